"""Markdown summary and PNG plots, generated from the suite JSON files of one results directory.

Why regenerate from JSON: suites can be run separately into the same directory (e.g. re-run only
`--suite http`), and the summary always reflects every result present. Nothing in the markdown
is typed by hand: targets and verdicts come from bench.targets.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from bench.common import format_number as _f
from bench.common import json_number as _num
from bench.coverage import coverage_lines, plot_coverage
from bench.figures import plot_http, plot_offline
from bench.stats import safe_ratio
from bench.targets import (
    TARGET_SPEEDUP,
    Target,
    evaluate,
    evaluate_peers,
    evaluate_slo,
    limits_analysis,
    limits_bounds,
)

SUITES = ("offline", "engine", "http", "slo", "peers")


def load_results(out_dir: Path) -> dict[str, dict[str, Any]]:
    """{suite: document} for every `<suite>.json` present in out_dir."""
    found: dict[str, dict[str, Any]] = {}
    for suite in SUITES:
        path = out_dir / f"{suite}.json"
        if path.is_file():
            found[suite] = json.loads(path.read_text())
    return found


def _pct(value: Any) -> str:
    return _f(value, "{:.2f} %", 100)


def _m(value: Any) -> str:
    return _f(value, "{:.3f} M", 1e-6)


# --------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_engine(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    plt = _pyplot()
    cells = doc["result"]["cells"]
    from bench.engine_suite import MODES, SUFFIX, mode_name

    order = [mode_name(m, p) for p in SUFFIX for m in MODES]  # fp32 modes first, then int8's
    modes = sorted({c["mode"] for c in cells}, key=order.index)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for mode in modes:
        mc = sorted((c for c in cells if c["mode"] == mode), key=lambda c: c["batch_size"])
        xs = [c["batch_size"] for c in mc]
        med = [c["images_per_s"]["median"] for c in mc]
        lo = [c["images_per_s"]["median"] - c["images_per_s"]["min"] for c in mc]
        hi = [c["images_per_s"]["max"] - c["images_per_s"]["median"] for c in mc]
        style = "--" if mc and mc[0].get("precision", "fp32") != "fp32" else "-"
        ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=mode, linestyle=style)
        ax2.plot(xs, [c["latency_ms"]["p50"] for c in mc], marker="o", label=f"{mode} p50", linestyle=style)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s (median over rounds, bars: min–max)")
    ax.set_title("Engine throughput (in process)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("batch size")
    ax2.set_ylabel("latency per batch call (ms)")
    ax2.set_title("Engine latency per call")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    path = out_dir / "engine_throughput.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


# --------------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------------


def _targets_table(targets: list[Target]) -> list[str]:
    lines = ["| target | limit | measured | verdict | measured on |", "|---|---:|---:|:---:|---|"]
    for t in targets:
        lines.append(f"| {t.description} | {t.limit} | {t.measured_text} | **{t.verdict}** | {t.source} |")
    return lines


def _machine(doc: dict[str, Any]) -> list[str]:
    m = doc["machine"]
    ram = m.get("ram_bytes")
    return [
        f"- CPU: {m.get('cpu_model')}, {m.get('logical_cores')} logical cores "
        f"(affinity {m.get('affinity')}), "
        f"RAM {ram / 2**30:.1f} GiB"
        if ram
        else f"- CPU: {m.get('cpu_model')}, {m.get('logical_cores')} cores",
        f"- OS: {m.get('os')}; Python {m.get('python')}; ONNX Runtime {m.get('onnxruntime')} "
        f"(providers available {m.get('providers_available')}, in use {m.get('providers_in_use')}); "
        f"numpy {m.get('numpy')}, onnx {m.get('onnx')}, Pillow {m.get('pillow')}, pyspng {m.get('pyspng')}, "
        f"orjson {m.get('orjson')}, httpx {m.get('httpx')}",
        f"- load average at suite start (1/5/15 min): {m.get('loadavg_1_5_15')}; git {m.get('git_sha')}; "
        f"recorded {m.get('recorded_at')}",
    ]


def _offline_section(doc: dict[str, Any], images: dict[str, str]) -> list[str]:
    models = doc["result"]["models"]
    lines = ["## Offline: accuracy vs average MACs (test split)", ""]
    lines += [
        "Thresholds are chosen on the held-out split (`heldout_*` arrays of calibration.npz) by "
        "`service.core.policies` and evaluated on the test split (`test_*`). Oracle: each image exits at the "
        "first exit that classifies it correctly (images no exit gets right take the last exit).",
        "",
        "| model | t | exits | full MACs | all-stages acc. | oracle acc. / MACs "
        "| ≤0.5 % budget: acc. / MACs (% full) "
        "| ≤1 % budget: acc. / MACs (% full) | MACs / oracle at ≤1 % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, m in models.items():
        h5, h10 = m["headline"].get("0.005"), m["headline"].get("0.01")

        def cell(p: dict[str, Any] | None, full: float = m["full_macs"]) -> str:
            if not p:
                return "–"
            return f"{_pct(p['test_accuracy'])} / {_m(p['test_macs'])} ({100 * p['test_macs'] / full:.1f} %)"

        ratio = h10["test_macs"] / m["oracle"]["macs"] if h10 and m["oracle"]["macs"] else math.nan
        lines.append(
            f"| {key} (`{m['name']}` {m['version']}) | {m['t']:g} | {m['num_exits']} | {_m(m['full_macs'])} "
            f"| {_pct(m['all_stages']['accuracy'])} "
            f"| {_pct(m['oracle']['accuracy'])} / {_m(m['oracle']['macs'])} "
            f"| {cell(h5)} | {cell(h10)} | {_f(ratio)}× |"
        )
    lines += ["", "Anytime points (everyone leaves at exit k):", ""]
    header = "| exit | cumulative MACs | " + " | ".join(f"{k} test acc." for k in models) + " |"
    lines += [header, "|---:|---:|" + "---:|" * len(models)]
    first = next(iter(models.values()))
    for k in range(first["num_exits"]):
        accs = " | ".join(
            _pct(m["anytime"][k]["test_accuracy"]) if k < len(m["anytime"]) else "–" for m in models.values()
        )
        lines.append(f"| {k + 1} | {_m(first['anytime'][k]['macs'])} | {accs} |")
    lines += ["", "Accuracy-drop knob (policy `optimal`, as served), BoostNet:", ""]
    bn = models["boostnet"]
    lines += [
        "| max drop | held-out acc. | test acc. | test loss vs all stages | avg MACs | % of full | exit fractions |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in bn["curves"].get("max_accuracy_drop/optimal", []):
        lines.append(
            f"| {100 * p['budget']:.2f} % | {_pct(p['heldout_accuracy'])} | {_pct(p['test_accuracy'])} "
            f"| {100 * p['accuracy_loss']:.2f} pp | {_m(p['test_macs'])} "
            f"| {100 * p['macs_fraction_of_full']:.1f} % "
            f"| {', '.join(f'{f:.3f}' for f in p['test_exit_fractions'])} |"
        )
    check = max(m["max_crosscheck_diff"] for m in models.values())
    lines += [
        "",
        f"Cross-check: `service.core.policies.evaluate_thresholds` vs the bench's own exit simulation, largest "
        f"difference {check:.2g}.",
    ]
    if "offline" in images:
        lines += ["", f"![accuracy vs MACs]({images['offline']})"]
    return lines


def _engine_section(doc: dict[str, Any], images: dict[str, str]) -> list[str]:
    r = doc["result"]
    s = doc["settings"]
    lines = ["## Engine: images/s per batch size (in process, no HTTP)", ""]
    thresholds_text = ", ".join(_f(t, "{:.4f}") if isinstance(t, float) else str(t) for t in r["thresholds"])
    full_text = r["full_network"].get("construction") or r["full_network"].get("reason")
    lines += [
        f"`{r['model']}` ({r['version']}); {r['images']} test images; early exit at max_accuracy_drop="
        f"{r['drop']:g} (thresholds {thresholds_text}); "
        f"{s['rounds']} interleaved rounds per batch size, ≥{s['round_seconds']:g} s per mode per round; "
        f"ORT intra-op threads {s['intra_op_threads']}, inter-op {s['inter_op_threads']}; "
        f"engine providers {r['engine_providers']}.",
        "",
        f"Full network (`full_onnx`): {full_text}.",
        f"Parity: {json.dumps(r['parity'])}.",
        "",
        "| batch | mode | images/s (median) | min–max | p50 ms/call | p99 ms/call | avg MACs | calls |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in r["cells"]:
        ips = c["images_per_s"]
        lines.append(
            f"| {c['batch_size']} | {c['mode']} | {_f(ips['median'], '{:.0f}')} "
            f"| {_f(ips['min'], '{:.0f}')}–{_f(ips['max'], '{:.0f}')} "
            f"| {_f(c['latency_ms']['p50'], '{:.3f}')} | {_f(c['latency_ms']['p99'], '{:.3f}')} "
            f"| {_m(c['avg_macs'])} "
            f"| {c['latency_ms']['calls']} |"
        )
    lines += ["", *_precision_lines(r)]
    lines += [
        "",
        "Time-ideal = all-stages time ÷ Σ exit fraction × cumulative measured stage time (the stage table "
        "below, same precision and batch size): what the stage times allow; MAC-ideal (full MACs ÷ average "
        "MACs) assumes time ∝ MACs and is information only.",
        "",
        "| batch | precision | early exit / all stages | early exit / full ONNX (same precision) "
        "| early exit / fp32 full ONNX | all stages / full ONNX | time-ideal | ÷ time-ideal | MAC-ideal |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sp in r["speedups"]:
        lines.append(
            f"| {sp['batch_size']} | {sp.get('precision', 'fp32')} | {_f(sp['early_exit_vs_all_stages'])}× "
            f"| {_f(sp['early_exit_vs_full_onnx'])}× "
            f"| {_f(sp.get('early_exit_vs_fp32_full_onnx', sp['early_exit_vs_full_onnx']))}× "
            f"| {_f(sp['all_stages_vs_full_onnx'])}× | {_f(sp.get('time_ideal'))}× "
            f"| {_f(sp.get('of_time_ideal'))} | {_f(sp['mac_ideal'])}× |"
        )
    costs = r.get("stage_costs") or []
    if costs:
        sizes = sorted({c["batch_size"] for c in costs})
        stages = sorted({c["stage"] for c in costs})
        precisions = list(dict.fromkeys(c.get("precision", "fp32") for c in costs))
        by = {(c.get("precision", "fp32"), c["batch_size"], c["stage"]): c for c in costs}
        lines += [
            "",
            "Per-stage cost, all stages run (engine stage timers): ms per image and µs per million MACs. "
            "Time proportional to MACs would give equal µs/MMAC everywhere.",
            "",
            "| stage | precision | MACs | " + " | ".join(f"batch {b}: ms/img (µs/MMAC)" for b in sizes) + " |",
            "|---:|---|---:|" + "---:|" * len(sizes),
        ]
        for k in stages:
            for p in precisions:
                row = by[(p, sizes[0], k)]
                cells = " | ".join(
                    f"{_f(by[(p, b, k)]['ms_per_image'], '{:.3f}')} ({_f(by[(p, b, k)]['us_per_mmac'], '{:.1f}')})"
                    for b in sizes
                )
                lines.append(f"| {k} | {p} | {_m(row['macs'])} | {cells} |")
    if "engine" in images:
        lines += ["", f"![engine throughput]({images['engine']})"]
    return lines


def _precision_lines(r: dict[str, Any]) -> list[str]:
    """fp32 and int8 side by side: stage precisions, test accuracy per exit and at the ≤1 % budget, batching."""
    precisions = r.get("precisions")
    if not precisions:
        return []
    reference = ((precisions.get("fp32") or {}).get("test_accuracy") or {}).get("all_stages")
    lines = [
        "Precisions (test split, from each artifact's calibration.npz, i.e. what its engine computes; "
        f"early exit at max_accuracy_drop={r['drop']:g}, thresholds from its own held-out arrays):",
        "",
        "| precision | version | stages | test acc. per exit | early-exit acc. | loss vs fp32 all stages "
        "| early exit images/s, batch 32 ÷ batch 1 |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for p, info in precisions.items():
        acc = info.get("test_accuracy") or {}
        loss = reference - acc["early_exit"] if reference is not None and "early_exit" in acc else None
        per_exit = " / ".join(_pct(a) for a in acc.get("per_exit", []))
        batching = next(
            (
                b["ratio"]
                for b in info.get("batching", [])
                if b["mode"].startswith("early_exit") and b["batch_size"] == 32
            ),
            None,
        )
        lines.append(
            f"| {p} | {info.get('version')} | {', '.join(info.get('stage_precisions', []))} | {per_exit} "
            f"| {_pct(acc.get('early_exit'))} | {_f(loss, '{:.2f} pp', 100)} | {_f(batching)}× |"
        )
    parity = {p: info.get("parity") for p, info in precisions.items()}
    lines += ["", f"Parity per precision: {json.dumps(parity)}."]
    pairs = r.get("equal_cost") or []
    if pairs:
        lines += [
            "",
            f"Accuracy at equal cost (the shipping decision): each fp32 max_accuracy_drop point against the most "
            f"accurate int8 point whose expected time per image is no greater; time per image = Σ exit fraction "
            f"(test split) × cumulative measured stage time at batch {r.get('frontier_batch')}.",
            "",
            "| fp32 max drop | fp32 ms/img | fp32 test acc. | int8 at ≤ that cost: acc. | its ms/img | its max drop "
            "| int8 − fp32 |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for q in pairs:
            gain = None if q["other_accuracy"] is None else q["other_accuracy"] - q["reference_accuracy"]
            lines.append(
                f"| {_pct(q['drop'])} | {_f(q['ms_per_image'], '{:.4f}')} | {_pct(q['reference_accuracy'])} "
                f"| {_pct(q['other_accuracy'])} | {_f(q['other_ms_per_image'], '{:.4f}')} | {_pct(q['other_drop'])} "
                f"| {_f(gain, '{:+.2f} pp', 100)} |"
            )
    return lines


def _http_section(doc: dict[str, Any], images: dict[str, str]) -> list[str]:
    r = doc["result"]
    s = doc["settings"]
    lines = ["## HTTP: closed-loop load against `boostserve serve`", ""]
    lines += [
        f"`{r['model']}` ({r['version']}); bodies: {r['images']} Fashion-MNIST test images as PNG "
        f"(mean {r['png_bytes_mean']:.0f} B), raw `image/png` POST {s.get('path', '/v1/classify')} "
        "(modes `multipart_*`: the same images as one-part multipart forms, as `curl -F` sends them); "
        f"client `{s['client']}` pinned to CPUs {s['client_cpus']}, "
        f"server pinned to CPUs {s['server_cpus']}; "
        f"per cell {s['warmup_s']:g} s warm-up then ≤{s['duration_s']:g} s or ≤{s['max_requests']} requests; "
        f"{s['rounds']} round(s), modes interleaved. "
        "Every answer's label is checked against the ground truth; "
        f"accuracy loss is paired (all-stages correctness of the same images from the calibration arrays: "
        f"{'yes' if r['paired_with_calibration'] else 'not available'}).",
        "",
        "| server | mode | clients | req/s (median) | min–max | p50 ms | p95 ms | p99 ms | served acc. "
        "| loss vs all "
        "| avg MACs (% full) | exits (1..N) | avg stage batch | engine ms/img | server CPU ms/req "
        "| client CPU ms/req (util) | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    order = {"all_stages": 0, "drop_0.005": 1, "drop_0.01": 2, "v2_binary": 3, "grpc": 4}
    for c in sorted(r["aggregate"], key=lambda c: (c["server"], order.get(c["mode"], 9), c["concurrency"])):
        frac = _num(c["avg_macs"]) / r["full_macs"] if r.get("full_macs") else math.nan
        lines.append(
            f"| {c['server']} | {c['mode']} | {c['concurrency']} | {_f(c['req_per_s'], '{:.0f}')} "
            f"| {_f(c['req_per_s_min'], '{:.0f}')}–{_f(c['req_per_s_max'], '{:.0f}')} "
            f"| {_f(c['p50_ms'])} | {_f(c['p95_ms'])} "
            f"| {_f(c['p99_ms'])} | {_pct(c['served_accuracy'])} "
            f"| {_f(c['accuracy_loss_vs_all_stages'], '{:.2f}', 100)} pp "
            f"| {_m(c['avg_macs'])} ({_f(frac, '{:.1f}', 100)} %) "
            f"| {'/'.join(str(h) for h in c['exit_histogram'])} "
            f"| {_f(c['avg_stage_batch'], '{:.1f}')} | {_f(c['engine_ms_per_image'], '{:.3f}')} "
            f"| {_f(c['server_cpu_ms_per_request'], '{:.3f}')} "
            f"| {_f(c['client_cpu_ms_per_request'], '{:.3f}')} "
            f"({_f(c['client_cpu_utilization'], '{:.0f}', 100)} %) "
            f"| {c['errors']} |"
        )
    lines += _ablation_lines(r["aggregate"])
    lines += _compare_lines(r.get("compare_with"), r["aggregate"], doc["machine"].get("git_sha"))
    lines += _floor_lines(r.get("floor"), r["aggregate"])
    if r.get("pooled"):
        lines += [
            "",
            "Served accuracy pooled over every cell of a server and mode (each cell continues through the "
            "test images where the previous one stopped):",
            "",
            "| server | mode | answers | distinct test images | served acc. | all stages, same images | loss |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for p in r["pooled"]:
            lines.append(
                f"| {p['server']} | {p['mode']} | {p['answers']} "
                f"| {p['distinct_images']} of {p['test_images']} "
                f"| {_pct(p['served_accuracy'])} | {_pct(p['all_stages_accuracy_same_images'])} "
                f"| {_f(p['accuracy_loss_vs_all_stages'], '{:.2f} pp', 100)} |"
            )
    check = r.get("client_check")
    if check:
        lines += [
            "",
            f"Load generator cost ({check['mode']}, {check['concurrency']} clients, batching server): "
            "the CPU the client itself needs per request, on its own pinned core.",
            "",
            "| client | req/s | client CPU ms/request | client core utilization | p50 ms |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in check["clients"]:
            lines.append(
                f"| {row['client']} | {_f(row['req_per_s'], '{:.0f}')} "
                f"| {_f(row['client_cpu_ms_per_request'], '{:.3f}')} "
                f"| {_f(row['client_cpu_utilization'], '{:.0f} %', 100)} | {_f(row['p50_ms'])} |"
            )
    for prof in r.get("profiles") or []:
        lines += ["", f"Server profile, {prof['mode']} with {prof['concurrency']} client(s) (batching server):", ""]
        if not prof.get("available"):
            lines.append(f"not available: {prof.get('reason')}")
            continue
        lines += [
            f"py-spy `--gil` samples at {prof['rate_hz']} Hz ({prof['samples']} samples, "
            f"{_f(prof['req_per_s_while_profiled'], '{:.0f}')} req/s while profiled): share of the server's "
            "Python time by component.",
            "",
            "| component | share |",
            "|---|---:|",
            *[f"| {c['component']} | {_f(c['share'], '{:.1f} %', 100)} |" for c in prof["components"]],
        ]
    agreements = [c["exit_agreement"] for c in r["aggregate"] if c.get("exit_agreement") is not None]
    agreements = [a for a in agreements if not (isinstance(a, float) and math.isnan(a))]
    if agreements:
        lines += [
            "",
            "Exit agreement between the server and the offline simulation of the same thresholds "
            f"on the same "
            f"images: min {100 * min(agreements):.2f} % over cells.",
        ]
    for key in ("http", "http_ablations", "http_exits"):
        if key in images:
            lines += ["", f"![{key}]({images[key]})"]
    return lines


def _commands(docs: dict[str, dict[str, Any]], fallback: str) -> str:
    """The command(s) that produced the suite JSONs (they may come from separate runs)."""
    recorded = list(dict.fromkeys(doc.get("command") or fallback for doc in docs.values()))
    return "`, `".join(recorded) if recorded else fallback


def write_report(out_dir: Path, markdown_path: Path, command: str) -> tuple[Path, list[Target]]:
    """(Re)generate plots and the markdown from every suite JSON in out_dir."""
    docs = load_results(out_dir)
    rel = Path(os.path.relpath(out_dir, markdown_path.parent))
    images: dict[str, str] = {}
    if "offline" in docs:
        images["offline"] = (rel / plot_offline(docs["offline"], out_dir)[0].name).as_posix()
        coverage_plot = plot_coverage(docs["offline"]["result"]["models"], out_dir)
        if coverage_plot is not None:
            images["coverage"] = (rel / coverage_plot.name).as_posix()
    if "engine" in docs:
        images["engine"] = (rel / plot_engine(docs["engine"], out_dir)[0].name).as_posix()
    if "http" in docs:
        paths = plot_http(docs["http"], out_dir)
        images["http"] = (rel / paths[0].name).as_posix()
        images["http_exits"] = (rel / paths[1].name).as_posix()
        images["http_ablations"] = (rel / paths[2].name).as_posix()
    if "slo" in docs:
        from bench.slo_suite import plot_slo

        images["slo"] = (rel / plot_slo(docs["slo"], out_dir).name).as_posix()
    if "peers" in docs:
        from bench.peers.report import plot_peers

        images["peers"] = (rel / plot_peers(docs["peers"], out_dir).name).as_posix()

    offline = docs["offline"]["result"] if "offline" in docs else None
    http = docs["http"]["result"] if "http" in docs else None
    engine = docs["engine"]["result"] if "engine" in docs else None
    targets = (
        evaluate(offline, http, engine)
        + evaluate_slo(docs["slo"]["result"] if "slo" in docs else None)
        + evaluate_peers(docs["peers"]["result"] if "peers" in docs else None)
    )
    (out_dir / "targets.json").write_text(json.dumps([t.as_dict() for t in targets], indent=2, default=str) + "\n")

    lines = [
        "# boostserve benchmarks",
        "",
        "<!-- generated by `boostserve bench`; do not edit: re-run the bench to change any number -->",
        "",
        f"Generated by `{_commands(docs, command)}`. Raw results: "
        + ", ".join(f"[{s}.json]({(rel / f'{s}.json').as_posix()})" for s in docs)
        + ".",
        "",
    ]
    for suite, doc in docs.items():
        lines.append(
            f"- suite `{suite}`: started {doc['started_at']}, took {doc['duration_s']:.1f} s "
            f"({'quick' if doc['settings'].get('quick') else 'full'} mode)"
        )
    lines += ["", "## Targets", "", "Verdicts are computed by `bench.targets` from the JSON results.", ""]
    lines += _targets_table(targets)
    if docs:
        # The HTTP or engine suite knows the providers in use; the offline suite runs no session.
        machine_doc = docs.get("http") or docs.get("engine") or next(iter(docs.values()))
        lines += ["", "## Machine", "", *_machine(machine_doc)]
    if "offline" in docs:
        lines += ["", *_offline_section(docs["offline"], images)]
        coverage = coverage_lines(docs["offline"]["result"]["models"], images.get("coverage"))
        if coverage:
            lines += ["", *coverage]
    if "engine" in docs:
        lines += ["", *_engine_section(docs["engine"], images)]
    if "http" in docs:
        lines += ["", *_http_section(docs["http"], images)]
    if "slo" in docs:
        from bench.slo_suite import slo_section

        lines += ["", *slo_section(docs["slo"], images.get("slo"))]
    if "peers" in docs:
        from bench.peers.report import peers_section

        lines += ["", *peers_section(docs["peers"], images.get("peers"))]
    engine_result = docs["engine"]["result"] if "engine" in docs else None
    limits = limits_analysis(http, engine_result)
    bounds = limits_bounds(limits, engine_result)
    if limits or bounds:
        lines += ["", "## What limits the HTTP numbers (computed from the results above)", ""]
        lines += [
            "Server CPU per request (from /proc) = engine share (engine suite CPU ms per image, same mode, "
            "batch size closest to the server's average stage-1 batch) + other (HTTP, routing, decode, "
            "scheduling, JSON). With the server CPU-bound, req/s follows 1 / CPU per request.",
            "",
            "| cell | server CPU ms/req | engine ms/img (batch) | other ms/req | engine share "
            "| avg stage-1 batch | engine wall ms/img (server metrics) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in limits:
            lines.append(
                f"| {row['what']} | {_f(row['server_cpu_ms'], '{:.3f}')} "
                f"| {_f(row['engine_ms'], '{:.3f}')} ({row['engine_batch'] or '–'}) "
                f"| {_f(row['other_ms'], '{:.3f}')} "
                f"| {_f(row['engine_share'], '{:.0f} %', 100)} | {_f(row['avg_stage1_batch'], '{:.1f}')} "
                f"| {_f(row['engine_wall_ms'], '{:.3f}')} |"
            )
        lines += ["", *[f"- {what}: {_f(value)}" for what, value in bounds]]
    lines += ["", "## Exact settings", ""]
    for suite, doc in docs.items():
        lines += [
            f"`{suite}`:",
            "",
            "```json",
            json.dumps(doc["settings"], indent=1, sort_keys=True),
            "```",
            "",
        ]
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text("\n".join(lines).rstrip() + "\n")
    return markdown_path, targets


ABLATIONS = {
    "batching": "as served (fast path, short stage batches on the event loop and long ones on the ORT "
    "worker thread, start-up objects frozen)",
    "fastapi_path": "raw-image classify through FastAPI routing (BOOSTSERVE_FAST_PATH=false)",
    "thread_stages": "every stage batch on the ORT worker thread (BOOSTSERVE_STAGE_EXECUTION=thread)",
    "loop_stages": "every stage batch on the event loop (BOOSTSERVE_STAGE_EXECUTION=loop)",
    "gc_unfrozen": "start-up objects left to the garbage collector (BOOSTSERVE_GC_FREEZE=false)",
    "no_access_log": "no access line per request (BOOSTSERVE_LOG_LEVEL=warning; served: info)",
}


def _ablation_lines(aggregate: list[dict[str, Any]]) -> list[str]:
    """Side by side: the served request path vs each one-setting ablation, drop_0.01."""
    cells = {
        (c["server"], c["concurrency"]): c for c in aggregate if c["mode"] == "drop_0.01" and c["server"] in ABLATIONS
    }
    clients = sorted({k for (name, k) in cells if name != "batching"})
    if not clients:
        return []
    lines = [
        "",
        "Request-path ablations (drop_0.01; each server differs from `batching` in one setting, same run):",
        "",
        "| server | what differs | clients | req/s (median) | p50 ms | p99 ms | server CPU ms/req | req/s vs served |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, what in ABLATIONS.items():
        for k in clients:
            c = cells.get((name, k))
            base = cells.get(("batching", k))
            if c is None:
                continue
            ratio = c["req_per_s"] / base["req_per_s"] if base and base.get("req_per_s") else None
            lines.append(
                f"| {name} | {what} | {k} | {_f(c['req_per_s'], '{:.0f}')} | {_f(c['p50_ms'], '{:.2f}')} "
                f"| {_f(c['p99_ms'], '{:.2f}')} | {_f(c['server_cpu_ms_per_request'], '{:.3f}')} "
                f"| {_f(ratio, '{:.2f}')}× |"
            )
    return lines


def _compare_lines(compare: dict[str, Any] | None, aggregate: list[dict[str, Any]], this_sha: str | None) -> list[str]:
    """This checkout (`batching`) vs another commit (`compare`, bench.compare), cell by cell."""
    if not compare:
        return []
    other_name = compare["server"]
    cells = {(c["server"], c["concurrency"]): c for c in aggregate if c["mode"] == "drop_0.01"}
    clients = sorted(k for (name, k) in cells if name == other_name)
    other, this = compare["other"], compare.get("this")
    old = f"`{other['short']}`"
    new = f"`{this['short']}`" if this else f"`{this_sha}`" if this_sha else "unknown commit"
    dirty = [
        f"{name} has uncommitted changes" for name, c in (("this checkout", this), (old, other)) if c and c["dirty"]
    ]
    subject = other["subject"] if len(other["subject"]) <= 80 else other["subject"][:79] + "…"
    lines = [
        "",
        f"This checkout ({new}) vs {old} (“{subject}”), side by side: server `{other_name}` runs the code of "
        f"{old} from `{other['path']}` on the same artifact with the settings of `batching`, drop_0.01, cells "
        "interleaved in the same rounds"
        + (f" ({'; '.join(dirty)})" if dirty else "")
        + ". req/s: median and min–max over rounds; p99: median over rounds.",
        "",
        f"| clients | rounds | req/s this | min–max | req/s {old} | min–max | this ÷ {old} "
        f"| p99 ms this | p99 ms {old} | server CPU ms/req this | server CPU ms/req {old} | errors (this / {old}) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in clients:
        a, b = cells.get(("batching", k)), cells[(other_name, k)]
        if a is None:
            continue
        lines.append(
            f"| {k} | {min(a['rounds'], b['rounds'])} | {_f(a['req_per_s'], '{:.0f}')} "
            f"| {_f(a['req_per_s_min'], '{:.0f}')}–{_f(a['req_per_s_max'], '{:.0f}')} "
            f"| {_f(b['req_per_s'], '{:.0f}')} "
            f"| {_f(b['req_per_s_min'], '{:.0f}')}–{_f(b['req_per_s_max'], '{:.0f}')} "
            f"| {_f(safe_ratio(_num(a['req_per_s']), _num(b['req_per_s'])), '{:.3f}')}× "
            f"| {_f(a['p99_ms'])} | {_f(b['p99_ms'])} "
            f"| {_f(a['server_cpu_ms_per_request'], '{:.3f}')} | {_f(b['server_cpu_ms_per_request'], '{:.3f}')} "
            f"| {a['errors']} / {b['errors']} |"
        )
    return lines


def _floor_lines(floor: dict[str, Any] | None, aggregate: list[dict[str, Any]]) -> list[str]:
    """What limits the early-exit/all-stages req/s ratio: model time vs the per-request rest.

    With the server CPU-bound on one core, req/s = 1 / (engine ms per image + other ms per request),
    so the ratio is (e_all + o) / (e_ee + o): the smaller the per-request cost o outside the model,
    the closer it gets to e_all / e_ee. The floor servers measure o for a server that does nothing.
    """
    if not floor or not floor.get("variants"):
        return []
    k = floor["concurrency"]
    cells = {c["mode"]: c for c in aggregate if c["server"] == "batching" and c["concurrency"] == k}
    allst, ee = cells.get("all_stages"), cells.get("drop_0.01")
    if allst is None or ee is None:
        return []
    e_all, e_ee = allst["engine_ms_per_image"], ee["engine_ms_per_image"]
    served_other = ee["server_cpu_ms_per_request"] - e_ee

    def ratio(other: float) -> float:
        return (e_all + other) / (e_ee + other)

    needed = (e_all - TARGET_SPEEDUP * e_ee) / (TARGET_SPEEDUP - 1)
    rows = [("boostserve as served (drop_0.01)", served_other, ee["req_per_s"])]
    for v in floor["variants"]:
        what = "floor: uvicorn + httptools + uvloop, " + ("PNG decode, " if v["decode"] else "") + "fixed answer"
        rows.append((what, v["server_cpu_ms_per_request"], v["req_per_s"]))
    lines = [
        "",
        f"What limits the early-exit / all-stages ratio ({k} clients, server on one core): "
        f"req/s ≈ 1 / (engine ms per image + other ms per request), with engine {e_all:.3f} ms/img for all "
        f"stages and {e_ee:.3f} ms/img for early exit in this run (ceiling {e_all / e_ee:.2f}× with nothing else "
        f"to do). The floor servers (`bench/floor_app.py`, same load, same core) measure the per-request cost "
        f"of the HTTP stack alone.",
        "",
        "| per-request CPU outside the model | ms/request | req/s | early exit / all stages it allows |",
        "|---|---:|---:|---:|",
    ]
    for what, other, rps in rows:
        lines.append(f"| {what} | {_f(other, '{:.3f}')} | {_f(rps, '{:.0f}')} | {_f(ratio(other), '{:.2f}')}× |")
    lines.append(
        f"| needed for the {TARGET_SPEEDUP:g}× target | {_f(needed, '{:.3f}')} | | {TARGET_SPEEDUP:g}× |"
        if needed > 0
        else f"| needed for the {TARGET_SPEEDUP:g}× target | out of reach: the engine ratio itself is below it | | |"
    )
    return lines
