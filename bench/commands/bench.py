"""`boostserve bench`: the offline, engine and HTTP benchmark suites.

Top-level imports stay light (argparse only), as the CLI dispatcher requires: numpy, ONNX
Runtime, matplotlib and httpx are imported by `run` when a suite needs them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Benchmark boostserve on an artifact. Each suite writes <suite>.json under --out; every run then
regenerates the markdown summary (targets with PASS/MISS computed by code) and PNG plots from all
suite JSONs present there, so suites can be run one at a time into the same directory.

Suites (--suite, comma-separated; default all):
  offline  accuracy vs average MACs on the test split from calibration.npz: every budgeted-MAC
           policy (reference, optimal) swept over budgets, the accuracy-drop knob, the anytime
           exits and the oracle exit; BoostNet vs its t=0 baseline (--baseline; an int8 artifact
           with its fp32 source beside it, like the default, is compared through that source).
           Thresholds are chosen on held-out data and evaluated on test. Seconds; no ONNX Runtime.
  engine   in-process images/s and latency per batch size (1, 8, 32, 128): early exit (≤1 %
           drop budget) vs all stages vs ONE plain ONNX Runtime session of the full network (the
           stage graphs chained into a single model with `onnx`). Interleaved rounds; median and
           min/max reported. With an int8 artifact beside the one benchmarked (DIR_int8, written by
           `boostserve quantize`), or when the one benchmarked is such an int8 artifact with its fp32
           source DIR beside it (the default: service/embedded_model_int8), the same three modes run
           on both in the same rounds (*_int8), with time-ideal and accuracy at equal cost.
  http     closed-loop load (N clients each looping request -> response) against a real
           `python -m boostserve serve` subprocess on 127.0.0.1 with 1, 8, 64, 256 clients,
           posting PNGs of Fashion-MNIST test images: all stages (early_exit=false), early exit
           at max_accuracy_drop=0.005 and 0.01, cross-request batching on vs off; request-path
           ablations (fast path off, stages on the worker thread, start-up objects not frozen out
           of the garbage collector) and a floor server (the HTTP
           stack alone, with and without the PNG decode) that bounds what the server can reach.
           Every label is checked; reports req/s, p50/p95/p99, served accuracy, MACs, exits,
           client/server CPU. --compare-with DIR adds the same cells served by another commit.

  peers    optional, never part of the default run: the same network served by the servers users
           would otherwise pick, each with its own batching (bench.peers): Ray Serve, BentoML,
           KServe, LitServe, PyTriton (the full network as one ONNX), Ray Serve with hand-written
           early exit, and boostserve (early exit and all stages); same PNGs, load (64 clients),
           pinning and interleaved rounds; labels checked. Each peer is installed on first use
           into its own venv under --peers-cache (minutes, GBs); --no-peer-install skips instead.
           Measured: 3 rounds x 10 s per cell took ~8 min on the 2-core dev machine once installed.

  slo      optional, never part of the default run: the live controllers under open-loop Poisson load
           (bench.slo_suite): accuracy first (global max_accuracy_drop=0.001, steps of 0.5, 1, 1.5,
           0.5 x the capacity measured in the same run) served by a static server and by SLO mode
           (latency target, floor), and a drift (the whole test split, then its hardest third) under
           a global budget_macs, static vs live MAC budget. ~5 min (--quick ~2.5 min).

Old code vs new, side by side (e.g. "does this change cost early-exit req/s?"):
  git worktree add /tmp/prev <commit>
  boostserve bench --suite http --quick --http-rounds 5 --compare-with /tmp/prev --out results/compare
The `compare` server runs /tmp/prev's own `python -S -P -m boostserve serve` with PYTHONPATH=
/tmp/prev:<this environment's site-packages> (so its boostserve and service packages, nothing of
this checkout; checked before it starts) on the same --artifacts with the settings of the
`batching` server, drop_0.01 at 1 and 64 clients, interleaved in the same rounds: two more cells
per round. The summary gets a "this checkout vs <commit>" table; http.json records both commits.
Remove the checkout afterwards with `git worktree remove /tmp/prev`.

Measured durations on the 2-core dev machine with the embedded model: `--suite http --quick` took
139 s (2026-12-01, servers started included); the published default run (`make bench`: --publish
--profile, 2 HTTP rounds, 2026-12-01) took about 22.5 min (offline 48 s, engine 127 s with fp32 and
int8, http 1,170 s with the profiled cells); the slo suite about 5 min and the peers suite about
8 min on top. On this shared machine two runs of 2 rounds have differed by ~10 % in req/s.
--publish writes the results to docs/benchmarks/ and the summary to docs/benchmarks.md;
--report-only regenerates the summary and plots from the JSON already in --out.
"""

DEFAULT_DATA = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_BASELINE = Path("docs/artifacts/baseline")


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _suites(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in ("offline", "engine", "http", "peers", "slo")]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown suite(s) {unknown or text!r}: choose from offline, engine, http, peers, slo"
        )
    return names


def _cpus(text: str) -> list[int] | None:
    if text.lower() in ("", "none", "all"):
        return None
    return list(_ints_or_zero(text))


def _ints_or_zero(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected CPU numbers such as 0 or 0,1, got {text!r}") from exc


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--suite",
        type=_suites,
        default=("offline", "engine", "http"),
        help="comma-separated suites to run: offline,engine,http,peers (default: offline,engine,http)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer cells and shorter runs: all suites in under 3 minutes"
    )
    parser.add_argument(
        "--artifacts",
        type=Path,
        default=None,
        help="artifact directory to benchmark (default: the embedded model that `boostserve serve` serves, "
        "service/embedded_model_int8)",
    )
    parser.add_argument(
        "--baseline",
        type=str,
        default=str(DEFAULT_BASELINE),
        help="t=0 baseline artifact for the offline comparison; 'none' to skip "
        "(default: %(default)s, skipped when absent)",
    )
    parser.add_argument(
        "--data",
        type=str,
        default=str(DEFAULT_DATA),
        help="Fashion-MNIST directory with t10k-*-idx*-ubyte.gz, or 'synthetic' for random "
        "images (tests, synthetic artifacts)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results directory (default: results/bench-<UTC timestamp>)"
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="where to write the markdown summary (default: OUT/README.md)",
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help="shorthand for --out docs/benchmarks --markdown docs/benchmarks.md",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress output")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run no suite: regenerate the markdown and plots from the suite JSONs already in --out",
    )

    off = parser.add_argument_group("offline suite")
    off.add_argument(
        "--budget-points",
        type=int,
        default=None,
        help="budgets per budgeted-MAC policy curve (default 24, quick 12)",
    )
    off.add_argument(
        "--coverage-resamples",
        type=int,
        default=None,
        help="calibration draws of the coverage experiment (bench.coverage; default 200, quick 50, 0 = skip)",
    )

    eng = parser.add_argument_group("engine suite")
    eng.add_argument("--batch-sizes", type=_ints, default=None, help="default 1,8,32,128 (quick: 1,32)")
    eng.add_argument("--engine-rounds", type=int, default=None, help="interleaved rounds (default 5, quick 2)")
    eng.add_argument(
        "--engine-round-seconds",
        type=float,
        default=None,
        help="seconds per mode per round (default 1.0, quick 0.3)",
    )
    eng.add_argument(
        "--engine-images",
        type=int,
        default=None,
        help="test images cycled through (default 4096, quick 1024)",
    )
    eng.add_argument(
        "--threads",
        type=int,
        default=1,
        help="ONNX Runtime intra-op threads for the engine suite and the server "
        "(default 1 = service.core.engine's measured default; 0 = ORT default)",
    )

    web = parser.add_argument_group("http suite")
    web.add_argument("--concurrency", type=_ints, default=None, help="client counts (default 1,8,64,256)")
    web.add_argument("--duration", type=float, default=None, help="measured seconds per cell (default 10, quick 4)")
    web.add_argument("--max-requests", type=int, default=None, help="request cap per cell (default 30000, quick 4000)")
    web.add_argument("--warmup", type=float, default=None, help="warm-up seconds per cell (default 2, quick 1)")
    web.add_argument("--http-rounds", type=int, default=None, help="interleaved rounds (default 2, quick 1)")
    web.add_argument("--http-images", type=int, default=None, help="distinct test images posted (default 10000)")
    web.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="load generator: 'raw' asyncio HTTP/1.1 (cheap, default) or 'httpx'",
    )
    web.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the server during extra drop_0.01 cells (1 and 64 clients) and report where its "
        "Python time goes (needs py-spy: pip install py-spy)",
    )
    web.add_argument(
        "--no-client-check",
        action="store_true",
        help="skip the extra cell that measures the other client implementation's cost (full mode only)",
    )
    web.add_argument(
        "--server-cpus",
        type=_cpus,
        default=None,
        help="CPUs the server is pinned to (default: the last CPU when there are ≥2; 'none')",
    )
    web.add_argument(
        "--client-cpus",
        type=_cpus,
        default=None,
        help="CPUs the load generator is pinned to (default: the other CPUs; 'none')",
    )
    web.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="BOOSTSERVE_MAX_BATCH_SIZE of the batching server (default: the service default)",
    )
    web.add_argument(
        "--max-batch-wait-ms",
        type=float,
        default=None,
        help="BOOSTSERVE_MAX_BATCH_WAIT_MS of the batching server (default: the service default)",
    )
    web.add_argument(
        "--compare-with",
        type=Path,
        default=None,
        metavar="DIR",
        help="a checkout of another commit of this repository (git worktree add DIR <commit>): also "
        "serve the same artifact with DIR's code, as server `compare` with the batching server's "
        "settings, drop_0.01 at 1 and 64 clients in the same rounds, and report it side by side; "
        "DIR's commit is recorded",
    )
    _configure_peers(parser)
    slo = parser.add_argument_group("slo suite (--suite slo)")
    slo.add_argument("--slo-step", type=float, default=None, help="seconds per load step (default 20, quick 8)")
    slo.add_argument(
        "--slo-latency-target-ms", type=float, default=50.0, help="SLO mode's latency target (default %(default)s)"
    )


def _peer_names(text: str) -> tuple[str, ...]:
    from bench.peers.runner import PEERS

    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {unknown}: choose from {', '.join(PEERS)}")
    return names


def _configure_peers(parser: argparse.ArgumentParser) -> None:
    from bench.peers.envs import default_cache

    peers = parser.add_argument_group("peers suite (--suite peers)")
    peers.add_argument(
        "--peers",
        type=_peer_names,
        default=None,
        help="comma-separated peers (default: all: ray_serve, ray_serve_early_exit, bentoml, kserve, litserve, "
        "pytriton); boostserve always runs",
    )
    peers.add_argument(
        "--peers-cache",
        type=Path,
        default=None,
        help=f"where the peers' venvs live (default: {default_cache()}; BOOSTSERVE_PEERS_CACHE)",
    )
    peers.add_argument(
        "--no-peer-install", action="store_true", help="skip (with the reason recorded) a peer whose venv is missing"
    )
    peers.add_argument("--peer-rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    peers.add_argument(
        "--peer-duration", type=float, default=None, help="measured seconds per cell (default 10, quick 3)"
    )
    peers.add_argument("--peer-warmup", type=float, default=None, help="warm-up seconds per cell (default 2, quick 1)")
    peers.add_argument("--peer-images", type=int, default=None, help="distinct test images posted (default 5000)")
    peers.add_argument("--peer-concurrency", type=_ints, default=None, help="client counts (default 64)")
    peers.add_argument(
        "--peer-batch-wait-ms",
        type=float,
        default=2.0,
        help="every peer batcher's max wait for a fuller batch (default %(default)s ms); max batch size: "
        "--max-batch-size or boostserve's default 32",
    )


def _default_artifacts() -> Path:
    """What `boostserve serve` serves by default (the int8 embedded model; the engine suite finds its
    fp32 source beside it)."""
    from service.http.settings import EMBEDDED_MODEL_DIR

    return EMBEDDED_MODEL_DIR


def _tidy(path: Path) -> Path:
    """Relative to the working directory when inside it: results then carry no machine paths."""
    resolved = path.resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve())
    except ValueError:
        return resolved


def _pick(value: Any, full: Any, quick: Any, is_quick: bool) -> Any:
    return value if value is not None else (quick if is_quick else full)


def _default_cpus(args: argparse.Namespace) -> tuple[list[int] | None, list[int] | None]:
    import os

    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    server, client = args.server_cpus, args.client_cpus
    if len(available) >= 2:
        server = server if server is not None else available[-1:]
        client = client if client is not None else [c for c in available if c not in server] or available
    return server, client


def run(args: argparse.Namespace) -> int:
    import shlex
    import sys
    from datetime import UTC, datetime

    from bench.common import Progress, load_artifact, write_json
    from bench.machine import machine_info
    from bench.report import write_report

    quick: bool = args.quick
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    if args.publish:
        out_dir = args.out or Path("docs/benchmarks")
        markdown = args.markdown or Path("docs/benchmarks.md")
        logs_dir = Path("results") / f"bench-{stamp}-logs"  # server logs stay out of docs/
    else:
        out_dir = args.out or Path("results") / f"bench-{stamp}"
        markdown = args.markdown or out_dir / "README.md"
        logs_dir = out_dir / "logs"
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(enabled=not args.no_progress)
    artifacts = _tidy(args.artifacts or _default_artifacts())
    if not (artifacts / "manifest.json").is_file():
        print(f"no manifest.json in {artifacts}: pass --artifacts DIR", file=sys.stderr)
        return 2
    baseline: Path | None = None
    if args.baseline.lower() != "none":
        candidate = Path(args.baseline)
        if (candidate / "manifest.json").is_file():
            baseline = _tidy(candidate)
        elif args.baseline != str(DEFAULT_BASELINE):
            print(f"no manifest.json in --baseline {candidate}", file=sys.stderr)
            return 2
    compare_with: str | None = None
    if args.compare_with is not None and not args.report_only:
        from bench.compare import read_checkout

        if "http" not in args.suite:
            print("--compare-with needs the http suite (--suite http)", file=sys.stderr)
            return 2
        try:
            compare_with = str(read_checkout(args.compare_with).path)
        except ValueError as exc:
            print(f"--compare-with: {exc}", file=sys.stderr)
            return 2
    command = (
        "boostserve bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        if len(sys.argv) > 1
        else "boostserve bench"
    )
    artifact = load_artifact(artifacts)
    test_cache: list[Any] = []

    def test_set() -> Any:
        from bench.data import load_test_set, synthetic_test_set

        if not test_cache:
            if args.data == "synthetic":
                pre = artifact.manifest.preprocessing
                test_cache.append(synthetic_test_set(2048, pre.height, pre.width, len(artifact.manifest.classes)))
            else:
                test_cache.append(load_test_set(Path(args.data)))
        return test_cache[0]

    t_all = time.perf_counter()
    for suite in () if args.report_only else args.suite:
        started = datetime.now(UTC).isoformat(timespec="seconds")
        t0 = time.perf_counter()
        progress.log(f"suite {suite}: {artifacts.name} ({'quick' if quick else 'full'} mode)")
        settings: dict[str, Any]
        providers: list[str] | None = None
        if suite == "offline":
            from bench.coverage import DEFAULT_RESAMPLES
            from bench.engine_suite import fp32_source
            from bench.offline import DEFAULT_BUDGET_POINTS, run_offline

            points = _pick(args.budget_points, DEFAULT_BUDGET_POINTS, 12, quick)
            resamples = _pick(args.coverage_resamples, DEFAULT_RESAMPLES, 50, quick)
            # Against the t=0 baseline (fp32), an int8 artifact is compared through its fp32 source,
            # so the two differ only in how they were trained, not also in precision.
            source = fp32_source(artifact) if baseline is not None else None
            offline_artifacts = artifacts if source is None else _tidy(source)
            settings = {
                "quick": quick,
                "artifacts": str(offline_artifacts),
                "baseline": str(baseline),
                "budget_points": points,
                "coverage_resamples": resamples,
            }
            result = run_offline(
                offline_artifacts, baseline, budget_points=points, progress=progress, coverage_resamples=resamples
            )
        elif suite == "engine":
            from bench.engine_suite import EngineSettings, run_engine

            eng = EngineSettings(
                batch_sizes=_pick(args.batch_sizes, (1, 8, 32, 128), (1, 32), quick),
                rounds=_pick(args.engine_rounds, 5, 2, quick),
                round_seconds=_pick(args.engine_round_seconds, 1.0, 0.3, quick),
                min_calls=3,
                max_calls=100_000,
                images=_pick(args.engine_images, 4096, 1024, quick),
                intra_op_threads=args.threads,
                inter_op_threads=1,
                providers=None,
            )
            settings = {"quick": quick, "artifacts": str(artifacts), "data": args.data, **eng.__dict__}
            import tempfile

            with tempfile.TemporaryDirectory(prefix="boostserve-bench-") as workdir:
                result = run_engine(artifact, test_set(), eng, Path(workdir), progress)
            providers = result.get("engine_providers")
        elif suite == "http":
            from bench.http_suite import CLASSIFY_PATH, MODE_QUERIES, HttpSettings, default_servers, run_http

            server_cpus, client_cpus = _default_cpus(args)
            threads = args.threads if args.threads > 0 else len(server_cpus or [0])
            concurrencies = _pick(args.concurrency, (1, 8, 64, 256), (1, 64), quick)
            http_settings = HttpSettings(
                servers=default_servers(
                    quick=quick,
                    threads=threads,
                    concurrencies=concurrencies,
                    max_batch_size=args.max_batch_size,
                    max_batch_wait_ms=args.max_batch_wait_ms,
                    compare_with=compare_with,
                ),
                duration_s=_pick(args.duration, 10.0, 4.0, quick),
                max_requests=_pick(args.max_requests, 30_000, 4_000, quick),
                warmup_s=_pick(args.warmup, 2.0, 1.0, quick),
                rounds=_pick(args.http_rounds, 2, 1, quick),
                images=_pick(args.http_images, 10_000, 10_000, quick),
                client=args.client,
                server_cpus=server_cpus,
                client_cpus=client_cpus,
                client_check=not args.no_client_check and not quick,
                profile=args.profile,
            )
            settings = {
                "quick": quick,
                "artifacts": str(artifacts),
                "data": args.data,
                "path": CLASSIFY_PATH,
                "mode_queries": MODE_QUERIES,
                "servers": [s.__dict__ for s in http_settings.servers],
                **{k: v for k, v in http_settings.__dict__.items() if k != "servers"},
            }
            result = run_http(artifact, test_set(), http_settings, logs_dir, progress)
            infos = [s.get("model_info") or {} for s in result["servers"]]
            providers = sorted({p for i in infos for p in str(i.get("providers", "")).split(",") if p}) or None
        elif suite == "peers":
            settings, result = _run_peers(args, artifact, test_set(), logs_dir, progress)
        elif suite == "slo":
            from bench.slo_suite import SloSettings, run_slo

            server_cpus, client_cpus = _default_cpus(args)
            step = _pick(args.slo_step, 20.0, 8.0, quick)
            slo_settings = SloSettings(
                step_s=step,
                latency_target_ms=args.slo_latency_target_ms,
                capacity_s=_pick(None, 6.0, 4.0, quick),
                drift_phases_s=(_pick(None, 15.0, 8.0, quick), _pick(None, 40.0, 25.0, quick)),
                drift_settle_s=_pick(None, 15.0, 10.0, quick),
                server_cpus=server_cpus,
                client_cpus=client_cpus,
            )
            settings = {"quick": quick, "artifacts": str(artifacts), "data": args.data, **slo_settings.__dict__}
            result = run_slo(artifact, test_set(), slo_settings, logs_dir, progress)
        duration = time.perf_counter() - t0
        write_json(
            out_dir / f"{suite}.json",
            {
                "suite": suite,
                "command": command,
                "started_at": started,
                "duration_s": duration,
                "machine": machine_info(providers),
                "settings": settings,
                "result": result,
            },
        )
        progress.log(f"suite {suite} done in {duration:.1f} s -> {out_dir / (suite + '.json')}")
    path, targets = write_report(out_dir, markdown, command)
    progress.log(f"all done in {time.perf_counter() - t_all:.1f} s; summary: {path}")
    for t in targets:
        print(f"{t.verdict:4}  {t.description}: {t.measured_text} (limit {t.limit})")
    return 0


def _run_peers(
    args: argparse.Namespace, artifact: Any, test: Any, logs_dir: Path, progress: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The peers suite's settings and result (bench.peers.runner)."""
    import tempfile

    from bench.common import TARGET_DROP
    from bench.http_suite import default_servers
    from bench.peers.envs import default_cache
    from bench.peers.runner import PEERS, PeersSettings, run_peers

    quick: bool = args.quick
    server_cpus, client_cpus = _default_cpus(args)
    threads = args.threads if args.threads > 0 else len(server_cpus or [0])
    concurrencies = _pick(args.peer_concurrency, (64,), (64,), quick)
    batching = next(c for c in default_servers(quick=True, threads=threads, concurrencies=concurrencies)
                    if c.name == "batching")  # fmt: skip
    peers_settings = PeersSettings(
        peers=args.peers or tuple(PEERS),
        concurrencies=concurrencies,
        duration_s=_pick(args.peer_duration, 10.0, 3.0, quick),
        warmup_s=_pick(args.peer_warmup, 2.0, 1.0, quick),
        max_requests=_pick(args.max_requests, 100_000, 20_000, quick),
        rounds=_pick(args.peer_rounds, 3, 1, quick),
        images=_pick(args.peer_images, 5000, 2000, quick),
        drop=TARGET_DROP,
        max_batch_size=args.max_batch_size or 32,
        max_wait_ms=args.peer_batch_wait_ms,
        server_cpus=server_cpus,
        client_cpus=client_cpus,
        cache=str(args.peers_cache or default_cache()),
        install=not args.no_peer_install,
        boostserve_env=dict(batching.env),
    )
    settings = {"quick": quick, "artifacts": str(artifact.path), "data": args.data, **peers_settings.__dict__}
    with tempfile.TemporaryDirectory(prefix="boostserve-peers-") as workdir:
        result = run_peers(artifact, test, peers_settings, Path(workdir), logs_dir, progress)
    return settings, result
