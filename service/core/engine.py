"""ONNX Runtime execution of a staged BoostNet: one session per stage, per-sample early exit.

Why this module exists apart from the scheduler: the engine is the *only* code that touches ONNX
Runtime, and it is synchronous and transport-free, so the export's calibration
(`run_all_stages`), the benchmarks (`classify`) and the asyncio scheduler (`run_stage_batch`) all
run exactly the same graphs with exactly the same wiring.

Data model
----------
Between stages a sample is described by a `StageBatch`: a dict of arrays whose first axis is the
batch, keyed by *source name* (see service.core.artifact): "image" for the preprocessed image and the
output names of the stage that ran last ("feat_out_0", ..., "logits"). A stage input whose source is
"prev:<name>" is fed `state[<name>]`, one whose source is "image" is fed `state["image"]`. The image
is carried along only while a later stage still reads it (cascade stages). Because every value is
batch-first, the scheduler can slice (`take`) and concatenate (`concat`) states of different
requests with one numpy call per key, independent of the number of samples.

Early exit
----------
After stage k a sample leaves by the rule of service.core.exit_rule (confidence = max softmax(F_k)
in float32, leave when confidence >= threshold[k], the last stage always answers); the survivors
are compacted (`take`) so stage k+1 runs on the survivors only.

Providers and CUDA
------------------
Default providers: CUDA first when ONNX Runtime offers it, else CPU. ORT silently falls back to
CPU when CUDA cannot be initialised, so `providers` reports what `session.get_providers()` says
after loading, not what was asked for.

With CUDA in use, `run_stage_batch` uses IO binding: every output (features and `logits`) stays
on the device as an OrtValue and is bound as an input of the next stage; the logits are also
copied to the host, since the exit decision runs on the CPU. Compaction on the device is not
possible with the ORT Python API alone (no device-side gather without an extra library such as
CuPy), so when some samples exit, the surviving rows are copied to the host, gathered with numpy
and bound again as host inputs (ORT copies them to the device). When nobody exits (or when nothing
is compacted, e.g. `run_all_stages`) the device tensors pass through untouched.

`io_binding=True` takes the same binding path on CPU sessions (ORT binds CPU OrtValues the same
way), so CI tests its wiring, compaction and answers without a GPU (tests/service/
test_engine_binding.py); `make gpu-check` runs it on CUDA (tests/gpu/, docs/gpu.md). Each stage
counts its inputs bound as OrtValues of an earlier stage (`StageCounters.ortvalue_inputs`, no host
copy) and those uploaded from host arrays (`array_inputs`): the tests read "no host round trip when
nobody exits" off them.

Threads
-------
Default intra_op_threads=1, inter_op_threads=1, no spinning (0 still means "ONNX Runtime default",
one thread per physical core). Measured on the 2-core dev VM (ORT 1.32 CPU, a 4-conv 3x32x32
stage, other processes present), ms per batch:

    batch   intra=1   intra=2   intra=2 + spinning   2 threads x intra=1 (img/s vs 1 thread)
      1      0.46      0.43          0.62                 1866 vs 2159
      8      3.61      3.69          6.33                 2387 vs 2217
     32     17.0      19.3          27.3                  1916 vs 1881

A second intra-op thread buys nothing for these small stages, spinning costs 40-80 %, and two
concurrent single-thread runs gain <10 %. So: one thread for ORT (one batch at a time, run by the
scheduler's single worker thread) and the other core stays free for the event loop (HTTP,
decoding, preprocessing). Spinning is disabled for any thread count.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from service.core.artifact import ArtifactError, Manifest
from service.core.errors import DeadlineExceededError, StageFailedError, ValidationFailedError
from service.core.exit_rule import NEVER_EXIT, confidence, exits, force_last_exit, softmax

LOG = logging.getLogger("boostserve.engine")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

#: Measured default for 2-core hosts (see the module docstring).
DEFAULT_INTRA_OP_THREADS = 1


# --------------------------------------------------------------------------------------------------
# Value types
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExitResult:
    """The answer for one image: where it left and what the network said there."""

    exit_index: int  # 0-based stage index (the user-facing exit number is exit_index + 1)
    logits: np.ndarray  # (classes,) float32, cumulative F at the exit
    probabilities: np.ndarray  # (classes,) float32, softmax(logits)
    confidence: float  # max(probabilities)
    macs: int  # cumulative MACs of the exit
    deadline_hit: bool = False  # True: answered early because the deadline passed


@dataclass
class StageCounters:
    """Cumulative per-stage counters since the engine was built (thread-safe updates via Engine)."""

    runs: int = 0
    items: int = 0
    seconds: float = 0.0
    ortvalue_inputs: int = 0  # binding path: inputs bound as an earlier stage's OrtValue (no host copy)
    array_inputs: int = 0  # inputs fed from host arrays (copied to the device on CUDA)


def _to_host(value: Any) -> np.ndarray:
    """numpy view of a state value; device OrtValues are copied to host memory."""
    if isinstance(value, np.ndarray):
        return value
    return np.asarray(value.numpy())


def _batch_len(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return int(value.shape[0])
    return int(value.shape()[0])


@dataclass(frozen=True)
class StageBatch:
    """Per-sample state between stages; every array is batch-first ((B, ...) float32).

    `arrays` maps source names ("image", "feat_out_0", "logits", ...) to numpy arrays, or, on the
    CUDA path, to device OrtValues that were produced by the previous stage.
    """

    arrays: Mapping[str, Any]
    size: int

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> StageBatch:
        sizes = {_batch_len(v) for v in arrays.values()}
        if len(sizes) != 1:
            raise ValueError(f"state arrays disagree on the batch size: {sorted(sizes)}")
        return cls(arrays=dict(arrays), size=sizes.pop())

    def __len__(self) -> int:
        return self.size

    def take(self, index: np.ndarray | slice) -> StageBatch:
        """Rows `index` (int array, bool mask or slice) of every array (device values come to host)."""
        arrays = {k: _to_host(v)[index] for k, v in self.arrays.items()}
        size = next(iter(arrays.values())).shape[0] if arrays else 0
        return StageBatch(arrays=arrays, size=int(size))

    @staticmethod
    def concat(batches: Sequence[StageBatch]) -> StageBatch:
        """Row-wise concatenation (one np.concatenate per key); a single batch passes through untouched."""
        if len(batches) == 1:
            return batches[0]
        if not batches:
            raise ValueError("nothing to concatenate")
        keys = batches[0].arrays.keys()
        arrays = {k: np.concatenate([_to_host(b.arrays[k]) for b in batches], axis=0) for k in keys}
        return StageBatch(arrays=arrays, size=sum(b.size for b in batches))


@dataclass(frozen=True)
class StageOutput:
    """What one stage run produced: the state for the next stage and the host logits F_k."""

    state: StageBatch  # inputs the next stage needs (+ image if a later stage reads it)
    logits: np.ndarray  # (B, classes) float32 on host
    seconds: float


# --------------------------------------------------------------------------------------------------
# Helpers shared with the scheduler
# --------------------------------------------------------------------------------------------------


def normalize_thresholds(thresholds: Any, batch: int, num_stages: int) -> np.ndarray:
    """(E,) or (B, E) thresholds (or None = run every stage) -> (B, E) float32, last ALWAYS_EXIT.

    NaN stays NaN and never exits (see service.core.exit_rule.exits).
    """
    if thresholds is None:
        out = np.full((batch, num_stages), NEVER_EXIT, dtype=np.float32)
    else:
        arr = np.asarray(thresholds, dtype=np.float32)
        if arr.ndim == 1 and arr.shape[0] == num_stages:
            out = np.empty((batch, num_stages), dtype=np.float32)
            out[:] = arr  # broadcast (cheaper than broadcast_to().copy() for the usual batch of 1)
        elif arr.ndim == 2 and arr.shape == (batch, num_stages):
            out = arr.copy()
        else:
            raise ValidationFailedError(
                f"thresholds must have shape ({num_stages},) or ({batch}, {num_stages}), got {arr.shape}"
            )
    return force_last_exit(out)


def make_result(
    stage: int, logits: np.ndarray, probs: np.ndarray, conf: float, macs: int, deadline_hit: bool = False
) -> ExitResult:
    return ExitResult(
        exit_index=stage,
        logits=logits,
        probabilities=probs,
        confidence=float(conf),
        macs=int(macs),
        deadline_hit=deadline_hit,
    )


# --------------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------------


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, CPU always as the fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [CUDA, CPU] if CUDA in available else [CPU]


@dataclass(frozen=True)
class _StagePlan:
    """Precomputed wiring of one stage (no per-run dict building beyond the feeds)."""

    index: int
    feeds: tuple[tuple[str, str], ...]  # (graph input name, state key)
    outputs: tuple[str, ...]  # graph output names, session order
    keep_outputs: tuple[str, ...]  # outputs the next stage reads
    logits_output: str
    keep_image: bool  # a later stage reads the image
    cumulative_macs: int


class Engine:
    """One ONNX Runtime session per stage; synchronous, transport-free, thread-safe for `run_*`.

    ORT sessions may be called from several threads; the per-stage counters are guarded by a lock.
    """

    def __init__(
        self,
        manifest: Manifest,
        artifacts_dir: str | Path,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int = DEFAULT_INTRA_OP_THREADS,
        inter_op_threads: int = 1,
        io_binding: bool | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        """io_binding: None = on exactly when every stage runs on CUDA; True = the binding path on
        whatever device the sessions run on (CPU too: how CI tests it); False = plain `session.run`.
        """
        import onnxruntime as ort

        self.manifest = manifest
        self.artifacts_dir = Path(artifacts_dir)
        self.log = log or LOG
        self.num_stages = manifest.num_stages
        self.num_classes = len(manifest.classes)
        pre = manifest.preprocessing
        self.input_shape: tuple[int, int, int] = (pre.channels, pre.height, pre.width)
        requested = list(providers) if providers else default_providers()
        self.requested_providers = requested

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.enable_mem_pattern = True
        options.enable_cpu_mem_arena = True
        options.intra_op_num_threads = max(0, int(intra_op_threads))
        options.inter_op_num_threads = max(0, int(inter_op_threads))
        options.log_severity_level = 3
        # Spinning workers burn the second core the event loop needs between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.intra_op_threads = options.intra_op_num_threads
        self.inter_op_threads = options.inter_op_num_threads

        self._sessions: list[Any] = []
        for stage in manifest.stages:
            path = self.artifacts_dir / stage.file
            if not path.is_file():
                raise ArtifactError(f"stage {stage.index + 1} file missing: {path}")
            try:
                session = ort.InferenceSession(str(path), options, providers=requested)
            except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
                raise ArtifactError(f"ONNX Runtime cannot load stage {stage.index + 1} ({path}): {exc}") from exc
            self._sessions.append(session)

        self._plans = self._build_plans()
        in_use: list[str] = []
        for session in self._sessions:
            for name in session.get_providers():
                if name not in in_use:
                    in_use.append(name)
        self.providers: list[str] = in_use
        # IO binding only when every stage really runs on CUDA (a mixed placement gains nothing).
        self.uses_cuda = all(CUDA in s.get_providers() for s in self._sessions)
        self.uses_binding = self.uses_cuda if io_binding is None else bool(io_binding)
        #: Where bound outputs live: the GPU when every stage runs there, else host memory.
        self.binding_device = "cuda" if self.uses_cuda else "cpu"
        self._device_id = 0
        if requested and requested[0] == CUDA and not self.uses_cuda:
            self.log.warning("CUDA was requested but ONNX Runtime fell back to %s", self.providers)
        self.log.info(
            "engine ready: %d stages, providers in use %s (requested %s), intra_op=%d inter_op=%d, io_binding=%s",
            self.num_stages,
            self.providers,
            requested,
            self.intra_op_threads,
            self.inter_op_threads,
            self.binding_device if self.uses_binding else "off",
        )
        self._lock = threading.Lock()
        self.stage_counters: list[StageCounters] = [StageCounters() for _ in range(self.num_stages)]
        self._cum_macs = np.asarray(manifest.cumulative_macs, dtype=np.int64)

    # -- wiring --------------------------------------------------------------------------------------

    def _build_plans(self) -> list[_StagePlan]:
        """Check graph I/O names against the manifest and precompute feeds; ArtifactError on mismatch."""
        stages = self.manifest.stages
        plans: list[_StagePlan] = []
        for k, (stage, session) in enumerate(zip(stages, self._sessions, strict=True)):
            graph_inputs = [i.name for i in session.get_inputs()]
            graph_outputs = [o.name for o in session.get_outputs()]
            declared_inputs = [i.name for i in stage.inputs]
            declared_outputs = [o.name for o in stage.outputs]
            where = f"stage {k + 1} ({stage.file})"
            if sorted(graph_inputs) != sorted(declared_inputs):
                raise ArtifactError(f"{where}: graph inputs {graph_inputs} do not match the manifest {declared_inputs}")
            if sorted(graph_outputs) != sorted(declared_outputs):
                raise ArtifactError(
                    f"{where}: graph outputs {graph_outputs} do not match the manifest {declared_outputs}"
                )
            if stage.logits_output not in graph_outputs:
                raise ArtifactError(f"{where}: logits output {stage.logits_output!r} not among {graph_outputs}")
            if "image" in graph_outputs:
                raise ArtifactError(f"{where}: an output may not be called 'image' (reserved source name)")
            feeds: list[tuple[str, str]] = []
            for spec in stage.inputs:
                if spec.source == "image":
                    feeds.append((spec.name, "image"))
                    continue
                source = spec.source[len("prev:") :]
                if k == 0:
                    raise ArtifactError(
                        f"{where}: input {spec.name!r} reads {spec.source!r} but stage 1 has no previous"
                    )
                previous = [o.name for o in stages[k - 1].outputs]
                if source not in previous:
                    raise ArtifactError(
                        f"{where}: input {spec.name!r} reads {spec.source!r}, not an output of stage {k} ({previous})"
                    )
                feeds.append((spec.name, source))
            if k + 1 < len(stages):
                nxt = stages[k + 1]
                keep = tuple(i.source[len("prev:") :] for i in nxt.inputs if i.source != "image")
            else:
                keep = ()
            keep_image = any(s.reads_image for s in stages[k + 1 :])
            plans.append(
                _StagePlan(
                    index=k,
                    feeds=tuple(feeds),
                    outputs=tuple(graph_outputs),
                    keep_outputs=keep,
                    logits_output=stage.logits_output,
                    keep_image=keep_image,
                    cumulative_macs=stage.cumulative_macs,
                )
            )
        return plans

    @property
    def cumulative_macs(self) -> np.ndarray:
        """(E,) int64 cumulative MACs per exit."""
        return self._cum_macs

    # -- inputs --------------------------------------------------------------------------------------

    def check_images(self, images: Any) -> np.ndarray:
        """(B, C, H, W) float32 C-contiguous, matching the manifest; ValidationFailedError otherwise."""
        arr = np.ascontiguousarray(images, dtype=np.float32)
        if arr.ndim != 4 or tuple(arr.shape[1:]) != self.input_shape:
            raise ValidationFailedError(
                f"images must have shape (B, {', '.join(map(str, self.input_shape))}), got {tuple(arr.shape)}"
            )
        return arr

    def initial_state(self, images: np.ndarray) -> StageBatch:
        """The state stage 0 starts from: just the image (B, C, H, W)."""
        return StageBatch(arrays={"image": images}, size=int(images.shape[0]))

    # -- running -------------------------------------------------------------------------------------

    def run_stage_batch(self, k: int, state: StageBatch) -> StageOutput:
        """Run stage k on a state; returns the next state (outputs the next stage needs) and host logits.

        Raises StageFailedError when ONNX Runtime fails at run time.
        """
        plan = self._plans[k]
        start = time.perf_counter()
        try:
            if self.uses_binding:
                outputs, logits, bound = self._run_bound(k, plan, state)
            else:
                feeds = {name: _to_host(state.arrays[source]) for name, source in plan.feeds}
                values = self._sessions[k].run(list(plan.outputs), feeds)
                outputs = dict(zip(plan.outputs, values, strict=True))
                logits = outputs[plan.logits_output]
                bound = 0
        except KeyError as exc:
            raise ValidationFailedError(f"stage {k + 1} needs source {exc.args[0]!r}") from exc
        except Exception as exc:
            raise StageFailedError(f"stage {k + 1} failed: {type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - start
        self._count(k, state.size, seconds, bound, len(plan.feeds) - bound)
        nxt: dict[str, Any] = {name: outputs[name] for name in plan.keep_outputs}
        if plan.keep_image:
            nxt["image"] = state.arrays["image"]
        return StageOutput(state=StageBatch(arrays=nxt, size=state.size), logits=logits, seconds=seconds)

    def _run_bound(self, k: int, plan: _StagePlan, state: StageBatch) -> tuple[dict[str, Any], np.ndarray, int]:
        """IO-binding run: OrtValues in and out on `binding_device`; returns (outputs, host logits, inputs
        bound as OrtValues).

        Host arrays (the image, rows gathered after an exit) are bound with bind_cpu_input (ORT copies
        them to the device); an earlier stage's OrtValues are bound as they are. Every output is
        allocated by ORT on the binding device, so the next stage reads features and logits where
        they already are; the logits alone are also copied to the host for the exit decision.
        """
        session = self._sessions[k]
        binding = session.io_binding()
        bound = 0
        for name, source in plan.feeds:
            value = state.arrays[source]
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
                bound += 1
        for name in plan.outputs:
            binding.bind_output(name, self.binding_device, self._device_id)
        binding.synchronize_inputs()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        values = binding.get_outputs()  # OrtValues in the order bound
        outputs = dict(zip(plan.outputs, values, strict=True))
        logits = np.asarray(outputs[plan.logits_output].numpy())  # (B, classes) host copy
        return outputs, logits, bound

    def _count(self, k: int, items: int, seconds: float, ortvalue_inputs: int, array_inputs: int) -> None:
        with self._lock:
            c = self.stage_counters[k]
            c.runs += 1
            c.items += items
            c.seconds += seconds
            c.ortvalue_inputs += ortvalue_inputs
            c.array_inputs += array_inputs

    # -- whole-network entry points -----------------------------------------------------------------

    def run_all_stages(self, images: Any) -> list[np.ndarray]:
        """Every stage on every sample: E arrays (B, classes) float32 of cumulative logits F_k."""
        arr = self.check_images(images)
        state = self.initial_state(arr)
        out: list[np.ndarray] = []
        for k in range(self.num_stages):
            result = self.run_stage_batch(k, state)
            out.append(np.asarray(result.logits, dtype=np.float32))
            state = result.state
        return out

    def classify(self, images: Any, thresholds: Any = None, *, deadline: float | None = None) -> list[ExitResult]:
        """Run (B, C, H, W) images stage by stage; each sample leaves at its first confident exit.

        thresholds: (E,) or (B, E) float32; None = run every stage (A/B mode). The last stage
        always answers. deadline (time.monotonic()): checked between stages; survivors answer with
        their latest F (deadline_hit=True); DeadlineExceededError if it passed before stage 1 ran.
        Returns the results in input order. Synchronous: the benchmark's engine-only baseline and the
        reference the scheduler's tests compare against.
        """
        arr = self.check_images(images)
        batch = int(arr.shape[0])
        if batch == 0:
            return []
        thr = normalize_thresholds(thresholds, batch, self.num_stages)  # (B, E)
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceededError("the deadline passed before the first stage ran")
        results: list[ExitResult | None] = [None] * batch
        alive = np.arange(batch)  # original row of each current state row
        state = self.initial_state(arr)
        for k in range(self.num_stages):
            out = self.run_stage_batch(k, state)
            probs = softmax(out.logits)  # (n, classes)
            conf = confidence(probs)  # (n,)
            last = k == self.num_stages - 1
            late = not last and deadline is not None and time.monotonic() >= deadline
            leave = np.ones(conf.shape, dtype=bool) if (last or late) else exits(conf, thr[alive, k])
            macs = int(self._cum_macs[k])
            logits = np.asarray(out.logits, dtype=np.float32)
            for i in np.flatnonzero(leave).tolist():
                results[int(alive[i])] = make_result(k, logits[i], probs[i], conf[i], macs, deadline_hit=late)
            if leave.all():
                break
            stay = np.flatnonzero(~leave)
            alive = alive[stay]
            state = out.state if stay.size == out.state.size else out.state.take(stay)
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    def warmup(self, max_batch_size: int = 32) -> float:
        """Run every stage on zero batches of size 1 and max_batch_size; returns the seconds spent.

        Why: ORT allocates arenas and picks kernels on the first run of each shape; doing it here keeps
        that latency out of the first requests (and proves the sessions run before /ready says yes).
        """
        start = time.perf_counter()
        for size in sorted({1, max(1, int(max_batch_size))}):
            self.run_all_stages(np.zeros((size, *self.input_shape), dtype=np.float32))
        seconds = time.perf_counter() - start
        self.log.info("engine warm-up done in %.3f s", seconds)
        return seconds

    def stage_stats(self) -> list[StageCounters]:
        """A snapshot of the cumulative per-stage counters."""
        with self._lock:
            return [replace(c) for c in self.stage_counters]

    def reset_stats(self) -> None:
        with self._lock:
            self.stage_counters = [StageCounters() for _ in range(self.num_stages)]
