"""One global budget for every replica: BOOSTSERVE_BUDGET_FILE, watched and re-read atomically.

Two real `boostserve serve` processes share one file: an edit reaches both, a bad file is ignored
by both (the budget in force stays, `source.error` says why), a PUT to one is written through and
the other follows, and a restarted server starts with the file's budget. In process: the source
reported by GET/PUT, and the per-replica fallback when the file cannot be written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.reliability._server import LiveServer
from tests.service.http.conftest import ADMIN_TOKEN, ClientFactory

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def write_atomically(path: Path, content: str) -> None:
    """What an operator's tooling (or a ConfigMap update) does: a new file renamed over the old."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(content)
    os.replace(tmp, path)


def budget_of(server: LiveServer) -> dict[str, Any]:
    response = httpx.get(server.base_url + "/v1/budget", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(servers: list[LiveServer], check: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> None:
    """Until every server's GET /v1/budget passes `check` (polls; the bound only stops a hang)."""
    deadline = time.monotonic() + timeout
    while True:
        answers = [budget_of(s) for s in servers]
        if all(check(a) for a in answers):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not every server changed within {timeout}s: {answers}")
        time.sleep(0.1)


@pytest.fixture
def pair(synthetic_artifact: Path, tmp_path: Path) -> Iterator[tuple[Path, list[LiveServer]]]:
    path = tmp_path / "budget" / "budget.json"
    path.parent.mkdir()
    path.write_text('{"max_exit": 1}\n')
    settings = {"budget_file": path, "budget_file_poll_s": 0.2, "admin_token": ADMIN_TOKEN}
    servers = [
        LiveServer(synthetic_artifact, tmp_path / f"logs{i}", extra_args=["--providers", "cpu"], **settings)
        for i in range(2)
    ]
    try:
        for server in servers:
            server.start()
        yield path, servers
    finally:
        for server in servers:
            server.stop()


def test_two_servers_follow_one_budget_file(pair: tuple[Path, list[LiveServer]], synthetic_artifact: Path) -> None:
    path, servers = pair
    for answer in map(budget_of, servers):
        assert answer["budget"] == {"max_exit": 1}
        assert answer["source"]["kind"] == "file" and answer["source"]["file"] == str(path)
    write_atomically(path, '{"max_exit": 2}')
    wait_for(servers, lambda a: a["budget"] == {"max_exit": 2} and a["source"]["error"] is None)

    write_atomically(path, '{"max_exit": 2, "budget_macs": 5')  # bad JSON: logged, ignored
    wait_for(servers, lambda a: "ignored" in (a["source"]["error"] or ""))
    assert all(budget_of(s)["budget"] == {"max_exit": 2} for s in servers)
    write_atomically(path, '{"max_exit": 99}')  # valid JSON, does not fit a 3-exit model
    wait_for(servers, lambda a: "max_exit" in (a["source"]["error"] or ""))
    assert all(budget_of(s)["budget"] == {"max_exit": 2} for s in servers)

    # a PUT to one replica is written through: the file holds it, the other replica follows
    put = httpx.put(servers[0].base_url + "/v1/budget", json={"thresholds": "0,0,0"}, headers=AUTH, timeout=10)
    assert put.status_code == 200, put.text
    assert put.json()["source"]["kind"] == "file" and set(put.json()) == set(budget_of(servers[0]))
    assert json.loads(path.read_text()) == {"thresholds": [0.0, 0.0, 0.0], "early_exit": True}
    wait_for(servers, lambda a: a["budget"] == {"thresholds": [0.0, 0.0, 0.0]})

    # a restart keeps the budget: the file is loaded before the server says ready
    servers[1].stop()
    restarted = LiveServer(
        synthetic_artifact,
        path.parent.parent / "logs-restart",
        extra_args=["--providers", "cpu"],
        **servers[1].settings,
    )
    servers[1] = restarted.start()
    assert budget_of(restarted)["budget"] == {"thresholds": [0.0, 0.0, 0.0]}


def test_source_and_the_per_replica_fallback(make_client: ClientFactory, tmp_path: Path) -> None:
    with make_client(admin_token=ADMIN_TOKEN) as plain:
        assert plain.get("/v1/budget").json()["source"] == {
            "kind": "settings",
            "file": None,
            "sha256": None,
            "updated_at": None,
            "error": None,
        }
        put = plain.put("/v1/budget", json={"max_exit": 2}, headers=AUTH).json()
        assert put["source"]["kind"] == "put" and put["source"]["file"] is None
        assert plain.get("/v1/budget").json()["source"]["kind"] == "put"

    folder = tmp_path / "mounted"
    folder.mkdir()
    path = folder / "budget.json"
    path.write_text("not json")  # bad at start: ignored, the settings' budget serves
    with make_client(admin_token=ADMIN_TOKEN, budget_file=path, budget_file_poll_s=60) as c:
        answer = c.get("/v1/budget").json()
        assert answer["budget"] == {"max_accuracy_drop": 0.01, "policy": "optimal"}
        assert answer["source"]["kind"] == "settings" and "ignored" in answer["source"]["error"]
        shutil.rmtree(folder)  # the file can no longer be written (as with a read-only ConfigMap)
        put = c.put("/v1/budget", json={"max_exit": 1}, headers=AUTH)
        assert put.status_code == 200, put.text
        assert put.json()["budget"] == {"max_exit": 1}
        assert put.json()["source"]["kind"] == "put" and "this replica only" in put.json()["source"]["error"]
