"""The model every peer serves, written as a user of that peer would write it.

Runs inside a peer's own virtual environment (numpy, onnxruntime, Pillow and the peer; nothing
of boostserve is installed there), so it reads everything it needs from the JSON config the
runner writes (`bench.peers.runner`): the full-network ONNX (bench.fullgraph), the stage graphs
and their wiring, the preprocessing and the early-exit thresholds.

Two networks:
- `FullNetwork`: one ONNX Runtime session of the whole network (what a user exports and serves).
- `EarlyExitNetwork`: the stage graphs run by hand, batch by batch, survivors compacted between
  stages, with the same float32 max-softmax confidence and `>=` test as boostserve's exit rule
  (re-implemented here on purpose: this is the "user builds early exit themselves" variant).

Both run ONNX Runtime with one intra-op and one inter-op thread, like boostserve's engine, so
the comparison is about serving, not kernel threading.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class StageSpec:
    """One stage graph: its file and, per input, where the value comes from ("image" or "prev:<output>")."""

    file: str
    inputs: dict[str, str]  # input name -> source
    outputs: list[str]
    logits_output: str


@dataclass(frozen=True)
class PeerConfig:
    """What the runner hands a peer server (one JSON file)."""

    host: str
    port: int
    full_onnx: str
    stages: list[StageSpec]
    thresholds: list[float]  # per exit; +inf never exits, the last always answers
    height: int
    width: int
    channels: int
    mean: list[float]
    std: list[float]
    input_scale: float
    max_batch_size: int
    max_wait_ms: float
    early_exit: bool

    @staticmethod
    def load(path: str | Path) -> PeerConfig:
        raw = json.loads(Path(path).read_text())
        stages = [StageSpec(**s) for s in raw.pop("stages")]
        thresholds = [_threshold(t) for t in raw.pop("thresholds")]
        return PeerConfig(stages=stages, thresholds=thresholds, **raw)


def _threshold(value: Any) -> float:
    """JSON threshold -> float: null / "inf" = never exit, "-inf" = always."""
    if value is None or value == "inf":
        return math.inf
    if value == "-inf":
        return -math.inf
    return float(value)


def _session(path: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


class Preprocess:
    """PNG bytes -> (C, H, W) float32, the manifest's recipe (Pillow: what a user reaches for)."""

    def __init__(self, config: PeerConfig) -> None:
        self.size = (config.width, config.height)
        self.mode = "L" if config.channels == 1 else "RGB"
        self.channels = config.channels
        self.scale = np.float32(config.input_scale)
        self.mean = np.asarray(config.mean, dtype=np.float32).reshape(config.channels, 1, 1)
        self.std = np.asarray(config.std, dtype=np.float32).reshape(config.channels, 1, 1)

    def __call__(self, data: bytes) -> np.ndarray:
        from PIL import Image

        img = Image.open(io.BytesIO(data)).convert(self.mode)
        if img.size != self.size:
            img = img.resize(self.size, Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.float32)  # (H, W) or (H, W, 3)
        chw = arr[None] if self.channels == 1 else arr.transpose(2, 0, 1)  # (C, H, W)
        return (chw * self.scale - self.mean) / self.std

    def batch(self, items: list[bytes]) -> np.ndarray:
        return np.stack([self(b) for b in items]).astype(np.float32, copy=False)  # (B, C, H, W)


class FullNetwork:
    """One session of the whole network: (B, C, H, W) -> labels, everyone answers at the last exit."""

    def __init__(self, config: PeerConfig) -> None:
        self.session = _session(config.full_onnx)
        self.input_name = self.session.get_inputs()[0].name
        self.exit_number = len(config.stages)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        (logits,) = self.session.run(None, {self.input_name: images})  # (B, classes)
        labels = np.argmax(logits, axis=1)
        return labels, np.full(labels.shape, self.exit_number, dtype=np.int64)


def max_softmax(logits: np.ndarray) -> np.ndarray:
    """(B, classes) -> (B,) float32 max softmax, computed in float32 as boostserve's rule says."""
    z = logits.astype(np.float32, copy=True)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z.max(axis=1)


class EarlyExitNetwork:
    """The stage graphs by hand: run stage k on the survivors, let the confident ones leave."""

    def __init__(self, config: PeerConfig) -> None:
        self.stages = config.stages
        self.sessions = [_session(s.file) for s in config.stages]
        self.thresholds = np.asarray(config.thresholds, dtype=np.float32)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = images.shape[0]
        labels = np.zeros(n, dtype=np.int64)
        exits = np.zeros(n, dtype=np.int64)
        alive = np.arange(n)  # indices (into the batch) of images still running
        prev: dict[str, np.ndarray] = {}
        last = len(self.stages) - 1
        for k, (stage, session) in enumerate(zip(self.stages, self.sessions, strict=True)):
            feeds = {
                name: images[alive] if source == "image" else prev[source.removeprefix("prev:")]
                for name, source in stage.inputs.items()
            }
            values = dict(zip(stage.outputs, session.run(stage.outputs, feeds), strict=True))
            logits = values[stage.logits_output]  # (survivors, classes)
            leave = np.ones(alive.size, dtype=bool) if k == last else max_softmax(logits) >= self.thresholds[k]
            labels[alive[leave]] = np.argmax(logits[leave], axis=1)
            exits[alive[leave]] = k + 1
            stay = ~leave
            if not stay.any():
                break
            alive = alive[stay]
            prev = {name: value[stay] for name, value in values.items()}
        return labels, exits


def build_network(config: PeerConfig) -> FullNetwork | EarlyExitNetwork:
    return EarlyExitNetwork(config) if config.early_exit else FullNetwork(config)


def answer(label: int, exit_number: int) -> dict[str, int]:
    """The answer every peer returns: the predicted class index and the exit that produced it."""
    return {"label": int(label), "exit": int(exit_number)}


def classify_pngs(network: FullNetwork | EarlyExitNetwork, pre: Preprocess, items: list[bytes]) -> list[dict[str, int]]:
    """PNG bodies of one batch -> one answer per body, in order."""
    labels, exits = network(pre.batch(items))
    return [answer(int(lab), int(ex)) for lab, ex in zip(labels, exits, strict=True)]
