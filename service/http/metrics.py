"""Every Prometheus series of the service (the only module that imports prometheus_client).

Names and labels are the table in docs/architecture.md; dashboards and alerts are built on them,
so change them only together with deploy/. Each app gets its own CollectorRegistry, so several
apps in one test process never collide and /metrics shows exactly one app's series.

`Metrics` also implements the scheduler's observer protocol (`on_stage_batch`, `on_exits`);
stages arrive 0-based and are labelled 1-based ("1".."N"), like the `exit` field users see. Label
values come from closed sets only (route templates, error types, stage numbers), never from
request data.

Cost per request matters here (a 28x28 image costs ~0.2 ms of model work): exits arrive one call
per stage batch and, like the per-batch series, feed `ArrayHistogram`s (a whole array, or one value
n times, per call; prometheus_client's Histogram takes one value per call under several locks), and
the queue-depth and in-flight gauges are read from the scheduler and the runtime at scrape time
instead of being set on every change.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.utils import floatToGoString

from service.core.errors import ERROR_TYPES
from service.core.shadow import Expectation

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

#: HTTP latency: a 28x28 PNG is answered in ~1-3 ms; big uploads and deep exits under load take
#: tens to hundreds of ms; timeouts are seconds.
REQUEST_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
#: One ONNX Runtime stage run: tens of microseconds (tiny CPU stages) to ~100 ms (big batches).
STAGE_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Max softmax at exit: thresholds live mostly in 0.5..0.99, so resolve that range finely.
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.999, 1.0)


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "5xx"


class ArrayHistogram:
    """A Prometheus histogram observed a numpy array at a time (a custom collector).

    Same exposition as prometheus_client's Histogram (`_bucket{le}` cumulative, `_count`, `_sum`)
    without the `_created` series. Bucket i counts values <= buckets[i], as Prometheus defines it.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self._upper = np.asarray(sorted(buckets), dtype=np.float64)
        self._bounds: list[float] = self._upper.tolist()
        self._le = [floatToGoString(b) for b in self._bounds] + ["+Inf"]
        self._counts: dict[tuple[str, ...], np.ndarray] = {}  # per label values: (len(le),) int64
        self._sums: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()  # observations come from the loop, scrapes may not
        if not self.labelnames:
            self.labels()
        registry.register(self)

    def _series(self, labelvalues: tuple[str, ...]) -> np.ndarray:
        """The bucket counts of one series, created at zero (call with the lock held)."""
        counts = self._counts.get(labelvalues)
        if counts is None:
            counts = self._counts[labelvalues] = np.zeros(len(self._le), dtype=np.int64)
            self._sums[labelvalues] = 0.0
        return counts

    def labels(self, *values: str) -> None:
        """Create the series (at zero) so it is exported before the first observation."""
        with self._lock:
            self._series(values)

    def observe_many(self, values: np.ndarray, *labelvalues: str) -> None:
        bins = np.searchsorted(self._upper, values, side="left")  # (n,) bucket index, len(upper) = +Inf
        counts = np.bincount(bins, minlength=len(self._le))
        total = float(np.sum(values, dtype=np.float64))  # float32 confidences: sum in double
        with self._lock:
            self._series(labelvalues)[:] += counts
            self._sums[labelvalues] += total

    def observe(self, value: float, *labelvalues: str, count: int = 1) -> None:
        """One value (`count` times over): a bisect on the bounds, no numpy."""
        i = bisect.bisect_left(self._bounds, value)  # first bucket with bound >= value; len = +Inf
        with self._lock:
            self._series(labelvalues)[i] += count
            self._sums[labelvalues] += value * count

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            series = [(key, np.cumsum(counts).tolist(), self._sums[key]) for key, counts in self._counts.items()]
        for key, cumulative, total in sorted(series):
            family.add_metric(list(key), list(zip(self._le, cumulative, strict=True)), total)
        yield family


#: What happens to decode workers (service.core.decode_pool.DecodeStats), the `event` label's set.
DECODE_EVENTS = ("decoded", "killed", "crashed", "recycled", "refused")


class DecodePoolCollector:
    """The decode pool's counters and gauges, read from the pool at scrape time.

    Why read, not count: the pool is transport-free and keeps plain integers; exported before the
    pool is bound (zeros), so the families never appear or vanish with traffic.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.source: Any = None
        registry.register(self)

    def describe(self) -> list[Any]:
        return list(self._families(None))

    def collect(self) -> Iterator[Any]:
        yield from self._families(self.source)

    @staticmethod
    def _families(pool: Any) -> Iterator[Any]:
        events = CounterMetricFamily(
            "boostserve_decode_events",
            "images decoded by the decode workers, and decodes killed over their time limit, crashed (memory "
            "cap), workers recycled, images refused because the decode queue was full",
            labels=["event"],
        )
        for event in DECODE_EVENTS:
            events.add_metric([event], 0 if pool is None else getattr(pool.stats, event))
        yield events
        yield GaugeMetricFamily(
            "boostserve_decode_workers", "decode worker processes alive", value=0 if pool is None else len(pool.pids)
        )
        yield GaugeMetricFamily(
            "boostserve_decode_queue_depth",
            "images waiting for a decode worker",
            value=0 if pool is None else pool.pending,
        )


#: The `method` label's closed set. The method is request data: a client (or h11, which accepts
#: any token) sending made-up methods would otherwise create two series per method and route.
STANDARD_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def method_label(method: str) -> str:
    """The request method if standard, else "other"."""
    return method if method in STANDARD_METHODS else "other"


class Metrics:
    """The series of one app, on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._loop_lag_max = 0.0
        r = self.registry
        self.decode_pool = DecodePoolCollector(r)
        self.request_duration = Histogram(
            "boostserve_request_duration_seconds",
            "request latency by route template (gRPC: the method path) and protocol",
            ["route", "method", "status_class", "protocol"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "boostserve_requests",
            "requests (HTTP and gRPC)",
            ["route", "method", "status_class", "protocol"],
            registry=r,
        )
        self.errors = Counter("boostserve_errors", "error responses by error_type", ["error_type"], registry=r)
        self.images = Counter("boostserve_images", "images classified", registry=r)
        self.exits = Counter("boostserve_exits", "images answered at each exit (1-based)", ["stage"], registry=r)
        self._image_macs: ArrayHistogram | None = None
        self._stages = 0  # exits of the bound model (0 until bind_model)
        self._expectation: Expectation | None = None  # the shadow monitor's, for the point in force
        self.exit_confidence = ArrayHistogram(
            "boostserve_exit_confidence",
            "max softmax of the cumulative logits at the exit taken",
            CONFIDENCE_BUCKETS,
            ["stage"],
            registry=r,
        )
        self.stage_duration = ArrayHistogram(
            "boostserve_stage_duration_seconds",
            "wall time of one ONNX Runtime stage batch",
            STAGE_BUCKETS,
            ["stage"],
            registry=r,
        )
        self.stage_batch_size = ArrayHistogram(
            "boostserve_stage_batch_size", "images per stage batch", BATCH_BUCKETS, ["stage"], registry=r
        )
        # How well batching works: the cross-request batches and the merged survivor batches.
        self.multi_request_batches = Counter(
            "boostserve_multi_request_batches",
            "stage batches holding images of two or more requests",
            ["stage"],
            registry=r,
        )
        self.merged_batches = Counter(
            "boostserve_merged_batches",
            "stage batches combining images from two or more sources "
            "(stage 1: requests; deeper stages: the batches whose survivors they are)",
            ["stage"],
            registry=r,
        )
        self.merged_batch_images = Counter(
            "boostserve_merged_batch_images", "images in merged stage batches", ["stage"], registry=r
        )
        self.queue_depth = Gauge("boostserve_queue_depth", "images waiting per stage queue", ["stage"], registry=r)
        self.inflight = Gauge("boostserve_inflight_requests", "classification requests in progress", registry=r)
        self.deadline_hits = Counter(
            "boostserve_deadline_hits", "images answered early because their deadline passed", registry=r
        )
        self.budget_expected_macs = Gauge(
            "boostserve_budget_expected_macs", "expected MACs per image under the global budget", registry=r
        )
        self.budget_expected_accuracy = Gauge(
            "boostserve_budget_expected_accuracy",
            "expected (held-out) accuracy under the global budget",
            registry=r,
        )
        self.calibrated_exit_fraction = Gauge(
            "boostserve_calibrated_exit_fraction",
            "expected share of images exiting at each stage under the global budget",
            ["stage"],
            registry=r,
        )
        self.full_macs = Gauge("boostserve_full_macs", "MACs of the full network (all stages)", registry=r)
        # The live layer of the global budget (service.core.live); budget_expected_* above follow its
        # point in force, these say how far it is from the budget as set and why.
        self.operating_point_expected_drop = Gauge(
            "boostserve_operating_point_expected_drop",
            "held-out accuracy of the full network minus that of the global budget's point in force",
            registry=r,
        )
        self.degraded = Gauge(
            "boostserve_degraded", "1 while SLO mode serves the global budget at a cheaper point", registry=r
        )
        self.degraded_seconds = Counter("boostserve_degraded_seconds", "seconds spent degraded (SLO mode)", registry=r)
        self.degraded_requests = Counter(
            "boostserve_degraded_requests", "requests answered at a degraded point (SLO mode)", registry=r
        )
        self.degraded_images = Counter(
            "boostserve_degraded_images", "images answered at a degraded point (SLO mode)", registry=r
        )
        self.live_macs = Gauge(
            "boostserve_live_macs_per_image",
            "live MACs per image of the global budget_macs (the live MAC controller's weighted average)",
            registry=r,
        )
        self.slo_shed_limit = Gauge(
            "boostserve_slo_shed_limit_seconds",
            "SLO mode: the queue delay beyond which the cheapest allowed point sheds (adapts to answered p99)",
            registry=r,
        )
        self.slo_answered_p99 = Gauge(
            "boostserve_slo_answered_p99_seconds",
            "SLO mode: p99 of the requests answered in the last 0.5 s, head to answer (NaN: too few)",
            registry=r,
        )
        # NaN until SLO mode ticks: without a latency target there is no limit, and 0 would read as one.
        self.slo_shed_limit.set(float("nan"))
        self.slo_answered_p99.set(float("nan"))
        # The label-free accuracy monitor (service.core.shadow): shadow samples of the global budget's
        # early exits, what the calibration predicts for the point in force, the drift test and tightening.
        self.shadow_samples = Counter(
            "boostserve_shadow_samples",
            "early-exited images of the global budget also run to the last stage (by the exit that answered)",
            ["stage"],
            registry=r,
        )
        self.shadow_disagreements = Counter(
            "boostserve_shadow_disagreements",
            "shadow samples whose exit label differs from the full network's (by the exit that answered)",
            ["stage"],
            registry=r,
        )
        self.shadow_shed = Counter(
            "boostserve_shadow_shed",
            "sampled images not run to the end: shadow queue full, shadow batch failed, or shutdown",
            ["stage"],
            registry=r,
        )
        self.global_exits = Counter(
            "boostserve_global_budget_exits",
            "images answered at each exit on the global budget with early exit (the live exit mix the "
            "calibrated exit fractions predict)",
            ["stage"],
            registry=r,
        )
        self.shadow_expected = Gauge(
            "boostserve_shadow_expected_disagreement",
            "held-out disagreement with the full network among images answered at each early exit under the "
            "global budget's point in force: upper bound (not both right; the drift test's null) and lower bound "
            "(exactly one right)",
            ["stage", "bound"],
            registry=r,
        )
        self.shadow_expected_early = Gauge(
            "boostserve_shadow_expected_early_disagreement",
            "held-out disagreement among all early-exited images under the point in force (bounds as above)",
            ["bound"],
            registry=r,
        )
        self.shadow_drift_z = Gauge(
            "boostserve_shadow_drift_z",
            "one-sided z of the last drift window: live disagreement above the calibrated upper bound "
            "(NaN until a window completes; drift above 3.09)",
            registry=r,
        )
        self.shadow_live = Gauge(
            "boostserve_shadow_live_disagreement",
            "live disagreement rate among early-exited images of the last drift window (live exit mix)",
            registry=r,
        )
        self.drift_level = Gauge(
            "boostserve_drift_tightening_level",
            "drift tightening of a global max_accuracy_drop d: served as d / 2**level (0 = as certified)",
            registry=r,
        )
        self.loop_lag = Histogram(
            "boostserve_event_loop_lag_seconds",
            "how late the event loop ran a 50 ms timer: the wait a probe or a small request sees",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )
        self.loop_lag_max = Gauge(
            "boostserve_event_loop_lag_max_seconds", "the largest event loop lag since start", registry=r
        )
        self.ready = Gauge("boostserve_ready", "1 when models are loaded and warmed up", registry=r)
        self.model_info = Gauge(
            "boostserve_model_info",
            "the model being served (value is always 1)",
            ["model", "version", "stages", "providers", "exit_rule"],
            registry=r,
        )
        for error_type in sorted(ERROR_TYPES):
            self.errors.labels(error_type=error_type)
        self.ready.set(0)

    # -- model ---------------------------------------------------------------------------------
    def bind_model(
        self,
        *,
        name: str,
        version: str,
        cumulative_macs: Sequence[int],
        providers: Sequence[str],
        exit_rule: str,
    ) -> None:
        """Called once the manifest is loaded: model info, per-stage series, MACs buckets.

        The MACs histogram's buckets are the exits' cumulative MACs, so each bucket counts the
        images answered at or before one exit exactly.
        """
        stages = len(cumulative_macs)
        self.model_info.labels(
            model=name,
            version=version,
            stages=str(stages),
            providers=",".join(providers),
            exit_rule=exit_rule,
        ).set(1)
        self.full_macs.set(float(cumulative_macs[-1]))
        buckets = sorted({float(m) for m in cumulative_macs if m > 0}) or [1.0]
        if self._image_macs is None:
            self._image_macs = ArrayHistogram(
                "boostserve_image_macs",
                "MACs spent per classified image (buckets = cumulative MACs of each exit)",
                buckets,
                registry=self.registry,
            )
        for k in range(1, stages + 1):
            label = str(k)
            self.exits.labels(stage=label)
            self.exit_confidence.labels(label)
            self.stage_duration.labels(label)
            self.stage_batch_size.labels(label)
            for counter in (self.multi_request_batches, self.merged_batches, self.merged_batch_images):
                counter.labels(stage=label)
            self.global_exits.labels(stage=label)
            if k < stages:  # the last exit has nothing left to run
                for counter in (self.shadow_samples, self.shadow_disagreements, self.shadow_shed):
                    counter.labels(stage=label)
        self.shadow_drift_z.set(float("nan"))
        self.shadow_live.set(float("nan"))
        self._stages = stages
        self.set_shadow_expectation(self._expectation)  # the monitor may have told us before the model was bound

    def bind_live_gauges(self, *, queue_depths: Callable[[], Sequence[int]], inflight: Callable[[], int]) -> None:
        """Read queue depths per stage and requests in flight at scrape time (nothing per request)."""

        def depth_of(k: int) -> Callable[[], float]:
            return lambda: float(queue_depths()[k])

        for k in range(len(queue_depths())):
            self.queue_depth.labels(stage=str(k + 1)).set_function(depth_of(k))
        self.inflight.set_function(lambda: float(inflight()))

    def bind_decode_pool(self, pool: Any) -> None:
        """Export this DecodePool's counters (read at scrape time)."""
        self.decode_pool.source = pool

    def set_budget(
        self,
        *,
        expected_macs: float | None,
        expected_accuracy: float | None,
        exit_fractions: Sequence[float] | None,
    ) -> None:
        """The global budget changed (startup, PUT /v1/budget)."""
        self.budget_expected_macs.set(float("nan") if expected_macs is None else float(expected_macs))
        self.budget_expected_accuracy.set(float("nan") if expected_accuracy is None else float(expected_accuracy))
        if exit_fractions is not None:
            for k, fraction in enumerate(exit_fractions, start=1):
                self.calibrated_exit_fraction.labels(stage=str(k)).set(float(fraction))

    def observe_loop_lag(self, seconds: float) -> None:
        self.loop_lag.observe(seconds)
        if seconds > self._loop_lag_max:
            self._loop_lag_max = seconds
            self.loop_lag_max.set(seconds)

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)

    # -- the live layer (service.core.live.control.LiveObserver) ---------------------------------
    def set_operating_point(self, *, expected_macs: float | None, expected_drop: float | None, degraded: bool) -> None:
        """The global budget's point in force changed (expected_macs: in budget_expected_macs)."""
        self.operating_point_expected_drop.set(float("nan") if expected_drop is None else float(expected_drop))
        self.degraded.set(1 if degraded else 0)

    def add_degraded(self, *, seconds: float = 0.0, requests: int = 0, images: int = 0) -> None:
        if seconds > 0:
            self.degraded_seconds.inc(seconds)
        if requests:
            self.degraded_requests.inc(requests)
        if images:
            self.degraded_images.inc(images)

    def set_live_macs(self, macs_per_image: float | None) -> None:
        self.live_macs.set(float("nan") if macs_per_image is None else float(macs_per_image))

    def set_slo_shedding(self, *, shed_limit_s: float, answered_p99_s: float | None) -> None:
        self.slo_shed_limit.set(shed_limit_s)
        self.slo_answered_p99.set(float("nan") if answered_p99_s is None else answered_p99_s)

    # -- shadow monitor (service.core.shadow.ShadowObserver) ----------------------------------------
    def on_shadow_samples(self, stage: int, samples: int, disagreements: int) -> None:
        label = str(stage + 1)
        self._child(self.shadow_samples, label).inc(samples)
        if disagreements:
            self._child(self.shadow_disagreements, label).inc(disagreements)

    def on_shadow_shed(self, stage: int, count: int) -> None:
        self._child(self.shadow_shed, str(stage + 1)).inc(count)

    def on_global_exits(self, stage: int, count: int) -> None:
        self._child(self.global_exits, str(stage + 1)).inc(count)

    def set_shadow_expectation(self, expectation: Expectation | None) -> None:
        """The calibrated disagreement of the point in force (NaN without calibration or early exits)."""
        self._expectation = expectation
        nan = float("nan")
        early = max(self._stages - 1, 0) if expectation is None else len(expectation.answered)
        for bound in ("upper", "lower"):
            rates = [None] * early if expectation is None else expectation.rates(bound)
            for k, rate in enumerate(rates, start=1):
                self.shadow_expected.labels(stage=str(k), bound=bound).set(nan if rate is None else rate)
            rate = None if expectation is None else expectation.early_rate(bound)
            self.shadow_expected_early.labels(bound=bound).set(nan if rate is None else rate)

    def set_drift(self, z: float, live: float) -> None:
        self.shadow_drift_z.set(z)
        self.shadow_live.set(live)

    def set_drift_level(self, level: int) -> None:
        self.drift_level.set(level)

    # -- HTTP ----------------------------------------------------------------------------------
    def _child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, cached: labels() validates and locks on every call (a few
        per cent of the server's time in a profile); our label values come from closed sets."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def observe_request(self, route: str, method: str, status: int, seconds: float, protocol: str = "http") -> None:
        """One answered request. gRPC calls (protocol "grpc") are HTTP/2 POSTs to their method path,
        and their status class is the HTTP column of the same error table (service.core.status)."""
        cls = status_class(status)
        label = method_label(method)
        self._child(self.request_duration, route, label, cls, protocol).observe(seconds)
        self._child(self.requests, route, label, cls, protocol).inc()

    def count_error(self, error_type: str) -> None:
        self.errors.labels(error_type=error_type if error_type in ERROR_TYPES else "internal_error").inc()

    # -- scheduler observer protocol ----------------------------------------------------------------
    def on_stage_batch(self, stage: int, batch_size: int, seconds: float, requests: int, sources: int) -> None:
        label = str(stage + 1)
        self.stage_duration.observe(seconds, label)
        self.stage_batch_size.observe(batch_size, label)
        if requests > 1:
            self._child(self.multi_request_batches, label).inc()
        if sources > 1:
            self._child(self.merged_batches, label).inc()
            self._child(self.merged_batch_images, label).inc(batch_size)

    def on_exits(self, stage: int, confidences: np.ndarray, macs: float, deadline_hit: bool) -> None:
        label = str(stage + 1)
        n = len(confidences)
        self.images.inc(n)
        self._child(self.exits, label).inc(n)
        self.exit_confidence.observe_many(confidences, label)
        if self._image_macs is not None:
            self._image_macs.observe(macs, count=n)
        if deadline_hit:
            self.deadline_hits.inc(n)

    # -- exposition ----------------------------------------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self.registry)
