"""Every shell and Python example of README.md and docs/http-api.md, run against a live server.

Why: these are the first commands a newcomer runs, and they drifted while nothing ran them (a
three-value `thresholds` example that the 4-exit model answers with 422, a Pillow snippet for a
`python3` that has no Pillow). Each fenced ```bash / ```sh / ```python block is one test case,
id `FILE:LINE` (the line of its opening fence). It runs from the repository root against a real
`boostserve serve` on the embedded model at a free port on 127.0.0.1: every `http://127.0.0.1:8000`
in the block is rewritten to that server, and `$TOKEN` holds the server's admin token.

A block passes when it exits 0 and every HTTP answer it got was 2xx. Shell blocks run under
`set -euo pipefail` with `curl` wrapped as `curl --fail-with-body --location --max-redirs 0`, so a
4xx/5xx or a redirect is a non-zero curl exit that ends the block. Python blocks run with this
interpreter (the `.venv` one the docs tell you to use), where urllib raises on a 4xx/5xx.

A block that must not run here (it builds the venv, trains for hours, needs docker ...) has
`<!-- docs-test: skip (reason) -->` on the line just above its fence and is reported as a skip with
that reason. A malformed marker fails its block without running it (and `test_markers_are_well_formed`
names it), so a typo neither skips a block silently nor runs one meant to be skipped. A block without
the marker that installs, builds, serves or trains (`make`, `pip`, `docker`, `boostserve train` ...)
fails unrun too: run here, it would rewrite the checkout's `.venv` or hang on a server. The global
budget is put back after every block, so no block depends on what an earlier one changed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.reliability._server import LiveServer

REPO = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/http-api.md")
#: The address the docs use (`make serve`'s default); rewritten to the test server's.
DOC_URL = "http://127.0.0.1:8000"
ADMIN_TOKEN = "docs-example-token"
#: Fence language -> how the block is run; blocks in any other language (text, json, none) are prose.
RUNNERS = {"bash": "shell", "sh": "shell", "shell": "shell", "python": "python", "py": "python"}
BLOCK_TIMEOUT_S = 20.0

FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"<!--\s*docs-test:(.*?)-->")
SKIP = re.compile(r"^\s*skip \((.+)\)\s*$")
#: A curl command word: at the start of a line or after ; & | ( or $( (what the wrapper must see).
CURL_COMMAND = re.compile(r"(?:^|[;&|(])\s*curl\s", re.MULTILINE)
#: Commands a runnable example must not contain (see the module docstring): they need the marker.
UNSAFE_COMMAND = re.compile(
    r"(?:^|[;&|(])\s*(?:sudo\s+)?(?:\S*/)?"
    r"(?:make|pip3?|apt-get|apt|docker|podman|kubectl|boostserve\s+(?:serve|train|export|bench|report))\b"
    r"|-m\s+pip\b",
    re.MULTILINE,
)

SHELL_PRELUDE = """\
set -euo pipefail
shopt -s inherit_errexit
curl() {
  command curl --fail-with-body --show-error --location --max-redirs 0 "$@" || return $?
  echo ok >> "$DOCS_TEST_CURL_LOG"
}
export -f curl
"""


@dataclass(frozen=True)
class Block:
    path: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    runner: str  # "shell" | "python"
    code: str
    skip: str | None  # the marker's reason; None = run it
    problem: str | None = None  # why it must fail without being run (a malformed marker)

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


def extract_blocks(path: str, text: str) -> tuple[list[Block], list[str]]:
    """The runnable-language blocks of one Markdown file, and problems with its markers."""
    lines = text.splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    marker_lines_used: set[int] = set()
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            problems.append(f"{path}:{i + 1}: code fence never closed")
            break
        runner = RUNNERS.get(fence.group(1).lower())
        if runner is not None:
            skip = problem = None
            above = MARKER.search(lines[i - 1]) if i > 0 else None
            if above is not None:
                marker_lines_used.add(i - 1)
                reason = SKIP.match(above.group(1))
                if reason is None:
                    problem = f"{path}:{i}: docs-test marker must read 'skip (reason)': {lines[i - 1]!r}"
                    problems.append(problem)
                else:
                    skip = reason.group(1)
            blocks.append(Block(path, i + 1, runner, "\n".join(lines[i + 1 : end]) + "\n", skip, problem))
        i = end + 1
    for n, line in enumerate(lines):
        if MARKER.search(line) and n not in marker_lines_used:
            problems.append(f"{path}:{n + 1}: docs-test marker not just above a bash/sh/python fence: {line!r}")
    return blocks, problems


def all_blocks() -> tuple[list[Block], list[str]]:
    blocks: list[Block] = []
    problems: list[str] = []
    for path in DOCS:
        found, wrong = extract_blocks(path, (REPO / path).read_text())
        blocks += found
        problems += wrong
    return blocks, problems


BLOCKS, MARKER_PROBLEMS = all_blocks()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    artifacts = REPO / "service" / "embedded_model"
    logs = tmp_path_factory.mktemp("docs-server")
    with LiveServer(artifacts, logs, admin_token=ADMIN_TOKEN, log_level="warning").start() as live:
        yield live


@pytest.fixture(scope="module")
def initial_budget(server: LiveServer) -> dict[str, object]:
    response = httpx.get(server.base_url + "/v1/budget", timeout=5.0)
    response.raise_for_status()
    body: dict[str, object] = response.json()
    return body


@pytest.fixture
def restores_budget(server: LiveServer, initial_budget: dict[str, object]) -> Iterator[None]:
    """Put the start-up budget and early-exit switch back after the block (it may PUT its own)."""
    yield
    budget = initial_budget["budget"]
    assert isinstance(budget, dict)
    restore = httpx.put(
        server.base_url + "/v1/budget",
        json={**budget, "early_exit": initial_budget["early_exit"]},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=5.0,
    )
    assert restore.status_code == 200, restore.text
    restored = httpx.get(server.base_url + "/v1/budget", timeout=5.0).json()
    # The same budget in force; its source is now the PUT that restored it.
    assert {k: v for k, v in restored.items() if k != "source"} == {
        k: v for k, v in initial_budget.items() if k != "source"
    }
    assert restored["source"]["kind"] == "put"


def run_block(block: Block, base_url: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run one block from the repository root; returns the process and how many curls succeeded."""
    code = block.code.replace(DOC_URL, base_url)
    curl_log = tmp_path / "curl.log"
    curl_log.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOSTSERVE_")}
    env.update(TOKEN=ADMIN_TOKEN, DOCS_TEST_CURL_LOG=str(curl_log))
    if block.runner == "shell":
        script = tmp_path / "block.sh"
        script.write_text(SHELL_PRELUDE + code)
        command = ["bash", str(script)]
    else:
        script = tmp_path / "block.py"
        script.write_text(code)
        command = [sys.executable, str(script)]
    process = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S, check=False
    )
    return process, len(curl_log.read_text().splitlines())


def test_docs_have_runnable_examples() -> None:
    """Guards the extraction itself: a changed fence style must not leave nothing to run."""
    for path in DOCS:
        assert any(b.path == path and b.skip is None for b in BLOCKS), f"no runnable example found in {path}"


def test_markers_are_well_formed() -> None:
    assert MARKER_PROBLEMS == []


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
@pytest.mark.usefixtures("restores_budget")
def test_example_runs(block: Block, server: LiveServer, tmp_path: Path) -> None:
    if block.problem is not None:
        pytest.fail(f"not run: {block.problem}")
    if block.skip is not None:
        pytest.skip(f"docs-test: skip ({block.skip})")
    unsafe = UNSAFE_COMMAND.search(block.code)
    if unsafe is not None:
        pytest.fail(f"{block.id}: not run, {unsafe.group().strip()!r} installs, builds, serves or trains: mark it skip")
    process, curls_ok = run_block(block, server.base_url, tmp_path)
    report = (
        f"{block.id} ({block.runner}) exited {process.returncode}\n--- block ---\n{block.code}"
        f"--- stdout ---\n{process.stdout[-3000:]}\n--- stderr ---\n{process.stderr[-3000:]}"
    )
    assert process.returncode == 0, report + f"\n--- server log ---\n{server.logs()[-2000:]}"
    if block.runner == "shell":
        # every curl went through the wrapper (so its status was checked), none was skipped
        assert curls_ok >= len(CURL_COMMAND.findall(block.code)), report


@pytest.mark.parametrize(
    ("line", "unsafe"),
    [
        ("make serve", True),
        ("make test    # the suite", True),
        (".venv/bin/pip install -e .", True),
        ("python3 -m pip install pillow", True),
        ("sudo apt-get install dataset-fashion-mnist", True),
        ("docker run --rm boostserve", True),
        ("boostserve train --config compact-fashion-mnist --out runs/x", True),
        (". .venv/bin/activate && boostserve serve --artifacts a", True),
        ("curl -s http://127.0.0.1:8000/v1/budget | python3 -m json.tool", False),
        (".venv/bin/python - <<'PY'", False),
        ("boostserve thresholds --artifacts service/embedded_model --max-exit 2", False),
        ("# the default budget: make sure it is calibrated", False),
    ],
)
def test_unsafe_commands_are_recognised(line: str, unsafe: bool) -> None:
    assert (UNSAFE_COMMAND.search(line) is not None) is unsafe
