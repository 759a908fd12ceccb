"""Tests of the peers suite's logic (bench.peers) without the peers themselves.

The peer frameworks are optional and installed on demand, so these tests check what does not need
them: the expected answers, the hand-written early exit and full network the peers run (in this
environment, against boostserve's engine), the request envelopes and answer parsers, the answer
check, the aggregation, the verdicts, the report, and the process handling with a fake peer
server. One slow test (`-m "slow and peers"`) runs a real peer when its venv exists.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.common import load_artifact, thresholds_for_drop
from bench.data import encode_png, preprocess
from bench.fullgraph import build_full_network
from bench.loadgen import LoadResult
from bench.peers import envs
from bench.peers.protocol import build_requests, parse_peer_answer, triton_body
from bench.peers.report import peers_section, plot_peers
from bench.peers.runner import (
    EARLY_EXIT,
    FULL,
    PEERS,
    Expected,
    PeerProcess,
    PeersSettings,
    ServerSpec,
    _measure,
    aggregate,
    check_answers,
    compute_expected,
    expected_from_logits,
    peer_config,
    process_tree,
    start_failure_reason,
)
from bench.peers.servers.model import EarlyExitNetwork, FullNetwork, PeerConfig, Preprocess
from bench.targets import PEER_EARLY_EXIT, evaluate_peers
from tests.fixtures.synthetic_artifact import build_synthetic_artifact

ROOT = Path(__file__).resolve().parents[2]


def _settings(**over: Any) -> PeersSettings:
    base: dict[str, Any] = dict(
        peers=(), concurrencies=(64,), duration_s=0.3, warmup_s=0.0, max_requests=10_000, rounds=1, images=64,
        drop=0.01, max_batch_size=8, max_wait_ms=1.0, server_cpus=None, client_cpus=None,
    )  # fmt: skip
    base.update(over)
    return PeersSettings(**base)


# ------------------------------------------------------------------------------------------------
# expected answers and the networks the peers run
# ------------------------------------------------------------------------------------------------


def test_expected_from_logits_takes_the_first_confident_exit() -> None:
    # 3 exits, 4 images. Image 0 confident at exit 1, image 1 only at exit 2, images 2 and 3 never
    # (the last exit answers); image 3 sits exactly on exit 1's threshold: ties exit.
    sure, unsure = [10.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    e1 = np.array([sure, unsure, unsure, [0.0, 0.0, 0.0]], dtype=np.float32)
    e2 = np.array([[0.0, 0.0, 9.0], [0.0, 9.0, 0.0], unsure, unsure], dtype=np.float32)
    e3 = np.array([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 5.0, 0.0]], dtype=np.float32)
    tie = float(np.float32(1.0 / 3.0))  # max softmax of three equal logits, in float32
    expected = expected_from_logits([e1, e2, e3], [0.9, 0.9, -math.inf])
    assert expected.early_exits.tolist() == [1, 2, 3, 3]
    assert expected.early_labels.tolist() == [0, 1, 2, 1]
    assert expected.full_labels.tolist() == [1, 0, 2, 1]
    tied = expected_from_logits([e1, e2, e3], [tie, 0.9, -math.inf])
    assert tied.early_exits.tolist() == [1, 1, 1, 1]
    assert tied.exits(FULL).tolist() == [3, 3, 3, 3]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    root = tmp_path_factory.mktemp("peers_artifact")
    path = build_synthetic_artifact(root / "art", num_stages=3, num_classes=4, logit_scale=[1.0, 2.0, 3.0])
    artifact = load_artifact(path)
    full = build_full_network(artifact.manifest, artifact.path, root / "full.onnx")
    return artifact, full


def _images(artifact: Any, n: int = 96) -> np.ndarray:
    pre = artifact.manifest.preprocessing
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, size=(n, pre.height, pre.width), dtype=np.uint8)  # (n, H, W)


def test_peer_networks_answer_what_boostserve_engine_expects(synthetic: tuple[Any, Path], tmp_path: Path) -> None:
    """The hand-written early exit and the full-network session the peers run give, image for image,
    the labels and exits computed with boostserve's engine and exit rule (both from PNG bytes)."""
    artifact, full = synthetic
    images = _images(artifact)
    thresholds = thresholds_for_drop(artifact, 0.05)
    expected = compute_expected(artifact, images, thresholds, chunk=40)
    assert len(set(expected.early_exits.tolist())) > 1  # the thresholds really split the images
    pngs = encode_png(images)
    for early in (False, True):
        raw = peer_config(artifact, full, thresholds, port=1, early_exit=early, s=_settings())
        (tmp_path / "c.json").write_text(json.dumps(raw))
        config = PeerConfig.load(tmp_path / "c.json")
        pre = Preprocess(config)
        pixels = pre.batch(pngs)  # (n, C, H, W)
        p = artifact.manifest.preprocessing
        reference = preprocess(images, height=p.height, width=p.width, channels=p.channels, mean=p.mean, std=p.std,
                               input_scale=p.input_scale)  # fmt: skip
        np.testing.assert_array_equal(pixels, reference)
        network = EarlyExitNetwork(config) if early else FullNetwork(config)
        labels, exits = network(pixels)
        mode = EARLY_EXIT if early else FULL
        np.testing.assert_array_equal(labels, expected.labels(mode))
        np.testing.assert_array_equal(exits, expected.exits(mode))


# ------------------------------------------------------------------------------------------------
# envelopes and parsers
# ------------------------------------------------------------------------------------------------


def _split(request: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = request.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return lines[0], headers, body


@pytest.mark.parametrize("protocol", ["raw_png", "litserve", "bentoml", "kserve_v1", "triton_bytes"])
def test_every_envelope_carries_the_png(protocol: str) -> None:
    import base64

    png = bytes(range(256)) * 3
    (request,) = build_requests(protocol, "127.0.0.1", 8123, "/p", [png])
    line, headers, body = _split(request)
    assert line == "POST /p HTTP/1.1"
    assert int(headers["content-length"]) == len(body)
    if protocol == "raw_png":
        assert headers["content-type"] == "image/png" and body == png
    elif protocol == "triton_bytes":
        size = int(headers["inference-header-content-length"])
        header = json.loads(body[:size])
        (tensor,) = header["inputs"]
        assert tensor["datatype"] == "BYTES" and tensor["parameters"]["binary_data_size"] == len(body) - size
        assert struct.unpack("<I", body[size : size + 4])[0] == len(png) and body[size + 4 :] == png
    else:
        payload = json.loads(body)
        b64 = {
            "litserve": lambda d: d["image"],
            "bentoml": lambda d: d["images"][0],
            "kserve_v1": lambda d: d["instances"][0]["image_bytes"]["b64"],
        }[protocol](payload)
        assert base64.b64decode(b64) == png


def test_triton_body_layout() -> None:
    body, size = triton_body(b"abc")
    assert body[size:] == b"\x03\x00\x00\x00abc"


@pytest.mark.parametrize(
    "answer",
    [
        {"label": 7, "exit": 2},
        [{"label": 7, "exit": 2}],
        {"predictions": [{"label": 7, "exit": 2}]},
        {"results": [{"label": 7, "exit": 2, "macs": 1.0}], "latency_ms": 1.0},
        {"outputs": [{"name": "exit", "data": [2]}, {"name": "label", "data": [7]}]},
    ],
)
def test_parse_peer_answer_shapes(answer: Any) -> None:
    label, exit_, *_ = parse_peer_answer(json.dumps(answer).encode())
    assert (label, exit_) == (7, 2)


def test_parse_peer_answer_rejects_an_answer_without_label() -> None:
    with pytest.raises(KeyError):
        parse_peer_answer(b'{"class": 7}')


# ------------------------------------------------------------------------------------------------
# answer check, aggregation, verdicts, report
# ------------------------------------------------------------------------------------------------


def _expected() -> Expected:
    return Expected(
        full_labels=np.array([0, 1, 2, 3]),
        early_labels=np.array([0, 1, 1, 3]),
        early_exits=np.array([1, 2, 1, 3]),
        num_exits=3,
    )


def test_check_answers_counts_mismatches_against_the_mode() -> None:
    result = LoadResult(
        latencies_s=[0.01] * 5,
        statuses=[200, 200, 200, 200, 503],
        image_index=[0, 1, 2, 3, 0],
        labels=[0, 1, 1, 3, -1],
        exits=[1, 2, 2, 3, -1],
    )
    truth = np.array([0, 1, 2, 0])
    early = check_answers(result, EARLY_EXIT, _expected(), truth)
    assert (early["ok"], early["errors"], early["label_mismatches"], early["exit_mismatches"]) == (4, 1, 0, 1)
    assert early["accuracy"] == pytest.approx(0.5)  # images 0 and 1 right, 2 and 3 wrong
    full = check_answers(result, FULL, _expected(), truth)
    assert full["label_mismatches"] == 1  # image 2: the full network says 2
    assert full["exit_mismatches"] == 3  # only image 3's answer came from the last exit


def _cell(server: str, mode: str, rps: float, r: int, mismatches: int = 0) -> dict[str, Any]:
    return {
        "server": server, "mode": mode, "concurrency": 64, "round": r, "req_per_s": rps,
        "latency_ms": {"p50": 10.0 * (r + 1), "p99": 20.0 * (r + 1)}, "server_cpu_ms_per_request": 1.0,
        "server_cpu_utilization": 1.0, "client_cpu_ms_per_request": 0.1, "ok": 100, "errors": 0,
        "label_mismatches": mismatches, "exit_mismatches": 0, "accuracy": 0.9,
    }  # fmt: skip


def test_aggregate_medians_ranges_and_sums() -> None:
    cells = [_cell("ray_serve", FULL, v, r, mismatches=r) for r, v in enumerate([300.0, 100.0, 200.0])]
    (row,) = aggregate(cells)
    assert (row["req_per_s"], row["req_per_s_min"], row["req_per_s_max"]) == (200.0, 100.0, 300.0)
    assert row["p99_ms"] == 40.0 and row["rounds"] == 3
    assert (row["answers"], row["label_mismatches"]) == (300, 3)


def _peers_result() -> dict[str, Any]:
    cells = []
    for r in range(3):
        cells += [
            _cell("boostserve", EARLY_EXIT, 3000.0 + r, r),
            _cell("boostserve", FULL, 1500.0, r),
            _cell("ray_serve", FULL, 600.0, r),
            _cell("pytriton", FULL, 500.0, r),
            _cell(PEER_EARLY_EXIT, EARLY_EXIT, 1000.0, r),  # faster than the full-network peers
        ]
    servers = [
        {"name": n, "title": n, "batching": "b", "status": "ok", "reason": None, "versions": {n: "1.0"},
         "startup_s": [1.0]}
        for n in ("boostserve", "ray_serve", "pytriton", PEER_EARLY_EXIT)
    ]  # fmt: skip
    servers.append({"name": "bentoml", "title": "BentoML", "batching": "a", "status": "skipped",
                    "reason": "venv missing", "versions": {}, "startup_s": []})  # fmt: skip
    return {
        "model": "m", "version": "v", "images": 10, "png_bytes_mean": 500.0, "drop": 0.01,
        "thresholds": [0.9, "-inf"], "servers": servers, "cells": cells, "aggregate": aggregate(cells),
        "expected": {"full_accuracy": 0.9, "early_exit_accuracy": 0.89, "early_exit_macs_fraction": 0.2},
    }  # fmt: skip


def test_evaluate_peers_best_full_network_peer_and_hand_written_early_exit() -> None:
    best, hand = evaluate_peers(_peers_result())
    assert best.measured == pytest.approx(3001.0 / 600.0) and best.verdict == "PASS"
    assert "ray_serve" in best.measured_text  # the best full-network peer, not the early-exit one
    assert hand.measured == pytest.approx(3.001) and hand.verdict == "PASS"
    assert [t.verdict for t in evaluate_peers(None)] == ["N/A", "N/A"]


def test_evaluate_peers_misses_below_the_limits() -> None:
    result = _peers_result()
    for row in result["aggregate"]:
        if row["server"] == "boostserve" and row["mode"] == EARLY_EXIT:
            row["req_per_s"] = 1900.0
    best, hand = evaluate_peers(result)
    assert (best.verdict, hand.verdict) == ("MISS", "MISS")


def test_report_section_lists_every_server_and_skip_reason(tmp_path: Path) -> None:
    doc = {
        "result": _peers_result(),
        "settings": {"server_cpus": [1], "client_cpus": [0], "rounds": 3, "warmup_s": 2, "duration_s": 10,
                     "max_batch_size": 32, "max_wait_ms": 2.0},
        "machine": {"loadavg_1_5_15": [1.0, 1.0, 1.0]},
    }  # fmt: skip
    lines = peers_section(doc, "peers.png")
    text = "\n".join(lines)
    rows = [line for line in lines if line.startswith("| boostserve |") or line.startswith("| ray_serve")]
    assert rows[0].startswith("| boostserve | early exit")  # fastest first
    assert "`bentoml`: venv missing" in text
    assert "| ray_serve | full network | b | 600 | 600–600 |" in text
    assert "5.00×" in text  # boostserve early exit ÷ ray_serve
    assert plot_peers(doc, tmp_path).stat().st_size > 1000


def test_start_failure_reason_is_one_line() -> None:
    reason = start_failure_reason("x exited with 1; log /l:\n  File a\nValueError: bad port\n\n")
    assert reason == "server did not start: x exited with 1; log /l:; last log line: ValueError: bad port"


# ------------------------------------------------------------------------------------------------
# environments
# ------------------------------------------------------------------------------------------------


def test_peers_extra_pins_the_versions_the_suite_installs() -> None:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["peers"]
    pinned = {r for env in envs.PEER_ENVS.values() for r in env.requirements if not r.startswith("numpy")}
    assert set(extra) == pinned
    assert {s.env_name for s in PEERS.values()} == set(envs.PEER_ENVS)


def test_missing_env_without_install_is_a_reason_not_a_crash(tmp_path: Path) -> None:
    env = envs.PEER_ENVS["kserve"]
    assert envs.installed_versions(env, tmp_path) is None
    with pytest.raises(envs.PeerEnvError, match="not installed"):
        envs.ensure_env(env, tmp_path, install=False, log=tmp_path / "log")


# ------------------------------------------------------------------------------------------------
# process handling with a fake peer
# ------------------------------------------------------------------------------------------------

FAKE_PEER = """
import asyncio, json, os, sys

config = json.load(open(sys.argv[1]))
if os.fork() == 0:  # a child process, as multi-process peers have: it must be stopped with the server
    import time
    while True:
        time.sleep(1)

async def handle(reader, writer):
    while True:
        try:
            head = await reader.readuntil(b"\\r\\n\\r\\n")
        except asyncio.IncompleteReadError:
            break
        length = next(int(l.split(b":")[1]) for l in head.split(b"\\r\\n") if l.lower().startswith(b"content-length"))
        await reader.readexactly(length)
        body = json.dumps({"label": 3, "exit": 4}).encode()
        writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: "
                     + str(len(body)).encode() + b"\\r\\n\\r\\n" + body)
        await writer.drain()
    writer.close()

async def main():
    server = await asyncio.start_server(handle, config["host"], config["port"])
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


def test_fake_peer_is_started_loaded_checked_and_stopped_with_its_children(tmp_path: Path) -> None:
    from bench.server import free_port

    code = tmp_path / "code" / "peer_servers"
    code.mkdir(parents=True)
    (code / "__init__.py").write_text("")
    (code / "fake.py").write_text(FAKE_PEER)
    port = free_port()
    config = tmp_path / "fake.json"
    config.write_text(json.dumps({"host": "127.0.0.1", "port": port}))
    spec = ServerSpec("fake", "fake", "none", (FULL,), "raw_png", "/classify", module="fake", startup_timeout_s=30)
    bodies = [b"png-%d" % i for i in range(8)]
    server = PeerProcess(
        spec, Path(sys.executable), tmp_path / "code", config,
        lambda p: build_requests("raw_png", "127.0.0.1", p, "/classify", bodies[:1])[0],
        port=port, cpus=None, log_path=tmp_path / "fake.log",
    )  # fmt: skip
    server.start()
    try:
        assert server.proc is not None
        tree = process_tree(server.proc.pid)
        assert len(tree) == 2  # the server and its child
        requests = build_requests("raw_png", server.host, server.port, "/classify", bodies)
        result, cpu_s = _measure(server, requests, parse_peer_answer, concurrency=4, s=_settings(), start_index=0)
    finally:
        server.stop()
    assert result.count > 0 and set(result.statuses) == {200} and cpu_s >= 0
    expected = Expected(np.array([3, 3, 3, 3, 3, 3, 3, 5]), np.zeros(8, np.int64), np.ones(8, np.int64), 4)
    checks = check_answers(result, FULL, expected, np.full(8, 3))
    assert checks["label_mismatches"] == sum(1 for i in result.image_index if i == 7)
    assert checks["exit_mismatches"] == 0  # full network: exit 4 of 4, as the fake answers
    assert not process_tree(server.proc.pid) & tree  # nothing of it is left


# ------------------------------------------------------------------------------------------------
# a real peer, when installed
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.peers
def test_kserve_peer_serves_the_expected_answers(tmp_path: Path) -> None:
    from bench.common import Progress
    from bench.data import load_test_set
    from bench.peers.runner import run_peers

    cache = envs.default_cache()
    if envs.installed_versions(envs.PEER_ENVS["kserve"], cache) is None:
        pytest.skip(f"no kserve venv under {cache} (boostserve bench --suite peers --peers kserve installs it)")
    artifact = load_artifact(ROOT / "service" / "embedded_model")
    test = load_test_set()
    s = _settings(peers=("kserve",), images=200, duration_s=1.0, cache=str(cache), install=False)
    result = run_peers(artifact, test, s, tmp_path, tmp_path / "logs", Progress(enabled=False))
    rows = {(c["server"], c["mode"]): c for c in result["aggregate"]}
    assert rows[("kserve", FULL)]["answers"] > 0
    for row in rows.values():
        assert row["errors"] == 0 and row["label_mismatches"] == 0 and row["exit_mismatches"] == 0


def test_cli_knows_the_suite_and_rejects_unknown_peers(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.commands.bench import _suites
    from boostserve.cli import main

    assert _suites("http,peers") == ("http", "peers")
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--suite", "peers", "--peers", "ray_serve,nope"])
    assert exc.value.code == 2
    assert "unknown peer(s) ['nope']" in capsys.readouterr().err
