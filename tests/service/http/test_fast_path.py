"""The fast path (raw and multipart bodies) answers what the FastAPI route answers, and takes only what it should."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request

import service.http.v1.fast_path as fast_path
from service.core.errors import ValidationFailedError
from service.http.app import create_app
from service.http.v1 import request as wire
from tests.service.http import images
from tests.service.http.conftest import ClientFactory, settings_for

PNG = {"content-type": "image/png"}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", {}),
        (b"max_exit=2", {"max_exit": "2"}),
        (b"thresholds=0.9%2C0.8%2C0&policy=optimal", {"thresholds": "0.9,0.8,0", "policy": "optimal"}),
        (b"thresholds=", {"thresholds": ""}),
        (b"a+b=c%20d", {"a b": "c d"}),
    ],
)
def test_the_query_becomes_knobs_as_text(query: bytes, expected: dict[str, str]) -> None:
    assert wire.query_options(query) == expected


def test_a_query_parameter_given_twice_is_refused() -> None:
    with pytest.raises(ValidationFailedError, match="'max_exit' is given more than once"):
        wire.query_options(b"max_exit=1&max_exit=2")


CASES: list[tuple[str, dict[str, Any]]] = [
    ("", {"content": images.png(seed=1)}),
    ("?max_exit=1", {"content": images.png(seed=2)}),
    ("?thresholds=0.9,0.5,0&top_k=2", {"content": images.png(seed=3)}),
    ("?early_exit=false", {"content": images.png(seed=4)}),
    ("?max_accuracy_drop=0.05", {"content": images.png(seed=5)}),
    ("?budget_macs=1000", {"content": images.png(seed=6)}),
    ("?deadline_ms=5000&policy=optimal&budget_macs=2000", {"content": images.png(seed=7)}),
    ("?thresholds=0.9,abc,0", {"content": images.png()}),  # 422 from the shared parser
    ("?max_exit=9", {"content": images.png()}),  # 422: more exits than the model has
    ("?budget_macs=5&max_exit=1", {"content": images.png()}),  # 422: two budgets
    ("?policy=nope&budget_macs=1000", {"content": images.png()}),  # 422: unknown policy
    ("", {"content": b"not an image"}),  # 400
    ("", {"content": b""}),  # 400, empty body
    ("?max_exit=0", {"content": images.png()}),  # 422: exits are 1-based
    ("?max_exit=1.0", {"content": images.png()}),  # 422: a whole number
    ("?top_k=1001", {"content": images.png()}),  # 422: top_k <= 1000
    ("?budget_macs=nan", {"content": images.png()}),  # 422: finite
    ("?deadline_ms=600001", {"content": images.png()}),  # 422: at most ten minutes
    ("?early_exit=yes", {"content": images.png()}),  # 422: true/false/1/0 only
    ("?max_acuracy_drop=0.001", {"content": images.png()}),  # 422: misspelt knob
    ("?foo=bar", {"content": images.png()}),  # 422: unknown parameter
    ("?early_exit=false&max_exit=1", {"content": images.png()}),  # 422: the budget would be ignored
    ("?policy=reference&max_exit=1", {"content": images.png()}),  # 422: max_exit takes no policy
    ("?max_exit=1&max_exit=2", {"content": images.png()}),  # 422: given twice
]


def _normalised(response: Any) -> tuple[int, str, Any]:
    body = response.json()
    if response.status_code == 200:
        body.pop("latency_ms")
    return response.status_code, response.headers["content-type"], body


#: The multipart cases' image limit (a fifth part is one too many).
MAX_IMAGES = 4


@pytest.fixture(scope="module")
def both_paths(synthetic_artifact: Path) -> Iterator[dict[bool, TestClient]]:
    """The same settings twice: the fast path on (True) and off (False: everything through FastAPI)."""
    with contextlib.ExitStack() as stack:
        yield {
            enabled: stack.enter_context(
                TestClient(
                    create_app(settings_for(synthetic_artifact, fast_path=enabled, max_images_per_request=MAX_IMAGES)),
                    raise_server_exceptions=False,
                )
            )
            for enabled in (True, False)
        }


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """One entry per request the fast path handled."""
    paths: list[str] = []
    real = fast_path.ClassifyFastPath.__call__

    async def spy(self: Any, scope: Any, receive: Any, send: Any) -> None:
        paths.append(scope["path"])
        await real(self, scope, receive, send)

    monkeypatch.setattr(fast_path.ClassifyFastPath, "__call__", spy)
    return paths


def _both_ways(clients: dict[bool, TestClient], url: str, **kwargs: Any) -> list[tuple[int, str, Any]]:
    answers = [_normalised(clients[enabled].post(url, **kwargs)) for enabled in (True, False)]
    assert answers[0] == answers[1], json.dumps(answers, indent=1)[:2000]
    return answers


@pytest.mark.parametrize(("query", "kwargs"), CASES, ids=[f"{q or 'none'}-{i}" for i, (q, _) in enumerate(CASES)])
def test_fast_path_answers_like_the_fastapi_route(
    both_paths: dict[bool, TestClient], served: list[str], query: str, kwargs: dict[str, Any]
) -> None:
    _both_ways(both_paths, f"/v1/classify{query}", headers=PNG, **kwargs)
    assert served == ["/v1/classify"]  # every raw-image request: the disabled app never takes it


BOUNDARY = b"b0uNd-ary.42"


def part(
    data: bytes,
    *,
    name: bytes = b"file",
    filename: bytes | None = b"a.png",
    content_type: bytes | None = b"image/png",
    head: bytes | None = None,
) -> bytes:
    """One part, headers as curl writes them (Content-Disposition, then Content-Type), or `head` verbatim."""
    if head is None:
        disposition = b'Content-Disposition: form-data; name="' + name + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
        head = disposition + (b"\r\nContent-Type: " + content_type if content_type is not None else b"")
    return head + b"\r\n\r\n" + data


def form(*parts: bytes, boundary: bytes = BOUNDARY, end: bytes = b"--\r\n", preamble: bytes = b"") -> bytes:
    """A multipart body: the parts between boundary lines, closed by the last boundary + `end`."""
    body = preamble + b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts)
    return body + b"--" + boundary + end


FORM = b"multipart/form-data; boundary=" + BOUNDARY
PNGS = [images.png(seed=10 + i) for i in range(MAX_IMAGES + 1)]

#: (id, query, Content-Type, body, plain: whether the fast path's own parser reads it).
MULTIPART_CASES: list[tuple[str, str, bytes, bytes, bool]] = [
    ("one", "", FORM, form(part(PNGS[0])), True),
    ("several", "", FORM, form(*(part(p) for p in PNGS[:3])), True),
    ("at-the-limit", "?top_k=2&max_exit=1", FORM, form(*(part(p) for p in PNGS[:MAX_IMAGES])), True),
    ("early-exit-off", "?early_exit=false", FORM, form(part(PNGS[1]), part(PNGS[2])), True),
    ("budget", "?max_accuracy_drop=0.05", FORM, form(part(PNGS[3])), True),
    ("no-part-content-type", "", FORM, form(part(PNGS[0], content_type=None)), True),
    ("empty-filename", "", FORM, form(part(PNGS[0], filename=b"")), True),
    ("utf8-filename", "", FORM, form(part(PNGS[0], filename="\u00e9t\u00e9.png".encode())), True),
    ("quoted-boundary", "", b'multipart/form-data; boundary="' + BOUNDARY + b'"', form(part(PNGS[0])), True),
    ("no-space-before-boundary", "", b"multipart/form-data;boundary=" + BOUNDARY, form(part(PNGS[0])), True),
    ("media-type-case", "", b"Multipart/Form-Data; boundary=" + BOUNDARY, form(part(PNGS[0])), True),
    (
        "header-name-case",
        "",
        FORM,
        form(
            part(PNGS[0], head=b'CONTENT-DISPOSITION: form-data; name="file"; filename="a"\r\ncontent-type: image/png')
        ),
        True,
    ),
    ("no-final-crlf", "", FORM, form(part(PNGS[0]), end=b"--"), True),
    ("delimiter-prefix-in-data", "", FORM, form(part(PNGS[0] + b"\r\n--" + BOUNDARY[:-1])), True),
    ("too-many-files", "", FORM, form(*(part(p) for p in PNGS)), False),  # 413 from Starlette's count
    ("bad-image-second", "", FORM, form(part(PNGS[0]), part(b"junk")), True),  # 400 naming image 1
    ("empty-part", "", FORM, form(part(b"")), True),  # 400 empty image
    ("zero-parts", "", FORM, form(), False),
    ("unknown-field", "", FORM, form(part(PNGS[0], name=b"notfile")), False),  # 422 naming it
    ("field-name-case", "", FORM, form(part(PNGS[0], name=b"FILE")), False),  # 422: names are exact
    ("file-without-filename", "", FORM, form(part(b"text", filename=None, content_type=None)), False),  # 422
    ("file-and-a-field", "", FORM, form(part(PNGS[0]), part(b"x", name=b"note", filename=None)), False),
    ("escaped-quote-in-filename", "", FORM, form(part(PNGS[0], filename=b'a\\"b.png')), False),
    ("extra-disposition-param", "", FORM, form(part(PNGS[0], filename=b'a"; size="3')), False),
    (
        "content-type-first",
        "",
        FORM,
        form(
            part(PNGS[0], head=b'Content-Type: image/png\r\nContent-Disposition: form-data; name="file"; filename="a"')
        ),
        False,
    ),
    (
        "attachment",
        "",
        FORM,
        form(part(PNGS[0], head=b'Content-Disposition: attachment; name="file"; filename="a"')),
        False,
    ),
    ("charset-param", "", FORM + b"; charset=latin-1", form(part(PNGS[0])), False),
    ("missing-boundary", "", b"multipart/form-data", form(part(PNGS[0])), False),  # malformed
    ("other-boundary", "", b"multipart/form-data; boundary=other", form(part(PNGS[0])), False),  # malformed
    ("unclosed", "", FORM, b"--" + BOUNDARY + b"\r\n" + part(PNGS[0]), False),  # malformed
    ("trailing-bytes", "", FORM, form(part(PNGS[0]), end=b"--\r\nepilogue"), False),
    ("preamble", "", FORM, form(part(PNGS[0]), preamble=b"preamble\r\n"), False),
    ("junk-after-delimiter", "", FORM, form(part(PNGS[0] + b"\r\n--" + BOUNDARY + b"x")), False),
    ("lf-line-ends", "", FORM, form(part(PNGS[0])).replace(b"\r\n", b"\n"), False),  # malformed
    ("two-queries", "?max_exit=1&max_exit=2", FORM, form(part(PNGS[0])), True),  # 422 before the body
    ("unknown-knob", "?foo=bar", FORM, form(part(PNGS[0])), True),  # 422 from the core
]
#: The status of each case that is not answered 200 (the same both ways, checked by the test).
REFUSED = {"too-many-files": 413, "bad-image-second": 400, "empty-part": 400}
REFUSED |= dict.fromkeys(
    ["zero-parts", "unknown-field", "field-name-case", "file-without-filename", "file-and-a-field"], 422
)
REFUSED |= dict.fromkeys(["missing-boundary", "other-boundary", "unclosed", "preamble", "lf-line-ends"], 422)
REFUSED |= dict.fromkeys(["two-queries", "unknown-knob"], 422)


@pytest.mark.parametrize(
    ("case", "query", "content_type", "body", "plain"), MULTIPART_CASES, ids=[c[0] for c in MULTIPART_CASES]
)
def test_multipart_on_the_fast_path_answers_like_the_fastapi_route(
    both_paths: dict[bool, TestClient],
    served: list[str],
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    query: str,
    content_type: bytes,
    body: bytes,
    plain: bool,
) -> None:
    """Exact status and body both ways, for plain forms (the fast path's parser) and every other
    form (Starlette's, on both paths), malformed ones included."""
    read: list[bool] = []  # per form the fast path parsed: did its own parser take it?
    real = wire.plain_form_files

    def spy(*args: Any) -> list[bytes] | None:
        blobs = real(*args)
        read.append(blobs is not None)
        return blobs

    monkeypatch.setattr(wire, "plain_form_files", spy)
    answers = _both_ways(both_paths, f"/v1/classify{query}", content=body, headers={"content-type": content_type})
    assert answers[0][0] == REFUSED.get(case, 200)
    assert served == ["/v1/classify"]
    assert read == ([] if case == "two-queries" else [plain])  # a bad query is refused before the body is read


def test_forms_that_clients_send_are_plain(both_paths: dict[bool, TestClient]) -> None:
    """httpx's encoder (requests' is the same layout) and curl's `-F` bytes take the fast parser."""
    request = both_paths[True].build_request(
        "POST", "/v1/classify", files=[("file", ("a.png", PNGS[0], "image/png")), ("file", ("b.png", PNGS[1]))]
    )
    body = request.read()
    assert wire.plain_form_files(body, request.headers["content-type"].encode(), 2) == PNGS[:2]
    curl_boundary = b"------------------------d74496d66958873e"  # what `curl -F file=@a.png` sends (curl 7/8)
    curl = (
        b"--" + curl_boundary + b"\r\n"
        b'Content-Disposition: form-data; name="file"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + PNGS[0] + b"\r\n--" + curl_boundary + b"--\r\n"
    )
    assert wire.plain_form_files(curl, b"multipart/form-data; boundary=" + curl_boundary, 1) == [PNGS[0]]
    from bench.loadgen import build_multipart_requests  # what the bench's multipart modes send

    [bench] = build_multipart_requests("127.0.0.1", 80, "/v1/classify", [PNGS[2]])
    head, _, body = bench.partition(b"\r\n\r\n")
    content_type = next(h for h in head.split(b"\r\n") if h.startswith(b"Content-Type: ")).removeprefix(
        b"Content-Type: "
    )
    assert wire.plain_form_files(body, content_type, 1) == [PNGS[2]]


def test_unknown_parameters_name_the_key_and_list_the_accepted_ones(make_client: ClientFactory) -> None:
    with make_client() as client:
        response = client.post("/v1/classify?max_acuracy_drop=0.001", content=images.png(), headers=PNG)
    assert response.status_code == 422
    assert response.json() == {
        "error": {
            "type": "validation_error",
            "message": "unknown query parameter 'max_acuracy_drop'; accepted: budget_macs, max_accuracy_drop, "
            "max_exit, thresholds, policy, drop_confidence, early_exit, deadline_ms, top_k",
        }
    }


def test_fast_path_requests_are_counted_under_the_route_template(make_client: ClientFactory) -> None:
    with make_client() as client:
        assert client.post("/v1/classify?max_exit=1", content=images.png(), headers=PNG).status_code == 200
        metrics = client.get("/metrics").text
    series = 'boostserve_requests_total{method="POST",protocol="http",route="/v1/classify",status_class="2xx"}'
    assert f"{series} 1.0" in metrics


def test_body_limit_and_request_id_still_apply(make_client: ClientFactory) -> None:
    with make_client(max_body_bytes=1024) as client:
        response = client.post(
            "/v1/classify", content=b"\x89PNG" + b"\0" * 4096, headers={**PNG, "x-request-id": "abc-1"}
        )
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "payload_too_large"
    assert response.headers["x-request-id"] == "abc-1"


def test_the_no_escape_query_split_equals_parse_qsl() -> None:
    """query_options skips parse_qsl when there is nothing to unquote; the knobs must not change."""
    import random
    from urllib.parse import parse_qsl

    rng = random.Random(0)
    for _ in range(5000):
        text = "".join(rng.choice("ab=&;1.%+") for _ in range(rng.randint(0, 12)))
        pairs = parse_qsl(text, keep_blank_values=True)
        if len({n for n, _ in pairs}) != len(pairs):
            continue  # a repeated name is refused, not split
        assert wire.query_options(text.encode()) == dict(pairs), text


def test_a_repeated_query_is_parsed_once_and_answered_alike(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsed queries are memoised per query string, so nothing may mutate them between requests."""
    calls: list[bytes] = []
    real = wire.query_options

    def spy(query_string: bytes) -> dict[str, str]:
        calls.append(query_string)
        return real(query_string)

    monkeypatch.setattr(fast_path.wire, "query_options", spy)
    with make_client() as client:
        good = [client.post("/v1/classify?thresholds=0.9,0.5,0", content=images.png(), headers=PNG) for _ in range(3)]
        bad = [client.post("/v1/classify?thresholds=0.9,x,0", content=images.png(), headers=PNG) for _ in range(2)]
    assert [r.status_code for r in good] == [200] * 3 and [r.status_code for r in bad] == [422] * 2
    assert all(r.json()["budget"]["thresholds"] == [0.9, 0.5, 0.0] for r in good)
    assert len({r.json()["error"]["message"] for r in bad}) == 1
    assert calls == [b"thresholds=0.9,0.5,0", b"thresholds=0.9,x,0"]  # errors come from the core, not the split


def _random_form(rng: random.Random) -> tuple[bytes, bytes, bool]:
    """A form as clients write it, its data full of CR, LF, dashes and boundary fragments, then
    (half the time) a few random byte edits: (body, Content-Type, edited)."""
    boundary = bytes(rng.choice(b"0123456789abcXYZ-_.+") for _ in range(rng.randint(1, 12)))
    alphabet = [b"\r", b"\n", b"-", b"--", b"x", b"\r\n", b"\r\n--", boundary, boundary[:-1], b"\r\n\r\n", b'"']
    parts = []
    for _ in range(rng.randint(1, MAX_IMAGES + 1)):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        filename = rng.choice([b"a.png", b"", b"x;y", b"\xc3\xa9"])
        parts.append(part(data, filename=filename, content_type=rng.choice([None, b"image/png"])))
    body = form(*parts, boundary=boundary, end=rng.choice([b"--\r\n", b"--"]))
    edits = rng.random() < 0.5
    if edits:
        edited = bytearray(body)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(edited) + 1)
            edit = rng.choice(["insert", "delete", "replace"])
            if edit == "insert":
                edited[at:at] = rng.choice(alphabet)
            elif at < len(edited):
                edited[at : at + 1] = b"" if edit == "delete" else bytes([rng.randrange(256)])
        body = bytes(edited)
    quoted = rng.random() < 0.2
    return body, b"multipart/form-data; boundary=" + (b'"%s"' % boundary if quoted else boundary), edits


async def _starlette_files(body: bytes, content_type: bytes) -> list[bytes]:
    """The reference: the parts Starlette's parser finds (the FastAPI route's multipart_request)."""
    sent = [False]

    async def receive() -> dict[str, Any]:
        if sent[0]:
            return {"type": "http.disconnect"}
        sent[0] = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/classify", "headers": [(b"content-type", content_type)]}
    request = await wire.multipart_request(Request(scope, receive), {}, MAX_IMAGES, 1 << 20)
    return list(request.images.blobs)  # type: ignore[union-attr, arg-type]


def test_every_form_the_plain_parser_reads_starlette_reads_alike() -> None:
    """Random forms and edited forms: whenever plain_form_files takes one, Starlette's parser
    finds exactly the same parts (and raises nothing). The rest is Starlette's to answer."""
    rng = random.Random(17)
    taken = {"intact": 0, "edited": 0}

    async def run() -> None:
        for _ in range(3000):
            body, content_type, edited = _random_form(rng)
            plain = wire.plain_form_files(body, content_type, MAX_IMAGES)
            if plain is not None:
                assert await _starlette_files(body, content_type) == plain, (body, content_type)
                taken["edited" if edited else "intact"] += 1

    asyncio.run(run())
    assert taken["intact"] > 500 and taken["edited"] > 50, taken  # the comparison is not vacuous
