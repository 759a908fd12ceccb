"""A pool of decode worker processes with a per-image time cap, a memory cap and a bounded queue.

Why processes: a hostile file can make Pillow spend seconds to minutes of CPU, or gigabytes of
memory, inside C code that nothing can interrupt. Decoded in the serving process it held the event
loop (every request, the liveness probe included, waited) or a threadpool thread that could not be
stopped (44 of them starved every other decode, and shutdown waited for them). In a worker process
the watchdog can end it: when an image is not decoded within its limit, the worker is killed
(SIGKILL) and replaced, and only that request gets an error. Memory a decode took ends with its
worker too: a worker that holds more than `recycle_bytes` after an image is replaced.

Limits per image: `timeout_s` (the pool's cap, a property of the deployment) or the request's own
remaining time, whichever comes first; the caller says which error each expiry answers. The queue
of images waiting for a worker is bounded (`max_pending`): over it a request is refused (429) before
its bytes are copied anywhere.

Workers are fresh interpreters (`python -m service.core.decode_worker`), never forks of the
serving process with its ONNX Runtime threads, and none of multiprocessing's re-import of the
parent's main module. They start with the first image that needs one (most traffic, small plain
PNGs, never does), in a thread, so a start or replacement never holds the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import socket
import struct
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.core.artifact import Preprocessing
from service.core.errors import BoostServeError, InvalidImageError, NotReadyError, OverCapacityError

log = logging.getLogger("boostserve.decode")


@dataclass(frozen=True)
class DecodePoolConfig:
    workers: int
    #: Wall-clock cap for one image's decode (waiting for a worker is limited by the request alone).
    timeout_s: float
    #: Images that may wait for a free worker; more -> OverCapacityError.
    max_pending: int
    #: How much a worker's data segment may grow while decoding one image (RLIMIT_DATA).
    memory_cap_bytes: int
    #: A worker whose resident memory grew by more than this after an image is replaced.
    recycle_bytes: int = 64 << 20


@dataclass
class DecodeStats:
    decoded: int = 0
    killed: int = 0  # over their time limit
    crashed: int = 0  # the worker died by itself (a decoder crash, the memory cap)
    recycled: int = 0
    refused: int = 0  # the queue was full


class _Worker:
    """One worker process and the non-blocking socket to it (multiprocessing.Connection framing,
    read and written through the event loop: a 10 MB image is never a blocking write)."""

    def __init__(self, process: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.process = process
        self.sock = sock

    @property
    def pid(self) -> int:
        return int(self.process.pid)


#: How long a new worker may take to import its decoder and say it is ready.
_START_TIMEOUT_S = 60.0
#: One thread per worker is enough for numpy in a decoder; a BLAS pool per worker is not.
_WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


OnTimeout = Callable[[float], BoostServeError]


def too_expensive(seconds: float) -> BoostServeError:
    """The default expiry: the image needed more than the pool's cap."""
    return InvalidImageError(f"image too expensive to decode: not decoded within {seconds:g} s")


class DecodePool:
    """Decodes image files in worker processes; `decode` is called from the event loop."""

    def __init__(self, spec: Preprocessing, limits: Any, config: DecodePoolConfig) -> None:
        if config.workers < 1:
            raise ValueError("a decode pool needs at least one worker")
        self.spec = spec
        self.limits = limits
        self.config = config
        self.stats = DecodeStats()
        self._starting: asyncio.Future[None] | None = None
        self._idle: deque[_Worker] = deque()
        self._waiters: deque[asyncio.Future[_Worker]] = deque()
        self._all: set[_Worker] = set()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the workers now (blocking; `decode` starts them itself when needed)."""
        for _ in range(self.config.workers):
            self._idle.append(self._spawn())

    async def _ensure_started(self) -> None:
        if self._all or self._closed:
            return
        loop = asyncio.get_running_loop()
        if self._starting is None:
            self._starting = loop.run_in_executor(None, self._spawn_all)
        await asyncio.shield(self._starting)

    def _spawn_all(self) -> None:
        workers = [self._spawn() for _ in range(self.config.workers)]
        if self._closed:
            for worker in workers:
                self._kill(worker)
                self._reap(worker)
            return
        self._idle.extend(workers)

    def close(self) -> None:
        """Kill every worker now (shutdown: a decode in progress is not worth waiting for)."""
        self._closed = True
        workers = list(self._all)
        for worker in workers:
            self._kill(worker)
        for worker in workers:
            self._reap(worker)
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(NotReadyError("the server is shutting down"))
        self._waiters.clear()

    @property
    def pids(self) -> list[int]:
        return sorted(w.pid for w in self._all)

    @property
    def pending(self) -> int:
        return len(self._waiters)

    def _spawn(self) -> _Worker:
        ours, theirs = socket.socketpair()
        env = {**os.environ, **_WORKER_ENV}
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (package_root, env.get("PYTHONPATH"))))
        with theirs:
            process = subprocess.Popen(
                [sys.executable, "-m", "service.core.decode_worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        worker = _Worker(process, ours)
        c = self.config
        try:
            ours.settimeout(_START_TIMEOUT_S)
            ours.sendall(_frame(pickle.dumps((self.spec, self.limits, c.memory_cap_bytes, c.recycle_bytes))))
            if _read_message_blocking(ours) != "ready":
                raise OSError("no ready message")
            ours.setblocking(False)
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            self._kill(worker)
            self._reap(worker)
            raise RuntimeError(f"decode worker {process.pid} did not start: {exc}") from exc
        self._all.add(worker)
        return worker

    def _kill(self, worker: _Worker) -> None:
        """SIGKILL `worker` and forget it; returns at once (the caller reaps it, off the loop)."""
        self._all.discard(worker)
        with contextlib.suppress(OSError):
            worker.process.kill()
        with contextlib.suppress(OSError):
            worker.sock.close()

    @staticmethod
    def _reap(worker: _Worker) -> None:
        """Wait for a killed worker to be gone, for at most a second (blocking).

        Never on the event loop: a killed process ends only once the kernel has torn down its
        memory, and a worker killed over a memory bomb holds hundreds of MiB and runs at a low
        priority on a busy core, so its end can take a good part of a second of wall time.
        """
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.process.wait(timeout=1.0)

    def _replace(self, worker: _Worker) -> _Worker:
        """The killed `worker`, reaped, and its replacement started (blocking: in a thread).

        Reaped first, so a dying worker's memory and its replacement's never add up.
        """
        self._reap(worker)
        return self._spawn()

    def _retire(self, worker: _Worker) -> None:
        """Replace `worker` (killed, crashed or recycled) without holding the event loop."""
        self._kill(worker)
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        spawned = loop.run_in_executor(None, self._replace, worker)

        def ready(done: asyncio.Future[_Worker]) -> None:
            if done.cancelled() or done.exception() is not None:
                log.error("cannot start a decode worker: %r", None if done.cancelled() else done.exception())
                return
            replacement = done.result()
            if self._closed:
                self._kill(replacement)
                self._reap(replacement)
            else:
                self._release(replacement)

        spawned.add_done_callback(ready)

    # -- workers in and out ------------------------------------------------------------------------
    def _release(self, worker: _Worker) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(worker)
                return
        self._idle.append(worker)

    async def _acquire(self, timeout: float | None, on_timeout: Callable[[], BoostServeError]) -> _Worker:
        if self._idle:
            return self._idle.popleft()
        if len(self._waiters) >= self.config.max_pending:
            self.stats.refused += 1
            raise OverCapacityError(
                f"{len(self._waiters)} images are waiting for a decoder (limit {self.config.max_pending}); retry later",
                retry_after=1.0,
            )
        waiter: asyncio.Future[_Worker] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())  # a worker came in the same tick: hand it on
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise on_timeout() from None
            raise

    # -- the one entry point -----------------------------------------------------------------------
    async def decode(
        self, data: bytes, timeout: float | None = None, on_timeout: OnTimeout | None = None
    ) -> np.ndarray:
        """float32 (C, H, W) of one image file, or the domain error its decode raised.

        `timeout` (the request's remaining time) and `on_timeout` (the error it answers) apply when
        they come before the pool's own cap, which answers `too_expensive`.
        """
        if self._closed:
            raise NotReadyError("the server is shutting down")
        await self._ensure_started()
        loop = asyncio.get_running_loop()
        started = loop.time()
        # Waiting for a worker (one may be restarting) is not the image's fault: only the
        # request's own time limits it; the pool's cap starts with the decode.
        request_limit = None if timeout is None else max(timeout, 0.0)

        def request_expired() -> BoostServeError:
            return (on_timeout or too_expensive)(request_limit or 0.0)

        def cap_expired() -> BoostServeError:
            return too_expensive(self.config.timeout_s)

        worker = await self._acquire(request_limit, request_expired)
        limit, expired = self.config.timeout_s, cap_expired
        if request_limit is not None:
            left = request_limit - (loop.time() - started)
            if left < limit:
                limit, expired = max(left, 0.0), request_expired
        try:
            result, recycle = await asyncio.wait_for(self._exchange(worker.sock, data), limit)
        except TimeoutError:
            self.stats.killed += 1
            log.warning("decode worker %d killed: image not decoded within %.3g s", worker.pid, limit)
            self._retire(worker)
            raise expired() from None
        except (EOFError, OSError, pickle.UnpicklingError):
            self.stats.crashed += 1
            log.warning("decode worker %d died while decoding (exit code %s)", worker.pid, worker.process.poll())
            self._retire(worker)
            raise InvalidImageError("image too expensive to decode: the decoder ran out of resources") from None
        except asyncio.CancelledError:
            self._retire(worker)  # nobody wants its answer; do not let it run on
            raise
        if recycle:
            self.stats.recycled += 1
            self._retire(worker)
        else:
            self._release(worker)
        if isinstance(result, BoostServeError):
            raise result
        self.stats.decoded += 1
        return np.asarray(result, dtype=np.float32)

    @staticmethod
    async def _exchange(sock: socket.socket, data: bytes) -> tuple[Any, bool]:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, _frame_header(len(data)))
        await loop.sock_sendall(sock, data)  # no concatenated copy of a 10 MB image
        size = _frame_size(await _read_exactly(sock, 4))
        if size is None:
            size = _frame_size(await _read_exactly(sock, 8))
        assert size is not None
        result, recycle = pickle.loads(await _read_exactly(sock, size))
        return result, bool(recycle)


def _frame_header(size: int) -> bytes:
    """multiprocessing.Connection's framing (what the worker's `recv_bytes` reads) for `size` bytes."""
    if size > 0x7FFFFFFF:
        return struct.pack("!iQ", -1, size)
    return struct.pack("!i", size)


def _frame_size(header: bytes) -> int | None:
    """The payload size a frame header says; None after the 4-byte marker of an 8-byte size."""
    if len(header) == 8:
        return int(struct.unpack("!Q", header)[0])
    (size,) = struct.unpack("!i", header)
    return None if size == -1 else int(size)


def _frame(payload: bytes) -> bytes:
    return _frame_header(len(payload)) + payload


async def _read_exactly(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = await loop.sock_recv_into(sock, view[got:])
        if n == 0:
            raise EOFError("the decode worker closed its socket")
        got += n
    return bytes(buffer)


def _read_message_blocking(sock: socket.socket) -> Any:
    """One framed pickled message from a blocking socket (the start-up handshake, in a thread)."""

    def exactly(size: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < size:
            chunk = sock.recv(size - len(chunks))
            if not chunk:
                raise EOFError("the decode worker closed its socket")
            chunks += chunk
        return bytes(chunks)

    size = _frame_size(exactly(4))
    if size is None:
        size = _frame_size(exactly(8))
    assert size is not None
    return pickle.loads(exactly(size))
