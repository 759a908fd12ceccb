"""The one error type of attach-exits.

Why a subclass of ExportError: the command turns it into one line and exit status 1 like
`boostserve export`, and the artifact is published only after every check passed.
"""

from __future__ import annotations

from export.errors import ExportError


class AttachError(ExportError):
    """The model, the cuts, the preprocessing or the dataset cannot give a correct artifact."""
