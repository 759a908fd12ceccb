"""The live MAC budget: keep the served MACs per image at a global `budget_macs` when the mix drifts.

Why a controller: `budget_macs=B` picks thresholds whose average cost on the *held-out* images is
at most B. Served images need not look like those: a harder mix reaches deeper exits and spends
more, an easier one less (docs/policies.md measures the out-of-sample spread). The server sees the
MACs it actually spent on every image, so it can correct the thresholds along the calibrated
frontier (re-resolve `budget_macs` at another held-out budget B') until the live average is B.

The estimator (a ratio, so the correction has no lag-driven oscillation): over the images served
on the global budget, an exponentially weighted sum of their live MACs L and of the held-out
expected MACs E of the thresholds each was served with, same weights. a = L / E is the live/held-
out cost ratio of the current mix: images served under different thresholds enter both sums
alike, so a moves only when the mix moves (a plain EWMA of L fed back through an integrator lags
behind its own corrections and rings). The point that spends B live solves a · e(B') = B, where
e(B') is the held-out cost of budget B'; locally e(B') = κ · B' with κ = e(B_now) / B_now of the
point in force, so B' = B / (a κ), clamped to [first exit's cost, full cost]. Iterated as images
arrive this is a fixed point that converges while a changes slowly along the frontier.

The window (`window` images, the EWMA's 1/α): the weighted mean of N_eff ≈ 2·window images has a
relative standard error of cv / sqrt(2·window), where cv is the coefficient of variation of the
per-image MACs under the thresholds in force (about 1.1-1.3 on the shipped models between 9 % and
40 % of the full cost, computed from their calibration exit fractions in docs/policies.md). The
default of 2,000 images puts that noise at about 2 %, inside the ±3 % band, while it still follows
a drift within a few thousand images (seconds at the server's rates). A shorter window would chase
sampling noise with the thresholds; a longer one would let a drift run outside the band longer.

Deadband: a new point is requested only when B' differs from the held-out budget in force by more
than `deadband` (1 %), so noise does not re-resolve budgets (a new `budget_macs` reference answer
costs tens of milliseconds) and targets sit on a grid of that spacing.

Pure: no clock and no I/O; `service.core.live.control` feeds it and applies its targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["MacController", "MacControllerConfig"]


@dataclass(frozen=True)
class MacControllerConfig:
    budget_macs: float  # B: the global budget (MACs per image, live)
    min_macs: float  # the first exit's cumulative cost: the cheapest held-out budget
    max_macs: float  # the full network's cost
    window: int = 2000  # images (EWMA 1/alpha)
    deadband: float = 0.01  # relative change of the held-out budget below which nothing moves
    min_images: int = 0  # images observed before the first move (default window // 4)

    def __post_init__(self) -> None:
        if not (0 < self.min_macs <= self.max_macs) or not math.isfinite(self.max_macs):
            raise ValueError("need 0 < min_macs <= max_macs")
        if not self.budget_macs > 0 or self.window < 1 or not 0 <= self.deadband < 1:
            raise ValueError("need budget_macs > 0, window >= 1, deadband in [0, 1)")


class MacController:
    """The ratio controller described in the module docstring."""

    def __init__(self, config: MacControllerConfig, held_out_budget: float, held_out_macs: float) -> None:
        self.config = config
        self._alpha = 1.0 / config.window
        self._live = 0.0  # EWMA numerator of live MACs
        self._expected = 0.0  # same weights, held-out expected MACs of the thresholds served
        self.images = 0
        self.held_out_budget = float(held_out_budget)  # B_now: the budget_macs the thresholds in force resolve
        self.held_out_macs = float(held_out_macs)  # e(B_now): their held-out expected MACs

    @property
    def min_images(self) -> int:
        return self.config.min_images or max(1, self.config.window // 4)

    def observe(self, images: int, live_macs: float, expected_macs: float) -> None:
        """`images` answered on the global budget: their summed live MACs, and the held-out
        expected MACs per image of the thresholds they were served with."""
        if images <= 0:
            return
        keep = (1.0 - self._alpha) ** images  # the weight left to older images after these
        self._live = keep * self._live + (1.0 - keep) * (live_macs / images)
        self._expected = keep * self._expected + (1.0 - keep) * expected_macs
        self.images += images

    @property
    def ratio(self) -> float | None:
        """a = live / held-out cost of the current mix (None before any image)."""
        if self.images == 0 or self._expected <= 0.0:
            return None
        return self._live / self._expected

    @property
    def live_macs(self) -> float | None:
        """The weighted live MACs per image (bias-corrected like the ratio: divided by the weight)."""
        if self.images == 0:
            return None
        return self._live / (1.0 - (1.0 - self._alpha) ** self.images)

    def moved_to(self, held_out_budget: float, held_out_macs: float) -> None:
        """The thresholds in force now resolve `held_out_budget` (held-out cost `held_out_macs`)."""
        self.held_out_budget = float(held_out_budget)
        self.held_out_macs = float(held_out_macs)

    def target(self) -> float | None:
        """The held-out budget B' to serve now, or None to stay (too few images, or inside the deadband)."""
        a = self.ratio
        if a is None or self.images < self.min_images or a <= 0.0 or self.held_out_macs <= 0.0:
            return None
        cfg = self.config
        kappa = self.held_out_macs / self.held_out_budget  # e(B') / B' near the point in force
        wanted = min(cfg.max_macs, max(cfg.min_macs, cfg.budget_macs / (a * kappa)))
        if abs(math.log(wanted / self.held_out_budget)) <= math.log1p(cfg.deadband):
            return None
        return wanted
