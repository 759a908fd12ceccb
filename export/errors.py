"""Errors of the export pipeline.

Why one base class: `boostserve export` turns every `ExportError` into a clear one-line message
and a non-zero exit status, and guarantees that no manifest was written.
"""

from __future__ import annotations


class ExportError(Exception):
    """The export cannot produce a correct artifact (graph check, parity, data, calibration)."""


class ParityError(ExportError):
    """ONNX Runtime disagrees with torch beyond the tolerance."""
