"""Faults: bad artifacts refuse to start; a stage failing at run time fails only its batch.

Start-up (real `boostserve serve`, each run bounded by a timeout):
  - a stage file whose sha256 differs from the manifest  -> exit 2, message names the stage
  - a corrupted ONNX file whose hash *was* updated        -> non-zero exit, message names the stage
  - manifest.json not JSON / not the schema / missing     -> exit 2, clear message
  - calibration.npz missing or corrupted                  -> non-zero exit, message names it
  - no calibration in the manifest at all                 -> documented fallback: serves, budget =
    max_exit = last stage, budget_macs / max_accuracy_drop requests -> 422
Run time (in process, engine session monkeypatched):
  - a stage that raises for batches holding a "poison" image -> those requests 500 (envelope,
    generic message with the request id), every other request 200, server ready, recovers.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.core.artifact import MANIFEST_FILE, sha256_file
from tests.fixtures.synthetic_artifact import build_synthetic_artifact
from tests.reliability import _images as img
from tests.reliability._results import record
from tests.reliability._server import run_serve_expect_failure
from tests.reliability.conftest import IMAGE_SIDE, make_settings

STARTUP_TIMEOUT_S = 60.0


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rehash(artifact: Path, file: str) -> None:
    """Make the manifest agree with a modified file (so only the content is wrong)."""
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    for stage in manifest["stages"]:
        if stage["file"] == file:
            stage["sha256"] = sha256_file(artifact / file)
    if manifest.get("calibration") and manifest["calibration"]["file"] == file:
        manifest["calibration"]["sha256"] = sha256_file(artifact / file)
    (artifact / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _broken_hash(a: Path) -> None:
    _flip_byte(a / "stage_02.onnx")


def _corrupt_onnx_rehashed(a: Path) -> None:
    path = a / "stage_02.onnx"
    path.write_bytes(path.read_bytes()[:100])  # truncated protobuf
    _rehash(a, "stage_02.onnx")


def _garbage_onnx_rehashed(a: Path) -> None:
    (a / "stage_03.onnx").write_bytes(b"this is not an onnx model at all\n" * 10)
    _rehash(a, "stage_03.onnx")


def _manifest_not_json(a: Path) -> None:
    (a / MANIFEST_FILE).write_text('{"schema_version": 1, "name": ')


def _manifest_bad_schema(a: Path) -> None:
    manifest = json.loads((a / MANIFEST_FILE).read_text())
    del manifest["stages"][0]["sha256"]
    (a / MANIFEST_FILE).write_text(json.dumps(manifest))


def _manifest_missing(a: Path) -> None:
    (a / MANIFEST_FILE).unlink()


def _stage_missing(a: Path) -> None:
    (a / "stage_01.onnx").unlink()


def _calibration_missing(a: Path) -> None:
    (a / "calibration.npz").unlink()


def _calibration_corrupt_rehashed(a: Path) -> None:
    (a / "calibration.npz").write_bytes(b"PK\x03\x04 not really a zip")
    _rehash(a, "calibration.npz")


def _calibration_wrong_exits_rehashed(a: Path) -> None:
    arrays = {
        "heldout_confidence": np.full((2, 10), 0.5, dtype=np.float32),  # 2 exits, the model has 3
        "heldout_correct": np.ones((2, 10), dtype=bool),
        "heldout_labels": np.zeros(10, dtype=np.int64),
    }
    np.savez_compressed(a / "calibration.npz", **arrays)
    _rehash(a, "calibration.npz")


def _path_escape(a: Path) -> None:
    manifest = json.loads((a / MANIFEST_FILE).read_text())
    manifest["stages"][0]["file"] = "../../../../etc/passwd"
    (a / MANIFEST_FILE).write_text(json.dumps(manifest))


#: (id, mutation, words the message must contain (case-insensitive, any of each tuple))
STARTUP_FAULTS = [
    ("stage-hash-mismatch", _broken_hash, [("stage 2",), ("sha256", "corrupt", "changed")]),
    ("stage-corrupt-onnx-rehashed", _corrupt_onnx_rehashed, [("stage 2",), ("onnx",)]),
    ("stage-garbage-onnx-rehashed", _garbage_onnx_rehashed, [("stage 3",), ("onnx",)]),
    ("stage-file-missing", _stage_missing, [("stage 1",), ("missing",)]),
    ("manifest-not-json", _manifest_not_json, [("manifest.json",), ("json",)]),
    ("manifest-bad-schema", _manifest_bad_schema, [("manifest",), ("sha256",)]),
    ("manifest-missing", _manifest_missing, [("manifest.json",)]),
    ("manifest-path-escape", _path_escape, [("escapes", "outside")]),
    ("calibration-missing", _calibration_missing, [("calibration",), ("missing",)]),
    ("calibration-corrupt-rehashed", _calibration_corrupt_rehashed, [("cannot read calibration",)]),
    ("calibration-wrong-exits-rehashed", _calibration_wrong_exits_rehashed, [("calibration",), ("exit",)]),
]


@pytest.mark.parametrize("fault_id,mutate,words", STARTUP_FAULTS, ids=[f[0] for f in STARTUP_FAULTS])
def test_serve_refuses_bad_artifact(
    rel_artifact: Path, tmp_path: Path, fault_id: str, mutate: Any, words: list[tuple[str, ...]]
) -> None:
    artifact = _copy(rel_artifact, tmp_path / "artifact")
    mutate(artifact)
    done = run_serve_expect_failure(artifact, timeout=STARTUP_TIMEOUT_S, log_level="warning")
    output = (done.stderr + done.stdout).lower()
    record(
        f"fault_startup_{fault_id}",
        {"exit_code": done.returncode, "stderr_tail": done.stderr[-1500:], "stdout_tail": done.stdout[-500:]},
    )
    assert done.returncode == 2, f"{fault_id}: exit {done.returncode}, documented 2\n{output[-2000:]}"
    assert "boostserve serve: " in done.stderr, f"{fault_id}: no one-line reason\n{output[-2000:]}"
    for alternatives in words:
        assert any(w in output for w in alternatives), f"{fault_id}: none of {alternatives} in:\n{output[-2000:]}"


def test_serve_refuses_missing_artifact_dir(tmp_path: Path) -> None:
    done = run_serve_expect_failure(tmp_path / "does-not-exist", timeout=STARTUP_TIMEOUT_S)
    assert done.returncode != 0
    assert "manifest.json" in done.stderr


def test_no_calibration_documented_fallback(tmp_path: Path) -> None:
    """No calibration: serve with max_exit = last stage; calibration-needing budgets -> 422."""
    from fastapi.testclient import TestClient

    from service.http.app import create_app

    artifact = build_synthetic_artifact(
        tmp_path / "nocal", height=IMAGE_SIDE, width=IMAGE_SIDE, num_classes=10, with_calibration=False
    )
    app = create_app(make_settings(artifact, default_budget='{"max_accuracy_drop": 0.01}'))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/readyz").status_code == 200
        budget = client.get("/v1/budget").json()
        assert budget["calibrated"] is False
        assert budget["budget"] == {"max_exit": 3}, budget
        png = img.valid_png()
        ok = client.post("/v1/classify", content=png, headers={"Content-Type": "image/png"})
        assert ok.status_code == 200, ok.text
        assert ok.json()["results"][0]["exit"] == 3
        for query in ("max_accuracy_drop=0.01", "budget_macs=1000"):
            refused = client.post(f"/v1/classify?{query}", content=png, headers={"Content-Type": "image/png"})
            assert refused.status_code == 422, refused.text
            assert "calibration" in refused.json()["error"]["message"]
        assert (
            client.post("/v1/classify?max_exit=1", content=png, headers={"Content-Type": "image/png"}).status_code
            == 200
        )


# --------------------------------------------------------------------------------------------------
# run-time stage failure
# --------------------------------------------------------------------------------------------------

POISON_VALUE = 255  # an all-white image: after (x/255 - 0.5) / 0.25 every pixel is 2.0


class PoisonedSession:
    """Wraps an ORT session: raises for any batch holding a poison image (stage 0 input)."""

    def __init__(self, inner: Any, poison_level: float) -> None:
        self.inner = inner
        self.poison_level = poison_level
        self.enabled = True
        self.failed_batches: list[tuple[int, int]] = []  # (batch size, poison rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def run(self, output_names: Any, feeds: dict[str, np.ndarray], *args: Any, **kwargs: Any) -> Any:
        image = feeds.get("image")
        if self.enabled and image is not None:
            flat = image.reshape(image.shape[0], -1)
            poison = np.all(np.isclose(flat, self.poison_level), axis=1)
            if poison.any():
                self.failed_batches.append((int(image.shape[0]), int(poison.sum())))
                raise RuntimeError("simulated ONNX Runtime failure (test)")
        return self.inner.run(output_names, feeds, *args, **kwargs)


def _png_const(value: int) -> bytes:
    return img.png_bytes(Image.new("L", (IMAGE_SIDE, IMAGE_SIDE), color=value))


def test_stage_failure_fails_only_its_batch_and_recovers(rel_artifact: Path) -> None:
    import httpx

    from service.http.app import create_app

    app = create_app(make_settings(rel_artifact, max_batch_size=8, max_batch_wait_ms=5.0, max_queue=256))
    poison_png = _png_const(POISON_VALUE)
    healthy = [img.valid_png(seed=s) for s in range(6)]
    headers = {"Content-Type": "image/png"}

    async def scenario() -> dict[str, Any]:
        async with app.router.lifespan_context(app):
            runtime = app.state.service
            engine = runtime.scheduler.engine
            pre = runtime.manifest.preprocessing
            level = (POISON_VALUE / 255.0 - pre.mean[0]) / pre.std[0]
            wrapper = PoisonedSession(engine._sessions[0], level)
            engine._sessions[0] = wrapper
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://rel") as client:
                # 1) sequential: poison -> 500, healthy -> 200
                bad = await client.post("/v1/classify", content=poison_png, headers=headers)
                good = await client.post("/v1/classify", content=healthy[0], headers=headers)
                # 2) concurrent mix: 120 requests, 3 of them poisoned (batches of <= 8)
                kinds = ["poison" if i % 40 == 20 else "healthy" for i in range(120)]
                responses = await asyncio.gather(
                    *(
                        client.post(
                            "/v1/classify",
                            content=poison_png if k == "poison" else healthy[i % 6],
                            headers=headers,
                        )
                        for i, k in enumerate(kinds)
                    )
                )
                # 3) recovery: the fault goes away
                wrapper.enabled = False
                recovered = [await client.post("/v1/classify", content=poison_png, headers=headers) for _ in range(3)]
                ready = await client.get("/readyz")
        return {
            "bad": bad,
            "good": good,
            "kinds": kinds,
            "responses": responses,
            "recovered": recovered,
            "ready": ready,
            "failed_batches": wrapper.failed_batches,
        }

    out = asyncio.run(scenario())
    bad = out["bad"]
    assert bad.status_code == 500, bad.text
    error = bad.json()["error"]
    assert error["type"] == "internal_error"
    assert "simulated" not in error["message"], "500 must not echo the exception"
    assert bad.headers.get("x-request-id") and bad.headers["x-request-id"] in error["message"]
    assert out["good"].status_code == 200

    concurrent = list(zip(out["kinds"], out["responses"], strict=True))
    poison_statuses = [r.status_code for k, r in concurrent if k == "poison"]
    healthy_statuses = [r.status_code for k, r in concurrent if k == "healthy"]
    assert set(poison_statuses) == {500}, poison_statuses
    assert set(healthy_statuses) <= {200, 500}
    # Exactly the healthy requests that shared a failed batch with a poison image failed.
    innocents_in_failed_batches = sum(size - poison for size, poison in out["failed_batches"])
    healthy_failed = healthy_statuses.count(500)
    record(
        "fault_runtime_stage",
        {
            "concurrent_requests": len(concurrent),
            "poison_requests": len(poison_statuses),
            "healthy_ok": healthy_statuses.count(200),
            "healthy_failed_sharing_a_failed_batch": healthy_failed,
            "failed_batches": out["failed_batches"],
            "recovered_statuses": [r.status_code for r in out["recovered"]],
        },
    )
    assert healthy_failed == innocents_in_failed_batches, (healthy_failed, out["failed_batches"])
    assert healthy_statuses.count(200) >= len(healthy_statuses) // 2
    assert all(r.status_code == 200 for r in out["recovered"])
    assert out["ready"].status_code == 200
