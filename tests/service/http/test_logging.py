"""The log writer: same lines as a plain handler, in order, written in batches off the event loop."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.http import logging_setup
from service.http.logging_setup import BackgroundHandler, JSONFormatter, TextFormatter, access_record, log_access


class CountingStream(io.StringIO):
    """A text stream that counts its writes and the threads that wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.threads: set[str] = set()

    def write(self, text: str) -> int:
        self.writes += 1
        self.threads.add(threading.current_thread().name)
        return super().write(text)


@pytest.fixture
def writer() -> Iterator[tuple[BackgroundHandler, CountingStream]]:
    """A writer that waits a minute for a batch unless flushed or warned: batches are deterministic."""
    stream = CountingStream()
    handler = BackgroundHandler(stream, batch_s=60.0, chunk=64)
    handler.setFormatter(TextFormatter())
    yield handler, stream
    handler.close()


def _record(message: str, level: int = logging.INFO, name: str = "boostserve.app", *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, args or None, None)


def test_lines_are_those_of_a_plain_handler_in_order(writer: tuple[BackgroundHandler, CountingStream]) -> None:
    handler, stream = writer
    plain = io.StringIO()
    reference = logging.StreamHandler(plain)
    reference.setFormatter(TextFormatter())
    records = [_record(f"line {i}") for i in range(150)]
    entries = [(1_800_000_000.25 + i, "POST", "/v1/classify", 200, 0.002, f"id{i}", "/v1/classify") for i in range(150)]
    for record, entry in zip(records, entries, strict=True):
        handler.handle(record)
        handler.put_access(entry)
        reference.handle(record)
        reference.handle(access_record(entry))
    handler.flush()
    assert stream.getvalue() == plain.getvalue()
    assert stream.getvalue().count("\n") == 300


def test_a_batch_is_written_in_chunks_by_the_writer_thread(writer: tuple[BackgroundHandler, CountingStream]) -> None:
    """300 lines queued while the writer waits for its batch: 5 writes of <= 64 lines, none by the caller."""
    handler, stream = writer
    for i in range(300):
        handler.put_access((1_800_000_000.0, "POST", "/v1/classify", 200, 0.001, f"id{i}", "/v1/classify"))
    handler.flush()
    assert stream.writes == 5  # ceil(300 / 64)
    assert stream.threads == {"boostserve-log-writer"}


def test_access_lines_are_built_and_formatted_on_the_writer_thread(
    writer: tuple[BackgroundHandler, CountingStream], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What log_access costs the event loop is a queue put: no LogRecord, no formatting there."""
    handler, _ = writer
    threads: list[str] = []
    real = logging_setup.access_record

    def spy(entry: logging_setup.AccessEntry) -> logging.LogRecord:
        threads.append(threading.current_thread().name)
        return real(entry)

    monkeypatch.setattr(logging_setup, "access_record", spy)
    monkeypatch.setattr(logging_setup, "_access_writer", handler)
    logging.getLogger("boostserve.access").setLevel(logging.INFO)
    for i in range(10):
        log_access("POST", "/v1/classify", 200, 0.001, f"id{i}", "/v1/classify")
    handler.flush()
    assert threads == ["boostserve-log-writer"] * 10


def test_other_records_are_formatted_when_logged(writer: tuple[BackgroundHandler, CountingStream]) -> None:
    """A record's arguments may change after the call; its line shows them as they were."""
    handler, stream = writer
    providers = ["CPUExecutionProvider"]
    handler.handle(_record("providers %s", logging.INFO, "boostserve.app", providers))
    providers.append("changed later")
    handler.flush()
    assert "providers ['CPUExecutionProvider']" in stream.getvalue()


def test_a_warning_is_written_without_waiting_for_the_batch(writer: tuple[BackgroundHandler, CountingStream]) -> None:
    handler, stream = writer
    handler.handle(_record("queued info"))
    handler.handle(_record("something is wrong", logging.WARNING))
    deadline = time.monotonic() + 30.0  # the batch wait is 60 s: only the wake-up can make it in time
    while "something is wrong" not in stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    text = stream.getvalue()
    assert text.index("queued info") < text.index("something is wrong")


def test_close_writes_what_is_queued_and_stops_the_thread() -> None:
    stream = CountingStream()
    handler = BackgroundHandler(stream, batch_s=60.0)
    handler.setFormatter(TextFormatter())
    handler.handle(_record("last words"))
    handler.close()
    assert "last words" in stream.getvalue()
    assert not handler._writer.is_alive()


def test_the_access_line_has_its_fields_in_json() -> None:
    line = json.loads(
        JSONFormatter().format(access_record((1_800_000_000.5, "GET", "/livez", 200, 0.0012345, "r1", "/livez")))
    )
    assert line == {
        "ts": "2027-01-15T08:00:00.500Z",
        "level": "info",
        "logger": "boostserve.access",
        "message": "GET /livez -> 200 in 1.23 ms",
        "request_id": "r1",
        "route": "/livez",
        "method": "GET",
        "status": 200,
        "duration_ms": round(0.0012345 * 1000.0, 3),
    }


def test_without_the_writer_the_access_line_goes_to_the_logger_now(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(logging_setup, "_access_writer", None)
    with caplog.at_level(logging.INFO, logger="boostserve.access"):
        log_access("POST", "/v1/classify", 422, 0.003, "r2", "/v1/classify")
    [record] = [r for r in caplog.records if r.name == "boostserve.access"]
    assert record.getMessage() == "POST /v1/classify -> 422 in 3.00 ms"
    assert (record.request_id, record.status, record.duration_ms) == ("r2", 422, 3.0)  # type: ignore[attr-defined]


@pytest.mark.parametrize("created", [1_800_000_000.0, 1_800_000_000.999, 1_764_600_000.0425, 1_700_000_059.5])
def test_the_cached_timestamps_equal_the_uncached_ones(created: float) -> None:
    record = _record("x")
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    assert TextFormatter().formatTime(record) == logging.Formatter().formatTime(record)
    ts = json.loads(JSONFormatter().format(record))["ts"]
    assert ts == time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(record.msecs):03d}Z"


def test_uvicorn_leaves_the_writer_running(writer: tuple[BackgroundHandler, CountingStream]) -> None:
    """uvicorn applies its log_config with dictConfig, which (unless incremental) closes every handler."""
    import logging.config

    handler, stream = writer
    logging.config.dictConfig(logging_setup.uvicorn_log_config())
    assert handler._writer.is_alive()
    handler.put_access((1_800_000_000.0, "GET", "/livez", 200, 0.001, "r3", "/livez"))
    handler.flush()
    assert stream.threads == {"boostserve-log-writer"} and "GET /livez -> 200" in stream.getvalue()


def test_after_close_records_are_written_at_once() -> None:
    stream = CountingStream()
    handler = BackgroundHandler(stream)
    handler.setFormatter(TextFormatter())
    handler.close()
    handler.handle(_record("logged at exit"))
    handler.put_access((1_800_000_000.0, "GET", "/livez", 200, 0.001, "r4", "/livez"))
    assert "logged at exit" in stream.getvalue() and "[request_id=r4]" in stream.getvalue()


class StalledStream(CountingStream):
    """A stream whose first write blocks until released (a full pipe nobody reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.entered.set()
        assert self.release.wait(timeout=60)
        return super().write(text)


def test_a_stalled_stream_drops_access_lines_past_the_bound_and_says_so() -> None:
    """The queue does not grow without bound when the stream stops taking lines (nor block the caller)."""
    stream = StalledStream()
    handler = BackgroundHandler(stream, batch_s=0.0, max_pending=10)
    handler.setFormatter(TextFormatter())
    entry = (1_800_000_000.0, "GET", "/livez", 200, 0.001, "first", "/livez")
    handler.put_access(entry)
    assert stream.entered.wait(timeout=60)  # the writer is stuck in its first write
    for i in range(50):
        handler.put_access((*entry[:5], f"id{i}", "/livez"))
    stream.release.set()
    handler.flush()
    handler.close()
    lines = stream.getvalue().splitlines()
    kept = [line.rsplit("request_id=", 1)[1].rstrip("]") for line in lines if "request_id=" in line]
    assert kept == ["first"] + [f"id{i}" for i in range(10)]
    warnings = [line for line in lines if "request_id=" not in line]
    assert len(warnings) == 1 and "40 access lines dropped: the log stream did not keep up" in warnings[0]


def test_the_cost_measurement_runs_and_writes_its_files(tmp_path: Path) -> None:
    """scripts/access_log_cost.py (docs/http-api.md, "Logging"): both ways measured, JSON and markdown."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[3]
    command = [sys.executable, str(root / "scripts" / "access_log_cost.py"), "--lines", "300", "--rounds", "2"]
    subprocess.run([*command, "--out", str(tmp_path)], check=True, capture_output=True, timeout=120)
    doc = json.loads((tmp_path / "access_log_cost.json").read_text())
    assert set(doc["summary"]) == {"synchronous", "writer"} and len(doc["runs"]["writer"]) == 2
    assert all(v["caller_us_per_line"]["median"] > 0 for v in doc["summary"].values())
    assert "| writer |" in (tmp_path / "access_log_cost.md").read_text()
