"""The GPU check's Python steps (`make gpu-check`, scripts/gpu_check.sh; docs/gpu.md).

Why a module of its own: a GPU machine may be lent for a few minutes, with no time to write a
check then. Each step here is one command that writes its JSON (and markdown) as soon as it has
something, so a step stopped by the script's time cap still leaves what it measured:

  providers  ONNX Runtime's build and the providers each stage session really got
             (`session.get_providers()`, read back by the Engine); exit 2 when CUDA was required
             and is not in use: ORT falls back to CPU silently, so numbers would lie otherwise.
  engine     bench.engine_suite's measurement (early exit, all stages, one full-network ORT
             session) on the device and on CPU, same images, batch 1-256, plus the parity of
             the two devices (labels, exits, logits, and the calibration's own confidences).
  summary    one gpu_check.json + summary.md from the script's step table and the files above.
  sample     writes bench/fmnist_test_head.npz, the images the check uses when no dataset is
             installed (the first test images in file order, so calibration.npz's test arrays
             hold their CPU confidences).

The device run is `--device cuda`; `--device cpu` runs the same steps on the CPU provider
in seconds (the script's `--cpu-only`, what CI runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import TARGET_DROP, Artifact, Progress, load_artifact, thresholds_for_drop, write_json
from bench.data import TestSet, load_test_set
from bench.engine_suite import EngineSettings, preprocessed, run_engine

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

#: The fixed image set of the check when no dataset is installed (`sample` writes it).
SAMPLE_PATH = Path(__file__).resolve().parent / "fmnist_test_head.npz"
SAMPLE_SIZE = 512
#: Batch sizes of the device run (the issue: "batch 1-256") and of the CPU-only dry run.
GPU_BATCH_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DRY_BATCH_SIZES: tuple[int, ...] = (1, 8)
#: Two devices' logits may differ by rounding (cuDNN kernels, TF32); a label may then flip only
#: where the CPU's top-2 logits are closer than this. Wider gaps must give the same label.
LABEL_TIE_MARGIN = 0.05


def embedded_artifact_dir() -> Path:
    """The packaged model the check runs (no download, no dataset): its fp32 version, since the int8
    one's QDQ graphs are a CPU choice (its stage precisions were measured on the CPU)."""
    from service.http.settings import EMBEDDED_FP32_MODEL_DIR

    return Path(EMBEDDED_FP32_MODEL_DIR)


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def load_images(data_dir: Path | None, limit: int) -> tuple[TestSet, str]:
    """(test images, how they were found): the dataset when given, else the shipped sample.

    Both start at test image 0 in file order, so image i's CPU confidences are column i of
    calibration.npz's test arrays.
    """
    if data_dir is not None:
        return load_test_set(data_dir, limit=limit), f"dataset {data_dir}"
    with np.load(SAMPLE_PATH, allow_pickle=False) as data:
        images = np.asarray(data["images"], dtype=np.uint8)  # (n, 28, 28)
        labels = np.asarray(data["labels"], dtype=np.int64)  # (n,)
    return TestSet(images, labels, str(SAMPLE_PATH)).head(limit), f"shipped sample {SAMPLE_PATH.name}"


def write_sample(data_dir: Path, out: Path, n: int = SAMPLE_SIZE) -> Path:
    """The first n test images and labels, byte-reproducible (service.core.artifact's npz writer)."""
    from service.core.artifact import save_calibration_npz

    test = load_test_set(data_dir, limit=n)
    save_calibration_npz(out, {"images": test.images, "labels": test.labels.astype(np.uint8)})
    return out


# --------------------------------------------------------------------------------------------------
# providers
# --------------------------------------------------------------------------------------------------


def _distributions() -> dict[str, str]:
    """Installed onnxruntime distributions: two at once overwrite each other's files."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str] = {}
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def provider_report(device: str) -> dict[str, Any]:
    """What ORT offers and what the engine's sessions really run on, after one real inference."""
    import onnxruntime as ort

    from service.core.artifact import load_manifest
    from service.core.engine import Engine

    root = embedded_artifact_dir()
    requested = [CUDA, CPU] if device == "cuda" else [CPU]
    report: dict[str, Any] = {
        "device": device,
        "onnxruntime": ort.__version__,
        "distributions": _distributions(),
        "build_cuda_version": getattr(ort, "cuda_version", None) or None,
        "available_providers": ort.get_available_providers(),
        "requested_providers": requested,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        engine = Engine(load_manifest(root), root, providers=requested)
        logits = engine.run_all_stages(np.zeros((2, *engine.input_shape), dtype=np.float32))
    except Exception as exc:  # the report must say why, whatever ORT raised
        report.update(session_providers=[], every_stage_on_device=False, error=f"{type(exc).__name__}: {exc}")
        return report
    report.update(
        session_providers=engine.providers,
        every_stage_on_device=engine.uses_cuda if device == "cuda" else CPU in engine.providers,
        io_binding=engine.binding_device if engine.uses_binding else "off",
        inference_ok=bool(all(np.isfinite(f).all() for f in logits)),
    )
    return report


def cmd_providers(args: argparse.Namespace) -> int:
    report = provider_report(args.device)
    write_json(args.out / "providers.json", report)
    print(json.dumps(report, indent=2, default=str))
    if args.device == "cuda" and not report["every_stage_on_device"]:
        print(
            f"FAIL: {CUDA} is not what the sessions run on: session.get_providers() gave "
            f"{report['session_providers']} (available: {report['available_providers']}; "
            f"error: {report.get('error', 'none')}). ONNX Runtime fell back to CPU; the log above "
            "names the library it could not load.",
            file=sys.stderr,
        )
        return 2
    return 0


# --------------------------------------------------------------------------------------------------
# engine
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One engine-suite run: a label for the report and the providers it asks for."""

    label: str
    providers: list[str]
    io_binding: bool | None = None  # None: the engine's default (on when every stage runs on CUDA)


def runs_for(device: str) -> list[Run]:
    """The device first (the numbers the lease is for), then the CPU reference.

    On CUDA the engine binds by default, so the device run times the binding path. The dry run's
    io_binding reaches only the parity check: bench.engine_suite builds its own engines (plain
    path on CPU), so "cpu-dry" timings are the CPU's plain path, a test of the code, not a number.
    """
    if device == "cuda":
        return [Run("cuda", [CUDA, CPU]), Run("cpu", [CPU])]
    return [Run("cpu-dry", [CPU], io_binding=True), Run("cpu", [CPU])]


def settings_for(device: str, budget_s: float, runs: int, cpu_threads: int, images: int) -> EngineSettings:
    """Round length from the time budget: every (batch, mode, round) cell gets an equal share.

    Why 1.6: per batch size the suite also makes one untimed call per mode and a stage-cost pass,
    and the CPU's large batches run past the round length (min_calls); measured on the dry run.
    """
    batch_sizes = GPU_BATCH_SIZES if device == "cuda" else DRY_BATCH_SIZES
    rounds = 3 if device == "cuda" else 1
    cells = runs * len(batch_sizes) * 3 * rounds
    round_seconds = max(0.02, min(1.0, budget_s / (cells * 1.6)))
    return EngineSettings(
        batch_sizes=batch_sizes,
        rounds=rounds,
        round_seconds=round_seconds,
        min_calls=3 if device == "cuda" else 1,
        max_calls=100_000,
        images=images,
        intra_op_threads=cpu_threads,
        inter_op_threads=1,
        providers=None,  # set per run
    )


def device_parity(artifact: Artifact, x: np.ndarray, device: Run, reference: Run, test_index0: int) -> dict[str, Any]:
    """The device's answers against the CPU's on the same images (and against calibration.npz).

    labels: argmax of F_k per exit; a mismatch is tolerated only where the CPU's top-2 logits are
    within LABEL_TIE_MARGIN (counted apart). exits: `classify` at the suite's 1 % thresholds.
    calibration: the stored test confidences were computed by the CPU engine at export.
    """
    from service.core.engine import Engine
    from service.core.exit_rule import confidence, softmax

    thresholds = thresholds_for_drop(artifact, TARGET_DROP)
    engines = {
        run.label: Engine(artifact.manifest, artifact.path, providers=run.providers, io_binding=run.io_binding)
        for run in (device, reference)
    }
    dev, ref = engines[device.label], engines[reference.label]
    batch = 256
    chunks = [x[i : i + batch] for i in range(0, len(x), batch)]
    dev_f = [np.concatenate(parts) for parts in zip(*(dev.run_all_stages(c) for c in chunks), strict=True)]
    ref_f = [np.concatenate(parts) for parts in zip(*(ref.run_all_stages(c) for c in chunks), strict=True)]
    per_exit = []
    for k, (d, r) in enumerate(zip(dev_f, ref_f, strict=True)):  # each (n, classes)
        top2 = np.sort(r, axis=-1)[:, -2:]  # (n, 2)
        tie = (top2[:, 1] - top2[:, 0]) < LABEL_TIE_MARGIN
        differ = d.argmax(axis=-1) != r.argmax(axis=-1)
        per_exit.append(
            {
                "exit": k + 1,
                "label_mismatches": int(differ.sum()),
                "label_mismatches_beyond_ties": int((differ & ~tie).sum()),
                "max_abs_logit_diff": float(np.abs(d - r).max()),
                "max_abs_confidence_diff": float(np.abs(confidence(softmax(d)) - confidence(softmax(r))).max()),
            }
        )
    dev_exit = np.concatenate([[r.exit_index for r in dev.classify(c, thresholds)] for c in chunks])
    ref_exit = np.concatenate([[r.exit_index for r in ref.classify(c, thresholds)] for c in chunks])
    out: dict[str, Any] = {
        "device": device.label,
        "reference": reference.label,
        "images": len(x),
        "device_providers": dev.providers,
        "io_binding": dev.binding_device if dev.uses_binding else "off",
        "per_exit": per_exit,
        "exit_mismatches": int((dev_exit != ref_exit).sum()),
        "label_tie_margin": LABEL_TIE_MARGIN,
    }
    if artifact.test is not None and test_index0 + len(x) <= artifact.test.confidence.shape[1]:
        stored = artifact.test.confidence[:, test_index0 : test_index0 + len(x)]  # (E, n)
        for name, f in (("device", dev_f), ("reference", ref_f)):
            got = np.stack([confidence(softmax(fk)) for fk in f])  # (E, n)
            out[f"{name}_vs_calibration_max_abs_confidence_diff"] = float(np.abs(got - stored).max())
        out["reference_equals_calibration_bitwise"] = bool(
            np.array_equal(np.stack([confidence(softmax(fk)) for fk in ref_f]), stored)
        )
    return out


def compare(results: dict[str, dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """Per batch size: images/s of every (run, mode) and the ratios the issue asks for."""

    def ips(run: str, mode: str, batch: int) -> float | None:
        for cell in results.get(run, {}).get("cells", []):
            if cell["mode"] == mode and cell["batch_size"] == batch:
                return float(cell["images_per_s"]["median"])
        return None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    labels = [r.label for r in runs_for(device)]
    dev, ref = labels[0], labels[1]
    batches = sorted({c["batch_size"] for r in results.values() for c in r.get("cells", [])})
    rows = []
    for b in batches:
        row: dict[str, Any] = {"batch_size": b}
        for run in labels:
            for mode in ("early_exit", "all_stages", "full_onnx"):
                row[f"{run}_{mode}"] = ips(run, mode, b)
        row["device_early_exit_vs_device_full_onnx"] = ratio(ips(dev, "early_exit", b), ips(dev, "full_onnx", b))
        row["device_early_exit_vs_cpu_early_exit"] = ratio(ips(dev, "early_exit", b), ips(ref, "early_exit", b))
        row["device_full_onnx_vs_cpu_full_onnx"] = ratio(ips(dev, "full_onnx", b), ips(ref, "full_onnx", b))
        rows.append(row)
    return rows


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:,.{digits}f}"


def engine_markdown(payload: dict[str, Any]) -> str:
    """The engine step's report: the comparison table and the parity, nothing claimed beyond it."""
    labels = payload["runs"]
    dev, ref = labels[0], labels[1]
    lines = [
        "# GPU check: engine suite",
        "",
        f"Written by `{payload['command']}` at {payload['finished_utc']} (UTC).",
        f"Images: {payload['images']} ({payload['image_source']}); thresholds: the 1 % accuracy-drop budget "
        f"{payload['thresholds']}; CPU runs with {payload['cpu_threads']} intra-op thread(s) of "
        f"{payload['cpu_count']} cores; {payload['settings']['rounds']} interleaved round(s) of "
        f"{payload['settings']['round_seconds']:.2f} s per cell, median images/s.",
        "",
    ]
    for label in labels:
        body = payload["results"].get(label)
        if body is None:
            lines.append(f"- {label}: not measured ({payload['missing'].get(label, 'stopped before it ran')})")
        else:
            lines.append(f"- {label}: providers {body.get('engine_providers')}, parity {body.get('parity')}")
    lines += [
        "",
        f"| batch | {dev} early exit | {dev} all stages | {dev} full ORT | {ref} early exit | {ref} full ORT "
        f"| {dev} early exit ÷ {dev} full ORT | {dev} ÷ {ref} (early exit) | {dev} ÷ {ref} (full ORT) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["comparison"]:
        lines.append(
            f"| {row['batch_size']} | {_fmt(row[f'{dev}_early_exit'])} | {_fmt(row[f'{dev}_all_stages'])} "
            f"| {_fmt(row[f'{dev}_full_onnx'])} | {_fmt(row[f'{ref}_early_exit'])} | {_fmt(row[f'{ref}_full_onnx'])} "
            f"| {_fmt(row['device_early_exit_vs_device_full_onnx'], 2)} "
            f"| {_fmt(row['device_early_exit_vs_cpu_early_exit'], 2)} "
            f"| {_fmt(row['device_full_onnx_vs_cpu_full_onnx'], 2)} |"
        )
    parity = payload.get("device_parity")
    lines += ["", "## Device vs CPU answers", ""]
    if not parity:
        lines.append(f"Not measured: {payload.get('device_parity_error', 'stopped before it ran')}.")
    else:
        lines.append(
            f"{parity['images']} images, device providers {parity['device_providers']}, IO binding "
            f"{parity['io_binding']}; exits that differ at the 1 % thresholds: {parity['exit_mismatches']}."
        )
        if "device_vs_calibration_max_abs_confidence_diff" in parity:
            lines.append(
                f"Max |confidence − calibration.npz| (computed by the CPU engine at export): device "
                f"{parity['device_vs_calibration_max_abs_confidence_diff']:.3g}, CPU "
                f"{parity['reference_vs_calibration_max_abs_confidence_diff']:.3g} (bitwise equal: "
                f"{parity['reference_equals_calibration_bitwise']})."
            )
        lines += [
            "",
            "| exit | label mismatches | beyond ties (top-2 gap ≥ "
            f"{parity['label_tie_margin']}) | max abs logit diff | max abs confidence diff |",
            "|---|---|---|---|---|",
        ]
        for e in parity["per_exit"]:
            lines.append(
                f"| {e['exit']} | {e['label_mismatches']} | {e['label_mismatches_beyond_ties']} "
                f"| {e['max_abs_logit_diff']:.3g} | {e['max_abs_confidence_diff']:.3g} |"
            )
    if payload.get("plot"):
        lines += ["", f"![images/s per batch size]({payload['plot']})"]
    return "\n".join(lines) + "\n"


def engine_plot(payload: dict[str, Any], out: Path) -> str | None:
    """images/s against batch size per (run, mode), log-log; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"early_exit": "-o", "all_stages": "--s", "full_onnx": ":^"}
    for label, body in payload["results"].items():
        for mode, style in styles.items():
            cells = sorted((c for c in body["cells"] if c["mode"] == mode), key=lambda c: c["batch_size"])
            if cells:
                ax.plot(
                    [c["batch_size"] for c in cells],
                    [c["images_per_s"]["median"] for c in cells],
                    style,
                    label=f"{label} {mode.replace('_', ' ')}",
                )
    ax.set_xscale("log", base=2)
    batches = sorted({c["batch_size"] for body in payload["results"].values() for c in body["cells"]})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_yscale("log")
    ax.set_title(f"engine on {' vs '.join(payload['results'])}: {payload['images']} images", fontsize=10)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s (median of rounds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out.name


def cmd_engine(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    artifact = load_artifact(embedded_artifact_dir())
    test, source = load_images(args.data, args.images)
    runs = runs_for(args.device)
    settings = settings_for(args.device, args.budget, len(runs), args.cpu_threads, len(test))
    payload: dict[str, Any] = {
        "command": " ".join(["python -m bench.gpu_check", *sys.argv[1:]]),
        "device": args.device,
        "runs": [r.label for r in runs],
        "images": len(test),
        "image_source": source,
        "thresholds": thresholds_for_drop(artifact, TARGET_DROP),
        "cpu_threads": args.cpu_threads,
        "cpu_count": os.cpu_count(),
        "settings": {
            "batch_sizes": list(settings.batch_sizes),
            "rounds": settings.rounds,
            "round_seconds": settings.round_seconds,
            "budget_s": args.budget,
        },
        "results": {},
        "missing": {},
        "comparison": [],
    }

    def flush() -> None:
        payload["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        payload["comparison"] = compare(payload["results"], args.device)
        write_json(out / "engine.json", payload)
        (out / "engine.md").write_text(engine_markdown(payload))

    progress = Progress(enabled=not args.quiet)
    x = preprocessed(artifact, test)
    if args.device == "cuda":  # CPU numbers under a CUDA label would be worse than none
        from service.core.engine import Engine

        probe = Engine(artifact.manifest, artifact.path, providers=runs[0].providers)
        if not probe.uses_cuda:
            payload["missing"] = {r.label: f"not run: the sessions fell back to {probe.providers}" for r in runs}
            flush()
            print(f"FAIL: the engine's sessions run on {probe.providers}, not {CUDA}", file=sys.stderr)
            return 2
    status = 0
    try:
        payload["device_parity"] = device_parity(artifact, x, runs[0], runs[1], test_index0=0)
    except Exception as exc:  # recorded, and the timing still runs
        payload["device_parity_error"] = f"{type(exc).__name__}: {exc}"
        status = 1
    flush()
    for run in runs:
        run_settings = replace(settings, providers=run.providers)
        try:
            with tempfile.TemporaryDirectory() as workdir:  # the chained full-network .onnx, not a result
                # The packaged artifact alone (no `<dir>_int8` beside it): the cells are sized for it.
                body = run_engine(artifact, test, run_settings, Path(workdir), progress, int8=None)
        except Exception as exc:
            payload["missing"][run.label] = f"{type(exc).__name__}: {exc}"
            status = 1
            flush()
            continue
        if run.label == "cuda" and CUDA not in body.get("engine_providers", []):
            payload["missing"][run.label] = f"the engine ran on {body.get('engine_providers')}, not CUDA"
            status = 2
            flush()
            break
        payload["results"][run.label] = body
        flush()
    payload["plot"] = engine_plot(payload, out / "engine.png")
    flush()
    print((out / "engine.md").read_text())
    return status


# --------------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------------


def read_steps(path: Path) -> list[dict[str, Any]]:
    """The script's step table: one `name<TAB>rc<TAB>seconds<TAB>note` line per step."""
    steps = []
    if path.is_file():
        for line in path.read_text().splitlines():
            name, rc, seconds, note = [*line.split("\t"), "", "", ""][:4]
            steps.append(
                {
                    "step": name,
                    "rc": int(rc) if rc.lstrip("-").isdigit() else None,
                    "seconds": float(seconds) if seconds else None,
                    "note": note,
                }
            )
    return steps


def read_junit(path: Path) -> dict[str, Any] | None:
    """Counts of a pytest junit XML (tests, failures, errors, skipped) and the failing test names."""
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    skipped = [
        f"{case.get('name')}: {(case.find('skipped').get('message') or '')[:120]}"  # type: ignore[union-attr]
        for case in suite.iter("testcase")
        if case.find("skipped") is not None
    ]
    return {**counts, "failed": failed, "skipped_tests": skipped}


def cmd_summary(args: argparse.Namespace) -> int:
    out: Path = args.out
    steps = read_steps(out / "steps.tsv")
    providers = json.loads((out / "providers.json").read_text()) if (out / "providers.json").is_file() else None
    engine = json.loads((out / "engine.json").read_text()) if (out / "engine.json").is_file() else None
    tests = read_junit(out / "pytest-gpu.xml")
    passed = bool(steps) and all(s["rc"] == 0 for s in steps) and tests is not None and tests["tests"] > 0
    passed = passed and tests is not None and tests["failures"] == tests["errors"] == tests["skipped"] == 0
    summary = {
        "passed": passed,
        "device": args.device,
        "steps": steps,
        "providers": providers,
        "gpu_tests": tests,
        "engine": {"json": "engine.json", "markdown": "engine.md"} if engine else None,
        "written_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    write_json(out / "gpu_check.json", summary)
    lines = [
        f"# GPU check: {'PASSED' if passed else 'FAILED'}",
        "",
        f"Device `{args.device}`, written {summary['written_utc']} UTC by scripts/gpu_check.sh.",
        "",
        "| step | exit code | seconds | note |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s['step']} | {s['rc']} | {_fmt(s['seconds'], 1)} | {s['note']} |" for s in steps]
    if providers:
        lines += [
            "",
            f"ONNX Runtime {providers.get('onnxruntime')} ({providers.get('distributions')}, built for CUDA "
            f"{providers.get('build_cuda_version')}); available {providers.get('available_providers')}; the "
            f"sessions run on {providers.get('session_providers')}"
            + (f"; error: {providers['error']}" if providers.get("error") else "")
            + ".",
        ]
    if tests:
        lines += [
            "",
            f"`gpu` tests: {tests['tests']} run, {tests['failures']} failed, {tests['errors']} errors, "
            f"{tests['skipped']} skipped.",
        ]
        lines += [f"- failed: {name}" for name in tests["failed"]]
        lines += [f"- skipped: {name}" for name in tests["skipped_tests"]]
    if engine:
        lines += ["", "Engine suite: [engine.md](engine.md) ([engine.json](engine.json))."]
    lines += ["", "Logs of each step: logs/."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if passed else 1


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("providers", "engine", "summary"):
        s = sub.add_parser(name)
        s.add_argument("--out", type=Path, required=True, help="results folder (e.g. results/gpu-check)")
        s.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    engine = sub.choices["engine"]
    engine.add_argument("--budget", type=float, default=150.0, help="seconds for the timed rounds of all runs")
    engine.add_argument("--data", type=Path, default=None, help="Fashion-MNIST folder (default: the shipped sample)")
    engine.add_argument("--images", type=int, default=SAMPLE_SIZE, help="images to use (from test image 0)")
    engine.add_argument("--cpu-threads", type=int, default=1, help="intra-op threads of CPU sessions (serving: 1)")
    engine.add_argument("--quiet", action="store_true")
    sample = sub.add_parser("sample", help="write the shipped image sample from a Fashion-MNIST folder")
    sample.add_argument("--data", type=Path, required=True)
    sample.add_argument("--out", type=Path, default=SAMPLE_PATH)
    sample.add_argument("--images", type=int, default=SAMPLE_SIZE)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "sample":
        print(write_sample(args.data, args.out, args.images))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    handler = {"providers": cmd_providers, "engine": cmd_engine, "summary": cmd_summary}[args.command]
    return int(handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
