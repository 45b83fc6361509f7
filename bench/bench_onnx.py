"""CPU images/s of one checkpoint in torch eager against its `cxr-dist export` file on onnxruntime.

    .venv/bin/python bench/bench_onnx.py                          # Lite1 (packaged weights), 240 px
    .venv/bin/python bench/bench_onnx.py --checkpoint runs/x --repeats 9

Without --checkpoint a Lite1 checkpoint with the packaged ImageNet weights is written to a
temporary folder (speed does not depend on the weights' values), with a temperature of 1.5. The file is exported twice:
by the dynamo exporter (the default of `cxr-dist export`) and by the TorchScript one (opset 17,
what `--opset 17` gives), so the table also says what the choice of exporter costs at run time.
Same random uint8 films for all; per repeat every (batch, runtime) is timed once, the order of
the runtimes rotated between repeats, after a warm-up; onnxruntime gets as many intra-op
threads as torch. Prints the machine, then a markdown table: median images/s, min-max over the
repeats, and the median of the per-repeat ratios to torch eager (same repeat, side by side).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cxr_dist.model.checkpoint import amend_checkpoint, save_checkpoint
from cxr_dist.config import Config, LoaderConfig, ModelConfig, section, to_dict
from cxr_dist.product.export import export_onnx, load_model, temperature_of
from cxr_dist.model.classifier import build_model

EXPORTS = (("onnxruntime (dynamo export)", None), ("onnxruntime (TorchScript export, opset 17)", 17))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def lite1_checkpoint(folder: Path, input_size: int) -> Path:
    cfg = Config(loader=LoaderConfig(input_size=input_size),
                 model=ModelConfig(backbone="tf_efficientnet_lite1", weights="lite1-package"))
    run = folder / "run"
    save_checkpoint(run, "best", build_model(cfg.model).state_dict(), {}, {"config": to_dict(cfg)})
    amend_checkpoint(run, {"calibration": {"temperature": 1.5}})  # a folded temperature, as a real run has
    return run


def session(path: Path, threads: int):
    """A CPU session whose idle threads sleep: by default onnxruntime's pool spin-waits after each
    run, and on a small machine those spinning threads take the cores from the next runtime timed
    (torch eager ran 10-30x slower right after onnxruntime with spinning on, 2 cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def timed(fn, n_calls: int) -> float:
    start = time.perf_counter()
    for _ in range(n_calls):
        fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="a run or checkpoint dir (default: Lite1 with packaged weights)")
    ap.add_argument("--input-size", type=int, default=240, help="without --checkpoint: the film side S")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--images", type=int, default=64, help="images per timed measurement (batch 1: 64 calls)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and onnxruntime threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = args.checkpoint or lite1_checkpoint(tmp, args.input_size)
        exports = {}
        for name, opset in EXPORTS:
            start = time.perf_counter()
            path = export_onnx(ckpt, tmp / f"{opset or 'default'}.onnx", opset=opset)
            exports[name] = (path.stat().st_size, time.perf_counter() - start)
        model, meta = load_model(ckpt)
        temperature = temperature_of(meta)
        size = section(meta["config"], LoaderConfig).input_size
        backbone = meta["config"]["model"]["backbone"]

        def torch_run(x: torch.Tensor):
            with torch.inference_mode():
                return torch.softmax(model(x) / temperature, dim=1)[:, 1]

        sessions = {name: session(tmp / f"{opset or 'default'}.onnx", args.threads) for name, opset in EXPORTS}
        runners = {"torch eager": lambda x: torch_run(x).numpy()}
        for name, sess in sessions.items():
            runners[name] = lambda x, s=sess: s.run(["prob_abnormal"], {"image": x.numpy()})[0]

        gen = torch.Generator().manual_seed(0)
        inputs = {b: torch.randint(0, 256, (b, 1, size, size), dtype=torch.uint8, generator=gen) for b in args.batches}
        parity = {}
        for b, x in inputs.items():  # warm-up (allocations, onnxruntime's first-run planning) and parity
            ref = runners["torch eager"](x)
            for name, run in runners.items():
                for _ in range(2):
                    p = run(x)
                parity[name] = max(parity.get(name, 0.0), float(np.abs(p - ref).max()))

        load_before = os.getloadavg()
        rates: dict[tuple[int, str], list[float]] = {(b, n): [] for b in args.batches for n in runners}
        names = list(runners)
        for r in range(args.repeats):
            order = names[r % len(names):] + names[: r % len(names)]  # rotate: no runtime always first
            for b, x in inputs.items():
                calls = max(1, args.images // b)
                for name in order:
                    rates[(b, name)].append(calls * b / timed(lambda: runners[name](x), calls))
        load_after = os.getloadavg()

    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs ({len(os.sched_getaffinity(0))} usable), "
          f"torch threads {torch.get_num_threads()}, onnxruntime intra-op threads {args.threads}; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after the timed part")
    import onnxruntime

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, python {platform.python_version()}; "
          f"model {backbone}, input uint8 N x 1 x {size} x {size}, T = {temperature:g}")
    print(f"{args.repeats} repeats interleaved, {args.images} images per measurement, 2 warm-up calls each")
    for name, (nbytes, seconds) in exports.items():
        print(f"export {name}: {seconds:.1f} s once, {nbytes / 1e6:.1f} MB; "
              f"max |p - p_torch| {parity[name]:.1e}")
    print()
    print("| batch | runtime | images/s (median) | min-max | vs torch eager |")
    print("|---:|---|---:|---|---:|")
    for b in args.batches:
        base = rates[(b, "torch eager")]
        for name in names:
            v = rates[(b, name)]
            ratio = statistics.median(a / t for a, t in zip(v, base))  # per repeat: side by side
            print(f"| {b} | {name} | {statistics.median(v):.1f} | {min(v):.1f}-{max(v):.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
