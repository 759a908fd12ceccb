"""The peers' own virtual environments: what each one installs (pinned), where, with which Python.

Why one venv per peer, outside the repository and created only on demand: the peers are large
(Ray, Triton's server binaries), their dependency pins conflict with each other and with
boostserve's, and none of them belongs in the serving environment. Each venv is made with
Debian's `/usr/bin/python3.11` when it exists, because PyTriton's Python-backend stub links the
system libpython3.11 (a pyenv or uv interpreter's venv loads but its stub cannot start); the other
peers do not care, and one interpreter for all keeps the comparison even.

`PEER_ENVS` is the one place the tested versions are written; the `peers` extra in
pyproject.toml lists the same pins (tests/bench/test_peers.py checks they agree).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: What every peer venv needs besides the peer itself: the model runtime and the PNG decoder.
COMMON_REQUIREMENTS: tuple[str, ...] = ("onnxruntime==1.32.0", "pillow==13.0.0")
#: The interpreter PyTriton's stub needs (see the module docstring); the fallback is this Python.
SYSTEM_PYTHON = Path("/usr/bin/python3.11")


@dataclass(frozen=True)
class PeerEnv:
    """One venv: its directory name, the pinned requirements and the distributions whose versions it reports."""

    name: str
    requirements: tuple[str, ...]
    report: tuple[str, ...]  # distribution names recorded in the results

    def path(self, cache: Path) -> Path:
        return cache / self.name

    def python(self, cache: Path) -> Path:
        return self.path(cache) / "bin" / "python"


PEER_ENVS: dict[str, PeerEnv] = {
    env.name: env
    for env in (
        PeerEnv("ray", ("ray[serve]==2.60.0", "numpy==2.4.6"), ("ray",)),
        PeerEnv("bentoml", ("bentoml==1.4.40", "numpy==2.4.6"), ("bentoml",)),
        PeerEnv("kserve", ("kserve==0.21.0", "numpy==2.4.6"), ("kserve",)),
        PeerEnv("litserve", ("litserve==0.2.19", "numpy==2.4.6"), ("litserve",)),
        # nvidia-pytriton 0.7.0 requires numpy < 2
        PeerEnv("pytriton", ("nvidia-pytriton==0.7.0", "numpy==1.26.4"), ("nvidia-pytriton",)),
    )
}


def default_cache() -> Path:
    """$BOOSTSERVE_PEERS_CACHE, else $XDG_CACHE_HOME/boostserve/peers, else ~/.cache/boostserve/peers."""
    explicit = os.environ.get("BOOSTSERVE_PEERS_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "boostserve" / "peers"


class PeerEnvError(RuntimeError):
    """A venv could not be made or installed: the peer is skipped with this message as the reason."""


def base_python() -> Path:
    return SYSTEM_PYTHON if SYSTEM_PYTHON.is_file() else Path(shutil.which("python3") or "python3")


def installed_versions(env: PeerEnv, cache: Path) -> dict[str, str] | None:
    """{distribution: version} of the venv's peer and runtime packages, None when the venv is not usable."""
    python = env.python(cache)
    if not python.is_file():
        return None
    names = [*env.report, "onnxruntime", "numpy", "pillow"]
    code = (
        "import json, importlib.metadata as m, sys\n"
        f"names = {names!r}\n"
        "out = {}\n"
        "for n in names:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = None\n"
        "out['python'] = sys.version.split()[0]\n"
        "print(json.dumps(out))\n"
    )
    try:
        done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60, check=True)
        versions = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if any(versions.get(n) is None for n in env.report):
        return None
    return {k: str(v) for k, v in versions.items() if v is not None}


def ensure_env(env: PeerEnv, cache: Path, *, install: bool, log: Path) -> dict[str, str]:
    """The venv's versions, creating and installing it first when missing and `install` is set."""
    versions = installed_versions(env, cache)
    if versions is not None:
        return versions
    if not install:
        raise PeerEnvError(f"{env.path(cache)} is not installed (run without --no-peer-install to create it)")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        steps = [
            [str(base_python()), "-m", "venv", str(env.path(cache))],
            [str(env.python(cache)), "-m", "pip", "install", "--disable-pip-version-check", "-q",
             *env.requirements, *COMMON_REQUIREMENTS],
        ]  # fmt: skip
        for step in steps:
            out.write("$ " + " ".join(step) + "\n")
            out.flush()
            done = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, check=False)
            if done.returncode != 0:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-5:])
                raise PeerEnvError(f"`{' '.join(step[:4])} ...` failed ({done.returncode}); log {log}: {tail}")
    versions = installed_versions(env, cache)
    if versions is None:
        raise PeerEnvError(f"{env.path(cache)} was installed but its packages cannot be read; log {log}")
    return versions
