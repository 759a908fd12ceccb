"""examples/client.py reports a refused connection or a missing image in one line, exit 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.server import free_port

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "examples" / "client.py"


def _client(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CLIENT), *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )


def test_refused_connection_is_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    image = next((REPO / "examples" / "images").glob("*.png"))
    result = _client("--url", url, str(image))
    assert result.returncode == 1
    assert result.stderr == f"cannot reach {url}: [Errno 111] Connection refused\n"
    assert result.stdout == ""


def test_missing_image_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.png"
    result = _client("--url", f"http://127.0.0.1:{free_port()}", str(missing))
    assert result.returncode == 1
    assert result.stderr == f"{missing}: No such file or directory\n"
