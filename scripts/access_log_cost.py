"""What one access line costs the thread that logs it (the event loop) and the whole process.

Two ways of writing the same line with the same formatter to the same kind of file, interleaved in
rounds: `synchronous` is how the server logged before the writer thread (a stdlib StreamHandler on
the root logger; `logger.info` with the fields as `extra`: the caller's frame looked up, the record
built, formatted, written and flushed on the calling thread), `writer` is `log_access` with
`configure_logging`'s BackgroundHandler (service/http/logging_setup.py). Per way and round:
CPU µs per line of the calling thread (time.thread_time: what the event loop pays) and of the
process (time.process_time: the writer thread too), median and range over rounds.

Usage: python scripts/access_log_cost.py [--lines 20000] [--rounds 5] [--format text|json] --out DIR
Writes DIR/access_log_cost.json and DIR/access_log_cost.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.http import logging_setup  # noqa: E402

ROUTE = "/v1/classify"
#: The stdlib's logging switches before configure_logging turns them off (the synchronous way's setting).
STDLIB_SWITCHES = (logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing)


def _synchronous(lines: int, fmt: str, stream: Any) -> None:
    """The access line as the middleware wrote it before the writer thread (same message and fields)."""
    root = logging.getLogger()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging_setup.JSONFormatter() if fmt == "json" else logging_setup.TextFormatter())
    root.addHandler(handler)
    access = logging.getLogger(logging_setup.ACCESS_LOGGER)
    try:
        for i in range(lines):
            if access.isEnabledFor(logging.INFO):
                access.info(
                    "%s %s -> %d in %.2f ms",
                    "POST",
                    ROUTE,
                    200,
                    1.234,
                    extra={
                        "request_id": f"r{i}",
                        "route": ROUTE,
                        "method": "POST",
                        "status": 200,
                        "duration_ms": 1.234,
                    },
                )
            if i % 256 == 0:
                time.sleep(0)  # an event loop waits on I/O between requests; give other threads the chance
    finally:
        root.removeHandler(handler)


def _writer(lines: int, fmt: str, stream: Any) -> None:
    logging_setup.configure_logging("info", fmt)
    writer = logging_setup._access_writer
    assert writer is not None
    writer.stream = stream
    try:
        for i in range(lines):
            logging_setup.log_access("POST", ROUTE, 200, 0.001234, f"r{i}", ROUTE)
            if i % 256 == 0:
                time.sleep(0)
        writer.flush()  # the process CPU includes writing everything
    finally:
        logging.getLogger().removeHandler(writer)
        writer.close()
        logging_setup._access_writer = None


def _measure(way: str, lines: int, fmt: str, path: Path) -> dict[str, float]:
    with path.open("w") as stream:
        if way == "synchronous":
            saved = (logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
            # the stdlib defaults, as the server ran before configure_logging switched them off
            logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing = STDLIB_SWITCHES
        t0, p0 = time.thread_time(), time.process_time()
        (_synchronous if way == "synchronous" else _writer)(lines, fmt, stream)
        caller, process = time.thread_time() - t0, time.process_time() - p0
        if way == "synchronous":
            logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing = saved
    return {"caller_us_per_line": 1e6 * caller / lines, "process_us_per_line": 1e6 * process / lines}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--format", choices=["text", "json"], default="text")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger(logging_setup.ACCESS_LOGGER).setLevel(logging.INFO)
    ways = ("synchronous", "writer")
    runs: dict[str, list[dict[str, float]]] = {w: [] for w in ways}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for way in ways if r % 2 == 0 else ways[::-1]:  # ABBA: neither way always goes first
                runs[way].append(_measure(way, args.lines, args.format, Path(tmp) / f"{way}.log"))
    summary = {
        way: {
            key: {
                "median": statistics.median(v[key] for v in runs[way]),
                "min": min(v[key] for v in runs[way]),
                "max": max(v[key] for v in runs[way]),
            }
            for key in ("caller_us_per_line", "process_us_per_line")
        }
        for way in ways
    }
    doc = {"command": " ".join(sys.argv), "lines": args.lines, "rounds": args.rounds, "format": args.format,
           "runs": runs, "summary": summary}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "access_log_cost.json").write_text(json.dumps(doc, indent=1))
    rows = [
        f"Access log cost per line ({args.format} format, {args.lines} lines x {args.rounds} interleaved rounds; "
        f"`{doc['command']}`): CPU µs per line, median (min–max over rounds).",
        "",
        "| way | calling thread (the event loop) | whole process |",
        "|---|---:|---:|",
    ]
    for way in ways:
        c, p = summary[way]["caller_us_per_line"], summary[way]["process_us_per_line"]
        cells = [f"{x['median']:.2f} ({x['min']:.2f}–{x['max']:.2f})" for x in (c, p)]
        rows.append(f"| {way} | {cells[0]} | {cells[1]} |")
    (args.out / "access_log_cost.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
