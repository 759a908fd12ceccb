"""The decode worker pool: same pixels as an inline decode, time and memory caps that kill and
replace a worker, a bounded queue, and no worker outliving the server."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.core.artifact import Manifest, load_manifest
from service.core.decode_pool import DecodePool, DecodePoolConfig
from service.core.errors import InvalidImageError, OverCapacityError, ValidationFailedError
from service.core.preprocess import Limits, Preprocessor
from service.http.settings import EMBEDDED_MODEL_DIR
from tests.reliability._hostile import progressive_scan_bomb
from tests.reliability._procs import alive

#: A decode of several seconds that every bound accepts (scan count under the limit).
SLOW = progressive_scan_bomb(4096, 90)


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest(EMBEDDED_MODEL_DIR, verify=False)


def make_pool(manifest: Manifest, **overrides: float) -> DecodePool:
    config = {"workers": 1, "timeout_s": 30.0, "max_pending": 4, "memory_cap_bytes": 256 << 20, **overrides}
    limits = Limits(max_image_pixels=4096 * 4096, max_decode_bytes=1 << 40)
    return DecodePool(manifest.preprocessing, limits, DecodePoolConfig(**config))  # type: ignore[arg-type]


@pytest.fixture
def pools(manifest: Manifest) -> Iterator[list[DecodePool]]:
    made: list[DecodePool] = []
    yield made
    for pool in made:
        pool.close()


def jpeg(seed: int = 0, size: tuple[int, int] = (60, 40)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def wait_gone(pid: int, seconds: float = 10.0) -> bool:
    stop = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < stop:
        time.sleep(0.02)
    return not alive(pid)


def test_the_same_pixels_as_an_inline_decode(manifest: Manifest, pools: list[DecodePool]) -> None:
    pool = make_pool(manifest)
    pools.append(pool)
    inline = Preprocessor(manifest.preprocessing, pool.limits)

    async def run() -> list[np.ndarray]:
        return [await pool.decode(jpeg(seed)) for seed in range(3)]

    for seed, decoded in enumerate(asyncio.run(run())):
        assert np.array_equal(decoded, inline.decode_file(jpeg(seed)))


def test_a_decode_over_the_cap_is_killed_and_its_worker_replaced(manifest: Manifest, pools: list[DecodePool]) -> None:
    pool = make_pool(manifest, timeout_s=0.3)
    pools.append(pool)

    async def run() -> tuple[str, float, list[int], list[int], np.ndarray]:
        first = await pool.decode(jpeg())  # starts the worker
        before = pool.pids
        started = time.monotonic()
        with pytest.raises(InvalidImageError) as refused:
            await pool.decode(SLOW)
        took = time.monotonic() - started
        again = await pool.decode(jpeg())  # the replacement answers
        assert np.array_equal(again, first)
        return refused.value.message, took, before, pool.pids, again

    message, took, before, after, _ = asyncio.run(run())
    assert message == "image too expensive to decode: not decoded within 0.3 s"
    assert took < 5.0  # the slow image alone takes over 1 s of CPU
    assert before != after and len(after) == 1
    assert wait_gone(before[0])
    assert pool.stats.killed == 1


def test_a_killed_worker_is_reaped_off_the_event_loop(manifest: Manifest, pools: list[DecodePool]) -> None:
    """A worker killed over a memory bomb can take most of a second to end (its memory is torn down
    at its low priority): waiting for it on the event loop stalled every request and /livez."""
    pool = make_pool(manifest, timeout_s=0.3)
    pools.append(pool)
    waited_on: list[int] = []

    async def run() -> int:
        await pool.decode(jpeg())  # starts the worker
        (worker,) = pool._idle
        real_wait = worker.process.wait

        def wait(timeout: float | None = None) -> int:
            waited_on.append(threading.get_ident())
            return real_wait(timeout)

        worker.process.wait = wait  # type: ignore[method-assign]
        with pytest.raises(InvalidImageError):
            await pool.decode(SLOW)
        await pool.decode(jpeg())  # the replacement is in, so the old one was reaped
        return threading.get_ident()

    loop_thread = asyncio.run(run())
    assert waited_on and loop_thread not in waited_on


def test_the_request_limit_answers_its_own_error(manifest: Manifest, pools: list[DecodePool]) -> None:
    pool = make_pool(manifest)
    pools.append(pool)

    async def run() -> None:
        await pool.decode(jpeg())
        with pytest.raises(ValidationFailedError, match=r"^over 0\.2 s$"):
            await pool.decode(SLOW, 0.2, lambda seconds: ValidationFailedError(f"over {seconds:g} s"))

    asyncio.run(run())


def test_a_full_queue_refuses_before_waiting(manifest: Manifest, pools: list[DecodePool]) -> None:
    pool = make_pool(manifest, max_pending=1, timeout_s=0.5)
    pools.append(pool)

    async def run() -> list[object]:
        await pool.decode(jpeg())
        # One decoding, one waiting, the third refused at once.
        tasks = [asyncio.ensure_future(pool.decode(SLOW)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(OverCapacityError, match=r"^1 images are waiting for a decoder \(limit 1\); retry later$"):
            await pool.decode(jpeg())
        return await asyncio.gather(*tasks, return_exceptions=True)

    outcomes = asyncio.run(run())
    assert all(isinstance(o, InvalidImageError) for o in outcomes), outcomes
    assert pool.stats.refused == 1


def test_over_the_memory_cap_is_a_clear_error_and_the_worker_is_replaced(
    manifest: Manifest, pools: list[DecodePool]
) -> None:
    pool = make_pool(manifest, memory_cap_bytes=64 << 20)
    pools.append(pool)
    big = io.BytesIO()
    Image.new("RGBA", (4096, 4096), (1, 2, 3, 4)).save(big, "PNG")  # ~350 MB to composite

    async def run() -> tuple[str, list[int], list[int]]:
        await pool.decode(jpeg())
        before = pool.pids
        with pytest.raises(InvalidImageError) as refused:
            await pool.decode(big.getvalue())
        await pool.decode(jpeg())
        return refused.value.message, before, pool.pids

    message, before, after = asyncio.run(run())
    assert message == "image too expensive to decode: over the decode memory limit (64 MiB)"
    assert before != after
    assert pool.stats.recycled == 1


def test_a_cancelled_decode_does_not_run_on(manifest: Manifest, pools: list[DecodePool]) -> None:
    pool = make_pool(manifest)
    pools.append(pool)

    async def run() -> int:
        await pool.decode(jpeg())
        pid = pool.pids[0]
        task = asyncio.ensure_future(pool.decode(SLOW))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return pid

    assert wait_gone(asyncio.run(run()))


def test_close_kills_a_worker_mid_decode(manifest: Manifest) -> None:
    pool = make_pool(manifest)

    async def run() -> int:
        await pool.decode(jpeg())
        task = asyncio.ensure_future(pool.decode(SLOW))
        await asyncio.sleep(0.1)
        pid = pool.pids[0]
        pool.close()
        task.cancel()
        return pid

    assert wait_gone(asyncio.run(run()), seconds=2.0)


def test_no_worker_outlives_a_killed_server() -> None:
    """SIGKILL of the process that owns the pool (no cleanup runs) ends a worker mid-decode."""
    script = textwrap.dedent(
        """
        import asyncio, sys
        from service.core.artifact import load_manifest
        from service.core.decode_pool import DecodePool, DecodePoolConfig
        from service.core.preprocess import Limits
        from service.http.settings import EMBEDDED_MODEL_DIR
        from tests.reliability._hostile import progressive_scan_bomb
        m = load_manifest(EMBEDDED_MODEL_DIR, verify=False)
        pool = DecodePool(m.preprocessing, Limits(4096 * 4096, 1 << 40), DecodePoolConfig(1, 60.0, 4, 256 << 20))
        pool.start()
        print(pool.pids[0], flush=True)
        asyncio.run(pool.decode(progressive_scan_bomb(4096, 90)))
        """
    )
    repo = Path(__file__).resolve().parents[2]
    owner = subprocess.Popen([sys.executable, "-c", script], cwd=repo, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        worker = int(owner.stdout.readline())
        time.sleep(0.2)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=10)
        assert wait_gone(worker), f"worker {worker} outlived its server"
    finally:
        owner.kill()
