"""Summarise the reliability runs (build/reliability/*.json) as the Markdown of docs/reliability.md.

The JSON files are written by the tests in tests/reliability/ (every figure comes from a run; this
script only formats). Typical use:

    .venv/bin/pytest tests/reliability                       # default suite (~2 min)
    .venv/bin/pytest -m slow tests/reliability               # long fuzz, long overload, 5-min soak
    .venv/bin/python scripts/reliability_report.py           # Markdown on stdout
    .venv/bin/python scripts/reliability_report.py --json    # one merged JSON document

Missing runs are listed as "not run", never filled in.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / "build" / "reliability"


def load(results_dir: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"warning: cannot read {path}: {exc}", file=sys.stderr)
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    return str(value)


def _stamp(run: dict[str, Any]) -> str:
    machine = run.get("machine", {})
    load = machine.get("loadavg_1_5_15_at_record")
    load_text = f", load average {'/'.join(str(x) for x in load)} (1/5/15 min) when recorded" if load else ""
    return f"{run.get('recorded_at', '?')}, commit {run.get('git') or '?'}, {machine.get('cpus', '?')} CPUs{load_text}"


def row(*cells: Any) -> str:
    return "| " + " | ".join(_fmt(c) for c in cells) + " |"


def fuzz_section(runs: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Fuzzing (schemathesis, v1 + v2 OpenAPI)", ""]
    lines.append(
        row(
            "run",
            "requests",
            "operations",
            "seconds",
            "5xx",
            "errors outside the envelope",
            "ready / valid request after",
            "statuses",
        )
    )
    lines.append("|---|---:|---:|---:|---:|---:|---|---|")
    for key in ("fuzz_quick", "fuzz_long"):
        run = runs.get(key)
        if run is None:
            lines.append(row(key, "not run", "", "", "", "", "", ""))
            continue
        lines.append(
            row(
                key,
                run["requests"],
                run["operations"],
                run["seconds"],
                run["server_errors_5xx"],
                run["envelope_failures"],
                f"{run['ready_after']} / {run['valid_request_after']}",
                run["statuses"],
            )
        )
    for key in ("fuzz_quick", "fuzz_long"):
        run = runs.get(key)
        if run is None:
            continue
        if run.get("conformance_findings"):
            lines += ["", f"Schema-conformance findings recorded by `{key}` (recorded, not failures):", ""]
            for finding, count in sorted(run["conformance_findings"].items()):
                lines.append(f"- {finding}: {count}")
        lines += ["", f"`{key}`: {_stamp(run)}"]
    return [*lines, ""]


def bad_images_section(runs: dict[str, dict[str, Any]]) -> list[str]:
    run = runs.get("bad_images")
    lines = ["## Bad-image corpus (live server)", ""]
    if run is None:
        return [*lines, "not run", ""]
    lines += ["| case | expected | got |", "|---|---|---|"]
    for case, got in run["outcomes"].items():
        expected = "/".join(str(s) for s in run["expected"].get(case, []))
        note = run.get("notes", {}).get(case)
        lines.append(row(case, expected, f"{got} ({note})" if note else got))
    alive, problems = run["server_alive_after"], len(run["problems"])
    lines += ["", f"Server alive after the corpus: {alive}; problems: {problems}."]
    return [*lines, "", _stamp(run), ""]


def overload_section(runs: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Overload (~4x capacity, max_queue 16)", ""]
    lines.append(
        row(
            "run",
            "capacity req/s",
            "offered req/s (x capacity)",
            "seconds",
            "answers",
            "admitted p50 / p99 / max ms (client)",
            "admitted p99 (server, bucket <=)",
            "refused p99 ms",
            "max queue depth",
            "RSS MB before / max / end",
        )
    )
    lines.append("|---|---:|---:|---:|---|---|---:|---:|---:|---|")
    for key in ("overload_short", "overload_long"):
        run = runs.get(key)
        if run is None:
            lines.append(row(key, "not run", "", "", "", "", "", "", "", ""))
            continue
        adm = run["admitted_latency"]
        lines.append(
            row(
                key,
                run["capacity_rps"],
                f"{run['offered_rps']} ({run['offered_multiple']}x)",
                run["duration_s"],
                run["statuses"],
                f"{adm['p50_ms']} / {adm['p99_ms']} / {adm['max_ms']}",
                f"{run.get('server_admitted_p99_le_s')} s",
                run["refused_latency"]["p99_ms"],
                f"{run['max_queue_depth_seen']} (limit {run['max_queue']})",
                f"{run['rss_mb_before_overload']} / {run['rss_mb_max']} / {run['rss_mb_end']}",
            )
        )
    for key in ("overload_short", "overload_long"):
        if key in runs:
            values = runs[key]["retry_after_values"]
            lines += ["", f"`{key}`: {_stamp(runs[key])}; Retry-After values seen: {values}"]
    return [*lines, ""]


def soak_section(runs: dict[str, dict[str, Any]]) -> list[str]:
    run = runs.get("soak")
    lines = ["## Soak (5 min at ~70 % capacity)", ""]
    if run is None:
        return [*lines, "not run", ""]
    first, last = run["latency_first_minute"], run["latency_last_minute"]
    lines += [
        row(
            "capacity req/s",
            "rate req/s",
            "requests",
            "errors",
            "p50 first / last min (ms)",
            "p99 first / last min (ms)",
            "RSS MB start / after 1 min / end",
            "RSS growth after 1st min",
        ),
        "|---:|---:|---:|---:|---|---|---|---:|",
        row(
            run["capacity_rps"],
            run["rate_rps"],
            run["requests"],
            run["errors"],
            f"{first['p50_ms']} / {last['p50_ms']}",
            f"{first['p99_ms']} / {last['p99_ms']}",
            f"{run['rss_mb_start']} / {run['rss_mb_after_first_minute']} / {run['rss_mb_end']}",
            f"{run['rss_growth_pct_after_first_minute']} %",
        ),
        "",
        f"RSS every 30 s (MB): {run['rss_mb_series_every_30s']}",
        "",
        _stamp(run),
    ]
    return [*lines, ""]


def shutdown_section(runs: dict[str, dict[str, Any]]) -> list[str]:
    run = runs.get("shutdown")
    lines = ["## Graceful shutdown (SIGTERM under load)", ""]
    if run is None:
        return [*lines, "not run", ""]
    lines += [
        row(
            "grace s",
            "requests",
            "handled by server",
            "200",
            "503",
            "in flight at SIGTERM, answered 200",
            "sent after SIGTERM",
            "lost answers",
            "exit code",
            "exit after SIGTERM s",
            "last 200 after SIGTERM s",
        ),
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
        row(
            run["grace_s"],
            run["requests"],
            run["handled_by_server"],
            run["answered_200"],
            run["answered_503"],
            run["in_flight_at_sigterm_answered"],
            run["after_sigterm_outcomes"],
            run["lost_answers"],
            run["exit_code"],
            run["exit_after_sigterm_s"],
            run["last_200_after_sigterm_s"],
        ),
        "",
        _stamp(run),
    ]
    return [*lines, ""]


def shutdown_over_grace_section(runs: dict[str, dict[str, Any]]) -> list[str]:
    keys = sorted(k for k in runs if k.startswith("shutdown_over_grace_"))
    if not keys:
        return []
    lines = [
        "SIGTERM while six 64-image requests are in flight (work longer than the grace):",
        "",
        "| grace s | exit code | exit after SIGTERM s | answers |",
        "|---:|---:|---:|---|",
    ]
    for key in keys:
        run = runs[key]
        answers: dict[str, int] = {}
        for status, _text in run["outcomes"]:
            answers[str(status)] = answers.get(str(status), 0) + 1
        lines.append(row(run["grace_s"], run["exit_code"], run["exit_after_sigterm_s"], answers))
    return [*lines, ""]


def security_section(runs: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Security runs", ""]
    paths = runs.get("security_file_paths")
    if paths:
        statuses = sorted({str(v) for v in paths["statuses"].values()})
        lines.append(
            f"- Client-named files: {paths['requests']} requests naming /etc/passwd or a temp file (JSON, raw, "
            f"multipart filename, query, v2 BYTES/parameters, path traversal): statuses {', '.join(statuses)}; "
            f"files opened by the service: {len(paths['opened'])}; file content in a response: {len(paths['leaks'])}."
        )
    logs = runs.get("security_logs")
    if logs:
        n = sum(len(v) for v in logs["statuses"].values())
        lines.append(
            f"- Logs at level debug (json and text formats, real process): {n} requests carrying a canary "
            f"in the image bytes / base64 / fields; canary forms searched: {logs['canary_forms_checked']}; found: 0."
        )
    if len(lines) == 2:
        lines.append("not run")
    return [*lines, ""]


def faults_section(runs: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Faults", "", "| start-up fault | exit code | message (last line) |", "|---|---:|---|"]
    keys = sorted(k for k in runs if k.startswith("fault_startup_"))
    for key in keys:
        run = runs[key]
        text = (run.get("stderr_tail") or "").strip().splitlines()
        fallback = text[-1] if text else ""
        message = next((t for t in reversed(text) if "ArtifactError:" in t or "boostserve serve:" in t), fallback)
        message = message.replace("`", "'")
        message = re.sub(r"/\S*?/artifact\b", "<artifact>", message)  # temp dirs say nothing
        lines.append(row(key.removeprefix("fault_startup_"), run["exit_code"], f"`{message[:200]}`"))
    if not keys:
        lines.append("| not run | | |")
    run = runs.get("fault_runtime_stage")
    if run:
        lines += [
            "",
            f"Run-time stage failure: {run['concurrent_requests']} concurrent requests, "
            f"{run['poison_requests']} poisoned -> all 500; healthy: {run['healthy_ok']} x 200, "
            f"{run['healthy_failed_sharing_a_failed_batch']} x 500 (exactly those batched with a poisoned "
            f"image; failed batches (size, poisoned rows): {run['failed_batches']}); after the fault: "
            f"{run['recovered_statuses']}.",
        ]
    return [*lines, ""]


def hostile_section(runs: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Hostile images (decode isolation)", ""]
    attack = runs.get("mixed_attack")
    if attack is None:
        lines += ["Mixed attack: not run.", ""]
    else:
        alone, attacked = attack["legit_alone"], attack["legit_under_attack"]
        lines += [
            f"Mixed attack, {attack['duration_s']:g} s: {attack['attackers']} clients looping "
            f"{len(attack['bombs_bytes'])} bombs ({', '.join(f'{b:,} B' for b in attack['bombs_bytes'])}) beside "
            f"{attack['legit_clients']} legitimate single-image clients; server on CPU 0, clients on CPU 1.",
            "",
            "| legitimate clients | req/s | p50 ms | p99 ms | max ms |",
            "|---|---:|---:|---:|---:|",
            row("alone", alone["rps"], round(alone["p50"], 1), round(alone["p99"], 1), round(alone["max"], 1)),
            row(
                "under attack",
                attacked["rps"],
                round(attacked["p50"], 1),
                round(attacked["p99"], 1),
                round(attacked["max"], 1),
            ),
            "",
            f"- p99 under attack / alone: {attack['p99_ratio']}",
            f"- /livez every 0.1 s: {attack['livez_probes']} probes, p50 {attack['livez_p50_ms']} ms, p99 "
            f"{attack['livez_p99_ms']} ms, max {attack['livez_max_ms']} ms, failures {len(attack['livez_failures'])}; "
            f"during the alone phase p99 {attack.get('livez_alone_p99_ms')} ms, "
            f"max {attack.get('livez_alone_max_ms')} ms (prober: its own process, a new connection per probe)",
            *(
                [
                    f"- server event loop lag (boostserve_event_loop_lag_seconds, a 50 ms timer, both phases): max "
                    f"{attack['server_loop_lag_max_ms']} ms; {attack['server_loop_lag_over_50ms']:.0f} of "
                    f"{attack['server_loop_lag_samples']:.0f} samples over 50 ms, "
                    f"{attack['server_loop_lag_over_100ms']:.0f} over 100 ms"
                ]
                if "server_loop_lag_max_ms" in attack
                else []
            ),
            f"- answers to the attackers: {_fmt(attack['attack_statuses'])}; to the legitimate clients: "
            f"{_fmt(attack['legit_statuses'])}",
            f"- server process tree (decode workers included) RSS max: {attack['rss_mib_max']} MiB",
            "",
            _stamp(attack),
            "",
        ]
    bombs = runs.get("memory_bombs")
    if bombs is not None:
        growth = (bombs["rss_after"] - bombs["rss_before"]) / 2**20
        lines += [
            f"8 concurrent WebP memory bombs (4096x4096 RGBA, 38 B each): all 413 from the header; process tree "
            f"RSS {bombs['rss_before'] / 2**20:.1f} -> {bombs['rss_after'] / 2**20:.1f} MiB ({growth:+.1f} MiB). "
            + _stamp(bombs),
            "",
        ]
    bodies = runs.get("body_budget")
    if bodies is not None:
        growth = (bodies["rss_held"] - bodies["rss_before"]) / 2**20
        lines += [
            f"{bodies['clients']} clients each sending {bodies['sent_bytes']:,} B of a 10 MiB body and stalling, body "
            f"budget {bodies['budget_mib']} MiB: {bodies['refused']} refused with 429; process tree RSS "
            f"{bodies['rss_before'] / 2**20:.1f} -> {bodies['rss_held'] / 2**20:.1f} MiB ({growth:+.1f} MiB) while "
            "they stall. " + _stamp(bodies),
            "",
        ]
    decode = runs.get("shutdown_during_decode")
    if decode is not None:
        lines += [
            f"SIGTERM during a {decode.get('image_side', 4096)}² progressive JPEG with {decode['scans_repeated']} "
            f"repeated scans (grace {decode['grace_s']:g} s): exit code {decode['exit_code']} "
            f"{decode['exit_after_sigterm_s']} s after SIGTERM; client: {decode['client']}. " + _stamp(decode),
            "",
        ]
    return lines


def render(runs: dict[str, dict[str, Any]]) -> str:
    parts: list[str] = []
    sections = (
        fuzz_section,
        bad_images_section,
        hostile_section,
        overload_section,
        soak_section,
        shutdown_section,
        shutdown_over_grace_section,
        faults_section,
        security_section,
    )
    for section in sections:
        parts += section(runs)
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the tests wrote their JSON")
    parser.add_argument("--json", action="store_true", help="print one merged JSON document instead")
    args = parser.parse_args(argv)
    runs = load(args.dir)
    if not runs:
        print(f"no results in {args.dir}: run the tests first (see the docstring)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(runs, indent=2))
    else:
        print(render(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
