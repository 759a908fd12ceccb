"""The http suite's `compare` server: the same artifact served by the code of another checkout.

Why: "does this change cost req/s?" is only answered fairly side by side — the same machine state,
the same load generator, the same artifact and settings, cells interleaved in the same rounds —
not by comparing against a number measured days ago. The user makes the other checkout with
`git worktree add /tmp/prev <commit>`; `boostserve bench --compare-with /tmp/prev` then runs that
checkout's own `python -m boostserve serve` next to this one's.

Import isolation (verified, not assumed): `PYTHONPATH=DIR python -m boostserve` alone runs THIS
checkout's code when started from this checkout's directory, because `-m` puts the working
directory first on sys.path; and the editable install's finder (setuptools, on sys.meta_path)
resolves any submodule DIR lacks (`service.core` before the package move, say) from this checkout
instead of failing. So the server runs as `python -S -P -m boostserve serve` with
`PYTHONPATH=DIR:<this environment's site-packages>`: -P drops the working directory, -S skips
site.py and with it every .pth file, the editable finder included. Only DIR's first-party code and
this environment's third-party packages are importable; `verify_imports` checks it before each
start and the result is recorded.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.server import ServerProcess

#: Server name of the other checkout's entry in the http suite (cells, aggregate, report).
COMPARE_SERVER = "compare"
#: The first-party packages `boostserve serve` needs; both must come from the other checkout.
CHECKOUT_PACKAGES = ("boostserve", "service")
#: The interpreter flags that keep this checkout's code out of the other checkout's server.
ISOLATION_FLAGS = ("-S", "-P")


@dataclass(frozen=True)
class Checkout:
    """A git checkout and the commit it has checked out."""

    path: Path
    commit: str
    short: str
    subject: str
    dirty: bool  # tracked files differ from the commit: the code is not exactly `commit`

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "commit": self.commit,
            "short": self.short,
            "subject": self.subject,
            "dirty": self.dirty,
        }


def _git(path: Path, *args: str) -> str:
    out = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10, check=True)
    return out.stdout.strip()


def read_checkout(path: Path) -> Checkout:
    """The commit of the checkout at `path`; ValueError when it is not one `boostserve serve` runs from."""
    path = path.resolve()
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    missing = [p for p in CHECKOUT_PACKAGES if not (path / p / "__init__.py").is_file()]
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)} package: not a checkout of this repository")
    try:
        commit = _git(path, "rev-parse", "HEAD")
        short = _git(path, "rev-parse", "--short", "HEAD")
        subject = _git(path, "log", "-1", "--format=%s")
        dirty = bool(_git(path, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError) as exc:
        raise ValueError(f"{path} is not a git checkout (git rev-parse HEAD failed: {exc})") from exc
    return Checkout(path=path, commit=commit, short=short, subject=subject, dirty=dirty)


def this_checkout() -> Checkout | None:
    """The checkout the bench runs from, or None (an installed copy, no git)."""
    try:
        return read_checkout(Path(__file__).resolve().parent.parent)
    except ValueError:
        return None


def isolated_environment(code_dir: Path) -> dict[str, str]:
    """PYTHONPATH for an `-S -P` interpreter: `code_dir` first, then this environment's packages."""
    packages = [*site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        packages.append(site.getusersitepackages())
    entries = [str(code_dir.resolve()), *(p for p in packages if Path(p).is_dir())]
    return {"PYTHONPATH": os.pathsep.join(entries)}


def isolated_command(*args: str) -> list[str]:
    """This interpreter, isolated from the working directory and .pth files, running `args`."""
    return [sys.executable, *ISOLATION_FLAGS, *args]


_PROBE = (
    "import json, boostserve.cli, service; "
    "print(json.dumps({'boostserve': boostserve.cli.__file__, 'service': service.__file__}))"
)


def verify_imports(code_dir: Path, env: dict[str, str], cwd: Path | None = None) -> dict[str, str]:
    """{package: file} as the isolated interpreter imports them, started in `cwd` (default: ours, where
    the server starts); RuntimeError unless every file is in code_dir."""
    out = subprocess.run(
        isolated_command("-c", _PROBE), env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    if out.returncode != 0:
        raise RuntimeError(f"cannot import {', '.join(CHECKOUT_PACKAGES)} from {code_dir}:\n{out.stderr.strip()}")
    files: dict[str, str] = json.loads(out.stdout.strip().splitlines()[-1])
    root = code_dir.resolve()
    stray = {name: f for name, f in files.items() if not Path(f).resolve().is_relative_to(root)}
    if stray:
        raise RuntimeError(f"the compare server would not run the code of {root}: {stray}")
    return files


class CheckoutServerProcess(ServerProcess):
    """`python -S -P -m boostserve serve` with the code of another checkout (see the module docstring)."""

    def __init__(self, checkout: Checkout, artifacts: Path, env: dict[str, str], **kwargs: Any) -> None:
        super().__init__(artifacts, env, **kwargs)
        self.checkout = checkout
        self.isolation = isolated_environment(checkout.path)
        self.imports: dict[str, str] = {}

    @property
    def command(self) -> list[str]:
        return isolated_command(*super().command[1:])

    def process_env(self) -> dict[str, str]:
        return {**super().process_env(), **self.isolation}

    def start(self) -> None:
        self.imports = verify_imports(self.checkout.path, self.isolation)
        super().start()

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "pythonpath": self.isolation["PYTHONPATH"],
            "checkout": self.checkout.as_dict(),
            "imports": self.imports,
        }
