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

from ..config import FROZEN_BACKENDS, ConfigError, DataConfig
from ..fileio import write_bytes_atomic
from .classifier import CXRClassifier, frozen_part, normalize_input
from ..data.stream import eval_loader

EXPORT_FORMAT = 1  # bump when the exported graph changes, so old files are not reused


class _FrozenPart(nn.Module):
    """The frozen part at `depth` on already-normalised input: what gets exported."""

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
    part = _FrozenPart(model, depth).eval()
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


def calibration_batches(data: DataConfig, split: str, n_images: int = 128,
                        index: dict | None = None) -> list[torch.Tensor]:
    """The first `n_images` images of `split` (unaugmented, the same on every rank): int8 ranges."""
    out, n = [], 0
    for batch in eval_loader(data, split, 0, 1, index=index):
        out.append(batch["image"][: n_images - n])
        n += len(out[-1])
        if n >= n_images:
            break
    return out


# ---------------------------------------------------------------------- engines


def _channels_last(part: _FrozenPart) -> Callable[[torch.Tensor], torch.Tensor]:
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


def _exported(part: _FrozenPart, depth: int, input_size: int, work_dir: Path, log: Callable[[str], None]) -> Path:
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


def _quantized(fp32_path: Path, calibration: list[np.ndarray], log: Callable[[str], None]) -> Path:
    """The int8 (QDQ) version of `fp32_path`, calibrated on `calibration` (normalised batches)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    h = hashlib.sha256(fp32_path.name.encode())
    for b in calibration:
        h.update(np.ascontiguousarray(b).tobytes())
    path = fp32_path.with_name(f"{fp32_path.stem}-int8-{h.hexdigest()[:12]}.onnx")
    if path.is_file():
        return path

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
                        calibrate_method=CalibrationMethod.MinMax)
        write_bytes_atomic(path, Path(f"{tmp}/q.onnx").read_bytes())
    n = sum(len(b) for b in calibration)
    log(f"quantized the frozen part to int8 on {n} training images: {path} in {time.time() - t0:.1f} s")
    return path

