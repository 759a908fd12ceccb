"""The pieces of `python -m export.attach.results` that decide numbers: send curves, picks, the docs block."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.attach.results import BEGIN, END, _pick_fraction, _send_curve, replace_block


def test_send_curve_counts_gains_and_losses_of_sending() -> None:
    # image 0: small wrong, large right (+1); image 1: small right, large wrong (-1); image 2: both right
    small_ok = np.array([False, True, True])
    large_ok = np.array([True, False, True])
    fraction, accuracy = _send_curve(np.array([3.0, 2.0, 1.0]), small_ok, large_ok)
    np.testing.assert_allclose(fraction, [0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(accuracy, [2 / 3, 1.0, 2 / 3, 2 / 3])


def test_pick_fraction_is_the_smallest_meeting_the_target() -> None:
    fraction = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    accuracy = np.array([0.80, 0.89, 0.91, 0.92, 0.92])
    assert _pick_fraction(fraction, accuracy, 0.91) == 0.5
    assert _pick_fraction(fraction, accuracy, 0.95) == 1.0  # never met: send everything


def test_replace_block_keeps_the_rest_of_the_page(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(f"intro\n{BEGIN}\nold\n{END}\noutro\n")
    replace_block(page, "new table")
    assert page.read_text() == f"intro\n{BEGIN}\nnew table\n{END}\noutro\n"
    page.write_text("no markers\n")
    with pytest.raises(SystemExit):
        replace_block(page, "x")
