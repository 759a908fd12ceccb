"""Logging for `boostserve serve`: plain text for people, one JSON object per line for collectors.

Why here and not uvicorn's log config: the same formatter must cover our loggers
(`boostserve.*`, access lines with request id, route template, status, duration) and uvicorn's,
so a log pipeline sees one format. Access lines never contain bodies, image data or query values:
the middleware logs the route template, not the URL.

Why a background writer (`BackgroundHandler`): the access log writes one line per request, and
written the usual way (a LogRecord with its caller's frame looked up, formatted and written with a
flush per line, all on the event loop) it cost the server a measured share of its requests per
second at the shipped `info` level (docs/http-api.md, "Logging"). Records are queued by the thread
that logs them and written by one thread in batches, one write per batch; access records are
formatted there too (their arguments are the middleware's immutable values), every other record is
formatted when it is logged, so its text is what it was at that moment, as with a plain handler.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any, Final, TextIO

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


@functools.lru_cache(maxsize=4)
def _utc_second(second: int) -> str:
    """The UTC date and time of a whole second: computed once per second, not once per line."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


@functools.lru_cache(maxsize=4)
def _local_second(second: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))


class JSONFormatter(logging.Formatter):
    """{"ts", "level", "logger", "message", **extra fields, "exc_info"?} per line."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": f"{_utc_second(int(record.created))}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_") and key != "color_message":
                payload[key] = value
        if record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s%(request_id_suffix)s")

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.request_id_suffix = f" [request_id={request_id}]" if request_id else ""
        return super().format(record)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """logging.Formatter's default text ("2026-12-01 15:53:01,042"), its strftime once per second."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return f"{_local_second(int(record.created))},{int(record.msecs):03d}"


#: The access logger: one line per request (`log_access`).
ACCESS_LOGGER: Final = "boostserve.access"
access_log = logging.getLogger(ACCESS_LOGGER)

#: What the event loop hands the writer per request: (time, method, target, status, seconds, request id, route).
AccessEntry = tuple[float, str, str, int, float, str, str]


def access_record(entry: AccessEntry) -> logging.LogRecord:
    """The access line of one request as a LogRecord: the one place its message and fields are written."""
    created, method, target, status, elapsed_s, request_id, route = entry
    args = (method, target, status, elapsed_s * 1000.0)
    record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, "", 0, "%s %s -> %d in %.2f ms", args, None)
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    record.request_id = request_id
    record.route = route
    record.method = method
    record.status = status
    record.duration_ms = round(elapsed_s * 1000.0, 3)
    return record


def log_access(method: str, target: str, status: int, elapsed_s: float, request_id: str, route: str) -> None:
    """Log one request's access line (at INFO): on `configure_logging`'s writer thread when it runs.

    With the writer, the caller (the event loop) only queues a tuple: the LogRecord is built,
    formatted and written on the writer thread, stamped with the time of this call. Without it
    (tests, an embedding application) the record goes to the access logger's handlers now.
    """
    if not access_log.isEnabledFor(logging.INFO):
        return
    entry = (time.time(), method, target, status, elapsed_s, request_id, route)
    writer = _access_writer
    if writer is not None:
        writer.put_access(entry)
    else:
        access_log.handle(access_record(entry))


class _Flush:
    """A marker in the queue: set once every record queued before it is written."""

    def __init__(self) -> None:
        self.done = threading.Event()


#: A queued item: a record to format, a line already formatted, an access entry, a flush marker, or
#: None (close).
_Item = logging.LogRecord | str | AccessEntry | _Flush | None


class BackgroundHandler(logging.Handler):
    """Queue records on the logging thread; one daemon thread formats and writes them in batches.

    `emit` costs the caller one queue put (plus, for records not named in `deferred`, their
    formatting). The writer wakes for the first record, waits `batch_s` for more (a warning or
    worse wakes it at once), then writes what is queued in chunks of at most `chunk` lines, one
    write and flush each; between chunks the GIL goes back to the event loop, so a batch never holds
    it for long. `flush()` returns once everything queued so far is written (the exit watchdog and
    logging.shutdown call it), `close()` flushes and stops the thread. A process killed outright
    loses at most the last `batch_s` of lines.

    Bounded: a stream that stops taking lines (a full pipe nobody reads) used to block the event
    loop; now it would grow the queue instead, so past `max_pending` queued items access lines are
    dropped and counted, and the count is written as a warning once the stream takes lines again.
    Other records are never dropped (they are few).
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        deferred: Iterable[str] = (ACCESS_LOGGER,),
        batch_s: float = 0.05,
        chunk: int = 64,
        max_pending: int = 100_000,
    ) -> None:
        super().__init__()
        self.stream = stream
        self.deferred = frozenset(deferred)
        self.batch_s = batch_s
        self.chunk = chunk
        self.max_pending = max_pending
        #: Access lines dropped since the last report of them (the queue was full).
        self.dropped = 0
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._urgent = threading.Event()
        self._closed = False
        self._writer = threading.Thread(target=self._run, name="boostserve-log-writer", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        if self._closed:  # after close (logging.shutdown at exit): written now, as a StreamHandler would
            self._emit_lines([self.format(record)])
            return
        try:
            self._queue.put(record if record.name in self.deferred else self.format(record))
            if record.levelno >= logging.WARNING:
                self._urgent.set()
        except Exception:
            self.handleError(record)

    def put_access(self, entry: AccessEntry) -> None:
        """Queue one access line (`log_access`); built and formatted on the writer thread."""
        if self._closed:
            self.handle(access_record(entry))
        elif self._queue.qsize() >= self.max_pending:
            self.dropped += 1  # the writer reads and resets it; a lost increment only under-counts
        else:
            self._queue.put(entry)

    def flush(self) -> None:
        """Block until every record queued so far is written (at most 5 s; never on the writer itself)."""
        if self._closed or threading.current_thread() is self._writer or not self._writer.is_alive():
            return
        marker = _Flush()
        self._queue.put(marker)
        self._urgent.set()
        marker.done.wait(timeout=5.0)

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True
            self._queue.put(None)
            self._urgent.set()
            self._writer.join(timeout=5.0)
        super().close()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            self._urgent.wait(self.batch_s)  # let a batch gather; a warning, flush or close ends the wait
            self._urgent.clear()
            items = [first]
            with contextlib.suppress(queue.Empty):
                while True:
                    items.append(self._queue.get_nowait())
            if not self._write(items):
                return

    def _write(self, items: list[_Item]) -> bool:
        """Write `items` in order; False once the close marker (None) is reached."""
        lines: list[str] = []
        for item in items:
            if isinstance(item, (logging.LogRecord, tuple)):
                try:
                    record = item if isinstance(item, logging.LogRecord) else access_record(item)
                    lines.append(self.format(record))
                except Exception:
                    self.handleError(logging.makeLogRecord({"msg": repr(item)[:200]}))
            elif isinstance(item, str):
                lines.append(item)
            else:
                self._emit_lines(lines)
                lines = []
                if item is None:
                    return False
                item.done.set()
            if len(lines) >= self.chunk:
                self._emit_lines(lines)
                lines = []
                time.sleep(0)  # hand the GIL back between chunks
        self._emit_lines(lines)
        dropped, self.dropped = self.dropped, 0
        if dropped:
            message = "%d access lines dropped: the log stream did not keep up"
            self._emit_lines(
                [self.format(logging.LogRecord(ACCESS_LOGGER, logging.WARNING, "", 0, message, (dropped,), None))]
            )
        return True

    def _emit_lines(self, lines: list[str]) -> None:
        if not lines:
            return
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except Exception:  # a closed or broken stream must not end the writer
            self.handleError(logging.makeLogRecord({"msg": lines[0]}))


#: The writer `log_access` queues to; set by configure_logging (None: log synchronously).
_access_writer: BackgroundHandler | None = None


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Route the root, uvicorn and boostserve loggers to stderr with one formatter (idempotent).

    Also turns off what the logging module records for every LogRecord and no formatter of ours
    prints (the caller's frame, thread, process and multiprocessing names): the Python logging
    HOWTO's "Optimization" switches, which make each access record cheaper to create.
    """
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BackgroundHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    numeric = getattr(logging, level.upper(), logging.INFO)
    root = logging.getLogger()
    global _access_writer
    _access_writer = None
    for existing in list(root.handlers):
        if getattr(existing, "_boostserve", False):
            root.removeHandler(existing)
            existing.close()
    handler._boostserve = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(numeric)
    # Our access log replaces uvicorn's (which prints the raw URL, query string included).
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("boostserve").setLevel(numeric)
    _access_writer = handler


def uvicorn_log_config() -> dict[str, Any]:
    """Tell uvicorn not to install its own handlers (configure_logging already did).

    Incremental: a full dictConfig closes every existing handler first, and a closed
    BackgroundHandler has no writer thread any more (it would write synchronously).
    """
    return {"version": 1, "incremental": True}
