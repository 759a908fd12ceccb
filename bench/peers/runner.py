"""The peers suite: boostserve and the servers users would otherwise pick, under the same load.

What is compared: one network (the embedded model), served
  - by boostserve (`boostserve serve`, the http suite's `batching` settings): early exit at
    max_accuracy_drop=0.01 and all stages (`early_exit=false`);
  - by each peer, the full network as one ONNX (bench.fullgraph) with the peer's own batching
    (bench.peers.servers): Ray Serve, BentoML, KServe, LitServe, PyTriton;
  - by Ray Serve with hand-written early exit in its `@serve.batch` handler: the stage graphs run
    by hand with boostserve's thresholds for the same budget (what a user would build without us).
Same PNG bodies, same closed-loop load generator (bench.loadgen, 64 clients by default), same
pinning (the server and every process it starts on `server_cpus`, the load generator on
`client_cpus`), ONNX Runtime with one intra-op thread everywhere, the same max batch size and
batch wait for every batcher that has them.

Rounds are interleaved: each round starts every server in turn (rotating order), measures its
cells, and stops it, so one server is alive at a time and a slow phase of the shared machine
hits everyone. Every answer is checked against the expected answer for its image, computed
here in-process with boostserve's engine and exit rule (full network: the last exit's label;
early exit: the label at the exit the thresholds pick, and that exit), and against the ground
truth. CPU per request is the whole process tree's CPU (Ray's raylet, GCS and actors, Triton's
server and stubs, BentoML's and LitServe's workers) over the measured window.

A peer whose venv cannot be installed or whose server does not answer is skipped with the
reason recorded in the results (never silently left out).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Artifact, Progress, thresholds_for_drop
from bench.data import TestSet, encode_png, preprocess
from bench.loadgen import LoadResult, parse_answer, run_closed_loop, summarize_latency
from bench.peers.envs import PEER_ENVS, PeerEnvError, default_cache, ensure_env
from bench.peers.protocol import Parser, build_requests, parse_peer_answer
from bench.server import ServerProcess, free_port
from bench.stats import safe_ratio

BOOSTSERVE = "boostserve"
#: Modes: the whole network for every image, or early exit at the suite's accuracy-drop budget.
FULL, EARLY_EXIT = "full", "early_exit"
MODES = (FULL, EARLY_EXIT)


@dataclass(frozen=True)
class ServerSpec:
    """One server of the suite: how to start it, what to send it, which modes it serves."""

    name: str
    title: str  # what it is, for the table
    batching: str  # how it batches, for the table
    modes: tuple[str, ...]
    protocol: str
    path: str
    env_name: str | None = None  # bench.peers.envs key; None = boostserve itself
    module: str | None = None  # peer_servers.<module>
    env: dict[str, str] = field(default_factory=dict)  # "{port}" is replaced by the server's port
    startup_timeout_s: float = 180.0
    #: (name, regex with one group): a version the server prints in its log (Triton's own server)
    log_version: tuple[str, str] | None = None


#: Ray Serve's settings for both Ray servers: the throughput-optimised mode, direct ingress on the
#: server's port, no usage reporting.
_RAY_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "{port}",
    "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "{port_plus_1}",
    "RAY_USAGE_STATS_ENABLED": "0",
}

PEERS: dict[str, ServerSpec] = {
    s.name: s
    for s in (
        ServerSpec(
            "ray_serve",
            "Ray Serve, direct ingress (RAY_SERVE_THROUGHPUT_OPTIMIZED=1), full network",
            "@serve.batch",
            (FULL,),
            "raw_png",
            "/",
            "ray",
            "ray_serve",
            _RAY_ENV,
        ),
        ServerSpec(
            "ray_serve_early_exit",
            "Ray Serve as above, hand-written early exit in the batch handler (stage graphs, same thresholds)",
            "@serve.batch",
            (EARLY_EXIT,),
            "raw_png",
            "/",
            "ray",
            "ray_serve",
            _RAY_ENV,
        ),
        ServerSpec(
            "bentoml",
            "BentoML service, one worker, full network",
            "adaptive batching (batchable API)",
            (FULL,),
            "bentoml",
            "/classify",
            "bentoml",
            "bentoml_service",
            {"BENTOML_DO_NOT_TRACK": "True"},
        ),
        ServerSpec(
            "kserve",
            "KServe ModelServer (v1 protocol), one worker, full network",
            "hand-written asyncio batcher (KServe's batcher is a Kubernetes sidecar)",
            (FULL,),
            "kserve_v1",
            "/v1/models/peer:predict",
            "kserve",
            "kserve_server",
        ),
        ServerSpec(
            "litserve",
            "LitServe, one CPU worker, fast_queue, full network",
            "LitAPI max_batch_size / batch_timeout",
            (FULL,),
            "litserve",
            "/predict",
            "litserve",
            "litserve_server",
        ),
        ServerSpec(
            "pytriton",
            "PyTriton (Triton Inference Server + Python backend), full network",
            "Triton dynamic batcher",
            (FULL,),
            "triton_bytes",
            "/v2/models/peer/infer",
            "pytriton",
            "pytriton_server",
            log_version=("tritonserver", r"server_version\s*\|\s*([0-9][0-9.]*)"),
        ),
    )
}
BOOSTSERVE_SPEC = ServerSpec(
    BOOSTSERVE,
    "boostserve serve (the http suite's batching server settings)",
    "cross-request, per stage",
    (EARLY_EXIT, FULL),
    "raw_png",
    "/v1/classify",
)
#: boostserve's query string per mode (the budget is the suite's drop, TARGET_DROP by default).
BOOSTSERVE_FULL_QUERY = "early_exit=false"
#: The hand-written-early-exit peer the targets compare against.
EARLY_EXIT_PEER = "ray_serve_early_exit"


@dataclass(frozen=True)
class PeersSettings:
    peers: tuple[str, ...]
    concurrencies: tuple[int, ...]
    duration_s: float
    warmup_s: float
    max_requests: int
    rounds: int
    images: int
    drop: float
    max_batch_size: int
    max_wait_ms: float
    server_cpus: list[int] | None
    client_cpus: list[int] | None
    cache: str = field(default_factory=lambda: str(default_cache()))
    install: bool = True
    boostserve_env: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# expected answers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """Per image: the full network's label, and the label and (1-based) exit under the thresholds."""

    full_labels: np.ndarray  # (n,)
    early_labels: np.ndarray  # (n,)
    early_exits: np.ndarray  # (n,) 1-based
    num_exits: int

    def labels(self, mode: str) -> np.ndarray:
        return self.early_labels if mode == EARLY_EXIT else self.full_labels

    def exits(self, mode: str) -> np.ndarray:
        return self.early_exits if mode == EARLY_EXIT else np.full_like(self.early_exits, self.num_exits)


def expected_from_logits(logits: list[np.ndarray], thresholds: list[float]) -> Expected:
    """From the cumulative logits of every exit (E arrays (n, classes)): both modes' answers."""
    from service.core.exit_rule import exit_indices, max_softmax

    conf = np.stack([max_softmax(lg) for lg in logits])  # (E, n)
    taken = exit_indices(conf, thresholds)  # (n,) 0-based
    labels = np.stack([np.argmax(lg, axis=1) for lg in logits])  # (E, n)
    n = labels.shape[1]
    return Expected(labels[-1].astype(np.int64), labels[taken, np.arange(n)].astype(np.int64), taken + 1, len(logits))


def compute_expected(artifact: Artifact, images: np.ndarray, thresholds: list[float], chunk: int = 256) -> Expected:
    """Every stage on every image with boostserve's engine: the answers each mode must give."""
    from service.core.engine import Engine

    pre = artifact.manifest.preprocessing
    engine = Engine(artifact.manifest, artifact.path)
    parts: list[list[np.ndarray]] = []
    for start in range(0, images.shape[0], chunk):
        batch = preprocess(
            images[start : start + chunk],
            height=pre.height,
            width=pre.width,
            channels=pre.channels,
            mean=pre.mean,
            std=pre.std,
            input_scale=pre.input_scale,
            resize=pre.resize,
        )  # (b, C, H, W)
        parts.append(engine.run_all_stages(batch))
    logits = [np.concatenate([p[k] for p in parts]) for k in range(artifact.manifest.num_stages)]
    return expected_from_logits(logits, thresholds)


# --------------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------------


def _proc_stats() -> dict[int, tuple[int, int, float]]:
    """{pid: (ppid, session id, utime + stime seconds)} of every live process we can read."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[int, int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] == "Z":  # a zombie: dead, waiting for its parent (or init) to reap it
                continue
            out[int(entry)] = (int(fields[1]), int(fields[3]), (int(fields[11]) + int(fields[12])) / ticks)
        except (OSError, ValueError, IndexError):
            continue
    return out


def process_tree(root: int, stats: dict[int, tuple[int, int, float]] | None = None) -> set[int]:
    """`root`, its descendants and every process in its session (it was started in a new session)."""
    stats = _proc_stats() if stats is None else stats
    members = {pid for pid, (_, sid, _) in stats.items() if sid == root}
    if root in stats:
        members.add(root)
    grew = True
    while grew:
        more = {pid for pid, (ppid, _, _) in stats.items() if ppid in members and pid not in members}
        members |= more
        grew = bool(more)
    return members


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of the live processes of `root`'s tree (a multi-process server's whole cost)."""
    stats = _proc_stats()
    return sum(stats[pid][2] for pid in process_tree(root, stats))


def probe(host: str, port: int, request: bytes, timeout_s: float = 10.0) -> int | None:
    """Send one pre-built request on a fresh connection; its HTTP status, None when nobody answers."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(request)
            head = b""
            while b"\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                head += chunk
            return int(head.split(b" ", 2)[1])
    except (OSError, ValueError, IndexError):
        return None


class TreeServer(ServerProcess):
    """A server process whose CPU is its whole tree's, and which is stopped with its whole tree."""

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid) if self.proc is not None else math.nan

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then after `timeout_s` SIGKILL to every process of the tree still alive.

        Short: a peer's graceful shutdown (Ray's takes ~20 s) is not what we measure.
        """
        if self.proc is None:
            return
        members = process_tree(self.proc.pid)
        super().stop(timeout_s)
        for sig in (signal.SIGTERM, signal.SIGKILL):  # what the server left behind: only processes it started
            for pid in members & set(_proc_stats()):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 5.0
            while members & set(_proc_stats()) and time.monotonic() < deadline:
                time.sleep(0.1)


class PeerProcess(TreeServer):
    """`python -m peer_servers.<module> CONFIG` in the peer's venv, ready once it classifies a PNG."""

    def __init__(
        self,
        spec: ServerSpec,
        python: Path,
        code_dir: Path,
        config_path: Path,
        probe_request: Callable[[int], bytes],
        *,
        port: int,
        cpus: list[int] | None,
        log_path: Path,
    ) -> None:
        env = {k: v.format(port=port, port_plus_1=port + 1) for k, v in spec.env.items()}
        super().__init__(Path("."), env, cpus=cpus, log_path=log_path, startup_timeout_s=spec.startup_timeout_s)
        self.port = port
        self.spec, self.python, self.code_dir, self.config_path = spec, python, code_dir, config_path
        self.probe_request = probe_request

    @property
    def command(self) -> list[str]:
        assert self.spec.module is not None
        return [str(self.python), "-m", f"peer_servers.{self.spec.module}", str(self.config_path)]

    def process_env(self) -> dict[str, str]:
        # Not this environment's PYTHONPATH or VIRTUAL_ENV: the peer's venv and the peer code only.
        base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        return {**base, "PYTHONPATH": str(self.code_dir), "PYTHONUNBUFFERED": "1", **self.env}

    def start(self) -> None:
        env = self.process_env()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(
                self.command,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.code_dir,
            )
        if self.cpus:
            os.sched_setaffinity(self.proc.pid, self.cpus)  # inherited by everything it starts
        deadline = time.monotonic() + self.startup_timeout_s
        request = self.probe_request(self.port)
        while time.monotonic() < deadline and self.proc.poll() is None:
            if probe(self.host, self.port, request) == 200:
                self.startup_s = time.perf_counter() - t0
                return
            time.sleep(0.5)
        code = self.proc.poll()
        self.stop()
        what = f"exited with {code}" if code is not None else f"did not answer 200 in {self.startup_timeout_s:.0f} s"
        raise RuntimeError(f"{self.spec.name} {what}; log {self.log_path}:\n{self.log_tail(15)}")


# --------------------------------------------------------------------------------------------------
# the suite
# --------------------------------------------------------------------------------------------------


def peer_config(
    artifact: Artifact, full_onnx: Path, thresholds: list[float], *, port: int, early_exit: bool, s: PeersSettings
) -> dict[str, Any]:
    """The JSON a peer server reads (bench.peers.servers.model.PeerConfig)."""
    pre = artifact.manifest.preprocessing
    stages = [
        {
            "file": str((artifact.path / st.file).resolve()),
            "inputs": {i.name: i.source for i in st.inputs},
            "outputs": [o.name for o in st.outputs],
            "logits_output": st.logits_output,
        }
        for st in artifact.manifest.stages
    ]
    return {
        "host": "127.0.0.1",
        "port": port,
        "full_onnx": str(full_onnx.resolve()),
        "stages": stages,
        "thresholds": [None if t == math.inf else ("-inf" if t == -math.inf else t) for t in thresholds],
        "height": pre.height,
        "width": pre.width,
        "channels": pre.channels,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "input_scale": pre.input_scale,
        "max_batch_size": s.max_batch_size,
        "max_wait_ms": s.max_wait_ms,
        "early_exit": early_exit,
    }


def check_answers(result: LoadResult, mode: str, expected: Expected, truth: np.ndarray) -> dict[str, Any]:
    """Labels (and exits) of every 200 answer against the expected answers and the ground truth."""
    statuses = np.asarray(result.statuses, dtype=np.int64)
    ok = statuses == 200
    idx = np.asarray(result.image_index, dtype=np.int64)[ok]
    labels = np.asarray(result.labels, dtype=np.int64)[ok]
    exits = np.asarray(result.exits, dtype=np.int64)[ok]
    n_ok = int(ok.sum())
    mismatched = int((labels != expected.labels(mode)[idx]).sum()) if n_ok else 0
    exit_known = exits > 0
    exit_mismatched = int((exits[exit_known] != expected.exits(mode)[idx[exit_known]]).sum()) if n_ok else 0
    return {
        "ok": n_ok,
        "errors": int(statuses.size - n_ok),
        "label_mismatches": mismatched,
        "exit_mismatches": exit_mismatched,
        "exits_reported": int(exit_known.sum()),
        "accuracy": float((labels == truth[idx]).mean()) if n_ok else math.nan,
        "exit_histogram": np.bincount(exits[exit_known] - 1, minlength=expected.num_exits).tolist()
        if exit_known.any()
        else [],
    }


def _measure(
    server: ServerProcess,
    requests: list[bytes],
    parse: Parser,
    *,
    concurrency: int,
    s: PeersSettings,
    start_index: int,
) -> tuple[LoadResult, float]:
    """Warm up, then one measured closed-loop window; (result, server tree CPU seconds in it)."""
    common: dict[str, Any] = dict(
        host=server.host, port=server.port, path="", bodies=requests, requests=requests, parse=parse,
        concurrency=concurrency, max_requests=s.max_requests,
    )  # fmt: skip
    if s.warmup_s > 0:
        asyncio.run(run_closed_loop(duration_s=s.warmup_s, warmup_s=0.0, start_index=start_index, **common))
    cpu0 = server.cpu_seconds()
    result = asyncio.run(run_closed_loop(duration_s=s.duration_s, warmup_s=0.0, start_index=start_index, **common))
    return result, server.cpu_seconds() - cpu0


def cell_summary(
    server: str, mode: str, concurrency: int, round_index: int, result: LoadResult, cpu_s: float, checks: dict[str, Any]
) -> dict[str, Any]:
    """One measured window's numbers."""
    latency = summarize_latency(result.latencies_s)
    return {
        "server": server,
        "mode": mode,
        "concurrency": concurrency,
        "round": round_index,
        "requests": result.count,
        "wall_s": result.wall_s,
        "req_per_s": result.count / result.wall_s if result.wall_s > 0 else math.nan,
        "latency_ms": latency,
        "server_cpu_ms_per_request": 1e3 * safe_ratio(cpu_s, result.count),
        "server_cpu_utilization": safe_ratio(cpu_s, result.wall_s),
        "client_cpu_ms_per_request": 1e3 * safe_ratio(result.client_cpu_s, result.count),
        "first_error": result.first_error,
        "thresholds_served": result.thresholds,
        **checks,
    }


def aggregate(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (server, mode, clients): medians over rounds, req/s min–max, answers and mismatches summed."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["server"], c["mode"], c["concurrency"]), []).append(c)

    def med(values: list[Any]) -> float:
        finite = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
        return float(np.median(finite)) if finite else math.nan

    out = []
    for (server, mode, concurrency), group in groups.items():
        rps = [c["req_per_s"] for c in group]
        ok = sum(c["ok"] for c in group)
        out.append(
            {
                "server": server,
                "mode": mode,
                "concurrency": concurrency,
                "rounds": len(group),
                "req_per_s": med(rps),
                "req_per_s_min": float(np.nanmin(rps)),
                "req_per_s_max": float(np.nanmax(rps)),
                "p50_ms": med([c["latency_ms"]["p50"] for c in group]),
                "p99_ms": med([c["latency_ms"]["p99"] for c in group]),
                "p99_ms_min": float(np.nanmin([c["latency_ms"]["p99"] for c in group])),
                "p99_ms_max": float(np.nanmax([c["latency_ms"]["p99"] for c in group])),
                "server_cpu_ms_per_request": med([c["server_cpu_ms_per_request"] for c in group]),
                "server_cpu_utilization": med([c["server_cpu_utilization"] for c in group]),
                "client_cpu_ms_per_request": med([c["client_cpu_ms_per_request"] for c in group]),
                "answers": ok,
                "errors": sum(c["errors"] for c in group),
                "label_mismatches": sum(c["label_mismatches"] for c in group),
                "exit_mismatches": sum(c["exit_mismatches"] for c in group),
                "accuracy": sum(c["accuracy"] * c["ok"] for c in group if c["ok"]) / ok if ok else math.nan,
            }
        )
    return out


def start_failure_reason(error: str) -> str:
    """One line for the table: what happened and the last line of the server's log."""
    first, _, log = error.partition("\n")
    last = next((line.strip() for line in reversed(log.splitlines()) if line.strip()), "")
    return f"server did not start: {first}" + (f"; last log line: {last[:300]}" if last else "")


def _rotate(items: list[Any], r: int) -> list[Any]:
    shift = r % max(len(items), 1)
    return items[shift:] + items[:shift]


def run_peers(
    artifact: Artifact, test: TestSet, s: PeersSettings, workdir: Path, logs_dir: Path, progress: Progress
) -> dict[str, Any]:
    """Install (on demand), start, load and check every server; the suite's JSON body."""
    from bench.fullgraph import FullGraphUnavailable, build_full_network
    from bench.http_suite import pinned

    unknown = [p for p in s.peers if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; known: {', '.join(PEERS)}")
    subset = test.head(s.images)
    bodies = encode_png(subset.images)
    thresholds = thresholds_for_drop(artifact, s.drop)
    progress.log(f"peers: expected answers of {len(bodies)} images (boostserve engine, every exit)")
    expected = compute_expected(artifact, subset.images, thresholds)
    cache = Path(s.cache)

    servers: dict[str, dict[str, Any]] = {
        BOOSTSERVE: {"spec": BOOSTSERVE_SPEC, "status": "ok", "reason": None, "versions": {}},
    }
    full_onnx: Path | None = None
    full_reason = ""
    try:
        full_onnx = build_full_network(artifact.manifest, artifact.path, workdir / "full_network.onnx")
    except FullGraphUnavailable as exc:
        full_reason = f"no full-network ONNX: {exc}"
    code_dir = workdir / "peer_code"
    shutil.copytree(Path(__file__).parent / "servers", code_dir / "peer_servers",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    for name in s.peers:
        spec = PEERS[name]
        entry: dict[str, Any] = {"spec": spec, "status": "ok", "reason": None, "versions": {}}
        servers[name] = entry
        if full_onnx is None:
            entry.update(status="skipped", reason=full_reason)
            continue
        assert spec.env_name is not None
        env = PEER_ENVS[spec.env_name]
        if s.install and not env.python(cache).is_file():
            progress.log(f"peers: installing {', '.join(env.requirements)} into {env.path(cache)} (once)")
        try:
            entry["versions"] = ensure_env(env, cache, install=s.install, log=logs_dir / f"install-{env.name}.log")
        except PeerEnvError as exc:
            entry.update(status="skipped", reason=str(exc))
            progress.log(f"peers: {name} skipped: {exc}")

    def make_server(name: str) -> ServerProcess:
        spec = servers[name]["spec"]
        log_path = logs_dir / f"peer-{name}.log"
        if name == BOOSTSERVE:
            return TreeServer(artifact.path, dict(s.boostserve_env), cpus=s.server_cpus, log_path=log_path)
        assert spec.env_name is not None and full_onnx is not None
        port = free_port()
        config_path = workdir / f"{name}.json"
        config_path.write_text(
            json.dumps(
                peer_config(artifact, full_onnx, thresholds, port=port, early_exit=EARLY_EXIT in spec.modes, s=s)
            )
        )
        return PeerProcess(
            spec,
            PEER_ENVS[spec.env_name].python(cache),
            code_dir,
            config_path,
            lambda p: build_requests(spec.protocol, "127.0.0.1", p, spec.path, bodies[:1])[0],
            port=port,
            cpus=s.server_cpus,
            log_path=log_path,
        )

    cells: list[dict[str, Any]] = []
    next_start: dict[tuple[str, str], int] = {}
    names = list(servers)
    with pinned(s.client_cpus):
        for r in range(s.rounds):
            for name in _rotate(names, r):
                entry = servers[name]
                if entry["status"] != "ok":
                    continue
                spec = entry["spec"]
                server = make_server(name)
                try:
                    server.start()
                except RuntimeError as exc:
                    entry.setdefault("start_failures", []).append({"round": r, "error": str(exc)[-2000:]})
                    if not any(c["server"] == name for c in cells):
                        entry.update(status="skipped", reason=start_failure_reason(str(exc)))
                    progress.log(f"peers: {name} failed to start in round {r + 1}: {str(exc)[:300]}")
                    continue
                entry.setdefault("startup_s", []).append(server.startup_s)
                try:
                    for mode in _rotate(list(spec.modes), r):
                        path = spec.path
                        if name == BOOSTSERVE:
                            query = BOOSTSERVE_FULL_QUERY if mode == FULL else f"max_accuracy_drop={s.drop:g}"
                            path = f"{spec.path}?{query}"
                        requests = build_requests(spec.protocol, server.host, server.port, path, bodies)
                        parse: Parser = parse_answer if name == BOOSTSERVE else parse_peer_answer
                        for concurrency in s.concurrencies:
                            start = next_start.get((name, mode), 0)
                            result, cpu_s = _measure(
                                server, requests, parse, concurrency=concurrency, s=s, start_index=start
                            )
                            next_start[(name, mode)] = result.next_index
                            checks = check_answers(result, mode, expected, subset.labels)
                            cell = cell_summary(name, mode, concurrency, r, result, cpu_s, checks)
                            cells.append(cell)
                            progress.log(
                                f"peers round {r + 1}/{s.rounds}: {name} {mode} c={concurrency}: "
                                f"{cell['req_per_s']:.0f} req/s, p99 {cell['latency_ms']['p99']:.1f} ms, "
                                f"{cell['server_cpu_ms_per_request']:.3f} CPU ms/req, "
                                f"{checks['label_mismatches']} label mismatches, {checks['errors']} errors"
                            )
                finally:
                    server.stop()
                    if spec.log_version and spec.log_version[0] not in entry["versions"]:
                        found = re.search(spec.log_version[1], server.log_tail(100_000))
                        if found:
                            entry["versions"][spec.log_version[0]] = found.group(1)
    return {
        "model": artifact.manifest.name,
        "version": artifact.manifest.version,
        "images": len(bodies),
        "png_bytes_mean": float(np.mean([len(b) for b in bodies])),
        "drop": s.drop,
        "thresholds": thresholds,
        "expected": {
            "full_accuracy": float((expected.full_labels == subset.labels).mean()),
            "early_exit_accuracy": float((expected.early_labels == subset.labels).mean()),
            "early_exit_agreement_with_full": float((expected.early_labels == expected.full_labels).mean()),
            "early_exit_macs_fraction": float(
                artifact.cumulative_macs[expected.early_exits - 1].mean() / artifact.full_macs
            ),
        },
        "servers": [
            {
                "name": name,
                "title": e["spec"].title,
                "batching": e["spec"].batching,
                "modes": list(e["spec"].modes),
                "protocol": e["spec"].protocol,
                "path": e["spec"].path,
                "env": e["spec"].env,
                "status": e["status"],
                "reason": e["reason"],
                "versions": e["versions"],
                "startup_s": e.get("startup_s", []),
                "start_failures": e.get("start_failures", []),
            }
            for name, e in servers.items()
        ],
        "cells": cells,
        "aggregate": aggregate(cells),
    }
