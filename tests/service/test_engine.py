"""Engine: wiring checks, per-sample early exit, compaction, MACs, providers, failures."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.core.artifact import ArtifactError, Manifest, load_manifest
from service.core.engine import CPU, CUDA, Engine, ExitResult, StageBatch, default_providers, normalize_thresholds
from service.core.errors import DeadlineExceededError, StageFailedError, ValidationFailedError
from service.core.exit_rule import softmax
from tests.fixtures.synthetic_artifact import random_images, reference_cumulative_logits


@pytest.fixture(scope="module")
def manifest(synthetic_artifact: Path) -> Manifest:
    return load_manifest(synthetic_artifact)


@pytest.fixture(scope="module")
def engine(manifest: Manifest, synthetic_artifact: Path) -> Engine:
    return Engine(manifest, synthetic_artifact, providers=[CPU])


def _images(n: int, seed: int = 3) -> np.ndarray:
    return random_images(n, channels=1, height=8, width=8, seed=seed)  # (n, 1, 8, 8)


def classify_counting(engine: Engine, x: np.ndarray, thresholds: Any) -> tuple[list[ExitResult], list[tuple[int, int]]]:
    """engine.classify, and per stage the (session runs, rows) it took, read off the engine's counters."""
    before = engine.stage_stats()
    results = engine.classify(x, thresholds)
    after = engine.stage_stats()
    return results, [(a.runs - b.runs, a.items - b.items) for a, b in zip(after, before, strict=True)]


def test_run_all_stages_matches_numpy_reference(engine: Engine, synthetic_artifact: Path) -> None:
    x = _images(17)
    got = engine.run_all_stages(x)
    ref = reference_cumulative_logits(synthetic_artifact, x)
    assert len(got) == engine.num_stages == 3
    for g, r in zip(got, ref, strict=True):
        assert g.shape == (17, 4) and g.dtype == np.float32
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_cascade_stage_reads_image(synthetic_artifact_rgb_cascade: Path) -> None:
    root = synthetic_artifact_rgb_cascade
    eng = Engine(load_manifest(root), root, providers=[CPU])
    x = random_images(9, channels=3, seed=5)
    for g, r in zip(eng.run_all_stages(x), reference_cumulative_logits(root, x), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    # Early exit on the cascade net: survivors still carry the image into stage index 2.
    assert len(eng.classify(x, np.full(4, 0.6, dtype=np.float32))) == 9


def test_threshold_zero_everything_exits_at_first_stage(engine: Engine) -> None:
    x = _images(11)
    results, runs = classify_counting(engine, x, np.zeros(3, dtype=np.float32))
    assert [r.exit_index for r in results] == [0] * 11
    assert runs == [(1, 11), (0, 0), (0, 0)]
    assert all(r.macs == engine.manifest.stages[0].cumulative_macs for r in results)
    first = engine.run_all_stages(x)[0]
    np.testing.assert_allclose(np.stack([r.logits for r in results]), first, rtol=1e-6)


def test_thresholds_above_one_run_every_stage_like_the_full_model(engine: Engine, synthetic_artifact: Path) -> None:
    x = _images(13)
    for thresholds in (np.full(3, 1.5, dtype=np.float32), None):
        results, runs = classify_counting(engine, x, thresholds)
        assert {r.exit_index for r in results} == {2}
        assert runs == [(1, 13), (1, 13), (1, 13)]
        logits = np.stack([r.logits for r in results])
        np.testing.assert_allclose(logits, engine.run_all_stages(x)[-1], rtol=1e-6)
        np.testing.assert_allclose(logits, reference_cumulative_logits(synthetic_artifact, x)[-1], atol=1e-5)
        assert all(r.macs == engine.manifest.full_macs and not r.deadline_hit for r in results)


def test_mixed_batch_exits_per_sample_and_compacts_survivors(engine: Engine) -> None:
    x = _images(40)
    all_logits = engine.run_all_stages(x)
    conf = [softmax(f).max(axis=-1) for f in all_logits]  # E x (40,)
    thresholds = np.array([np.median(conf[0]), np.median(conf[1]), 0.0], dtype=np.float32)
    results, runs = classify_counting(engine, x, thresholds)

    # Oracle: first k with conf_k >= T_k, the last always answers.
    expected = np.full(40, 2)
    for k in (1, 0):
        expected[conf[k] >= thresholds[k]] = k
    got = np.array([r.exit_index for r in results])
    np.testing.assert_array_equal(got, expected)
    assert 0 < (got == 0).sum() < 40 and (got > 0).sum() > 0

    # Compaction: stage k runs exactly on the samples that had not left before it.
    survivors = [40, int((expected >= 1).sum()), int((expected >= 2).sum())]
    assert runs == [(1, s) for s in survivors]

    # MACs: per sample the cumulative MACs of its exit; in total the MACs of the stages actually run.
    cum = engine.manifest.cumulative_macs
    assert [r.macs for r in results] == [cum[k] for k in got]
    stage_macs = [s.macs for s in engine.manifest.stages]
    assert sum(r.macs for r in results) == sum(n * m for n, m in zip(survivors, stage_macs, strict=True))

    # Each answer is F at its exit, with its softmax and confidence.
    for i, r in enumerate(results):
        np.testing.assert_allclose(r.logits, all_logits[r.exit_index][i], rtol=1e-6)
        np.testing.assert_allclose(r.probabilities.sum(), 1.0, rtol=1e-5)
        assert r.confidence == pytest.approx(float(conf[r.exit_index][i]), rel=1e-6)


def test_per_sample_thresholds(engine: Engine) -> None:
    x = _images(4)
    thr = np.array([[0.0, 0, 0], [2.0, 0, 0], [2.0, 2.0, 0], [np.inf, np.inf, np.inf]], dtype=np.float32)
    results, runs = classify_counting(engine, x, thr)
    assert [r.exit_index for r in results] == [0, 1, 2, 2]
    assert runs == [(1, 4), (1, 3), (1, 2)]


def test_normalize_thresholds_forces_last_and_validates() -> None:
    t = normalize_thresholds([0.5, 0.5, 0.5], 2, 3)
    assert t.shape == (2, 3) and np.isneginf(t[:, -1]).all()
    assert np.isinf(normalize_thresholds(None, 1, 3)[0, :2]).all()
    with pytest.raises(ValidationFailedError):
        normalize_thresholds([0.5, 0.5], 2, 3)


def test_bad_images_are_validation_errors(engine: Engine) -> None:
    with pytest.raises(ValidationFailedError):
        engine.classify(np.zeros((2, 3, 8, 8), dtype=np.float32))
    with pytest.raises(ValidationFailedError):
        engine.classify(np.zeros((1, 8, 8), dtype=np.float32))
    assert engine.classify(np.zeros((0, 1, 8, 8), dtype=np.float32)) == []


def test_classify_deadline(engine: Engine) -> None:
    with pytest.raises(DeadlineExceededError):
        engine.classify(_images(2), None, deadline=0.0)  # monotonic 0 is long past


def test_run_stage_batch_feeds_each_input_from_its_manifest_source(engine: Engine) -> None:
    x = _images(3)
    out0 = engine.run_stage_batch(0, engine.initial_state(x))
    assert set(out0.state.arrays) == {"feat_out_0", "logits"}  # what stage 2 reads
    out1 = engine.run_stage_batch(1, out0.state)  # feat_in_0 <- feat_out_0, logits_in <- logits
    np.testing.assert_allclose(out1.logits, engine.run_all_stages(x)[1], rtol=1e-6)
    with pytest.raises(ValidationFailedError):
        engine.run_stage_batch(1, engine.initial_state(x))


def test_stage_batch_take_and_concat() -> None:
    a = StageBatch.from_arrays({"f": np.arange(6.0).reshape(3, 2), "logits": np.zeros((3, 4))})
    b = a.take(np.array([2, 0]))
    assert len(b) == 2 and b.arrays["f"][0, 0] == 4.0
    c = StageBatch.concat([a, b])
    assert len(c) == 5 and c.arrays["logits"].shape == (5, 4)
    assert StageBatch.concat([a]) is a
    with pytest.raises(ValueError):
        StageBatch.from_arrays({"f": np.zeros((3, 2)), "g": np.zeros((2, 2))})


class _BrokenSession:
    """Wraps a real session; `run` raises like ORT does on a runtime failure."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : simulated")


def test_broken_stage_raises_stage_failed(manifest: Manifest, synthetic_artifact: Path) -> None:
    eng = Engine(manifest, synthetic_artifact, providers=[CPU])
    good = eng._sessions[1]
    eng._sessions[1] = _BrokenSession(good)
    with pytest.raises(StageFailedError, match="stage 2"):
        eng.classify(_images(3), None)
    assert len(eng.classify(_images(3), np.zeros(3, dtype=np.float32))) == 3  # stage 1 alone still works
    eng._sessions[1] = good
    assert len(eng.classify(_images(3), None)) == 3


def test_providers_are_the_ones_in_use(manifest: Manifest, synthetic_artifact: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ORT warns that CUDA is not available in this build
        eng = Engine(manifest, synthetic_artifact, providers=[CUDA, CPU])
    assert eng.providers == eng._sessions[0].get_providers() == [CPU]
    assert eng.requested_providers == [CUDA, CPU] and not eng.uses_cuda


def test_default_providers_prefer_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    assert default_providers() == [CUDA, CPU]
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    assert default_providers() == [CPU]


def _renamed(manifest: Manifest, stage: int, *, input_name: str | None = None, output: str | None = None) -> Manifest:
    spec = manifest.stages[stage]
    if input_name is not None:
        spec = spec.model_copy(update={"inputs": [spec.inputs[0].model_copy(update={"name": input_name})]})
    if output is not None:
        outputs = [o.model_copy(update={"name": output}) if o.name == "logits" else o for o in spec.outputs]
        spec = spec.model_copy(update={"outputs": outputs, "logits_output": output})
    stages = list(manifest.stages)
    stages[stage] = spec
    return manifest.model_copy(update={"stages": stages})


def test_name_mismatch_is_an_artifact_error(manifest: Manifest, synthetic_artifact: Path) -> None:
    with pytest.raises(ArtifactError, match="inputs"):
        Engine(_renamed(manifest, 1, input_name="features"), synthetic_artifact, providers=[CPU])
    with pytest.raises(ArtifactError, match="outputs"):
        Engine(_renamed(manifest, 2, output="scores"), synthetic_artifact, providers=[CPU])


def test_unloadable_graph_is_an_artifact_error(manifest: Manifest, tmp_path: Path) -> None:
    for stage in manifest.stages:
        (tmp_path / stage.file).write_bytes(b"not an onnx file")
    with pytest.raises(ArtifactError, match="cannot load"):
        Engine(manifest, tmp_path, providers=[CPU])


def test_warmup_and_counters(manifest: Manifest, synthetic_artifact: Path) -> None:
    eng = Engine(manifest, synthetic_artifact, providers=[CPU], intra_op_threads=1)
    assert eng.warmup(max_batch_size=8) >= 0.0
    stats = eng.stage_stats()
    assert [s.runs for s in stats] == [2, 2, 2] and [s.items for s in stats] == [9, 9, 9]
