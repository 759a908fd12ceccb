"""service.http.metrics: the array-fed histogram exports what prometheus_client's Histogram would."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.http.metrics import CONFIDENCE_BUCKETS, ArrayHistogram, Metrics


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == name]
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples if not s.name.endswith("_created")
    }


def test_array_histogram_matches_prometheus_client_histogram() -> None:
    rng = np.random.default_rng(0)
    # Values exactly on the bounds too: Prometheus buckets are "less than or equal".
    values = np.concatenate([rng.uniform(0, 1, 500), np.asarray(CONFIDENCE_BUCKETS), [0.0, 1.0, 1.0]])
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    array_histogram = ArrayHistogram("conf", "doc", CONFIDENCE_BUCKETS, ["stage"], registry=ours)
    histogram = Histogram("conf", "doc", ["stage"], buckets=CONFIDENCE_BUCKETS, registry=theirs)
    for stage, part in (("1", values[:200]), ("2", values[200:]), ("1", values[300:310])):
        array_histogram.observe_many(part.astype(np.float32), stage)
        for v in part.astype(np.float32).tolist():
            histogram.labels(stage=stage).observe(v)
    got, want = samples(ours, "conf"), samples(theirs, "conf")
    assert got.keys() == want.keys()
    for key, value in want.items():
        if key[0].endswith("_sum"):  # summed in another order: equal up to rounding
            assert abs(got[key] - value) < 1e-9 * value, key
        else:
            assert got[key] == value, key


def test_single_observations_match_too() -> None:
    """`observe(value, count=n)` (per-batch series, MACs per exit) is n observations of value."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    bounds = (1, 2, 4, 8, 16, 32)
    array_histogram = ArrayHistogram("size", "doc", bounds, ["stage"], registry=ours)
    histogram = Histogram("size", "doc", ["stage"], buckets=bounds, registry=theirs)
    for value, count, stage in ((1, 1, "1"), (32, 3, "1"), (5, 2, "2"), (33, 1, "2"), (8, 1, "1")):
        array_histogram.observe(value, stage, count=count)
        for _ in range(count):
            histogram.labels(stage=stage).observe(value)
    assert samples(ours, "size") == samples(theirs, "size")


def test_series_exist_before_any_observation() -> None:
    registry = CollectorRegistry()
    unlabelled = ArrayHistogram("macs", "doc", [1.0, 2.0], registry=registry)
    labelled = ArrayHistogram("conf", "doc", [0.5], ["stage"], registry=registry)
    labelled.labels("1")
    assert samples(registry, "macs")[("macs_count", ())] == 0
    assert samples(registry, "conf")[("conf_bucket", (("le", "+Inf"), ("stage", "1")))] == 0
    unlabelled.observe_many(np.asarray([3.0, 1.5]))
    assert samples(registry, "macs")[("macs_bucket", (("le", "2.0"),))] == 1
    assert samples(registry, "macs")[("macs_count", ())] == 2
    assert samples(registry, "macs")[("macs_sum", ())] == 4.5


def test_queue_depth_and_inflight_are_read_at_scrape_time() -> None:
    metrics = Metrics()
    depths, inflight = [0, 0, 0], [0]
    metrics.bind_live_gauges(queue_depths=lambda: depths, inflight=lambda: inflight[0])
    depths[1], inflight[0] = 7, 3
    assert samples(metrics.registry, "boostserve_queue_depth")[("boostserve_queue_depth", (("stage", "2"),))] == 7
    assert samples(metrics.registry, "boostserve_inflight_requests")[("boostserve_inflight_requests", ())] == 3


def test_stage_batches_count_cross_request_and_merged_batches() -> None:
    """The scheduler's merge counters, one observer call per batch."""
    metrics = Metrics()
    metrics.bind_model(name="m", version="1", cumulative_macs=[10, 20, 30], providers=["CPU"], exit_rule="x")
    metrics.on_stage_batch(0, 8, 0.001, 3, 3)  # three requests arriving together
    metrics.on_stage_batch(0, 2, 0.001, 1, 1)  # one request alone
    metrics.on_stage_batch(1, 5, 0.001, 1, 2)  # one request's survivors from two stage-1 batches
    metrics.on_stage_batch(2, 4, 0.001, 2, 1)  # two requests' survivors from one stage-2 batch

    def counts(name: str) -> dict[str, float]:
        return {dict(labels)["stage"]: v for (_, labels), v in samples(metrics.registry, name).items()}

    assert counts("boostserve_multi_request_batches") == {"1": 1, "2": 0, "3": 1}
    assert counts("boostserve_merged_batches") == {"1": 1, "2": 1, "3": 0}
    assert counts("boostserve_merged_batch_images") == {"1": 8, "2": 5, "3": 0}
    assert (
        samples(metrics.registry, "boostserve_stage_batch_size")[
            ("boostserve_stage_batch_size_count", (("stage", "1"),))
        ]
        == 2
    )
