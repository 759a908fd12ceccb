"""Tests of the bench code (not timed tests): the suites run end to end on the synthetic artifact
and write sane JSON, markdown and PNGs; the full-network graph and the load generator's HTTP client
are checked against independent references."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.common import load_artifact, simulate_exits
from bench.compare import COMPARE_SERVER
from bench.fullgraph import build_full_network
from bench.loadgen import run_closed_loop
from bench.server import metric_sum, parse_prometheus
from boostserve.cli import main
from tests.fixtures.synthetic_artifact import (
    build_synthetic_artifact,
    random_images,
    reference_cumulative_logits,
)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bench_artifacts")
    model = build_synthetic_artifact(
        root / "boostnet", num_stages=3, num_classes=4, logit_scale=[1.0, 2.0, 3.0], calibration_samples=400
    )
    baseline = build_synthetic_artifact(
        root / "baseline", num_stages=3, num_classes=4, t=0.0, seed=5, calibration_samples=400
    )
    return model, baseline


@pytest.fixture(scope="module")
def bench_out(artifacts: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, baseline = artifacts
    out = tmp_path_factory.mktemp("bench_out")
    argv = [
        "bench", "--suite", "offline,engine", "--quick", "--no-progress",
        "--artifacts", str(model), "--baseline", str(baseline), "--data", "synthetic", "--out", str(out),
        "--budget-points", "6", "--batch-sizes", "1,4", "--engine-rounds", "2",
        "--engine-round-seconds", "0.02", "--engine-images", "64",
    ]  # fmt: skip
    assert main(argv) == 0
    return out


def test_files_written(bench_out: Path) -> None:
    for name in ("offline.json", "engine.json", "targets.json", "README.md",
                 "offline_accuracy_vs_macs.png", "engine_throughput.png"):  # fmt: skip
        path = bench_out / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert (bench_out / "offline_accuracy_vs_macs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (bench_out / "README.md").read_text()
    assert "## Targets" in text and "| **N/A** |" in text  # http targets: not measured in this run
    assert "average MACs / oracle-exit MACs" in text
    assert "NaN" not in (bench_out / "offline.json").read_text()


def test_offline_numbers_are_sane(bench_out: Path) -> None:
    doc = json.loads((bench_out / "offline.json").read_text())
    assert doc["machine"]["logical_cores"] >= 1 and doc["settings"]["budget_points"] == 6
    models = doc["result"]["models"]
    assert set(models) == {"boostnet", "baseline"}
    for m in models.values():
        macs = m["cumulative_macs"]
        assert m["full_macs"] == macs[-1]
        assert m["oracle"]["accuracy"] >= m["all_stages"]["accuracy"]
        assert macs[0] <= m["oracle"]["macs"] <= macs[-1]
        assert m["max_crosscheck_diff"] < 1e-9  # service.core.policies agrees with the bench's simulation
        assert {"optimal", "reference", "max_accuracy_drop/optimal"} <= set(m["curves"])
        for points in m["curves"].values():
            for p in points:
                assert 0.0 <= p["test_accuracy"] <= 1.0
                assert macs[0] - 1e-6 <= p["test_macs"] <= macs[-1] + 1e-6
                assert math.isclose(sum(p["test_exit_fractions"]), 1.0, abs_tol=1e-9)
        knob = m["curves"]["max_accuracy_drop/optimal"]
        assert m["headline"]["0.01"] is not None
        # A larger allowed drop never costs more MACs (held-out).
        held = [p["heldout_macs"] for p in sorted(knob, key=lambda p: p["budget"])]
        assert all(a >= b - 1e-6 for a, b in itertools.pairwise(held))


def test_coverage_experiment(bench_out: Path) -> None:
    """The offline suite's coverage experiment: JSON per model, a markdown section and a PNG."""
    doc = json.loads((bench_out / "offline.json").read_text())
    assert doc["settings"]["coverage_resamples"] == 50  # quick mode
    for m in doc["result"]["models"].values():
        cov = m["coverage"]["coverage"]
        assert cov["resamples"] == 50 and cov["noise_sd_at_delta"] == pytest.approx(math.sqrt(0.95 * 0.05 / 50))
        for policy in ("optimal", "reference", "previous"):
            rows = cov["max_accuracy_drop"][policy]
            assert set(rows) == {"0", "0.001", "0.0025", "0.005", "0.0075", "0.01", "0.015", "0.02", "0.03", "0.05"}
            for row in rows.values():
                assert 0.0 <= row["violation_rate"] <= row["violation_rate_upper95"] <= 1.0
                assert 0.0 < row["macs_fraction_mean"] <= 1.0 + 1e-9
        # d = 0 on 400 calibration images: nothing below the full network is certified
        assert cov["max_accuracy_drop"]["optimal"]["0"]["macs_fraction_mean"] == pytest.approx(1.0)
        pol = m["coverage"]["policies"]
        assert pol["heldout_gap"]["below_eq9"]["optimal"] == 0  # never below Eq. 9 at the exact budget
        for row in pol["rows"]:
            assert row["optimal_accuracy"] >= 0.0 and 0.0 <= row["optimal_worse_share"] <= 1.0
    png = bench_out / "offline_coverage.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (bench_out / "README.md").read_text()
    assert "do the budget knobs hold on new images?" in text and "![coverage](offline_coverage.png)" in text


def test_engine_numbers_are_sane(bench_out: Path) -> None:
    doc = json.loads((bench_out / "engine.json").read_text())
    r = doc["result"]
    assert r["full_network"]["available"] is True
    assert r["parity"]["full_onnx_vs_all_stages_max_abs_diff"] < 1e-4
    assert r["parity"]["early_exit_label_mismatches"] == 0
    cells = {(c["batch_size"], c["mode"]) for c in r["cells"]}
    assert cells == {(b, m) for b in (1, 4) for m in ("early_exit", "all_stages", "full_onnx")}
    for c in r["cells"]:
        assert c["images_per_s"]["median"] > 0 and c["images_per_s"]["n"] == 2
        assert c["latency_ms"]["p50"] > 0
    full = r["cells"][0]["avg_macs"] if r["cells"][0]["mode"] != "early_exit" else None
    for c in r["cells"]:
        if c["mode"] == "early_exit":
            assert math.isclose(sum(c["exit_fractions"]), 1.0, abs_tol=1e-9)
        elif full is not None:
            assert c["avg_macs"] == full


def test_full_network_matches_numpy_reference(tmp_path: Path) -> None:
    """The chained single graph equals the numpy oracle, cascade stage (reads the image) included."""
    root = build_synthetic_artifact(tmp_path / "cascade", num_stages=4, channels=3, cascade_stage=2, seed=1)
    artifact = load_artifact(root)
    path = build_full_network(artifact.manifest, root, tmp_path / "full.onnx")
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits"]
    images = random_images(7, channels=3)
    got = session.run(["logits"], {"image": images})[0]
    want = reference_cumulative_logits(root, images)[-1]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_simulate_exits_rule() -> None:
    conf = np.array([[0.9, 0.2, 0.5], [0.1, 0.95, 0.4], [0.3, 0.3, 0.3]], dtype=np.float32)
    correct = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 1]], dtype=bool)
    out = simulate_exits(conf, correct, [0.5, 0.9, -math.inf], np.array([1.0, 2.0, 3.0]))
    # sample 0 exits at 1 (0.9 >= 0.5), sample 1 at 2, sample 2 at 1 (0.5 >= 0.5: ties exit)
    assert out["exit_fractions"] == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["macs"] == pytest.approx((1 + 2 + 1) / 3)


def test_prometheus_parser() -> None:
    text = (
        "# HELP x\n"
        'boostserve_stage_duration_seconds_sum{stage="1"} 0.5\n'
        'boostserve_stage_duration_seconds_sum{stage="2"} 0.25\n'
        "boostserve_images_total 12.0\n"
    )
    metrics = parse_prometheus(text)
    assert metric_sum(metrics, "boostserve_stage_duration_seconds_sum") == 0.75
    assert metric_sum(metrics, "boostserve_stage_duration_seconds_sum", stage="2") == 0.25
    assert metric_sum(metrics, "boostserve_images_total") == 12.0


def test_raw_load_generator_against_a_stub_server() -> None:
    """The raw HTTP/1.1 client keeps connections alive, bounds requests and reads every answer."""
    answer = json.dumps(
        {
            "results": [{"label": 3, "exit": 2, "macs": 100}],
            "latency_ms": 0.1,
            "budget": {"thresholds": [0.5, 0.0]},
        }
    ).encode()
    connections = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(
                    next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
                )
                await reader.readexactly(length)
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                    + str(len(answer)).encode() + b"\r\n\r\n" + answer
                )  # fmt: skip
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def scenario() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            result = await run_closed_loop(
                host="127.0.0.1", port=port, path="/v1/classify?early_exit=false",
                bodies=[b"a", b"bb", b"ccc"], concurrency=4, duration_s=5.0, max_requests=50, warmup_s=0.05,
            )  # fmt: skip
        assert result.count == 50 and set(result.statuses) == {200}
        assert set(result.labels) == {3} and set(result.exits) == {2}
        assert result.thresholds == [0.5, 0.0] and result.first_error is None
        assert 0 < result.wall_s < 5.0
        assert len(connections) == 4  # keep-alive: one connection per client

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def head_checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path | None]:
    """A `git worktree` of HEAD for the compare server (None outside a git checkout); removed after."""
    repo = Path(__file__).resolve().parents[2]
    path = tmp_path_factory.mktemp("compare") / "head"
    added = subprocess.run(
        ["git", "-C", str(repo), "worktree", "add", "--detach", str(path), "HEAD"], capture_output=True, check=False
    )
    if added.returncode != 0:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(path)], check=False)


@pytest.fixture(scope="module")
def http_out(
    artifacts: tuple[Path, Path], head_checkout: Path | None, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """One tiny HTTP run against real `boostserve serve` subprocesses, with a compare server when git allows."""
    model, _ = artifacts
    out = tmp_path_factory.mktemp("http")
    compare = ["--compare-with", str(head_checkout)] if head_checkout is not None else []
    argv = [
        "bench", "--suite", "http", "--quick", "--no-progress", "--artifacts", str(model),
        "--data", "synthetic", "--out", str(out), "--concurrency", "2", "--duration", "0.4",
        "--warmup", "0.1", "--max-requests", "200", "--http-images", "64", *compare,
    ]  # fmt: skip
    assert main(argv) == 0
    return out


def test_http_suite_end_to_end(http_out: Path) -> None:
    """A tiny HTTP run against a real `boostserve serve` subprocess: every answer is a 200 and the
    served exits agree with the offline simulation of the same thresholds."""
    out = http_out
    doc = json.loads((out / "http.json").read_text())
    r = doc["result"]
    assert {s["name"] for s in r["servers"]} - {COMPARE_SERVER} == {
        "batching",
        "no_batching",
        "fastapi_path",
        "thread_stages",
        "loop_stages",
        "gc_unfrozen",
        "no_access_log",
    }
    envs = {s["name"]: s["env"] for s in r["servers"]}
    # The published servers log at the shipped default (info): the access log is part of what is measured.
    assert "BOOSTSERVE_LOG_LEVEL" not in envs["batching"] and "BOOSTSERVE_LOG_LEVEL" not in envs["no_batching"]
    batching_env = {k: v for k, v in envs["batching"].items() if k != "BOOSTSERVE_GRPC_PORT"}
    assert envs["no_access_log"] == {**batching_env, "BOOSTSERVE_LOG_LEVEL": "warning"}
    cells = r["aggregate"]
    assert {(c["server"], c["mode"]) for c in cells} >= {
        ("batching", "all_stages"),
        ("batching", "drop_0.01"),
        ("batching", "multipart_all_stages"),  # the same images as one-part multipart forms
        ("batching", "multipart_drop_0.01"),
        ("batching", "v2_binary"),  # the same images and budget over OIP v2 REST, binary extension
        ("batching", "grpc"),  # ... and over OIP v2 gRPC
    }
    for mode in ("v2_binary", "grpc", "multipart_drop_0.01"):  # answers read, the budget is drop_0.01's
        oip = next(c for c in cells if c["server"] == "batching" and c["mode"] == mode)
        assert (oip["served_accuracy"] or 0) > 0 and (oip["server_request_ms_mean"] or 0) > 0, oip
        served = {c["mode"]: c["thresholds_served"] for c in r["cells"] if c["server"] == "batching"}
        assert served[mode] == served["drop_0.01"] is not None, served
    for c in cells:
        assert c["requests"] > 0 and c["errors"] == 0
        assert sum(c["exit_histogram"]) == c["requests"]
        assert c["client_cpu_ms_per_request"] > 0
    for allst in (c for c in cells if c["mode"] in ("all_stages", "multipart_all_stages")):
        assert allst["exit_histogram"][:-1] == [0] * (len(allst["exit_histogram"]) - 1)  # nobody exits early
    assert all(c["server_cpu_ms_per_request"] > 0 for c in cells)
    text = (out / "README.md").read_text()
    assert "## HTTP" in text and (out / "http_throughput_latency.png").is_file()
    assert "Request-path ablations" in text and "| fastapi_path | raw-image classify through FastAPI" in text
    floor = r["floor"]
    assert [v["name"] for v in floor["variants"]] == ["http_only", "http_decode"]
    assert all(
        v["req_per_s"] > 0 and v["errors"] == 0 and v["server_cpu_ms_per_request"] > 0 for v in floor["variants"]
    ), floor["variants"]
    assert "What limits the early-exit / all-stages ratio" in text and "| floor: uvicorn + httptools" in text


def test_compare_server_runs_the_other_checkout(http_out: Path, head_checkout: Path | None) -> None:
    """--compare-with: a `compare` server with the other checkout's code and batching's settings
    answers drop_0.01 cells next to batching; its commit is in the JSON and the side-by-side table."""
    if head_checkout is None:
        pytest.skip("not a git checkout: no worktree to compare with")
    doc = json.loads((http_out / "http.json").read_text())
    r = doc["result"]
    servers = {s["name"]: s for s in r["servers"]}
    other = servers[COMPARE_SERVER]
    head = subprocess.run(["git", "-C", str(head_checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert other["checkout"]["commit"] == head.stdout.strip() == r["compare_with"]["other"]["commit"]
    # The code is the only difference (batching also serves the grpc cells, on a port of its own).
    batching_env = {k: v for k, v in servers["batching"]["env"].items() if k != "BOOSTSERVE_GRPC_PORT"}
    assert other["env"] == batching_env
    root = head_checkout.resolve()
    assert set(other["imports"]) == {"boostserve", "service"}
    assert all(Path(f).is_relative_to(root) for f in other["imports"].values()), other["imports"]
    assert other["command"][1:3] == ["-S", "-P"] and other["pythonpath"].split(os.pathsep)[0] == str(root)
    cells = [c for c in r["aggregate"] if c["server"] == COMPARE_SERVER]
    assert [(c["mode"], c["concurrency"]) for c in cells] == [("drop_0.01", 2)]
    assert cells[0]["requests"] > 0 and cells[0]["errors"] == 0
    text = (http_out / "README.md").read_text()
    short = r["compare_with"]["other"]["short"]
    assert f"vs `{short}`" in text and f"| req/s this | min–max | req/s `{short}` |" in text
    row = next(line for line in text.splitlines() if line.startswith("| 2 | 1 | "))
    assert row.endswith("| 0 / 0 |"), row


def test_compare_isolation_keeps_this_checkout_out(tmp_path: Path) -> None:
    """The compare interpreter imports only the other checkout: not this checkout's boostserve (the
    working directory, here this repository), nor a submodule the other checkout lacks (the editable
    install's finder would supply service.core from this checkout)."""
    from bench.compare import isolated_command, isolated_environment, verify_imports

    other = tmp_path / "old"
    for package in ("boostserve", "service"):
        (other / package).mkdir(parents=True)
        (other / package / "__init__.py").write_text("")
    (other / "boostserve" / "cli.py").write_text("")
    env = isolated_environment(other)
    repo = Path(__file__).resolve().parents[2]
    files = verify_imports(other, env, cwd=repo)  # from this repository's directory, as the bench runs
    assert {k: Path(f).resolve() for k, f in files.items()} == {
        "boostserve": (other / "boostserve" / "cli.py").resolve(),
        "service": (other / "service" / "__init__.py").resolve(),
    }
    probe = subprocess.run(
        isolated_command("-c", "import service.core"),
        env={**os.environ, **env},
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert probe.returncode != 0 and "No module named 'service.core'" in probe.stderr, probe.stderr
    numpy = subprocess.run(isolated_command("-c", "import numpy"), env={**os.environ, **env}, cwd=repo)
    assert numpy.returncode == 0  # third-party packages still come from this environment


def test_compare_with_refuses_what_is_not_a_checkout(tmp_path: Path) -> None:
    """A directory without this repository's packages, or no http suite to run it in: exit 2, no run."""
    out = ["--no-progress", "--out", str(tmp_path / "out"), "--compare-with", str(tmp_path)]
    assert main(["bench", "--suite", "http", *out]) == 2
    assert main(["bench", "--suite", "offline", *out]) == 2
    assert not (tmp_path / "out" / "http.json").exists()


def test_profile_summary_attributes_innermost_component(tmp_path: Path) -> None:
    from bench.profiling import summarise_raw

    raw = tmp_path / "p.txt"
    raw.write_text(
        "run (uvicorn/server.py:1);app (fastapi/routing.py:2);"
        "to_tensor (service/core/preprocess.py:3);load (PIL/Image.py:4) 3\n"
        "run (uvicorn/server.py:1);app (fastapi/routing.py:2) 1\n"
    )
    out = summarise_raw(raw)
    shares = {c["component"]: c["share"] for c in out["components"]}
    assert out["samples"] == 4
    assert shares == {"image decode + preprocess": 0.75, "FastAPI/Starlette": 0.25}
    assert out["hottest"][0] == {"function": "load (PIL/Image.py)", "share": 0.75}


def test_profile_rules_name_our_code_where_it_is(tmp_path: Path) -> None:
    """Every path a component rule names exists, and our frame under uvicorn's is counted as ours.

    The rules once named modules that had since moved (service/scheduler.py and the like), so the
    published profile gave the fast path, the classify core and the scheduler to "uvicorn" and
    "other"; this keeps them honest after the next move.
    """
    from bench.profiling import OWN_CODE, summarise_raw

    repo = Path(__file__).resolve().parents[2]
    stacks: list[tuple[str, str]] = []
    for component, paths in OWN_CODE:
        for path in paths:
            assert (repo / path).exists(), f"{component}: {path} is not in the repository"
            file = repo / path if path.endswith(".py") else sorted((repo / path).rglob("*.py"))[0]
            # py-spy prints a path relative to sys.path where it can, else absolute: both are ours
            for shown in (file, file.relative_to(repo)):
                stack = f"run (uvicorn/protocols/http/httptools_impl.py:1);f ({shown}:7);g (<frozen x>:2) 1"
                stacks.append((component, stack))
    raw = tmp_path / "p.txt"
    raw.write_text("".join(stack + "\n" for _, stack in stacks))
    shares = {c["component"]: c["share"] for c in summarise_raw(raw)["components"]}
    expected = {name: sum(1 for c, _ in stacks if c == name) / len(stacks) for name, _ in OWN_CODE}
    assert shares == expected
    # another package's folder of the same name is not ours
    raw.write_text("run (uvicorn/server.py:1);f (site-packages/other_service/http/app.py:3) 1\n")
    assert [c["component"] for c in summarise_raw(raw)["components"]] == ["uvicorn HTTP protocol (httptools)"]
