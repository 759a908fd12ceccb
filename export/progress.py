"""Progress output for the long steps (export, calibration, report) without hard-wiring tqdm.

Why a wrapper: the CLI wants tqdm bars on stderr, tests and library callers want silence; and
the steps just call `bar.update(n)` / `note(text)` either way.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class _NullBar:
    def update(self, n: int = 1) -> None:
        del n


class Progress:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    @contextmanager
    def bar(self, *, total: int, desc: str, unit: str = "it") -> Iterator[Any]:
        if not self.enabled:
            yield _NullBar()
            return
        from tqdm import tqdm

        with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=True) as bar:
            yield bar

    def note(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)
