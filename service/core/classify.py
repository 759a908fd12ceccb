"""The classify core: `ClassifyService.classify(ClassifyRequest) -> ClassifyResult`, transport-free.

Why one entry point: v1 (multipart, raw body, JSON), the v1 fast path and v2 used to run their own
copies of the flow (budget parse and resolve, decode, scheduler call). Every adapter now builds a
`ClassifyRequest` from its wire format and calls this once; the adapter renders the result. The
order is fixed here: options before pixels (a bad budget is reported without decoding anything),
then preprocess, then the scheduler under the request's deadline.

Readiness and shutdown state (`ready`, `closing`, `inflight`) and the global budget live here too,
so every protocol sees the same answer to "can I serve?" and the same budget in force.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from service.core.artifact import Manifest
from service.core.budget import BudgetResolver, ResolvedBudget
from service.core.engine import ExitResult
from service.core.errors import (
    BoostServeError,
    DeadlineExceededError,
    NotReadyError,
    TooManyImagesError,
    ValidationFailedError,
)
from service.core.knobs import KNOBS, Budget, Knob, RequestOptions, parse_options
from service.core.live import LiveOperatingPoint
from service.core.memo import IdentityMemo
from service.core.preprocess import ImageInput, Preprocessor
from service.core.scheduler import Scheduler

if TYPE_CHECKING:
    from service.core.shadow import DriftControl

log = logging.getLogger("boostserve.classify")

#: Memo size for distinct request option sets (clients repeat a handful).
_MEMO_SIZE = 256


@dataclass(frozen=True)
class Classified:
    """One image's answer, in user terms (1-based exit)."""

    label: int
    confidence: float
    probabilities: np.ndarray  # (classes,) float32
    exit: int
    macs: int
    deadline_hit: bool


@dataclass(frozen=True)
class ClassifyRequest:
    """What every adapter hands the core: images and the knobs as received (text or JSON values).

    ``where`` names the place of the knobs in error messages ("query parameter", "parameters key").
    """

    images: ImageInput
    options: Mapping[str, Any] = field(default_factory=dict)
    where: str = "parameter"
    #: The adapter's own knobs (v1's top_k), parsed by the same rules; their values come back in
    #: `ClassifyResult.extras`.
    extra_knobs: tuple[Knob, ...] = ()


@dataclass(frozen=True)
class ClassifyResult:
    answers: list[Classified]
    budget: ResolvedBudget
    extras: Mapping[str, Any] = field(default_factory=dict)


#: Told of every answered request on the global budget: (the point it was served at, its results).
#: The live MAC controller (`service.core.live`) measures the live MACs per image from it.
GlobalAnswerHook = Callable[[ResolvedBudget, list[ExitResult]], None]

#: Asked before every admission with the request's image count; raises OverCapacityError to shed
#: (SLO mode sheds only beyond the cheapest allowed point, `service.core.live.control`).
ShedCheck = Callable[[int], None]


class BudgetObserver(Protocol):
    """Who hears of the global budget in force (the metrics' gauges)."""

    def set_budget(
        self, *, expected_macs: float | None, expected_accuracy: float | None, exit_fractions: list[float] | None
    ) -> None: ...


class ClassifyService:
    """The loaded model behind every protocol."""

    def __init__(
        self,
        *,
        manifest: Manifest,
        resolver: BudgetResolver,
        preprocessor: Preprocessor,
        scheduler: Scheduler,
        global_budget: ResolvedBudget,
        max_images_per_request: int,
        observer: BudgetObserver | None = None,
    ) -> None:
        self.manifest = manifest
        self.resolver = resolver
        self.preprocessor = preprocessor
        self.scheduler = scheduler
        self.global_budget = global_budget  # as set (settings, PUT, budget file)
        #: The point in force for requests on the global budget (the live controllers move it).
        self.live = LiveOperatingPoint(resolver, global_budget)
        self.global_answer_hooks: list[GlobalAnswerHook] = []
        #: Called for every answered request with (answered at, seconds from its arrival, `classify`'s
        #: `arrived`, to its answers), both time.monotonic(); SLO mode's shed limit reads them.
        self.answer_hooks: list[Callable[[float, float], None]] = []
        self.shed_check: ShedCheck | None = None
        #: Drift tightening of a global max_accuracy_drop from the shadow monitor (set by the app).
        self.drift: DriftControl | None = None
        self.admitted_images = 0  # images admitted since start (the SLO controller's arrival rate)
        self.max_images_per_request = max_images_per_request
        self.observer = observer
        self.ready = False
        self.closing = False  # SIGTERM received: readiness says no, admitted work is still answered
        self.inflight = 0  # requests inside classify (the boostserve_inflight_requests gauge reads it)
        self._budget_lock = asyncio.Lock()
        # (where, knobs, frozen options) -> (global budget it was resolved against, resolved, options)
        self._memo: dict[Any, tuple[ResolvedBudget, ResolvedBudget, RequestOptions]] = {}
        self._info_memo: IdentityMemo[ResolvedBudget, dict[str, Any]] = IdentityMemo(_MEMO_SIZE)

    @property
    def serving(self) -> bool:
        """Ready for new traffic: loaded and warm, and not shutting down (what readiness probes say)."""
        return self.ready and not self.closing

    def begin_shutdown(self) -> None:
        """Readiness says no from now on; admitted and draining work is still answered."""
        self.closing = True
        self.ready = False

    @property
    def calibrated(self) -> bool:
        return self.resolver.calibrated

    # -- budget ------------------------------------------------------------------------------------
    def resolve_options(
        self, options: Mapping[str, Any], where: str = "parameter", extra_knobs: tuple[Knob, ...] = ()
    ) -> tuple[ResolvedBudget, RequestOptions]:
        """Request knobs -> (budget in force for it, parsed options), memoised per distinct option set.

        Why the memo: most traffic repeats a handful of option sets, and parsing, resolving and
        describing them was a visible share of the server's Python time per request. An entry is
        used only while the global point it was resolved against is still in force (PUT /v1/budget
        and the live controllers replace that object); errors are never memoised.
        """
        names = tuple(k.name for k in extra_knobs)
        key: Any = (where, names, tuple(sorted((k, _frozen(v)) for k, v in options.items())))
        try:
            hit = self._memo.get(key)
        except TypeError:  # an unhashable value (a nested object): not memoised, the parser refuses it
            key, hit = None, None
        if hit is not None and hit[0] is self.live.current:
            return hit[1], hit[2]
        parsed = parse_options(options, allowed=(*KNOBS, *extra_knobs), where=where)
        resolved = self._resolve(parsed)
        if key is not None:
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            self._memo[key] = (self.live.current, resolved, parsed)
        return resolved, parsed

    def _resolve(self, options: RequestOptions) -> ResolvedBudget:
        """The request's own budget exactly as given, else the live point of the global budget.

        A request with its own budget knob is resolved on the held-out split and never moved by the
        live controllers (that is the promise of a per-request budget). A request that only flips
        early_exit against the global switch gets the global budget as set: with every stage
        running the thresholds do not matter, and with the global switch off no controller runs.
        """
        base = self.global_budget
        early_exit = base.early_exit if options.early_exit is None else options.early_exit
        if options.budget is None:
            if early_exit == base.early_exit:
                return self.live.current
            return ResolvedBudget(base.budget, base.thresholds, early_exit)
        return ResolvedBudget(options.budget, self.resolver.resolve(options.budget), early_exit)

    async def set_global_budget(self, budget: Budget | None, early_exit: bool | None = None) -> ResolvedBudget:
        """Replace the global budget and/or the global early-exit switch; returns what is in force."""
        async with self._budget_lock:
            current = self.global_budget
            if budget is not None:
                current = ResolvedBudget(budget, self.resolver.resolve(budget), current.early_exit)
            if early_exit is not None:
                current = ResolvedBudget(current.budget, current.thresholds, early_exit)
            self.global_budget = current
            self.live.rebase(current)
            self.publish_budget()
        log.info("global budget: %s, early_exit=%s", current.budget.describe(), current.early_exit)
        return current

    def publish_budget(self) -> None:
        if self.observer is None:
            return
        result = self.live.current.thresholds
        self.observer.set_budget(
            expected_macs=result.expected_macs,
            expected_accuracy=result.expected_accuracy,
            exit_fractions=None if result.exit_fractions is None else list(result.exit_fractions),
        )

    def budget_info(self, resolved: ResolvedBudget) -> dict[str, Any]:
        """The budget as given, thresholds in force and what calibration expects of them.

        Memoised per resolved-budget object (requests repeat a handful); treat the dict as read-only.
        """
        return self._info_memo.get(resolved, self._budget_info)

    def _budget_info(self, resolved: ResolvedBudget) -> dict[str, Any]:
        info = resolved.thresholds.to_json()
        expected_macs = _finite_or_none(info["expected_macs"])
        return {
            "budget": resolved.budget.to_json(),
            "effective_budget": None if resolved.effective is None else resolved.effective.to_json(),
            "degraded": resolved.degraded,
            "thresholds": info["thresholds"],
            "policy": info["policy"],
            "expected_accuracy": _finite_or_none(info["expected_accuracy"]),
            "expected_macs": expected_macs,
            "expected_macs_fraction": None if expected_macs is None else expected_macs / self.manifest.full_macs,
            "exit_fractions": info["exit_fractions"],
            "calibrated": self.calibrated,
            "early_exit": resolved.early_exit,
        }

    # -- classify ----------------------------------------------------------------------------------
    def check_count(self, count: int) -> None:
        """At least one image and at most the per-request limit (also used by adapters before reading)."""
        if count == 0:
            raise ValidationFailedError("no image in the request")
        if count > self.max_images_per_request:
            raise TooManyImagesError(f"{count} images in one request, the limit is {self.max_images_per_request}")

    def check_capacity(self) -> None:
        """Refuse now (503 / 429) what `classify` would refuse anyway, before the adapter parses.

        Why: under overload every refused request used to pay its JSON parse, base64 and decodes
        before the scheduler said no, and that work was the overload (goodput fell tenfold). The
        adapters call this once the body is read and before they parse it; `classify` applies the
        full rule (the request's image count) again.
        """
        self._admit(1)

    def _admit(self, count: int) -> None:
        """The one admission rule for `count` images: ready (or draining), and room in the scheduler.

        While draining (closing) requests still go to the scheduler: it answers what it admits and
        refuses (503) once stopped; only the readiness probes flip first.
        """
        if not self.ready and not self.closing:
            raise NotReadyError("the model is not ready (starting up)")
        self.scheduler.admit(count)
        if self.shed_check is not None:
            self.shed_check(count)

    async def classify(self, request: ClassifyRequest, arrived: float | None = None) -> ClassifyResult:
        """Options -> budget, admission, images -> tensor, scheduler -> answers (1-based exits).

        `arrived`: time.monotonic() when the transport had the request (its head), if it knows; the
        time `answer_hooks` hear of counts from there (else from this call)."""
        start = time.monotonic()
        resolved, options = self.resolve_options(request.options, request.where, request.extra_knobs)
        deadline_ms = options.deadline_ms
        count = len(request.images)
        self.check_count(count)
        self._admit(count)  # a request that will be refused is refused before it is decoded
        deadline = None if deadline_ms is None else start + deadline_ms / 1000.0
        limits = _DecodeLimits(start, deadline, deadline_ms, self.scheduler.request_timeout)
        images = await self.preprocessor.prepare(request.images, limits.remaining, limits.expired)  # (B, C, H, W)
        self.admitted_images += count
        self.inflight += 1
        try:  # the scheduler enforces the request timeout (one sweeper, no timer per request)
            results = await self.scheduler.submit(
                images,
                resolved.thresholds.as_array(),
                early_exit=resolved.early_exit,
                deadline=deadline,
                started=start,
                # On the global budget the early exits may be shadow-sampled (service.core.shadow),
                # tagged with the point they were answered at; a request's own budget never is.
                shadow=resolved.thresholds if options.budget is None and resolved.early_exit else None,
            )
        finally:
            self.inflight -= 1
        if self.answer_hooks:
            now = time.monotonic()
            took = now - (start if arrived is None else min(arrived, start))
            for answered in self.answer_hooks:
                answered(now, took)
        if options.budget is None and resolved.early_exit:
            for hook in self.global_answer_hooks:
                hook(resolved, results)
        answers = [
            Classified(
                label=int(r.probabilities.argmax()),
                confidence=float(r.confidence),
                probabilities=r.probabilities,
                exit=r.exit_index + 1,
                macs=int(r.macs),
                deadline_hit=r.deadline_hit,
            )
            for r in results
        ]
        return ClassifyResult(answers=answers, budget=resolved, extras=options.extras)


@dataclass(frozen=True)
class _DecodeLimits:
    """The request's own limits applied to its decodes: the client's deadline_ms and the server's
    request_timeout_s both count from arrival, decode included.

    A decode still running when the sooner one passes is stopped. Past the client's deadline there
    is nothing to answer from (no exit can run without pixels), so it is the client's 422, never a
    5xx; past the server's request timeout it is the same 504 as a timeout anywhere else.
    """

    start: float
    deadline: float | None
    deadline_ms: float | None
    request_timeout_s: float | None

    def _server_deadline(self) -> float | None:
        return None if self.request_timeout_s is None else self.start + self.request_timeout_s

    def _client_first(self) -> bool:
        server = self._server_deadline()
        return self.deadline is not None and (server is None or self.deadline <= server)

    def remaining(self) -> float | None:
        ends = [t for t in (self.deadline, self._server_deadline()) if t is not None]
        return None if not ends else min(ends) - time.monotonic()

    def expired(self, seconds: float) -> BoostServeError:
        if self._client_first():
            return ValidationFailedError(
                f"deadline_ms={self.deadline_ms:g} passed before the image was decoded; no exit can answer "
                "without pixels: allow more time or send a smaller image"
            )
        return DeadlineExceededError(f"request timeout ({self.request_timeout_s:g} s) passed while decoding")


def _frozen(value: Any) -> Any:
    """A hashable key that keeps the JSON type: 1, 1.0 and true are equal in Python, not to the parser."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return (type(value).__name__, value)


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
