"""A compute-bound variant of the synthetic artifact, for overload / soak / shutdown runs.

Why: the synthetic stages are a couple of small MatMuls, so the server's capacity would be set by
HTTP overhead (and a Python load generator on the same 2 cores cannot reach 4x of that). Here each
stage gets a Loop of `depth` (hidden x hidden) MatMul+Tanh iterations sharing one weight matrix after
its block: a per-*image* cost (batching does not amortise it, the weights stay in cache), tunable
so one image costs a few ms to a few tens of ms of ONNX Runtime time. Stage I/O, manifest schema
and sha256 contract are unchanged, so the server cannot tell it from an exported model.

The calibration arrays are the base artifact's (computed without the burn layers); they only feed
the threshold policies, which is all the load tests need.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.core.artifact import (
    MANIFEST_FILE,
    Manifest,
    content_version,
    load_manifest,
    sha256_file,
    write_manifest,
)
from tests.fixtures.synthetic_artifact import build_synthetic_artifact


def _add_burn(path: Path, depth: int, hidden: int, seed: int) -> int:
    """Insert the MatMul/Tanh chain after the block's Relu; returns the MACs per image added."""
    model = onnx.load(str(path))
    graph = model.graph
    relu = next(n for n in graph.node if n.op_type == "Relu")
    feat = relu.output[0]
    relu.output[0] = "burn_in"
    rng = np.random.default_rng(seed)
    # Orthogonal weight: tanh(x W) keeps the activations bounded and non-degenerate.
    q, _ = np.linalg.qr(rng.standard_normal((hidden, hidden)))
    graph.initializer.append(numpy_helper.from_array(q.astype(np.float32), "burn_w"))
    # One Loop node: `depth` iterations of x <- tanh(x @ W) (graph stays small whatever the depth).
    graph.initializer.append(numpy_helper.from_array(np.array(depth, dtype=np.int64), "burn_trips"))
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["x_in", "burn_w"], ["x_mm"]),
            helper.make_node("Tanh", ["x_mm"], ["x_out"]),
        ],
        "burn_body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, ["N", hidden]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, ["N", hidden]),
        ],
    )
    loop = helper.make_node("Loop", ["burn_trips", "", "burn_in"], [feat], body=body)
    position = list(graph.node).index(relu) + 1
    graph.node.insert(position, loop)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return depth * hidden * hidden


def build_heavy_artifact(
    out_dir: str | Path,
    *,
    depth: int = 40,
    hidden: int = 256,
    height: int = 28,
    width: int = 28,
    seed: int = 9,
) -> Path:
    """Synthetic artifact (3 stages, 10 classes, 1xHxW) with `depth` burn layers per stage."""
    out = build_synthetic_artifact(
        out_dir, height=height, width=width, num_classes=10, hidden=hidden, seed=seed, calibration_samples=100
    )
    raw = json.loads((out / MANIFEST_FILE).read_text())
    cumulative = 0
    for stage in raw["stages"]:
        added = _add_burn(out / stage["file"], depth, hidden, seed + stage["index"])
        stage["sha256"] = sha256_file(out / stage["file"])
        stage["macs"] += added
        cumulative += stage["macs"]
        stage["cumulative_macs"] = cumulative
    raw["provenance"]["config"]["burn_depth"] = depth
    raw["version"] = content_version(raw)
    write_manifest(out, Manifest.model_validate(raw))
    load_manifest(out, verify=True)
    return out
