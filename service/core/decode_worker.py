"""The decode worker process (`python -m service.core.decode_worker FD`): image bytes in, float32
(C, H, W) or a domain error out.

Why a process: Pillow's decoders run in C and cannot be interrupted, so a decode that runs too
long can only be stopped by killing the process that runs it, and memory that a decode took is
only certainly given back when its process ends. The pool (service.core.decode_pool) owns the
watchdog and the replacement; this module is what the worker runs, kept small so a replacement
starts quickly.

Protocol on the socket FD: the pool first sends the pickled `serve` arguments and the worker
answers "ready"; then the pool sends one image's bytes (`send_bytes`); the worker answers one
pickled `(result, recycle)` pair, where result is the ndarray or the BoostServeError to raise, and
recycle asks the pool to replace this worker (it kept too much memory; it exits after answering).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import sys
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.core.artifact import Preprocessing
    from service.core.preprocess import Limits

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """SIGKILL this worker when the serving process ends, whatever the worker is doing.

    Even when the server ends by os._exit (the shutdown watchdog) or is killed: without this a
    worker inside a long decode would outlive it.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _cap_memory(extra_bytes: int) -> None:
    """Let this process's data segment grow by at most `extra_bytes` from now (RLIMIT_DATA).

    Over it, allocations fail inside the decoder: Pillow and numpy raise MemoryError, answered as
    "too expensive" instead of the node's OOM killer taking the whole server.
    """
    with contextlib.suppress(OSError, ValueError):
        limit = _status_kib("VmData") * 1024 + extra_bytes
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def serve(conn: Connection, spec: Preprocessing, limits: Limits, memory_cap_bytes: int, recycle_bytes: int) -> None:
    """Decode until the pool closes the socket (or kills this process)."""
    from service.core.errors import BoostServeError, InvalidImageError
    from service.core.preprocess import Preprocessor

    preprocessor = Preprocessor(spec, limits)
    _cap_memory(memory_cap_bytes)
    conn.send("ready")
    baseline = _status_kib("VmRSS") * 1024
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        result: object
        recycle = False
        try:
            result = preprocessor.decode_file(data)
        except BoostServeError as exc:
            result = exc
        except MemoryError:
            result = InvalidImageError(
                f"image too expensive to decode: over the decode memory limit ({memory_cap_bytes / 2**20:.0f} MiB)"
            )
            recycle = True  # the allocator's state after a failed allocation is not worth trusting
        except Exception as exc:  # a decoder bug must not end the worker without an answer
            result = InvalidImageError(f"cannot decode image: {type(exc).__name__}: {exc}")
            recycle = True
        recycle = recycle or _status_kib("VmRSS") * 1024 > baseline + recycle_bytes
        try:
            conn.send((result, recycle))
        except (OSError, ValueError):
            return
        if recycle:
            os._exit(0)


#: Scheduling niceness of a worker: decoding yields the CPU to the serving process's event loop,
#: which answers every other request (and the liveness probe) when both want the same core.
WORKER_NICENESS = 10


def main(argv: list[str]) -> int:
    # Niceness first, before the decoder's imports: a replacement worker's start-up (numpy, Pillow)
    # is as much the worker's CPU as a decode is, and it must not compete with the event loop either.
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    conn = Connection(int(argv[1]))
    try:
        arguments = conn.recv()
    except (EOFError, OSError):
        return 0
    serve(conn, *arguments)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
