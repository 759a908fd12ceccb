"""Schema-driven fuzzing of every v1 and v2 operation (schemathesis + Hypothesis), in process.

What is asserted, for every generated request (valid-looking *and* schema-violating ones):
  - no 5xx at all;
  - every error (4xx) carries our envelope {"error": {"type": <ERROR_TYPES>, "message": str}},
    429/503 carry Retry-After;
  - afterwards the server is still ready and classifies a valid image (200).
Schemathesis' own conformance checks (status code / content type / response schema documented
in the OpenAPI document) run too, but are *recorded*, not asserted: they document drift between
the schema and the behaviour (build/reliability/fuzz_*.json), they are not reliability failures.

How the cases are steered so the interesting code runs (not just the 404 for a random model name):
  - v2 `{name}` / `{version}` path parameters are set to the served model in ~2/3 of the cases;
  - raw-image and multipart bodies get a valid PNG in ~1/3 of the positive cases;
  - PUT /v1/budget gets the right bearer token in ~1/2 of the cases, a wrong one otherwise.

Default suite: ~300 requests (< 60 s). Long run (slow marker): >= 2,000 requests.
    .venv/bin/pytest -m slow tests/reliability/test_fuzz.py
"""

from __future__ import annotations

import base64
import contextlib
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from tests.reliability._images import valid_png  # noqa: E402
from tests.reliability._results import record  # noqa: E402
from tests.reliability.conftest import make_settings  # noqa: E402

ADMIN_TOKEN = "fuzz-admin-token-0123456789"
CONFORMANCE_CHECK_NAMES = (
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)


def _conformance_checks() -> list[Any]:
    from schemathesis.specs.openapi import checks as oas_checks

    return [getattr(oas_checks, name) for name in CONFORMANCE_CHECK_NAMES if hasattr(oas_checks, name)]


def envelope_problem(status: int, headers: Any, body: bytes, path: str) -> str | None:
    """None when an error response has the exact error body of `path`'s route family; else what is wrong."""
    import json

    from tests.error_bodies import error_problem

    if status < 400:
        return None
    try:
        payload = json.loads(body)
    except ValueError:
        return f"{status}: body is not JSON: {body[:120]!r}"
    problem = error_problem(path, payload)
    if problem is not None:
        return f"{status}: {problem}"
    if status in (429, 503) and "retry-after" not in {k.lower() for k in headers}:
        return f"{status}: no Retry-After header"
    return None


def run_fuzz(artifacts: Path, *, examples_per_mode: int, label: str, time_limit_s: float) -> dict[str, Any]:
    """Fuzz every operation in positive and negative mode; returns the tallies (also recorded)."""
    from schemathesis import GenerationMode
    from schemathesis.core.failures import FailureGroup
    from schemathesis.python import asgi

    from service.http.app import create_app

    app = create_app(make_settings(artifacts, admin_token=ADMIN_TOKEN, max_images_per_request=8))
    statuses: Counter[str] = Counter()
    per_operation: dict[str, Counter[str]] = {}
    server_errors: list[str] = []
    envelope_failures: list[str] = []
    conformance: Counter[str] = Counter()
    conformance_examples: dict[str, str] = {}
    png = valid_png()
    png_b64 = base64.b64encode(png).decode()
    side = 28
    valid_v2_input = {
        "name": "image",
        "datatype": "UINT8",
        "shape": [1, side, side, 1],
        "data": [7] * side * side,
    }
    checks = _conformance_checks()
    started = time.monotonic()
    total = 0

    # Schemathesis runs the app's lifespan on its own event loop (shared portal thread) and keeps it
    # for the process; every request here, probes included, must go through that same loop, so no
    # TestClient (a second lifespan would build a second scheduler on another loop).
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        client = asgi.get_client(app)
        served = app.state.service.manifest
        operations = [result.ok() for result in schema.get_all_operations()]
        assert operations, "the OpenAPI document lists no operations"
        labels = sorted(op.label for op in operations)
        assert any(lbl.startswith("POST /v1/classify") for lbl in labels), labels
        assert any("/v2/models/{name}/infer" in lbl for lbl in labels), labels

        def make_runner(op: Any, mode: Any, tally: Counter[str]) -> Any:
            @given(case=op.as_strategy(generation_mode=mode), steer=st.integers(0, 5))
            @settings(
                max_examples=examples_per_mode,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
                derandomize=True,
            )
            def fuzz_one(case: Any, steer: int) -> None:
                nonlocal total
                if time.monotonic() - started > time_limit_s:
                    return
                path_params = case.path_parameters or {}
                if "name" in path_params and steer < 4:
                    path_params["name"] = served.name
                if "version" in path_params and steer < 4:
                    path_params["version"] = served.version
                headers = dict(case.headers or {})
                if op.label == "PUT /v1/budget":
                    headers["Authorization"] = f"Bearer {ADMIN_TOKEN if steer % 2 == 0 else 'wrong-token'}"
                media = (case.media_type or "").lower()
                if mode == GenerationMode.POSITIVE and steer < 2:
                    if media.startswith("image/") or media == "application/octet-stream":
                        case.body = png
                    elif media == "multipart/form-data" and isinstance(case.body, dict):
                        case.body = {**case.body, "file": [png]}
                    elif op.label.startswith("POST /v1/classify") and isinstance(case.body, dict):
                        case.body = {k: v for k, v in case.body.items() if k not in ("image", "images")}
                        case.body["image"] = png_b64
                    elif op.label.endswith("/infer") and isinstance(case.body, dict):
                        # steer 0: a plain valid request; steer 1: the generated parameters/id kept
                        kept = {k: v for k, v in case.body.items() if k in ("id", "parameters")}
                        case.body = {**(kept if steer == 1 else {}), "inputs": [valid_v2_input]}
                response = case.call(headers=headers)
                total += 1
                key = f"{response.status_code}"
                statuses[key] += 1
                tally[key] += 1
                where = f"{op.label} [{mode.value}] -> {response.status_code}"
                if response.status_code >= 500:  # a client's own deadline included: exit 1 answers it
                    server_errors.append(f"{where}: {response.content[:300]!r} (case: {case.as_curl_command()[:600]})")
                problem = envelope_problem(response.status_code, response.headers, response.content, case.path)
                if problem is not None:
                    envelope_failures.append(f"{where}: {problem}")
                try:
                    case.validate_response(response, checks=checks)
                except (Exception, FailureGroup) as exc:  # FailureGroup is a BaseExceptionGroup
                    subs = getattr(exc, "exceptions", None) or [exc]
                    for sub in subs:
                        name = f"{op.label}: {type(sub).__name__}"
                        conformance[name] += 1
                        conformance_examples.setdefault(name, str(sub)[:400])

            return fuzz_one

        for op in operations:
            tally = per_operation.setdefault(op.label, Counter())
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                if time.monotonic() - started > time_limit_s:
                    break
                # Unsatisfiable: e.g. negative mode of an operation without parameters.
                with contextlib.suppress(Unsatisfiable):
                    make_runner(op, mode, tally)()

        # The server must still be healthy afterwards.
        ready = client.get("/readyz")
        after = client.post("/v1/classify", data=png, headers={"Content-Type": "image/png"})
        budget_after = client.get("/v1/budget").json()
    finally:
        asgi.shutdown_lifespans()

    elapsed = time.monotonic() - started
    result = {
        "label": label,
        "requests": total,
        "seconds": round(elapsed, 1),
        "operations": len(operations),
        "statuses": dict(sorted(statuses.items())),
        "per_operation": {k: dict(sorted(v.items())) for k, v in sorted(per_operation.items())},
        "server_errors_5xx": len(server_errors),
        "server_error_examples": server_errors[:20],
        "envelope_failures": len(envelope_failures),
        "envelope_failure_examples": envelope_failures[:20],
        "conformance_findings": dict(conformance),
        "conformance_examples": conformance_examples,
        "ready_after": ready.status_code,
        "valid_request_after": after.status_code,
        "valid_request_after_body": after.text[:500] if after.status_code != 200 else None,
        "global_budget_after": budget_after,
    }
    record(label, result)
    return result


def _assert_clean(result: dict[str, Any], minimum: int) -> None:
    assert result["requests"] >= minimum, f"only {result['requests']} requests generated: {result['statuses']}"
    assert result["server_errors_5xx"] == 0, "5xx answers:\n" + "\n".join(result["server_error_examples"])
    assert result["envelope_failures"] == 0, "errors outside the envelope:\n" + "\n".join(
        result["envelope_failure_examples"]
    )
    assert result["ready_after"] == 200
    assert result["valid_request_after"] == 200


def test_fuzz_v1_v2_quick(rel_artifact: Path) -> None:
    """Default suite: a few hundred generated requests over every operation, < 60 s."""
    result = run_fuzz(rel_artifact, examples_per_mode=25, label="fuzz_quick", time_limit_s=50)
    _assert_clean(result, minimum=200)


@pytest.mark.slow
def test_fuzz_v1_v2_long(rel_artifact: Path) -> None:
    """Long run: >= 2,000 generated requests (~5,000; a few minutes on the 2-core dev VM)."""
    result = run_fuzz(rel_artifact, examples_per_mode=400, label="fuzz_long", time_limit_s=1500)
    _assert_clean(result, minimum=2000)
