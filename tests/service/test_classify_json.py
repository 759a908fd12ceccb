"""service.http.v1.render: the hand-built answer is exactly what the pydantic models would write."""

from __future__ import annotations

import json

import numpy as np

from service.core.classify import Classified
from service.http.schemas import BudgetInfo, ClassifyResponse, ImageResult, TopK
from service.http.v1.render import budget_info_json, classify_response_json, image_results

CLASSES = ["T-shirt", "Trousers", "Pullover", "Dress", "Ankle boot ü"]
INFO = {
    "budget": {"max_accuracy_drop": 0.01},
    "thresholds": [0.93, None, 0.0],
    "policy": "budgeted_batch",
    "expected_accuracy": 0.912,
    "expected_macs": 5_368_000.0,
    "expected_macs_fraction": 0.14,
    "exit_fractions": [0.7, 0.2, 0.1],
    "calibrated": True,
    "early_exit": True,
}


def answer(probabilities: list[float], exit_: int = 1, deadline_hit: bool = False) -> Classified:
    p = np.asarray(probabilities, dtype=np.float32)
    return Classified(
        label=int(np.argmax(p)),
        confidence=float(p.max()),
        probabilities=p,
        exit=exit_,
        macs=1_909_248 * exit_,
        deadline_hit=deadline_hit,
    )


def via_models(answers: list[Classified], top_k: int, latency_ms: float) -> dict[str, object]:
    """The reference: the same answer built from the pydantic models, as the route did before."""
    results = []
    for a in answers:
        order = np.argsort(-a.probabilities, kind="stable")[: min(top_k, len(CLASSES))]
        probabilities = a.probabilities.tolist()
        top = [TopK(label=int(i), class_name=CLASSES[i], probability=probabilities[i]) for i in order]
        results.append(
            ImageResult(
                label=a.label,
                class_name=CLASSES[a.label],
                confidence=a.confidence,
                top_k=top,
                exit=a.exit,
                exits_total=3,
                macs=a.macs,
                macs_fraction=a.macs / 5_727_744,
                deadline_hit=a.deadline_hit,
            )
        )
    response = ClassifyResponse(
        results=results, latency_ms=latency_ms, model_name="m", model_version="v1", budget=BudgetInfo(**INFO)
    )
    return json.loads(response.model_dump_json())


def test_answer_equals_the_pydantic_models_and_validates() -> None:
    answers = [
        answer([0.1, 0.2, 0.2, 0.1, 0.4]),  # a tie: the stable order keeps the lower label first
        answer([0.05, 0.05, 0.8, 0.05, 0.05], exit_=3, deadline_hit=True),
    ]
    for top_k in (1, 3, 5, 50):
        results = image_results(answers, CLASSES, 3, 5_727_744, top_k)
        body = classify_response_json(results, 1.25, "m", "v1", budget_info_json(INFO))
        assert json.loads(body) == via_models(answers, top_k, 1.25)
        ClassifyResponse.model_validate_json(body, strict=True)
        assert "Ankle boot ü".encode() in body  # UTF-8, as pydantic writes it
    assert [t["label"] for t in image_results(answers, CLASSES, 3, 5_727_744, 3)[0]["top_k"]] == [4, 1, 2]


def test_no_answers_is_an_empty_list() -> None:
    assert image_results([], CLASSES, 3, 1.0, 5) == []


def test_non_finite_values_become_null_not_invalid_json() -> None:
    broken = answer([float("nan"), 0.5, 0.5, 0.0, 0.0])
    results = image_results([broken], CLASSES, 3, 5_727_744, 2)
    body = classify_response_json(results, 1.0, "m", "v1", budget_info_json(INFO))
    assert b"NaN" not in body  # json.loads would accept NaN: check the text
    decoded = json.loads(body)
    assert decoded["results"][0]["confidence"] is None
    assert [t["probability"] for t in decoded["results"][0]["top_k"]] == [0.5, 0.5]
    assert decoded["budget"]["thresholds"] == [0.93, None, 0.0]
