"""Chain the per-stage ONNX graphs into ONE plain model (image -> final logits).

Why: the natural alternative to boostserve is "export the whole network once and run one ONNX
Runtime session". The engine suite compares against exactly that; building it from the very stage
graphs being served (instead of re-exporting from torch) keeps weights identical and keeps torch
out of the bench. Only the final cumulative logits are a graph output, so ONNX Runtime is free to
fuse across stage boundaries and skip nothing the full network needs.

Wiring follows the manifest (docs/architecture.md): an input with source "image" reads the
graph input `image`; "prev:<name>" reads output <name> of the previous stage. Each stage is
prefixed `sNN/` so names cannot collide; small Identity nodes connect them (ORT removes them).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.core.artifact import Manifest


class FullGraphUnavailable(RuntimeError):
    """The `onnx` package is missing or the stage graphs cannot be chained (reported, not fatal)."""


def _prefix(k: int) -> str:
    return f"s{k:02d}/"


def build_full_network(manifest: Manifest, artifacts_dir: Path, out_path: Path) -> Path:
    """Write the chained model to out_path and return it; raise FullGraphUnavailable if impossible."""
    try:
        import onnx
        from onnx import compose, helper
    except ImportError as exc:  # serving image without the `onnx` package
        raise FullGraphUnavailable(
            "the `onnx` package is not installed: the plain full-network session is skipped "
            "(pip install onnx to include it)"
        ) from exc

    stage_models = [onnx.load(str(artifacts_dir / stage.file)) for stage in manifest.stages]
    opsets: dict[str, int] = {}
    for model in stage_models:
        for opset in model.opset_import:
            previous = opsets.get(opset.domain)
            if previous is not None and previous != opset.version:
                raise FullGraphUnavailable(
                    f"stage graphs use different opsets for domain {opset.domain!r}: {previous} vs {opset.version}"
                )
            opsets[opset.domain] = opset.version

    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    sparse: list[onnx.SparseTensorProto] = []
    value_info: list[onnx.ValueInfoProto] = []
    functions: list[onnx.FunctionProto] = []
    image_input: onnx.ValueInfoProto | None = None
    last = len(stage_models) - 1
    for k, (stage, model) in enumerate(zip(manifest.stages, stage_models, strict=True)):
        prefixed = compose.add_prefix(model, _prefix(k))
        graph = prefixed.graph
        for spec in stage.inputs:
            if spec.source == "image":
                source = "image"
                if image_input is None:
                    original = next(i for i in model.graph.input if i.name == spec.name)
                    image_input = onnx.ValueInfoProto()
                    image_input.CopyFrom(original)
                    image_input.name = "image"
            else:
                if k == 0:
                    raise FullGraphUnavailable(f"stage 1 input {spec.name!r} reads a previous stage")
                source = _prefix(k - 1) + spec.source[len("prev:") :]
            nodes.append(helper.make_node("Identity", [source], [_prefix(k) + spec.name], name=f"wire_{k}_{spec.name}"))
        nodes.extend(graph.node)
        initializers.extend(graph.initializer)
        sparse.extend(graph.sparse_initializer)
        value_info.extend(graph.value_info)
        functions.extend(prefixed.functions)
        if k == last:
            final = next(o for o in model.graph.output if o.name == stage.logits_output)
            output = onnx.ValueInfoProto()
            output.CopyFrom(final)
            output.name = "logits"
            nodes.append(
                helper.make_node("Identity", [_prefix(k) + stage.logits_output], ["logits"], name="final_logits")
            )
    if image_input is None:
        raise FullGraphUnavailable("no stage reads the image")

    graph = helper.make_graph(
        nodes,
        f"{manifest.name}-full",
        [image_input],
        [output],
        initializer=initializers,
        sparse_initializer=sparse,
        value_info=value_info,
    )
    merged = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(domain, version) for domain, version in opsets.items()],
        producer_name="boostserve-bench",
        functions=functions,
    )
    merged.ir_version = max(m.ir_version for m in stage_models)
    try:
        onnx.checker.check_model(merged)
    except onnx.checker.ValidationError as exc:
        raise FullGraphUnavailable(f"the chained full-network graph does not validate: {exc}") from exc
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(merged, str(out_path))
    return out_path
