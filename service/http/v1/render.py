"""The `POST /v1/classify` answer as JSON bytes, built from plain dicts.

Why not the pydantic models: the answer is the hottest serialisation in the service (one per
request), and building `ImageResult` + `TopK` x k + `BudgetInfo` models and dumping them was
~15 % of the server's CPU per request for a 28x28 image, more than the model's first stage. The
models in `service.http.schemas` stay the contract (OpenAPI, tests validate every answer shape against
`ClassifyResponse`); this module writes the same fields in the same order, with the budget part
serialised once per distinct resolved budget by the models themselves (`budget_json`).

orjson writes the rest: ~1 µs where the standard library's encoder took ~12 µs (mostly float
formatting), the same shortest round-trip float digits, and NaN/Infinity (impossible from a healthy
softmax, possible from a broken model) as null, as pydantic does everywhere else in the API.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from service.core.classify import Classified, ClassifyResult, ClassifyService, ResolvedBudget
from service.core.knobs import Knob
from service.core.memo import IdentityMemo
from service.http.schemas import BudgetInfo

#: v1's rendering knob: how many classes each result lists.
TOP_K = Knob("top_k", "int", "request", "how many classes each result lists, most probable first", 5, low=1, high=1000)

#: Budget JSON per resolved budget object: clients use a handful of budgets.
_BUDGET_JSON: IdentityMemo[ResolvedBudget, bytes] = IdentityMemo()


def image_results(
    answers: Sequence[Classified], classes: Sequence[str], exits_total: int, full_macs: float, top_k: int
) -> list[dict[str, Any]]:
    """`ImageResult`-shaped dicts; top-k from one stable argsort over all the request's images."""
    if not answers:
        return []
    k = min(top_k, len(classes))
    if len(answers) == 1:  # the usual request: no stack
        probabilities = answers[0].probabilities[None]  # (1, classes)
    else:
        probabilities = np.stack([a.probabilities for a in answers])  # (n, classes)
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k].tolist()  # (n, k)
    full = float(full_macs) or 1.0
    return [
        {
            "label": a.label,
            "class_name": classes[a.label],
            "confidence": a.confidence,
            "top_k": [{"label": i, "class_name": classes[i], "probability": p[i]} for i in top],
            "exit": a.exit,
            "exits_total": exits_total,
            "macs": a.macs,
            "macs_fraction": a.macs / full,
            "deadline_hit": a.deadline_hit,
        }
        for a, top, p in zip(answers, order, probabilities.tolist(), strict=True)
    ]


def budget_info_json(info: dict[str, Any]) -> bytes:
    """A `BudgetInfo` dict as JSON, through the model (once per distinct budget, not per request)."""
    return BudgetInfo.model_construct(**info).model_dump_json().encode()


def budget_json(service: ClassifyService, resolved: ResolvedBudget) -> bytes:
    """`budget_info_json` of a resolved budget, memoised per resolved-budget object."""
    return _BUDGET_JSON.get(resolved, lambda r: budget_info_json(service.budget_info(r)))


def classify_response_json(
    results: list[dict[str, Any]], latency_ms: float, model_name: str, model_version: str, budget: bytes
) -> bytes:
    """The whole `ClassifyResponse`, fields in the model's order (compact JSON, UTF-8)."""
    head = {"results": results, "latency_ms": latency_ms, "model_name": model_name, "model_version": model_version}
    return orjson.dumps(head)[:-1] + b',"budget":' + budget + b"}"


def render_classify(service: ClassifyService, result: ClassifyResult, latency_ms: float) -> bytes:
    """The `POST /v1/classify` answer for a core result (top_k from the request, default its example)."""
    top_k = int(result.extras.get(TOP_K.name, TOP_K.example))
    manifest = service.manifest
    results = image_results(result.answers, manifest.classes, manifest.num_stages, manifest.full_macs, top_k)
    return classify_response_json(
        results, latency_ms, manifest.name, manifest.version, budget_json(service, result.budget)
    )
