"""The frozen part of the network on the CPU through a faster runtime (`model.frozen_backend`).

On a CPU-only machine the frozen forward pass is the whole cost of the frozen-compute cache (and
of evaluation): plain PyTorch eager reaches ~10% of the CPU's fp32 peak on EfficientNet-Lite1
(docs/performance.md, "The frozen forward on the CPU"). This module runs the same frozen part --
`CXRClassifier.frozen_forward` at one depth -- through another engine:

- "channels_last": PyTorch eager on an NHWC copy of the frozen modules (no export);
- "onnxruntime":   the frozen part exported to ONNX, run by ONNX Runtime (fp32);
- "openvino":      the same ONNX file compiled by OpenVINO (fp32: INFERENCE_PRECISION_HINT=f32,
                   since OpenVINO would otherwise pick bf16 on CPUs with bf16 units);
- "int8":          that ONNX file statically quantized by onnxruntime.quantization (QDQ, int8
                   per-channel weights, uint8 activations) with ranges calibrated on training
                   images, compiled by OpenVINO (its int8 kernels use VNNI where the CPU has it).
                   On an x86 CPU without VNNI the int8 kernels multiply uint8 by int8 with
                   VPMADDUBSW, whose int16 sum of two products saturates (255 x 127 x 2 > 32767):
                   there the weights are quantized to 7 bits (ONNX Runtime's `reduce_range`, the
                   workaround ONNX Runtime and OpenVINO document), which cannot saturate, and the
                   convolutions with few products per output (depthwise and the stem: 9-27,
                   where 7-bit rounding does not average out) stay fp32 (`int8_recipe`).

A runner is a snapshot of the weights it was built from: `attached(model, runner)` hooks it into
`model.frozen_forward` only while the frozen weights cannot change (building a cache, evaluating
a loaded checkpoint) and only for the depth it was built for and inputs on the CPU.

Exports cost seconds (ONNX) to a minute (int8 calibration): they are kept in `work_dir` under a
name hashing the frozen weights, depth, input size, backend and calibration images, so a rerun
(or another run with the same backbone) loads them instead.
"""
from __future__ import annotations

import contextlib
import hashlib
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from ..config import FROZEN_BACKENDS, ConfigError, LoaderConfig
from ..fileio import write_bytes_atomic
from .classifier import CXRClassifier, frozen_part, normalize_input
from ..data.index import ShardIndex
from ..data.stream import eval_loader

EXPORT_FORMAT = 1  # bump when the exported graph changes, so old files are not reused


class FrozenPart(nn.Module):
    """The frozen part of `model` at `depth` as a module of its own, on already-normalised input:
    what gets exported (and what bench/bench_frozen.py times)."""

    def __init__(self, model: CXRClassifier, depth: int) -> None:
        super().__init__()
        self.backbone, self.depth = model.backbone, depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_part(self.backbone, x, self.depth)


class FrozenRunner:
    """Runs the frozen part of one model at one depth: uint8 (or float) images -> float32
    features, the same as `model.frozen_forward` at that depth (within the backend's tolerance)."""

    def __init__(self, backend: str, depth: int, mean: torch.Tensor, std: torch.Tensor,
                 run: Callable[[torch.Tensor], torch.Tensor], build_s: float = 0.0) -> None:
        self.backend, self.depth, self.build_s = backend, depth, build_s
        self._mean, self._std, self._run = mean.clone(), std.clone(), run

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return normalize_input(x, self._mean, self._std)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.normalize(x.cpu()))


def check_backend(backend: str) -> None:
    if backend not in FROZEN_BACKENDS:
        raise ConfigError(f"model.frozen_backend must be one of {', '.join(FROZEN_BACKENDS)}, not {backend!r}")


def build_runner(model: CXRClassifier, backend: str, depth: int, input_size: int, work_dir: str | Path,
                 calibration: Iterable[torch.Tensor] | None = None, threads: int | None = None,
                 log: Callable[[str], None] = lambda s: None) -> FrozenRunner | None:
    """A runner of `model`'s frozen part at `depth` for `input_size` px images (None for "eager").

    `calibration`: uint8 image batches from the training split (required for "int8").
    `threads`: the engine's threads (default: torch's, so 2 processes on 2 cores get 1 each).
    """
    check_backend(backend)
    if backend == "eager":
        return None
    t0 = time.time()
    threads = threads or torch.get_num_threads()
    was_training = model.training
    model.eval()
    part = FrozenPart(model, depth).eval()
    mean, std = model.mean.cpu(), model.std.cpu()
    try:
        if backend == "channels_last":
            run = _channels_last(part)
        else:
            onnx_path = _exported(part, depth, input_size, Path(work_dir), log)
            if backend == "onnxruntime":
                run = _onnxruntime(onnx_path, threads)
            else:
                if backend == "int8":
                    if calibration is None:
                        raise ConfigError('model.frozen_backend="int8" needs calibration images from the training split')
                    norm = FrozenRunner(backend, depth, mean, std, lambda x: x)
                    onnx_path = _quantized(onnx_path, [norm.normalize(b).numpy() for b in calibration], log)
                run = _openvino(onnx_path, threads)
    finally:
        model.train(was_training)
    return FrozenRunner(backend, depth, mean, std, run, time.time() - t0)


@contextlib.contextmanager
def attached(model: CXRClassifier, runner: FrozenRunner | None) -> Iterator[CXRClassifier]:
    """`model.frozen_forward` goes through `runner` (at its depth, on the CPU) inside the block."""
    before = model.frozen_runner
    model.frozen_runner = runner
    try:
        yield model
    finally:
        model.frozen_runner = before


def calibration_batches(loader: LoaderConfig, split: str, index: ShardIndex, n_images: int = 128) -> list[torch.Tensor]:
    """The first `n_images` images of `split` (unaugmented, the same on every rank): int8 ranges."""
    out, n = [], 0
    for batch in eval_loader(loader, split, 0, 1, index):
        out.append(batch["image"][: n_images - n])
        n += len(out[-1])
        if n >= n_images:
            break
    return out


# ---------------------------------------------------------------------- engines


def _channels_last(part: FrozenPart) -> Callable[[torch.Tensor], torch.Tensor]:
    import copy

    nhwc = copy.deepcopy(part).to(memory_format=torch.channels_last)  # the model itself stays NCHW
    return lambda x: nhwc(x.contiguous(memory_format=torch.channels_last)).contiguous()


def _onnxruntime(path: Path, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: the graph clean-up warnings say nothing wrong
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def _openvino(path: Path, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {
        "INFERENCE_PRECISION_HINT": "f32",  # fp32 where not quantized: never a silent bf16
        "PERFORMANCE_HINT": "LATENCY",  # one request over the whole batch, all `threads` on it
        "INFERENCE_NUM_THREADS": threads,
    })
    request = compiled.create_infer_request()
    # The output buffer is reused by the next call: copy it out.
    return lambda x: torch.from_numpy(request.infer({0: x.numpy()})[0].copy())


# ---------------------------------------------------------------------- exports, kept on disk


def weights_hash(part: nn.Module) -> str:
    """sha256 of the frozen part's tensors (names, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in part.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _exported(part: FrozenPart, depth: int, input_size: int, work_dir: Path, log: Callable[[str], None]) -> Path:
    """The fp32 ONNX file of `part`: loaded from `work_dir` when there, else exported (atomically)."""
    key = hashlib.sha256(f"{EXPORT_FORMAT}-{weights_hash(part)}-{depth}-{input_size}-{torch.__version__}".encode())
    path = work_dir / f"frozen-d{depth}-{input_size}px-{key.hexdigest()[:16]}.onnx"
    if path.is_file():
        return path
    t0 = time.time()
    x = torch.zeros(2, 3, input_size, input_size)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter (deprecated, still shipped): one self-contained file, dynamic
        # batch, seconds on 2 cores; the torch.export one takes minutes here for the same graph.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(part, (x,), f"{tmp}/m.onnx", dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
        work_dir.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, Path(f"{tmp}/m.onnx").read_bytes())
    log(f"exported the frozen part (depth {depth}) to {path} in {time.time() - t0:.1f} s")
    return path


VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})  # /proc/cpuinfo: u8 x s8 -> s32 without int16


def int8_saturates(cpu_flags: str | None = None, machine: str | None = None) -> bool:
    """True on an x86 CPU whose int8 dot product goes through VPMADDUBSW (no VNNI/AMX): the int16
    sum of two uint8 x int8 products saturates with 8-bit weights (OpenVINO's "saturation issue";
    ONNX Runtime's quantization docs: use `reduce_range` there). `cpu_flags`: the `flags` line of
    /proc/cpuinfo (read when None); unknown flags on x86 count as saturating (accuracy first)."""
    import platform

    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False  # ARM's int8 dot products (SDOT, or widening multiplies) accumulate in 32 bits
    if cpu_flags is None:
        try:
            cpu_flags = next((line.split(":", 1)[1] for line in Path("/proc/cpuinfo").read_text().splitlines()
                              if line.startswith("flags")), "")
        except OSError:
            cpu_flags = ""
    return not (VNNI_FLAGS & set(cpu_flags.split()))


def int8_recipe(saturates: bool) -> str:
    """How `_quantized` quantizes: "w8" (8-bit weights everywhere: VNNI CPUs) or "w7" (7-bit
    weights, depthwise convolutions and the stem in fp32: CPUs where 8-bit weights saturate)."""
    return "w7" if saturates else "w8"


def _w7_options(fp32_path: Path) -> dict:
    """quantize_static arguments of the "w7" recipe: weights in 7 bits (|w| <= 64: two products
    255 x 64 stay within int16), and the convolutions whose outputs sum only a few products left in
    fp32, since their 7-bit rounding error does not average out over many inputs: the depthwise
    ones (9 or 25 products) and the stem (27, on the image). ~12% of the FLOPs of an
    EfficientNet-Lite1; the 1x1 convolutions, 88%, stay int8."""
    import onnx

    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    groups = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1) for n in convs}
    keep = [n.name for i, n in enumerate(convs) if i == 0 or groups[n.name] > 1]
    return {"reduce_range": True, "nodes_to_exclude": keep}


def _quantized(fp32_path: Path, calibration: list[np.ndarray], log: Callable[[str], None],
               saturates: bool | None = None) -> Path:
    """The int8 (QDQ) version of `fp32_path`, calibrated on `calibration` (normalised batches),
    quantized for this CPU (`saturates`: `int8_saturates()` when None; `int8_recipe`)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    recipe = int8_recipe(int8_saturates() if saturates is None else saturates)
    h = hashlib.sha256(fp32_path.name.encode())
    for b in calibration:
        h.update(np.ascontiguousarray(b).tobytes())
    # "w8" keeps the name of the files made before the recipes existed (same graph).
    tag = "int8" if recipe == "w8" else f"int8{recipe}"
    path = fp32_path.with_name(f"{fp32_path.stem}-{tag}-{h.hexdigest()[:12]}.onnx")
    if path.is_file():
        return path
    options = _w7_options(fp32_path) if recipe == "w7" else {}

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calibration)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {"x": b}

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        quantize_static(str(fp32_path), f"{tmp}/q.onnx", Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax, **options)
        write_bytes_atomic(path, Path(f"{tmp}/q.onnx").read_bytes())
    n = sum(len(b) for b in calibration)
    log(f"quantized the frozen part to int8 ({recipe}) on {n} training images: {path} in {time.time() - t0:.1f} s")
    if recipe == "w7":
        log("this CPU has no VNNI: int8 weights in 7 bits (no saturation); int8 may be no faster than "
            "openvino here (docs/performance.md)")
    return path

