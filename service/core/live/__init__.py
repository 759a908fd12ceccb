"""The live layer of the global budget: its operating point and the controllers that move it.

`operating_point.LiveOperatingPoint` is the interface every controller uses (see its docstring for
the contract); `macs` (live MAC budget) and `slo` (accuracy scaling under overload) are the pure
controllers, `control` drives them on the event loop from the scheduler's signals.
"""

from service.core.live.operating_point import LiveOperatingPoint, PointListener

__all__ = ["LiveOperatingPoint", "PointListener"]
