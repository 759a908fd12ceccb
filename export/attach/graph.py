"""The user's ONNX classifier as a graph to cut: checks, MACs per tensor, cut candidates, stage graphs.

Why ONNX's own tools and no re-implementation of the network: the promise to the user is that the
last exit *is* their network. Stage graphs are `onnx.utils.Extractor` sub-graphs of the very same
nodes and initializers (only tensor names change), so the chained stages compute the original
output node for node; `export.attach.build` checks this bit for bit through the serving engine.

A cut is one tensor that *separates* the graph: every path from the image to the logits passes
through it. Then the stage after it needs nothing but that tensor, which is what the manifest's
wiring expresses (stage k+1 reads outputs of stage k only). A tensor inside a residual block
(the skip path bypasses it) does not separate the graph and is refused.

MACs follow `models.macs` (the BoostNet/MSDNet papers' convention) on a batch of one: Conv
Cin*Cout*kh*kw*Hout*Wout/groups, Relu numel of the output, Max/AveragePool C*Hout*Wout*kh*kw,
GlobalAverage/MaxPool the input's numel, Gemm / a MatMul by a weight K*N (+ N for a bias), every
other op 0 (BatchNorm is folded into Conv in exported graphs).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from export.attach.errors import AttachError
from export.stages import IMAGE, LOGITS_IN, LOGITS_OUT, feat_in, feat_out

#: The tensor a stage graph hands to the next one (one cut = one tensor).
FEAT_OUT: str = feat_out(0)
FEAT_IN: str = feat_in(0)
HEAD_PREFIX = "boostserve_exit_"


@dataclass(frozen=True)
class CutCandidate:
    """A tensor the graph can be cut at, with the MACs needed to compute it (batch of one)."""

    name: str
    shape: tuple[int, ...]  # without the batch axis
    op: str  # the op type of the node producing it
    cumulative_macs: int


@dataclass(frozen=True)
class Classifier:
    """A checked single-input, single-output float32 ONNX classifier, I/O renamed image -> logits."""

    path: Path
    model: onnx.ModelProto
    input_name: str  # as in the user's file
    output_name: str  # as in the user's file
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    shapes: dict[str, tuple[int, ...]]  # every tensor, batch of one
    node_macs: tuple[int, ...]  # per node of model.graph.node

    @property
    def total_macs(self) -> int:
        return int(sum(self.node_macs))

    @property
    def params(self) -> int:
        return initializer_params(self.model)


def initializer_params(model: onnx.ModelProto) -> int:
    """Parameters of a graph: the elements of its initializers."""
    return int(sum(int(np.prod(i.dims)) for i in model.graph.initializer))


# ---------------------------------------------------------------------------------------------
# loading and checks
# ---------------------------------------------------------------------------------------------


def _rename(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Rename tensors everywhere in `graph` (nodes, I/O, value_info, initializers, sub-graphs)."""
    if not mapping:
        return
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _rename(attribute.g, mapping)
            for sub in attribute.graphs:
                _rename(sub, mapping)
    for value in (*graph.input, *graph.output, *graph.value_info):
        value.name = mapping.get(value.name, value.name)
    for init in graph.initializer:
        init.name = mapping.get(init.name, init.name)


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    shape = value.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


def _is_float(value: onnx.ValueInfoProto) -> bool:
    return value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def _infer_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Concrete shape of every tensor for a batch of one (the input's batch axis pinned to 1)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    first = probe.graph.input[0].type.tensor_type.shape.dim[0]
    first.Clear()
    first.dim_value = 1
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=True, data_prop=True)
    except Exception as exc:  # onnx raises InferenceError and friends
        raise AttachError(f"ONNX shape inference fails on the model: {exc}") from exc
    shapes: dict[str, tuple[int, ...]] = {}
    graph = inferred.graph
    for value in (*graph.input, *graph.value_info, *graph.output):
        dims = _dims(value)
        if dims and all(d is not None for d in dims):
            shapes[value.name] = tuple(int(d) for d in dims if d is not None)
    for init in graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    return shapes


def load_classifier(path: str | Path) -> Classifier:
    """Read and check the user's model; AttachError (one line) for anything attach-exits cannot use."""
    path = Path(path)
    try:
        model = onnx.load(str(path))
    except FileNotFoundError:
        raise AttachError(f"{path}: no such file") from None
    except Exception as exc:  # protobuf DecodeError, OSError
        raise AttachError(f"{path} is not a readable ONNX model: {type(exc).__name__}: {exc}") from exc
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(graph.output) != 1:
        names = ", ".join(o.name for o in graph.output)
        raise AttachError(
            f"{path} has {len(graph.output)} outputs ({names}); attach-exits needs a classifier with "
            "exactly one output, its logits (batch, classes)"
        )
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise AttachError(f"{path} has {len(inputs)} inputs ({names}); attach-exits needs one image input")
    image, logits = inputs[0], graph.output[0]
    if not (_is_float(image) and _is_float(logits)):
        raise AttachError(f"{path}: input and output must be float32 tensors")
    in_dims, out_dims = _dims(image), _dims(logits)
    if len(in_dims) != 4 or any(d is None for d in in_dims[1:]):
        raise AttachError(f"{path}: input {image.name!r} must be (batch, C, H, W) with fixed C, H, W; got {in_dims}")
    if len(out_dims) != 2:
        raise AttachError(f"{path}: output {logits.name!r} must be (batch, classes); got {out_dims}")
    # The serving engine batches images: the batch axis must be dynamic on both ends.
    for value in (image, logits):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_param = "batch"
    # Initializers listed as graph inputs (old exporters) would look like extra inputs to a stage.
    del_inputs = [i for i in graph.input if i.name in initializers]
    for value in del_inputs:
        graph.input.remove(value)
    reserved = {IMAGE, LOGITS_OUT, LOGITS_IN, FEAT_IN, FEAT_OUT}
    used = {n for node in graph.node for n in (*node.input, *node.output)} | initializers
    clash = sorted((used - {image.name, logits.name}) & reserved)
    if clash:
        raise AttachError(f"{path}: tensor names {clash} are reserved for the stage wiring; rename them")
    _rename(graph, {image.name: IMAGE, logits.name: LOGITS_OUT})
    shapes = _infer_shapes(model)
    # onnx.utils.Extractor reads the I/O types of a sub-graph from value_info: infer them once
    # (batch axis symbolic) so that every cut tensor has one.
    del graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    if LOGITS_OUT not in shapes:
        raise AttachError(f"{path}: shape inference cannot determine the output shape")
    c, h, w = (int(d) for d in in_dims[1:] if d is not None)
    return Classifier(
        path=path,
        model=model,
        input_name=image.name,
        output_name=logits.name,
        image_shape=(c, h, w),
        num_classes=int(shapes[LOGITS_OUT][1]),
        shapes=shapes,
        node_macs=tuple(node_macs(node, shapes) for node in graph.node),
    )


# ---------------------------------------------------------------------------------------------
# MACs
# ---------------------------------------------------------------------------------------------


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def node_macs(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """MACs of one node for a batch of one (module docstring: the papers' convention)."""

    def shape(name: str) -> tuple[int, ...] | None:
        return shapes.get(name)

    out = shape(node.output[0]) if node.output else None
    if out is None:
        return 0
    op = node.op_type
    if op == "Conv":
        weight = shape(node.input[1])
        if weight is None:
            return 0
        # out (1, Cout, *spatial), weight (Cout, Cin/groups, *kernel)
        return int(math.prod(out) * math.prod(weight[1:]))
    if op == "Relu":
        return int(math.prod(out))
    if op in ("MaxPool", "AveragePool"):
        kernel = _attr(node, "kernel_shape", [])
        assert isinstance(kernel, list)
        return int(math.prod(out) * math.prod(int(k) for k in kernel))
    if op in ("GlobalAveragePool", "GlobalMaxPool"):
        first = shape(node.input[0])
        return int(math.prod(first)) if first is not None else 0
    if op == "Gemm":
        weight = shape(node.input[1])
        if weight is None:
            return 0
        bias = shape(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return int(math.prod(weight) + (math.prod(out[1:]) if bias is not None else 0))
    if op == "MatMul":
        first = shape(node.input[0])
        if first is None:
            return 0
        return int(math.prod(out) * first[-1])
    return 0


# ---------------------------------------------------------------------------------------------
# cut candidates
# ---------------------------------------------------------------------------------------------


def _producers(graph: onnx.GraphProto) -> dict[str, int]:
    return {out: i for i, node in enumerate(graph.node) for out in node.output}


def ancestors(graph: onnx.GraphProto, target: str, stop: Iterable[str] = ()) -> tuple[set[int], set[str]]:
    """Nodes needed to compute `target` when the tensors in `stop` are given, and the graph inputs reached."""
    producers = _producers(graph)
    initializers = {i.name for i in graph.initializer}
    stops = set(stop)
    nodes: set[int] = set()
    reached: set[str] = set()
    pending = [target]
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen or name in stops or name in initializers or name == "":
            continue
        seen.add(name)
        index = producers.get(name)
        if index is None:
            reached.add(name)  # a graph input
            continue
        if index in nodes:
            continue
        nodes.add(index)
        pending.extend(graph.node[index].input)
    return nodes, reached


def separates(classifier: Classifier, name: str, upstream: str | None = None) -> bool:
    """True when every path from the image (or from `upstream`) to the logits passes through `name`."""
    graph = classifier.model.graph
    stop = [name] if upstream is None else [name, upstream]
    _, reached = ancestors(graph, LOGITS_OUT, stop=stop)
    return IMAGE not in reached


def cut_candidates(classifier: Classifier) -> list[CutCandidate]:
    """Every separating float tensor of rank 2 or 4 strictly between the image and the logits, in graph order.

    Rank 4 (B, C, H, W) tensors get a global-average-pool head, rank 2 (B, C) ones a linear head.
    """
    graph = classifier.model.graph
    candidates: list[CutCandidate] = []
    for node in graph.node:
        for name in node.output:
            shape = classifier.shapes.get(name)
            if name == LOGITS_OUT or shape is None or len(shape) not in (2, 4):
                continue
            if not separates(classifier, name):
                continue
            nodes, _ = ancestors(graph, name)
            macs = sum(classifier.node_macs[i] for i in nodes)
            if macs == 0 or macs >= classifier.total_macs:
                continue
            candidates.append(CutCandidate(name, shape[1:], node.op_type, int(macs)))
    return candidates


def distinct_positions(candidates: Sequence[CutCandidate], total_macs: int) -> list[CutCandidate]:
    """Of candidates less than 1 % of the total MACs apart, only the last (e.g. the Relu after an Add);
    none within 1 % of the full cost.

    Why: two exits a Relu apart cost a head each and can answer no differently; the later tensor
    is the block's output, the one a head reads best. An exit at the very end saves nothing.
    """
    kept: list[CutCandidate] = []
    for candidate in candidates:
        if total_macs - candidate.cumulative_macs < 0.01 * total_macs:
            continue
        if kept and candidate.cumulative_macs - kept[-1].cumulative_macs < 0.01 * total_macs:
            kept[-1] = candidate
        else:
            kept.append(candidate)
    return kept


def auto_cuts(candidates: Sequence[CutCandidate], count: int, total_macs: int) -> list[CutCandidate]:
    """`count` cuts spread by cumulative MACs: matched to the targets j/(count+1) of the total.

    Why even fractions of the full cost: seed 001 places its exits along the cost axis so that each
    threshold trades a similar slice of compute. The match minimises the summed distance between
    the j-th chosen cut and the j-th target over all ordered choices (dynamic programming), so a
    network whose blocks do not sit near the targets still gets its cuts spread, not bunched.
    """
    if count < 1:
        raise AttachError("auto needs at least one cut (auto:K with K >= 1)")
    pool = distinct_positions(candidates, total_macs)
    if len(pool) < count:
        raise AttachError(
            f"auto:{count} needs {count} cut candidates; the model has {len(pool)} (separating tensors at least 1 % "
            "of the MACs apart, split bit for bit by ONNX Runtime)"
        )
    targets = [total_macs * j / (count + 1) for j in range(1, count + 1)]
    n = len(pool)
    inf = float("inf")
    # best[j][i]: least cost of matching targets 0..j with j+1 candidates, the last being pool[i]
    best = [[inf] * n for _ in range(count)]
    back = [[-1] * n for _ in range(count)]
    for i in range(n):
        best[0][i] = abs(pool[i].cumulative_macs - targets[0])
    for j in range(1, count):
        running, arg = inf, -1
        for i in range(n):
            if i > 0 and best[j - 1][i - 1] < running:
                running, arg = best[j - 1][i - 1], i - 1
            if arg >= 0:
                best[j][i] = running + abs(pool[i].cumulative_macs - targets[j])
                back[j][i] = arg
    i = min(range(n), key=lambda k: best[count - 1][k])
    chosen = [i]
    for j in range(count - 1, 0, -1):
        i = back[j][i]
        chosen.append(i)
    return [pool[k] for k in reversed(chosen)]


def resolve_cuts(classifier: Classifier, names: Sequence[str]) -> list[CutCandidate]:
    """Check named cuts (exist, separate the graph, in graph order); one-line AttachError otherwise."""
    candidates = {c.name: c for c in cut_candidates(classifier)}
    order = {out: i for i, node in enumerate(classifier.model.graph.node) for out in node.output}
    user_names = {IMAGE: classifier.input_name, LOGITS_OUT: classifier.output_name}
    resolved: list[CutCandidate] = []
    for name in names:
        if name in (classifier.input_name, classifier.output_name):
            raise AttachError(f"cut {name!r} is the model's input or output; cut at a tensor between them")
        if name not in order or name in user_names:
            raise AttachError(f"cut tensor {name!r} does not exist in {classifier.path} (see --list-cuts)")
        if name not in candidates:
            shape = classifier.shapes.get(name)
            if shape is not None and len(shape) in (2, 4) and not separates(classifier, name):
                raise AttachError(
                    f"cut {name!r} does not separate the graph: a path from the image to the logits bypasses it "
                    "(e.g. a residual skip); see --list-cuts"
                )
            raise AttachError(f"cut {name!r} cannot take an exit head (shape {shape}); see --list-cuts")
        resolved.append(candidates[name])
    positions = [order[c.name] for c in resolved]
    if positions != sorted(positions) or len(set(positions)) != len(positions):
        raise AttachError("cuts must be distinct and given in graph order (input to output)")
    return resolved


# ---------------------------------------------------------------------------------------------
# stage graphs
# ---------------------------------------------------------------------------------------------


def segment(classifier: Classifier, start: str, end: str) -> onnx.ModelProto:
    """The sub-graph computing `end` from `start` (same nodes, same initializers), via onnx.utils.Extractor."""
    extractor = onnx.utils.Extractor(classifier.model)
    try:
        return extractor.extract_model([start], [end])
    except Exception as exc:  # KeyError on a tensor shape inference did not type
        raise AttachError(f"cannot extract the graph from {start!r} to {end!r}: {exc}") from exc


def _set_batch(value: onnx.ValueInfoProto) -> None:
    dim = value.type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_param = "batch"


def head_nodes(
    feature: str, rank: int, weight: np.ndarray, bias: np.ndarray, output: str, t: float, reads_logits: bool
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Exit head: [GlobalAveragePool -> Flatten ->] Gemm (weight (classes, C), bias (classes,)) [+ t * logits_in].

    The same arithmetic `export.attach.heads.LinearHead` trains; with `reads_logits` the boosted
    sum F_k = f_k + t * F_{k-1} is baked in, like the BoostNet stages.
    """
    p = HEAD_PREFIX
    nodes: list[onnx.NodeProto] = []
    pooled = feature
    if rank == 4:
        nodes.append(helper.make_node("GlobalAveragePool", [feature], [p + "pooled"], name=p + "pool"))
        nodes.append(helper.make_node("Flatten", [p + "pooled"], [p + "flat"], name=p + "flatten", axis=1))
        pooled = p + "flat"
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(weight, dtype=np.float32), p + "weight"),
        numpy_helper.from_array(np.ascontiguousarray(bias, dtype=np.float32), p + "bias"),
    ]
    raw = output if not reads_logits else p + "raw"
    nodes.append(helper.make_node("Gemm", [pooled, p + "weight", p + "bias"], [raw], name=p + "linear", transB=1))
    if reads_logits:
        inits.append(numpy_helper.from_array(np.asarray(t, dtype=np.float32), p + "t"))
        nodes.append(helper.make_node("Mul", [LOGITS_IN, p + "t"], [p + "scaled"], name=p + "scale"))
        nodes.append(helper.make_node("Add", [raw, p + "scaled"], [output], name=p + "boost"))
    return nodes, inits


def _float_input(name: str, shape: Sequence[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["batch", *shape])


def build_stage(
    classifier: Classifier,
    start: CutCandidate | None,
    end: CutCandidate | None,
    head: tuple[np.ndarray, np.ndarray] | None,
    t: float,
) -> onnx.ModelProto:
    """Stage graph from cut `start` (None: the image) to cut `end` (None: the model's logits).

    Intermediate stages output the cut as `feat_out_0` and their exit head's answer as `logits`;
    the last stage's `logits` is the original output itself, never boosted.
    """
    start_name = IMAGE if start is None else start.name
    end_name = LOGITS_OUT if end is None else end.name
    model = segment(classifier, start_name, end_name)
    graph = model.graph
    mapping: dict[str, str] = {}
    if start is not None:
        mapping[start.name] = FEAT_IN
    if end is not None:
        mapping[end.name] = FEAT_OUT
    _rename(graph, mapping)
    for value in (*graph.input, *graph.output):
        _set_batch(value)
    del graph.value_info[:]  # re-derived by ORT; stale batch-1 shapes from the probe must not stay
    if end is not None:
        if head is None:
            raise AttachError(f"the stage ending at {end.name!r} needs an exit head")
        reads_logits = start is not None and t > 0
        nodes, inits = head_nodes(FEAT_OUT, len(end.shape) + 1, head[0], head[1], LOGITS_OUT, t, reads_logits)
        graph.node.extend(nodes)
        graph.initializer.extend(inits)
        graph.output.append(
            helper.make_tensor_value_info(LOGITS_OUT, onnx.TensorProto.FLOAT, ["batch", head[0].shape[0]])
        )
        if reads_logits:
            graph.input.append(_float_input(LOGITS_IN, [head[0].shape[0]]))
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise AttachError(f"the stage graph from {start_name!r} to {end_name!r} does not check: {exc}") from exc
    return model


def cascade_stage(classifier: Classifier) -> onnx.ModelProto:
    """A whole classifier as one stage that reads the image (a cascade member): the file, renamed I/O."""
    model = onnx.ModelProto()
    model.CopyFrom(classifier.model)
    del model.graph.value_info[:]
    return model


def stage_macs(classifier: Classifier, start: str | None, end: str | None) -> int:
    """MACs of the original nodes between two cuts (the head's are added by the caller)."""
    nodes, _ = ancestors(classifier.model.graph, LOGITS_OUT if end is None else end, stop=[start] if start else [])
    return int(sum(classifier.node_macs[i] for i in nodes))


def head_macs(shape: Sequence[int], num_classes: int) -> int:
    """Pool (input numel) + linear (weight + bias), `shape` without the batch axis: models.macs' rule."""
    channels = int(shape[0])
    pool = int(math.prod(shape)) if len(shape) == 3 else 0
    return pool + channels * num_classes + num_classes
