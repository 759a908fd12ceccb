"""What the routes share: the loaded model, the global budget, and the classify path.

Why a separate object (not code in the routes): v1 and v2 classify the same way (resolve the
budget, preprocess, submit to the scheduler under a deadline, count), and the routes stay thin
adapters between HTTP shapes and this object. It lives on `app.state.runtime`; the lifespan in
`service.http.app` builds it and flips `ready`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np

from service.core.artifact import Manifest
from service.core.budget import Budget, BudgetResolver
from service.core.errors import (
    BoostServeError,
    NotReadyError,
    TooManyImagesError,
    ValidationFailedError,
)
from service.core.policies import ThresholdResult
from service.core.preprocess import INLINE_DECODE_PIXELS, Preprocessor
from service.http.metrics import Metrics
from service.http.settings import Settings
from service.http.v1.render import budget_info_json

log = logging.getLogger("boostserve.runtime")

BUDGET_KEYS = ("budget_macs", "max_accuracy_drop", "max_exit", "thresholds")
NEEDS_CALIBRATION = ("budget_macs", "max_accuracy_drop")


@dataclass(frozen=True)
class ResolvedBudget:
    budget: Budget
    thresholds: ThresholdResult
    early_exit: bool


@dataclass(frozen=True)
class Classified:
    """One image's answer, in user terms (1-based exit)."""

    label: int
    confidence: float
    probabilities: np.ndarray
    exit: int
    macs: int
    deadline_hit: bool


@dataclass
class Runtime:
    settings: Settings
    manifest: Manifest
    engine: Any
    scheduler: Any
    resolver: BudgetResolver
    preprocessor: Preprocessor
    metrics: Metrics
    calibrated: bool
    global_budget: ResolvedBudget
    ready: bool = False
    closing: bool = False  # SIGTERM received: readiness probes say 503, admitted work still answered
    inflight: int = 0  # requests inside classify (the boostserve_inflight_requests gauge reads it)
    _budget_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # (request budget fields, early_exit) -> (global budget it was resolved against, resolved, info JSON)
    _resolve_cache: dict[Any, tuple[ResolvedBudget, ResolvedBudget, bytes]] = field(default_factory=dict)

    # -- budget --------------------------------------------------------------------------------
    def parse_budget(self, fields: Mapping[str, Any]) -> Budget | None:
        """Budget override from request fields; None when the request names none."""
        given = {k: v for k, v in fields.items() if v is not None and (k in BUDGET_KEYS or k == "policy")}
        if not any(k in given for k in BUDGET_KEYS):
            if "policy" in given:
                raise ValidationFailedError(
                    "a policy needs a budget: give one of budget_macs, max_accuracy_drop, max_exit, thresholds"
                )
            return None
        if not self.calibrated:
            needs = [k for k in NEEDS_CALIBRATION if k in given]
            if needs:
                raise ValidationFailedError(
                    f"{needs[0]} needs calibration data and this artifact has none; "
                    "use max_exit or thresholds, or re-export the model with --data"
                )
        return Budget.parse(given)

    def resolve(self, budget: Budget | None, early_exit: bool | None) -> ResolvedBudget:
        effective_early_exit = self.global_budget.early_exit if early_exit is None else early_exit
        if budget is None:
            if effective_early_exit == self.global_budget.early_exit:
                return self.global_budget
            return ResolvedBudget(self.global_budget.budget, self.global_budget.thresholds, effective_early_exit)
        return ResolvedBudget(budget, self.resolver.resolve(budget), effective_early_exit)

    def resolve_fields(self, fields: Mapping[str, Any], early_exit: bool | None) -> tuple[ResolvedBudget, bytes]:
        """`parse_budget` + `resolve` + `budget_info` as JSON, memoised per distinct request budget.

        Why: most traffic repeats a handful of budgets (the global one, a few knobs), and parsing,
        resolving and describing them was ~13 % of the server's Python time per request. An entry
        is used only while the global budget it was resolved against is still in force (PUT
        /v1/budget replaces that object), and errors are never cached.
        """
        key: Any = (tuple(sorted((k, _frozen(v)) for k, v in fields.items() if v is not None)), early_exit)
        try:
            hit = self._resolve_cache.get(key)
        except TypeError:  # a value that cannot be a key (not one our parsers produce): not memoised
            key, hit = None, None
        if hit is not None and hit[0] is self.global_budget:
            return hit[1], hit[2]
        resolved = self.resolve(self.parse_budget(fields), early_exit)
        info_json = budget_info_json(self.budget_info(resolved))
        if key is not None:
            if len(self._resolve_cache) >= 256:
                self._resolve_cache.clear()
            self._resolve_cache[key] = (self.global_budget, resolved, info_json)
        return resolved, info_json

    async def set_global_budget(self, budget: Budget) -> ResolvedBudget:
        async with self._budget_lock:
            resolved = ResolvedBudget(budget, self.resolver.resolve(budget), self.global_budget.early_exit)
            self.global_budget = resolved
            self.publish_budget()
        log.info("global budget changed to %s", budget_json(budget))
        return resolved

    def set_global_early_exit(self, early_exit: bool) -> None:
        """Flip the global A/B switch (every stage runs when false)."""
        current = self.global_budget
        self.global_budget = ResolvedBudget(current.budget, current.thresholds, early_exit)
        log.info("global early_exit set to %s", early_exit)

    def publish_budget(self) -> None:
        result = self.global_budget.thresholds
        self.metrics.set_budget(
            expected_macs=_opt_float(getattr(result, "expected_macs", None)),
            expected_accuracy=_opt_float(getattr(result, "expected_accuracy", None)),
            exit_fractions=_opt_list(getattr(result, "exit_fractions", None)),
        )

    def budget_info(self, resolved: ResolvedBudget) -> dict[str, Any]:
        """JSON for responses: the budget as given, thresholds in force and expectations."""
        info = dict(resolved.thresholds.to_json())
        expected_macs = _opt_float(info.get("expected_macs"))
        full = float(self.manifest.full_macs) or 1.0
        return {
            "budget": budget_json(resolved.budget),
            "thresholds": info.get("thresholds", []),
            "policy": info.get("policy"),
            "expected_accuracy": _finite_or_none(info.get("expected_accuracy")),
            "expected_macs": _finite_or_none(expected_macs),
            "expected_macs_fraction": None if expected_macs is None else _finite_or_none(expected_macs / full),
            "exit_fractions": info.get("exit_fractions"),
            "calibrated": self.calibrated,
            "early_exit": resolved.early_exit,
        }

    # -- classify ------------------------------------------------------------------------------
    def check_count(self, count: int) -> None:
        limit = self.settings.max_images_per_request
        if count == 0:
            raise ValidationFailedError("no image in the request")
        if count > limit:
            raise TooManyImagesError(f"{count} images in one request, the limit is {limit}")

    async def preprocess(self, blobs: Sequence[bytes]) -> np.ndarray:
        """Decode images: small ones on the event loop (cheaper than a thread hop), big ones in
        the threadpool so one large upload never stalls other requests."""
        self.check_count(len(blobs))
        pre = self.preprocessor
        out = np.empty((len(blobs), *pre.shape), dtype=np.float32)
        for i, blob in enumerate(blobs):
            try:
                if pre.decode_plain_png(blob, out=out[i]) is not None:
                    continue
                image = pre.open(blob)
                if pre.pixels(image) <= INLINE_DECODE_PIXELS:
                    out[i] = pre.to_tensor(image)
                else:
                    out[i] = await anyio.to_thread.run_sync(pre.to_tensor, image)
            except BoostServeError as exc:
                if len(blobs) > 1:
                    exc.message = f"image {i}: {exc.message}"
                    exc.args = (exc.message,)
                raise
        return out

    async def classify(
        self, images: np.ndarray, resolved: ResolvedBudget, deadline_ms: float | None
    ) -> list[Classified]:
        # While draining (closing) requests still go to the scheduler: it answers what it admits
        # and refuses (503) once stopped; only the readiness probes flip first.
        if not self.ready and not self.closing:
            raise NotReadyError("the model is not ready (starting up)")
        deadline: float | None = None
        if deadline_ms is not None:
            deadline = time.monotonic() + deadline_ms / 1000.0
        thresholds = resolved.thresholds.as_array()
        self.inflight += 1
        try:  # the scheduler enforces settings.request_timeout_s (one sweeper, no timer per request)
            results = await self.scheduler.submit(images, thresholds, early_exit=resolved.early_exit, deadline=deadline)
        finally:
            self.inflight -= 1
        cumulative = self.manifest.cumulative_macs
        out: list[Classified] = []
        for r in results:
            probabilities = np.asarray(r.probabilities, dtype=np.float32)
            exit_index = int(r.exit_index)
            out.append(
                Classified(
                    label=int(probabilities.argmax()),
                    confidence=float(r.confidence),
                    probabilities=probabilities,
                    exit=exit_index + 1,
                    macs=int(getattr(r, "macs", cumulative[exit_index])),
                    deadline_hit=bool(getattr(r, "deadline_hit", False)),
                )
            )
        return out


def budget_json(budget: Budget) -> dict[str, Any]:
    """The budget as given; `policy` only where it matters (budget_macs, max_accuracy_drop)."""
    raw = budget.model_dump(mode="json", exclude_none=True)
    if not budget.uses_policy:
        raw.pop("policy", None)
    return raw


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _opt_list(value: Any) -> list[float] | None:
    return None if value is None else [float(v) for v in value]
