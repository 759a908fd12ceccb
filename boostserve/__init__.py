"""boostserve: train, export and serve boosted early-exit networks (BoostNet)."""

__version__ = "0.1.0"
