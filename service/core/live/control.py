"""`LiveControl`: runs the live controllers on the event loop and applies their points.

One task ticks every `tick_s` (loop time), reads the signals (the scheduler's queue delay, backlog
and per-stage counters; the images admitted and answered; the process's CPU time), asks the pure controllers
(`service.core.live.macs`, `service.core.live.slo`) for a point, resolves a new point in a worker
thread (a `budget_macs` reference answer can take tens of ms, the loop must not wait for it) and
hands it to `LiveOperatingPoint`.

* Live MAC budget: on while the global budget is a `budget_macs` with early exit on (and the
  model is calibrated); fed from every answered request on the global budget that was not
  degraded (a degraded answer is cheap because of load, not because of the mix).
* SLO mode: on with a latency target. Its queue signal is the larger of the scheduler's oldest
  waiting image and the event loop's lag (how late the tick's own timer fired): with the loop busy
  parsing HTTP, requests wait before they reach the scheduler, where its queue cannot see them (the
  first open-loop runs admitted requests with a p99 of seconds while the scheduler's queue looked
  short). The ladder is rebuilt whenever the adjusted point changes:
  rung 0 is `LiveOperatingPoint.adjusted`, then `max_accuracy_drop` points with allowed drops on a
  geometric grid (x1.5) from the global budget's own drop (or 0.1 %) up to the floor, each kept
  only if strictly cheaper than the rung before (held-out expected MACs). Each rung carries the
  guarantee of its knob: the drop on new images exceeds its d <= floor with probability at most
  1 − drop_confidence, so the floor is a promise, not only a held-out number.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from service.core.budget import ResolvedBudget
from service.core.engine import ExitResult
from service.core.errors import BoostServeError, OverCapacityError
from service.core.knobs import Budget
from service.core.live.latency import LatencyWindow
from service.core.live.macs import MacController, MacControllerConfig
from service.core.live.slo import Rung, Signals, SloConfig, SloController

if TYPE_CHECKING:
    from service.core.classify import ClassifyService

__all__ = ["LiveControl", "LiveObserver", "LiveSettings", "running", "slo_ladder"]

log = logging.getLogger("boostserve.live")

#: Allowed drops of the SLO ladder grow by this factor per rung.
LADDER_STEP = 1.5
#: The first rung below a global budget that has no allowed drop of its own.
LADDER_START = 0.001


@dataclass(frozen=True)
class LiveSettings:
    live_budget: bool = True
    window: int = 2000  # images (the MAC controller's EWMA)
    latency_target_s: float | None = None  # SLO mode off when None
    max_drop_under_load: float = 0.03
    tick_s: float = 0.1


class LiveObserver(Protocol):
    """Who hears of the live layer (the metrics)."""

    def set_operating_point(self, *, expected_macs: float | None, expected_drop: float | None, degraded: bool) -> None:
        """The point in force changed."""
        ...

    def add_degraded(self, *, seconds: float = 0.0, requests: int = 0, images: int = 0) -> None:
        """Time spent degraded, and requests / images answered degraded."""
        ...

    def set_live_macs(self, macs_per_image: float | None) -> None:
        """The MAC controller's weighted live MACs per image (global budget)."""
        ...

    def set_slo_shedding(self, *, shed_limit_s: float, answered_p99_s: float | None) -> None:
        """SLO mode's shed limit and the answered p99 it was read against (None: too few answers)."""
        ...


def full_accuracy(service: ClassifyService) -> float | None:
    cal = service.resolver.calibration
    return None if cal is None else float(cal.correct[-1].mean())


def expected_drop(resolved: ResolvedBudget, full: float | None) -> float | None:
    acc = resolved.thresholds.expected_accuracy
    return None if full is None or acc is None or not math.isfinite(acc) else max(0.0, full - float(acc))


def slo_ladder(service: ClassifyService, adjusted: ResolvedBudget, floor: float) -> list[Budget | None]:
    """The SLO ladder below `adjusted` (rung 0 = None: serve `adjusted` itself); blocking, run in a thread."""
    rungs: list[Budget | None] = [None]
    if not service.calibrated:
        return rungs
    base = adjusted.budget
    if base.kind == "max_accuracy_drop":
        policy, confidence, drop = base.policy, base.confidence, float(base.value)
    else:
        policy, confidence, drop = None, None, LADDER_START / LADDER_STEP
    last = adjusted.thresholds.expected_macs
    drops: list[float] = []
    d = drop * LADDER_STEP
    while d < floor:
        drops.append(float(f"{d:.3g}"))
        d *= LADDER_STEP
    drops.append(float(floor))
    for d in drops:
        fields: dict[str, object] = {"max_accuracy_drop": d}
        if policy is not None:
            fields["policy"] = policy
        if confidence is not None:
            fields["drop_confidence"] = confidence
        budget = Budget.of(**fields)
        macs = service.resolver.resolve(budget).expected_macs
        if macs is not None and (last is None or macs < last):
            rungs.append(budget)
            last = macs
    return rungs


class LiveControl:
    """The controllers of one `ClassifyService`, ticked by `run()`."""

    def __init__(self, service: ClassifyService, settings: LiveSettings, observer: LiveObserver | None = None) -> None:
        self.service = service
        self.settings = settings
        self.observer = observer
        self.full_accuracy = full_accuracy(service)
        self.mac: MacController | None = None
        self.slo: SloController | None = None
        self._ladder: list[Budget | None] = [None]
        self._ladder_for: ResolvedBudget | None = None
        self._base: ResolvedBudget | None = None
        self._prev: tuple[float, int, int, list[tuple[int, float]], bool, float] | None = None
        self._busy = False  # a resolution is running in a worker thread
        #: How late this task's own timer fired at the last tick (s): the event loop's backlog, i.e.
        #: the wait of requests not yet parsed, which the scheduler's queue cannot see.
        self.loop_lag = 0.0
        service.global_answer_hooks.append(self._on_answers)
        #: What answered requests took (time.monotonic()), read each tick by SLO mode's shed limit.
        self.latencies = LatencyWindow(SloConfig.latency_window_s)
        self._refused = 0  # images refused by the shed rule since the last tick
        if settings.latency_target_s is not None:
            service.shed_check = self._shed_check
            service.answer_hooks.append(self.latencies.add)
        service.live.subscribe(self._on_point)

    # -- hooks (event loop) ------------------------------------------------------------------------------
    def _on_point(self, resolved: ResolvedBudget) -> None:
        self.service.publish_budget()
        if self.observer is not None:
            self.observer.set_operating_point(
                expected_macs=resolved.thresholds.expected_macs,
                expected_drop=expected_drop(resolved, self.full_accuracy),
                degraded=resolved.degraded,
            )

    def _on_answers(self, resolved: ResolvedBudget, results: list[ExitResult]) -> None:
        if resolved.degraded:
            if self.observer is not None:
                self.observer.add_degraded(requests=1, images=len(results))
            return
        mac = self.mac
        expected = resolved.thresholds.expected_macs
        if mac is None or expected is None or resolved.budget is not self.service.global_budget.budget:
            return
        mac.observe(len(results), float(sum(r.macs for r in results)), float(expected))

    def _shed_check(self, count: int) -> None:
        slo = self.slo
        if slo is None:
            return
        delay = max(self.service.scheduler.queue_delay(), self.loop_lag)
        if slo.should_shed(delay):
            self._refused += count
            raise OverCapacityError(
                "overloaded at the cheapest allowed operating point (SLO mode); retry later",
                retry_after=max(0.1, round(delay, 1)),
            )

    # -- the tick ------------------------------------------------------------------------------------------
    def _sync_base(self) -> None:
        """A new global budget: fresh controllers (the live layer dropped its adjustments already)."""
        base = self.service.global_budget
        if base is self._base:
            return
        self._base = base
        self.mac = None
        b = base.budget
        cal = self.service.resolver.calibration
        if self.settings.live_budget and base.early_exit and b.kind == "budget_macs" and cal is not None:
            macs = [float(m) for m in cal.cumulative_macs]
            config = MacControllerConfig(
                budget_macs=min(float(b.value), macs[-1]),
                min_macs=macs[0],
                max_macs=macs[-1],
                window=self.settings.window,
            )
            expected = base.thresholds.expected_macs or config.budget_macs
            self.mac = MacController(config, config.budget_macs, float(expected))

    def _signals(self, now: float) -> Signals:
        scheduler = self.service.scheduler
        stages = [(s.items, s.seconds) for s in scheduler.stats.stages]
        admitted = self.service.admitted_images
        backlog = scheduler.pending
        measured = max(scheduler.queue_delay(), self.loop_lag)
        slo = self.slo
        delay = measured if slo is None else max(measured, slo.predicted_wait(backlog))
        # Saturation from the queue itself, never from the prediction: the capacity learnt while
        # saturated feeds the prediction, and a prediction that made itself "saturated" would learn
        # from the few requests it let in (shedding) and shed everything.
        busy = backlog > 0 and measured > (0.0 if slo is None else slo.config.delay_low)
        prev = self._prev
        cpu = time.process_time()
        self._prev = (now, admitted, backlog, stages, busy, cpu)
        refused, self._refused = self._refused, 0
        latency = None
        if slo is not None:
            cfg = slo.config
            latency = self.latencies.quantile(time.monotonic(), cfg.latency_quantile, cfg.min_latency_samples)
        if prev is None:
            return Signals(now, delay, backlog, 0, 0, [None] * len(stages), False, latency, refused)
        _, prev_admitted, prev_backlog, prev_stages, prev_busy, prev_cpu = prev
        per_image: list[float | None] = []
        for (items, seconds), (items0, seconds0) in zip(stages, prev_stages, strict=True):
            per_image.append((seconds - seconds0) / (items - items0) if items > items0 else None)
        new = admitted - prev_admitted
        done = max(0, prev_backlog + new - backlog)
        return Signals(now, delay, backlog, new, done, per_image, busy and prev_busy, latency, refused, cpu - prev_cpu)

    async def tick(self, now: float, dt: float, loop_lag: float = 0.0) -> None:
        """One control step at loop time `now`, `dt` seconds after the previous one; `loop_lag`: how
        late the sleep before it ended (the time the tick itself spent is not lag)."""
        self.loop_lag = max(0.0, loop_lag)
        service = self.service
        live = service.live
        self._sync_base()
        if not service.global_budget.early_exit:
            return
        if self.observer is not None:
            if live.degraded and dt > 0:
                self.observer.add_degraded(seconds=dt)
            self.observer.set_live_macs(None if self.mac is None else self.mac.live_macs)
        if self.settings.latency_target_s is not None:
            await self._tick_slo(now)
        if self.mac is not None and not live.degraded:
            await self._tick_macs()

    async def _tick_slo(self, now: float) -> None:
        live = self.service.live
        if self._ladder_for is not live.adjusted:
            adjusted = live.adjusted
            ladder = await asyncio.to_thread(slo_ladder, self.service, adjusted, self.settings.max_drop_under_load)
            if adjusted is not live.adjusted:
                return  # moved while the ladder was built: rebuild next tick
            rungs = [Rung.from_exit_fractions(_fractions(self.service, adjusted, b)) for b in ladder]
            target = self.settings.latency_target_s
            assert target is not None
            previous = self.slo
            self.slo = SloController(SloConfig(latency_target_s=target), rungs)
            if previous is not None:  # keep what was learnt of the rates, and the degradation
                self.slo.arrival_rate, self.slo.overhead = previous.arrival_rate, previous.overhead
                self.slo.saturated_once = previous.saturated_once
                self.slo.stage_seconds = previous.stage_seconds
                self.slo.shed_delay = previous.shed_delay
                self.slo.rung = min(previous.rung, self.slo.floor)
            self._ladder, self._ladder_for = ladder, adjusted
        slo = self.slo
        assert slo is not None
        signals = self._signals(now)
        rung = slo.update(signals)
        if self.observer is not None:
            self.observer.set_slo_shedding(shed_limit_s=slo.shed_delay, answered_p99_s=signals.latency)
        wanted = self._ladder[rung]
        current = live.current.effective if live.degraded else None
        if wanted != current:
            live.degrade(wanted)

    async def _tick_macs(self) -> None:
        mac = self.mac
        assert mac is not None
        wanted = mac.target()
        if wanted is None or self._busy:
            return
        base = self.service.global_budget
        budget = Budget.of(budget_macs=float(f"{wanted:.6g}"), policy=base.budget.policy)
        self._busy = True
        try:
            resolved = await asyncio.to_thread(self.service.resolver.resolve, budget)
        except BoostServeError as exc:
            log.warning("live MAC budget: cannot resolve %s: %s", budget.describe(), exc)
            return
        finally:
            self._busy = False
        if base is not self.service.global_budget or self.mac is not mac:
            return  # the global budget changed meanwhile
        self.service.live.adjust("macs", budget)
        mac.moved_to(float(budget.value), float(resolved.expected_macs or budget.value))

    async def run(self, clock: Callable[[], float] | None = None) -> None:
        """Tick forever (cancelled at shutdown); a failing tick is logged, the next one runs."""
        loop = asyncio.get_running_loop()
        now_of = clock or loop.time
        last = now_of()
        while True:
            before = now_of()
            await asyncio.sleep(self.settings.tick_s)
            now = now_of()
            try:
                await self.tick(now, now - last, now - before - self.settings.tick_s)
            except Exception:
                log.exception("live control tick")
            last = now


def _fractions(service: ClassifyService, adjusted: ResolvedBudget, budget: Budget | None) -> list[float]:
    result = adjusted.thresholds if budget is None else service.resolver.resolve(budget)
    if result.exit_fractions is not None:
        return [float(f) for f in result.exit_fractions]
    n = service.manifest.num_stages  # uncalibrated: assume every image runs every stage
    return [0.0] * (n - 1) + [1.0]


@asynccontextmanager
async def running(
    service: ClassifyService, settings: LiveSettings, observer: LiveObserver | None = None
) -> AsyncIterator[LiveControl]:
    """Run the controllers until the block ends."""
    control = LiveControl(service, settings, observer)
    task = asyncio.create_task(control.run(), name="boostserve-live-control")
    try:
        yield control
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
