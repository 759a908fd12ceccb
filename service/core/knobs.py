"""The budget vocabulary: ONE table of knobs and their parsing (standard library only).

Why one table: the knobs a client may send (budget knobs, the policy, `early_exit`, `deadline_ms`)
used to be written out in nine files, with ranges checked in up to five places and drifting apart.
Every adapter now reads this table: v1 query strings and JSON bodies, v2 `parameters`, the CLI
flags, the settings' default budget and the OpenAPI text. Adding a knob is a row in `KNOBS`, a
policy function in `service.core.policies` and a case in `service.core.budget.BudgetResolver`.
No numpy here, so command-line tools can build their flags from the table without loading it.

Two spellings of every value, the same everywhere:

* text (query strings, environment, CLI, and strings inside JSON): numbers as decimals,
  booleans `true`/`false`/`1`/`0` (any case), thresholds `0.9,0.8,never,0` where
  `never`/`inf`/`null`/`none`/empty mean "never exit here";
* JSON values: numbers, booleans, a list of numbers or nulls for thresholds.

Strictness (one message style everywhere): an unknown key, two budget knobs, a policy without a
knob that takes one, and `early_exit=false` together with a budget knob (it would be ignored) are
all `ValidationFailedError` naming the key and listing what is accepted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from service.core.errors import InvalidBudgetError, ValidationFailedError

__all__ = [
    "BUDGET_FIELD_KNOBS",
    "BUDGET_KNOBS",
    "DEADLINE_MS_MAX",
    "DROP_CONFIDENCE",
    "KNOBS",
    "KNOB_BY_NAME",
    "NEVER_WORDS",
    "POLICIES",
    "Budget",
    "Knob",
    "RequestOptions",
    "format_macs",
    "parse_bool",
    "parse_options",
    "parse_thresholds",
]

ValueKind = Literal["float", "int", "bool", "thresholds", "choice"]
KnobRole = Literal["budget", "policy", "request"]

#: Search policies for the knobs that take one.
POLICIES: tuple[str, ...] = ("optimal", "reference")
#: Threshold words for "never exit here".
NEVER_WORDS: frozenset[str] = frozenset({"", "never", "inf", "+inf", "null", "none"})
#: Default risk level of max_accuracy_drop: P(drop on new images > the allowed drop) <= 1 - this.
DROP_CONFIDENCE = 0.95
#: The longest deadline a request may ask for (ten minutes).
DEADLINE_MS_MAX = 600_000.0
_TRUE, _FALSE = frozenset({"true", "1"}), frozenset({"false", "0"})


@dataclass(frozen=True)
class Knob:
    """One row of the vocabulary.

    ``role``: "budget" knobs are mutually exclusive (a request names at most one); "policy" knobs
    refine a budget knob (``policy`` those with ``takes_policy``, ``drop_confidence`` those with
    ``takes_confidence``) and travel with it in budget objects; "request" knobs shape one request
    (early exit on/off, deadline) and are not part of the global budget. ``low``/``high`` bound numbers, with
    ``low_open``/``high_open`` for strict bounds.
    """

    name: str
    kind: ValueKind
    role: KnobRole
    description: str
    example: Any
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    needs_calibration: bool = False
    takes_policy: bool = False
    takes_confidence: bool = False
    #: The policy of a knob with ``takes_policy`` when none is named: the out-of-sample winner for
    #: that knob (docs/policies.md has the comparison that chose it).
    default_policy: str | None = None

    def range_text(self) -> str:
        """'in (0, 600000]', '>= 1', '' — for messages and the OpenAPI text."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return ""

    def parse(self, raw: Any) -> Any:
        """A text or JSON value -> the typed value; ValidationFailedError naming the knob."""
        if self.kind == "bool":
            return parse_bool(raw, self.name)
        if self.kind == "thresholds":
            return parse_thresholds(raw, self.name)
        if self.kind == "choice":
            if not isinstance(raw, str) or raw not in self.choices:
                raise ValidationFailedError(f"{self.name} must be one of {', '.join(self.choices)}, got {raw!r}")
            return raw
        value = _parse_int(raw, self.name) if self.kind == "int" else _parse_float(raw, self.name)
        if not self._in_range(value):
            raise ValidationFailedError(f"{self.name} must be {self.range_text()}, got {raw!r}")
        return value

    def _in_range(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def json_schema(self) -> dict[str, Any]:
        """The JSON-schema form of the value (v1 JSON body, PUT /v1/budget, OpenAPI)."""
        schema: dict[str, Any]
        if self.kind == "bool":
            schema = {"type": "boolean"}
        elif self.kind == "thresholds":
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": [{"type": "number"}, {"type": "null"}]}}
        elif self.kind == "choice":
            schema = {"type": "string", "enum": list(self.choices)}
        else:
            schema = {"type": "integer" if self.kind == "int" else "number"}
            if self.low is not None:
                schema["exclusiveMinimum" if self.low_open else "minimum"] = self.low
            if self.high is not None:
                schema["exclusiveMaximum" if self.high_open else "maximum"] = self.high
        return {**schema, "description": self.description, "examples": [self.example]}


KNOBS: tuple[Knob, ...] = (
    Knob(
        "budget_macs",
        "float",
        "budget",
        "average multiply-accumulates per image (held-out expected value); at least the first exit's "
        "cost, values above the full network's cost are clamped to it",
        2_500_000,
        low=0.0,
        low_open=True,
        needs_calibration=True,
        takes_policy=True,
        default_policy="reference",
    ),
    Knob(
        "max_accuracy_drop",
        "float",
        "budget",
        "accepted accuracy loss versus the full network, as a fraction (0.01 = one percentage point): "
        "the cheapest thresholds that an exact test on the calibration images certifies, so that the "
        "loss on new images exceeds it with probability at most 1 - drop_confidence",
        0.01,
        low=0.0,
        high=1.0,
        needs_calibration=True,
        takes_policy=True,
        takes_confidence=True,
        default_policy="optimal",
    ),
    Knob(
        "max_exit",
        "int",
        "budget",
        "anytime mode: every image answers at this exit (1-based); later stages never run",
        2,
        low=1,
    ),
    Knob(
        "thresholds",
        "thresholds",
        "budget",
        "one max-softmax threshold per exit: an image exits at the first exit whose confidence >= its "
        "threshold; null/never (or > 1) = never exit there; the last exit always answers",
        [0.9, 0.8, None, 0.0],
    ),
    Knob(
        "policy",
        "choice",
        "policy",
        "search used by budget_macs / max_accuracy_drop: 'reference' (budget_macs: the BoostNet paper's "
        "Eq. 9, the default; max_accuracy_drop: one shared threshold) or 'optimal' (budget_macs: direct "
        "threshold search; max_accuracy_drop: thresholds that relax with depth, the default)",
        "optimal",
        choices=POLICIES,
    ),
    Knob(
        "drop_confidence",
        "float",
        "policy",
        f"with max_accuracy_drop: the probability (default {DROP_CONFIDENCE:g}) that the loss on new images "
        "stays within the allowed drop; higher costs more compute",
        0.95,
        low=0.0,
        high=1.0,
        low_open=True,
        high_open=True,
    ),
    Knob(
        "early_exit",
        "bool",
        "request",
        "false: every stage runs for every image (A/B comparison); cannot be combined with a budget knob",
        True,
    ),
    Knob(
        "deadline_ms",
        "float",
        "request",
        "answer with the best exit reached by then (milliseconds from arrival, decoding included; one that "
        "passes before a worker has decoded the image is a 422)",
        50,
        low=0.0,
        high=DEADLINE_MS_MAX,
        low_open=True,
    ),
)
KNOB_BY_NAME: dict[str, Knob] = {k.name: k for k in KNOBS}
BUDGET_KNOBS: tuple[Knob, ...] = tuple(k for k in KNOBS if k.role == "budget")
#: The members of a budget object (JSON `budget`, PUT /v1/budget, the default budget): one budget
#: knob and its refiners.
BUDGET_FIELD_KNOBS: tuple[Knob, ...] = tuple(k for k in KNOBS if k.role in ("budget", "policy"))
_BUDGET_NAMES = ", ".join(k.name for k in BUDGET_KNOBS)
_POLICY_NAMES = ", ".join(k.name for k in BUDGET_KNOBS if k.takes_policy)
_CONFIDENCE_NAMES = ", ".join(k.name for k in BUDGET_KNOBS if k.takes_confidence)


# --------------------------------------------------------------------------------------------------
# value parsers (text and JSON forms)
# --------------------------------------------------------------------------------------------------
def parse_bool(raw: Any, name: str) -> bool:
    """True/False, or the text true/false/1/0 in any case; nothing else (no yes/on, no numbers)."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    raise ValidationFailedError(f"{name} must be a boolean: true or false (in text also 1 or 0), got {raw!r}")


def _parse_float(raw: Any, name: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise ValidationFailedError(f"{name} must be a number, got {raw!r}")
    try:
        value = float(raw.strip()) if isinstance(raw, str) else float(raw)
    except ValueError:
        raise ValidationFailedError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ValidationFailedError(f"{name} must be a finite number, got {raw!r}")
    return value


def _parse_int(raw: Any, name: str) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().isdigit():
        return int(raw.strip())
    raise ValidationFailedError(f"{name} must be a whole number, got {raw!r}")


def parse_thresholds(raw: Any, name: str = "thresholds") -> tuple[float | None, ...]:
    """'0.9,0.8,never,0' or [0.9, 0.8, null, 0] -> (0.9, 0.8, None, 0.0); None = never exit there."""
    items: Sequence[Any] = raw.split(",") if isinstance(raw, str) else raw if isinstance(raw, list | tuple) else ()
    if not items:
        raise ValidationFailedError(f"{name} must be a list of numbers or nulls, or text such as '0.9,0.8,never,0'")
    out: list[float | None] = []
    for position, item in enumerate(items, start=1):
        if item is None or (isinstance(item, str) and item.strip().lower() in NEVER_WORDS):
            out.append(None)
            continue
        value = _parse_float(item, f"{name}[{position}]")
        if value < 0:
            raise ValidationFailedError(f"{name}[{position}] must be >= 0 or never, got {item!r}")
        out.append(value)
    return tuple(out)


def format_macs(value: float) -> str:
    """30000000 -> '30M', 1.5e7 -> '15M', 2.5e9 -> '2.5G' (short, for logs and describe())."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.4g}{suffix}"
    return f"{value:.4g}"


# --------------------------------------------------------------------------------------------------
# Budget and request options
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """One budget knob and its (already parsed) value, plus the policy where the knob takes one.

    ``confidence``: `drop_confidence` as given (knobs with ``takes_confidence`` only); None means
    `DROP_CONFIDENCE`, and is kept None so that answers show the budget as it was given.
    """

    kind: str
    value: Any
    policy: str | None = None
    confidence: float | None = None

    @classmethod
    def parse(cls, data: Budget | Mapping[str, Any], default_policy: str | None = None) -> Budget:
        """A mapping of knobs (JSON or text values) -> Budget; exactly one budget knob.

        ``default_policy``: the policy of a knob that takes one when the mapping names none.
        """
        if isinstance(data, Budget):
            return data
        allowed = BUDGET_FIELD_KNOBS
        try:
            options = parse_options(data, allowed=allowed, where="budget field", default_policy=default_policy)
        except InvalidBudgetError:
            raise
        except ValidationFailedError as exc:
            raise InvalidBudgetError(exc.message) from exc
        if options.budget is None:
            raise InvalidBudgetError(f"give exactly one of {_BUDGET_NAMES}")
        return options.budget

    @classmethod
    def of(cls, **fields: Any) -> Budget:
        """``Budget.of(budget_macs=3e7)``: keyword form of :meth:`parse`."""
        return cls.parse(fields)

    @property
    def knob(self) -> Knob:
        return KNOB_BY_NAME[self.kind]

    @property
    def needs_calibration(self) -> bool:
        return self.knob.needs_calibration

    @property
    def risk_confidence(self) -> float:
        """The `drop_confidence` in force: as given, else `DROP_CONFIDENCE`."""
        return DROP_CONFIDENCE if self.confidence is None else self.confidence

    def to_json(self) -> dict[str, Any]:
        """The budget as given, in its JSON form (the `budget` member of answers and GET /v1/budget)."""
        out: dict[str, Any] = {self.kind: list(self.value) if self.kind == "thresholds" else self.value}
        if self.policy is not None:
            out["policy"] = self.policy
        if self.confidence is not None:
            out["drop_confidence"] = self.confidence
        return out

    def describe(self) -> str:
        """Short human form for logs, CLI output and metrics: 'budget_macs=30M (optimal)'."""
        if self.kind == "budget_macs":
            return f"budget_macs={format_macs(self.value)} ({self.policy})"
        if self.kind == "max_accuracy_drop":
            extra = "" if self.confidence is None else f", drop_confidence={self.confidence:g}"
            return f"max_accuracy_drop={self.value * 100:.4g}% ({self.policy}{extra})"
        if self.kind == "thresholds":
            shown = ["never" if v is None or v > 1.0 else f"{v:.4g}" for v in self.value]
            return f"thresholds=[{', '.join(shown)}]"
        return f"{self.kind}={self.value}"


@dataclass(frozen=True)
class RequestOptions:
    """What a request asked for: a budget override (None = the global one), early exit, deadline."""

    budget: Budget | None = None
    early_exit: bool | None = None
    deadline_ms: float | None = None
    #: Values of knobs outside `KNOBS` that the caller allowed (an adapter's own, e.g. v1's top_k).
    extras: Mapping[str, Any] = field(default_factory=dict)


def parse_options(
    raw: Mapping[str, Any],
    *,
    allowed: Iterable[Knob] = KNOBS,
    where: str = "parameter",
    default_policy: str | None = None,
) -> RequestOptions:
    """Validate a mapping of knobs (every adapter's one entry point) into RequestOptions.

    ``allowed`` narrows the vocabulary (e.g. the global budget has no deadline); ``where`` names the
    place in messages ("query parameter", "parameters key", ...). None values count as absent.
    ``default_policy`` (None: the knob's own `Knob.default_policy`) is the policy of a knob that
    takes one and names none.
    """
    table = {k.name: k for k in allowed}
    values: dict[str, Any] = {}
    for name, value in raw.items():
        knob = table.get(name)
        if knob is None:
            raise ValidationFailedError(f"unknown {where} {name!r}; accepted: {', '.join(table)}")
        if value is not None:
            values[name] = knob.parse(value)
    budget_names = [k.name for k in BUDGET_KNOBS if k.name in values]
    if len(budget_names) > 1:
        raise ValidationFailedError(f"give at most one budget knob ({_BUDGET_NAMES}), got {', '.join(budget_names)}")
    budget: Budget | None = None
    policy = values.get("policy")
    confidence = values.get("drop_confidence")
    if budget_names:
        knob = KNOB_BY_NAME[budget_names[0]]
        if policy is not None and not knob.takes_policy:
            raise ValidationFailedError(f"policy applies to {_POLICY_NAMES} only, not to {knob.name}")
        if confidence is not None and not knob.takes_confidence:
            raise ValidationFailedError(f"drop_confidence applies to {_CONFIDENCE_NAMES} only, not to {knob.name}")
        budget = Budget(
            knob.name,
            values[knob.name],
            (policy or default_policy or knob.default_policy or POLICIES[0]) if knob.takes_policy else None,
            confidence,
        )
    elif policy is not None:
        raise ValidationFailedError(f"policy needs a budget knob that takes one: {_POLICY_NAMES}")
    elif confidence is not None:
        raise ValidationFailedError(f"drop_confidence needs a budget knob that takes it: {_CONFIDENCE_NAMES}")
    early_exit = values.get("early_exit")
    if early_exit is False and budget is not None:
        raise ValidationFailedError(
            f"early_exit=false runs every stage, so {budget.kind} would be ignored: give one or the other"
        )
    extras = {name: value for name, value in values.items() if name not in KNOB_BY_NAME}
    return RequestOptions(budget=budget, early_exit=early_exit, deadline_ms=values.get("deadline_ms"), extras=extras)
