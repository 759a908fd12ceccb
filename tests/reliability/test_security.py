"""Security: admin token, no client-named file reads, non-root container, safe checkpoints, no image
data in logs.
"""

from __future__ import annotations

import ast
import base64
import builtins
import hmac
import io
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability import _images as img
from tests.reliability._results import record
from tests.reliability.conftest import make_settings

REPO = Path(__file__).resolve().parents[2]
TOKEN = "rel-admin-token-5b1f0c9e"


@pytest.fixture
def admin_client(rel_artifact: Path) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from service.http.app import create_app

    with TestClient(create_app(make_settings(rel_artifact, admin_token=TOKEN)), raise_server_exceptions=False) as c:
        yield c


# --------------------------------------------------------------------------------------------------
# admin token on PUT /v1/budget
# --------------------------------------------------------------------------------------------------

BAD_AUTH = [
    ("missing", None),
    ("empty", ""),
    ("bearer-empty", "Bearer "),
    ("wrong", "Bearer not-the-token"),
    ("prefix", f"Bearer {TOKEN[:-1]}"),
    ("longer", f"Bearer {TOKEN}x"),
    ("case-changed", f"Bearer {TOKEN.upper()}"),
    ("basic-scheme", "Basic " + base64.b64encode(f"admin:{TOKEN}".encode()).decode()),
    ("token-without-scheme", TOKEN),
    ("non-ascii-utf8-bytes", "Bearer tökén".encode()),
]


@pytest.mark.parametrize("label,auth", BAD_AUTH, ids=[b[0] for b in BAD_AUTH])
def test_budget_change_needs_the_token(admin_client: Any, label: str, auth: str | bytes | None) -> None:
    before = admin_client.get("/v1/budget").json()
    headers = {} if auth is None else {"Authorization": auth}
    response = admin_client.put("/v1/budget", json={"max_exit": 1}, headers=headers)
    assert response.status_code == 401, (label, response.status_code, response.text)
    assert response.json()["error"]["type"] == "unauthorized"
    assert response.headers.get("www-authenticate", "").lower().startswith("bearer")
    assert TOKEN not in response.text
    assert admin_client.get("/v1/budget").json() == before, "the budget changed without the token"


def test_budget_change_with_token_works(admin_client: Any) -> None:
    response = admin_client.put("/v1/budget", json={"max_exit": 1}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    assert admin_client.get("/v1/budget").json()["budget"] == {"max_exit": 1}


def test_budget_change_disabled_without_configured_token(rel_artifact: Path) -> None:
    from fastapi.testclient import TestClient

    from service.http.app import create_app

    with TestClient(create_app(make_settings(rel_artifact)), raise_server_exceptions=False) as client:
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer anything"}):
            response = client.put("/v1/budget", json={"max_exit": 1}, headers=headers)
            assert response.status_code == 403, response.text
            assert response.json()["error"]["type"] == "forbidden"


def test_token_compared_with_hmac_compare_digest(admin_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runtime proof: the comparison goes through hmac.compare_digest, for right and wrong tokens."""
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    import service.http.v1.routes as api_v1

    if hasattr(api_v1, "compare_digest"):  # `from hmac import compare_digest` style
        monkeypatch.setattr(api_v1, "compare_digest", spy)
    wrong = admin_client.put("/v1/budget", json={"max_exit": 2}, headers={"Authorization": "Bearer nope"})
    right = admin_client.put("/v1/budget", json={"max_exit": 2}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert wrong.status_code == 401 and right.status_code == 200
    secrets = {TOKEN, TOKEN.encode()}
    assert len(calls) >= 2, "hmac.compare_digest was not used for the bearer token"
    assert all(a in secrets or b in secrets for a, b in calls), calls


def test_no_plain_equality_on_tokens_in_service() -> None:
    """Static check: no ==/!= comparison involving a token or secret in service/ (timing oracle)."""
    offenders = []
    for path in sorted((REPO / "service").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
                text = ast.unparse(node).lower()
                if re.search(r"token|secret|password|get_secret_value", text) and "none" not in text:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, offenders


# --------------------------------------------------------------------------------------------------
# no endpoint reads a file named by the client
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text("TOP-SECRET-FILE-CONTENT-4e8a\n")
    return path


def _path_payloads(secret: Path) -> list[tuple[str, dict[str, Any]]]:
    paths = [
        "/etc/passwd",
        "file:///etc/passwd",
        "../../../../../../etc/passwd",
        str(secret),
        f"file://{secret}",
    ]
    out: list[tuple[str, dict[str, Any]]] = []
    for p in paths:
        out.append((f"v1-json-image:{p}", {"method": "POST", "url": "/v1/classify", "json": {"image": p}}))
        out.append((f"v1-json-images:{p}", {"method": "POST", "url": "/v1/classify", "json": {"images": [p]}}))
        out.append(
            (
                f"v1-json-url-field:{p}",
                {"method": "POST", "url": "/v1/classify", "json": {"image_url": p, "url": p}},
            )
        )
        out.append(
            (
                f"v1-raw-body:{p}",
                {
                    "method": "POST",
                    "url": "/v1/classify",
                    "content": p.encode(),
                    "headers": {"Content-Type": "image/png"},
                },
            )
        )
        out.append(
            (
                f"v1-multipart-filename:{p}",
                {
                    "method": "POST",
                    "url": "/v1/classify",
                    "files": [("file", (p, b"not an image", "image/png"))],
                },
            )
        )
        out.append(
            (
                f"v1-query:{p}",
                {
                    "method": "POST",
                    "url": "/v1/classify",
                    "params": {"image": p, "path": p, "file": p},
                    "content": b"",
                    "headers": {"Content-Type": "image/png"},
                },
            )
        )
        out.append(
            (
                f"v2-bytes:{p}",
                {
                    "method": "POST",
                    "url": "/v2/models/{model}/infer",
                    "json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [p]}]},
                },
            )
        )
        out.append(
            (
                f"v2-param:{p}",
                {
                    "method": "POST",
                    "url": "/v2/models/{model}/infer",
                    "json": {
                        "parameters": {"image_path": p, "thresholds": p},
                        "inputs": [{"name": "image", "datatype": "UINT8", "shape": [1], "data": [p]}],
                    },
                },
            )
        )
    for traversal in (
        "/v1/../../etc/passwd",
        "/static/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/docs/../../etc/passwd",
    ):
        out.append((f"get:{traversal}", {"method": "GET", "url": traversal}))
    return out


def test_no_endpoint_reads_client_named_files(
    admin_client: Any, secret_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []
    real_open = builtins.open
    real_io_open = io.open
    real_os_open = os.open

    def note(path: Any) -> None:
        text = os.fsdecode(path) if isinstance(path, str | bytes | os.PathLike) else str(path)
        if "passwd" in text or "secret.txt" in text:
            opened.append(text)

    def spy_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        note(file)
        return real_open(file, *args, **kwargs)

    def spy_io_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        note(file)
        return real_io_open(file, *args, **kwargs)

    def spy_os_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        note(path)
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_io_open)
    monkeypatch.setattr(os, "open", spy_os_open)

    model = admin_client.app.state.service.manifest.name
    leaks: list[str] = []
    statuses: dict[str, int] = {}
    for label, kwargs in _path_payloads(secret_file):
        kwargs = dict(kwargs)
        kwargs["url"] = kwargs["url"].replace("{model}", model)
        response = admin_client.request(**kwargs)
        statuses[label] = response.status_code
        if not 400 <= response.status_code < 500:
            leaks.append(f"{label}: status {response.status_code}")
        if "root:x:0:0" in response.text or "TOP-SECRET-FILE-CONTENT" in response.text:
            leaks.append(f"{label}: file content in the response")
    monkeypatch.undo()
    record(
        "security_file_paths",
        {"requests": len(statuses), "statuses": statuses, "opened": opened, "leaks": leaks},
    )
    assert not opened, f"the service opened client-named files: {opened}"
    assert not leaks, leaks


# --------------------------------------------------------------------------------------------------
# container runs as non-root
# --------------------------------------------------------------------------------------------------


def _dockerfile_stages(text: str) -> list[dict[str, Any]]:
    """[{name, user (resolved), lines}] per FROM stage; global ARG defaults resolved."""
    lines: list[str] = []
    buf = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        lines.append(buf + stripped)
        buf = ""
    args: dict[str, str] = {}
    stages: list[dict[str, Any]] = []
    for line in lines:
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "ARG":
            name, _, default = rest.strip().partition("=")
            if default:
                args[name.strip()] = default.strip().strip('"')
            elif stages and name.strip() in args:
                pass  # re-declared inside a stage: keeps the global default
        elif word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append({"name": name, "user": None, "lines": []})
        elif stages:
            stages[-1]["lines"].append(line)
            if word == "USER":
                value = rest.strip()
                for key, val in args.items():
                    value = value.replace("${" + key + "}", val).replace("$" + key, val)
                stages[-1]["user"] = value
    return stages


def test_container_runs_as_non_root() -> None:
    dockerfiles = [
        p for p in (REPO / "Dockerfile", REPO / "Containerfile", REPO / "deploy" / "Dockerfile") if p.is_file()
    ]
    assert dockerfiles, "no Dockerfile in the repository"
    for path in dockerfiles:
        stages = _dockerfile_stages(path.read_text())
        assert stages, path
        final = stages[-1]
        runtimes = [s for s in stages if s["name"] and s["name"].startswith("runtime")] + [final]
        for stage in runtimes:
            user = stage["user"]
            assert user, f"{path.name}: stage {stage['name'] or 'final'} has no USER (runs as root)"
            name = user.split(":")[0]
            assert name not in ("root", "0"), f"{path.name}: stage {stage['name']} runs as {user}"
            assert "$" not in user, f"{path.name}: USER {user} not resolved to a literal"


# --------------------------------------------------------------------------------------------------
# checkpoints: weights_only=True, malicious pickles refused
# --------------------------------------------------------------------------------------------------


def test_checkpoint_loader_uses_weights_only_static() -> None:
    path = REPO / "models" / "checkpoint.py"
    tree = ast.parse(path.read_text())
    loads = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "load"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "torch"
    ]
    assert loads, "models/checkpoint.py does not call torch.load"
    for call in loads:
        kw = {k.arg: k.value for k in call.keywords}
        assert "weights_only" in kw, f"line {call.lineno}: torch.load without weights_only"
        assert isinstance(kw["weights_only"], ast.Constant) and kw["weights_only"].value is True, call.lineno
    # Every torch.load in the repository (not only checkpoint.py) passes weights_only=True.
    offenders = []
    for pkg in ("models", "export", "service", "boostserve", "bench", "scripts"):
        for py in sorted((REPO / pkg).rglob("*.py")) if (REPO / pkg).is_dir() else []:
            for node in ast.walk(ast.parse(py.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load"
                    and ast.unparse(node.func.value) == "torch"
                ):
                    kw = {k.arg: k.value for k in node.keywords}
                    value = kw.get("weights_only")
                    if not (isinstance(value, ast.Constant) and value.value is True):
                        offenders.append(f"{py.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)[:120]}")
    assert not offenders, offenders


class _Evil:
    """Unpickling this creates a marker file: proof of arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.open, (str(self.marker), "w"))


def test_malicious_checkpoint_is_refused(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from models.checkpoint import FORMAT, load_checkpoint

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "config": {}, "state_dict": {}, "meta": {"x": _Evil(marker)}}, path)
    with pytest.raises(Exception) as info:
        load_checkpoint(path)
    assert not marker.exists(), "loading the checkpoint executed pickled code"
    assert "weights" in str(info.value).lower() or "unpickl" in str(info.value).lower(), info.value


def test_cifar_loader_refuses_code_in_pickles(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import pickle

    from models import data

    marker = tmp_path / "pwned"
    batch = tmp_path / "test_batch"
    batch.write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": [0]}))
    with pytest.raises(data.DataError, match="not a plain CIFAR python pickle"):
        data._unpickle(batch)
    assert not marker.exists(), "unpickling the CIFAR batch executed code"


# --------------------------------------------------------------------------------------------------
# logs carry no image data
# --------------------------------------------------------------------------------------------------


def _canary_forms() -> list[bytes]:
    """The canary itself and every way it could be written in a log (base64 at 3 alignments, hex)."""
    forms = [img.CANARY, img.CANARY.hex().encode()]
    for shift in range(3):
        encoded = base64.b64encode(b"\x00" * shift + img.CANARY)
        forms.append(encoded[4:-4])  # the middle, alignment-independent part
    return forms


def _requests_with_canary(model: str) -> list[dict[str, Any]]:
    png = img.canary_png()
    enc = base64.b64encode(png).decode()
    garbage = b"\x00garbage" + img.CANARY + b"garbage"
    return [
        {"method": "POST", "url": "/v1/classify", "content": png, "headers": {"Content-Type": "image/png"}},
        {"method": "POST", "url": "/v1/classify", "files": [("file", ("canary.png", png, "image/png"))]},
        {"method": "POST", "url": "/v1/classify", "json": {"image": enc, "top_k": 2}},
        {"method": "POST", "url": "/v1/classify", "json": {"images": [enc, enc]}},
        # invalid ones: errors must not echo the input either
        {
            "method": "POST",
            "url": "/v1/classify",
            "content": garbage,
            "headers": {"Content-Type": "image/png"},
        },
        {"method": "POST", "url": "/v1/classify", "json": {"image": img.CANARY.decode() + "!!"}},
        {"method": "POST", "url": "/v1/classify", "json": {"image": enc, "unknown": img.CANARY.decode()}},
        {
            "method": "POST",
            "url": "/v1/classify",
            "content": garbage,
            "headers": {"Content-Type": "text/plain"},
        },
        {
            "method": "POST",
            "url": f"/v1/classify?thresholds={img.CANARY.decode()}",
            "content": png,
            "headers": {"Content-Type": "image/png"},
        },
        {
            "method": "POST",
            "url": f"/v2/models/{model}/infer",
            "json": {
                "id": "x",
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [enc]}],
            },
        },
        {
            "method": "POST",
            "url": f"/v2/models/{model}/infer",
            "json": {"inputs": [{"name": img.CANARY.decode(), "datatype": "UINT8", "shape": [1], "data": [1]}]},
        },
    ]


def test_logs_carry_no_image_data_in_process(rel_artifact: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fastapi.testclient import TestClient

    from service.http.app import create_app

    caplog.set_level(logging.DEBUG)
    app = create_app(make_settings(rel_artifact, log_level="debug"))
    with TestClient(app, raise_server_exceptions=False) as client:
        model = app.state.service.manifest.name
        statuses = [client.request(**kw).status_code for kw in _requests_with_canary(model)]
    assert statuses[0] == statuses[1] == statuses[2] == statuses[3] == 200, statuses
    # Server-side loggers only: the test's own HTTP client (httpx) logs the URLs it requests.
    server_records = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    text = "\n".join(
        f"{r.name} {r.getMessage()} {r.__dict__}" + (str(r.exc_info) if r.exc_info else "") for r in server_records
    ).encode("utf-8", "replace")
    assert text.strip(), "nothing was logged at DEBUG: the capture is not working"
    found = [f for f in _canary_forms() if f in text]
    assert not found, f"image data in the logs: {found}"


def test_logs_carry_no_image_data_live_server(rel_artifact: Path, live_server: Any) -> None:
    """The real process at log level debug, JSON and text formats: stdout+stderr have no image bytes."""
    import httpx

    seen: dict[str, list[int]] = {}
    for fmt in ("json", "text"):
        server = live_server(rel_artifact, log_level="debug", log_format=fmt)
        with httpx.Client(base_url=server.base_url, timeout=30.0) as client:
            client.get("/v2/models/none")  # routing errors are logged too
            probe = client.post("/v1/classify", content=img.valid_png(), headers={"Content-Type": "image/png"})
            model = probe.json()["model_name"]
            seen[fmt] = [client.request(**kw).status_code for kw in _requests_with_canary(model)]
        server.stop()
        logs = server.logs().encode("utf-8", "replace")
        assert b"/v1/classify" in logs, "no access lines: is the log level applied?"
        found = [f for f in _canary_forms() if f in logs]
        assert not found, f"{fmt} logs contain image data: {found}"
    record("security_logs", {"statuses": seen, "canary_forms_checked": len(_canary_forms())})
    assert all(s[:4] == [200, 200, 200, 200] for s in seen.values()), seen
