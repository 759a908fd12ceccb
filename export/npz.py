"""A byte-reproducible .npz writer.

Why not `numpy.savez_compressed`: it writes each member with the *current time* as its zip
timestamp, so the same arrays saved twice get different sha256s, which would change the
artifact's content version on every re-export of the same checkpoint. This writer pins the zip
timestamps (1980-01-01), the member order (sorted keys) and the compression level; the result
is a normal .npz that `numpy.load` reads (what `service.calibration.load_calibration` does).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

_EPOCH = (1980, 1, 1, 0, 0, 0)


def save_npz_deterministic(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    with zipfile.ZipFile(path, mode="w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for key in sorted(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, buffer.getvalue())
