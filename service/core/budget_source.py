"""Where the global budget comes from: the settings, a watched budget file, or a PUT.

Why a file: `PUT /v1/budget` changes the one replica that gets the request and is lost on restart,
while a deployment runs several replicas. With `BOOSTSERVE_BUDGET_FILE` (in Kubernetes a ConfigMap
mounted read-only) every replica loads the same file at start and re-reads it when it changes, so
one edit reaches them all and survives restarts.

The file holds what a PUT body holds: one budget knob (with its policy) and/or `early_exit`, as
JSON, parsed by the same rules (`parse_budget_update`). Re-reads are atomic: the file is read in
one piece and used only if its identity (inode, size, mtime) did not change during the read, so a
writer that replaces it (ConfigMap symlink swap, `mv`) or one caught mid-write is simply read again
at the next poll; a file that does not parse or does not fit the model is logged, reported in
`GET /v1/budget` (`source.error`) and ignored: the budget in force stays.

`PUT /v1/budget` with a budget file writes through: the new budget in force (knob, policy,
early_exit) replaces the file atomically (temporary file + rename in the same directory), so the
other replicas follow at their next poll and a restart keeps it. When the file cannot be written
(a read-only ConfigMap mount) the change applies to this replica only, until the file changes or
the process restarts, and the answer says so (`source.kind = "put"`, `source.error`). Without a
budget file a PUT is always per-replica and temporary.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from service.core.classify import ClassifyService, ResolvedBudget
from service.core.errors import ValidationFailedError
from service.core.knobs import BUDGET_FIELD_KNOBS, BUDGET_KNOBS, KNOB_BY_NAME, RequestOptions, parse_options

log = logging.getLogger("boostserve.budget")

#: What PUT /v1/budget and the budget file accept: a budget knob (with its policy) and/or the
#: global early-exit switch.
BUDGET_UPDATE_KNOBS = (*BUDGET_FIELD_KNOBS, KNOB_BY_NAME["early_exit"])
#: A budget file is a few dozen bytes; anything much bigger is not one.
MAX_FILE_BYTES = 64 * 1024


def parse_budget_update(payload: Any, where: str = "field") -> RequestOptions:
    """A PUT body or a budget file's JSON -> the options to apply (the one rule for both)."""
    if not isinstance(payload, dict) or not payload:
        names = ", ".join(k.name for k in BUDGET_KNOBS)
        raise ValidationFailedError(f"give one of {names} (and/or early_exit) as a JSON object")
    options = parse_options(payload, allowed=BUDGET_UPDATE_KNOBS, where=where)
    if options.budget is None and options.early_exit is None:
        raise ValidationFailedError("every field is null: give a budget knob and/or early_exit")
    return options


def budget_document(resolved: ResolvedBudget) -> dict[str, Any]:
    """The budget in force as a budget-file document (parses back to the same budget)."""
    return {**resolved.budget.to_json(), "early_exit": resolved.early_exit}


@dataclass
class BudgetSource:
    """Where the budget in force came from, as `GET /v1/budget` reports it."""

    kind: Literal["settings", "file", "put"] = "settings"
    file: str | None = None  # BOOSTSERVE_BUDGET_FILE, when set
    sha256: str | None = None  # of the file content in force (kind "file")
    updated_at: float | None = None  # unix time of the last change of the budget in force
    error: str | None = None  # the last file problem (ignored) or failed write-through

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "file": self.file,
            "sha256": self.sha256,
            "updated_at": self.updated_at,
            "error": self.error,
        }


class BudgetFile:
    """Loads the budget file into a ClassifyService, watches it, and takes PUTs through it."""

    def __init__(self, path: Path, service: ClassifyService, source: BudgetSource, poll_s: float) -> None:
        self.path = path
        self.service = service
        self.source = source
        self.poll_s = poll_s
        self._identity: tuple[int, int, int, int] | None = None
        self._lock = asyncio.Lock()  # one load or write at a time
        source.file = str(path)

    def _stat(self) -> tuple[int, int, int, int]:
        st = os.stat(self.path)  # follows symlinks: a ConfigMap's ..data swap changes it
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _read(self) -> tuple[tuple[int, int, int, int], bytes] | None:
        """(identity, content) read in one piece, or None while the file changes under the read."""
        before = self._stat()
        if before[2] > MAX_FILE_BYTES:
            raise ValidationFailedError(f"{before[2]} bytes: a budget file is at most {MAX_FILE_BYTES}")
        content = self.path.read_bytes()
        return (before, content) if self._stat() == before else None

    async def poll_once(self) -> bool:
        """Re-read the file if it changed; True when a new budget came into force."""
        async with self._lock:
            try:
                read = self._read()
            except FileNotFoundError:
                if self._identity is not None or self.source.error is None:
                    self._note_error(f"{self.path} not found; the budget in force stays")
                self._identity = None
                return False
            except (OSError, ValidationFailedError) as exc:
                self._note_error(f"{self.path}: {exc}; the budget in force stays")
                return False
            if read is None or read[0] == self._identity:
                return False
            identity, content = read
            self._identity = identity
            digest = hashlib.sha256(content).hexdigest()
            if digest == self.source.sha256 and self.source.kind == "file":
                self.source.error = None  # same content as in force (our own write-through, a touch, a revert)
                return False
            try:
                options = parse_budget_update(json.loads(content), where="budget file field")
                await self.service.set_global_budget(options.budget, options.early_exit)
            except (ValueError, ValidationFailedError) as exc:  # JSONDecodeError is a ValueError
                message = exc.message if isinstance(exc, ValidationFailedError) else str(exc)
                self._note_error(f"{self.path} ignored: {message}; the budget in force stays")
                return False
            self.source.kind, self.source.sha256 = "file", digest
            self.source.updated_at, self.source.error = time.time(), None
            log.info("budget file %s loaded (sha256 %s)", self.path, digest[:12])
            return True

    def _note_error(self, message: str) -> None:
        if message != self.source.error:
            log.error("%s", message)
        self.source.error = message

    async def watch(self) -> None:
        """Poll forever (cancelled at shutdown)."""
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll_once()
            except Exception:  # never let the watcher die: the next poll tries again
                log.exception("budget file watcher")

    async def put(self, options: RequestOptions) -> ResolvedBudget:
        """A PUT: apply it, then write the budget in force through to the file (atomically)."""
        async with self._lock:
            resolved = await self.service.set_global_budget(options.budget, options.early_exit)
            content = (json.dumps(budget_document(resolved), sort_keys=True) + "\n").encode()
            try:
                self._write(content)
            except OSError as exc:
                self.source.kind, self.source.sha256 = "put", None
                self.source.error = (
                    f"could not write {self.path} ({exc.strerror or exc}): this change applies to this replica "
                    "only, until the file changes or the process restarts"
                )
                log.warning("%s", self.source.error)
            else:
                self._identity = self._stat()
                self.source.kind, self.source.sha256 = "file", hashlib.sha256(content).hexdigest()
                self.source.error = None
            self.source.updated_at = time.time()
            return resolved

    def _write(self, content: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".budget-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(content)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


@asynccontextmanager
async def watching(
    path: Path, source: BudgetSource, poll_s: float, service: ClassifyService
) -> AsyncIterator[BudgetFile]:
    """Load the file now (before the server says ready), then watch it until the block ends."""
    watcher = BudgetFile(path, service, source, poll_s)
    await watcher.poll_once()
    task = asyncio.create_task(watcher.watch(), name="boostserve-budget-file")
    try:
        yield watcher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
