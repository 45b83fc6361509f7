"""The frozen forward on the CPU: each `model.frozen_backend` against plain eager fp32 timm.

    .venv/bin/python bench/bench_frozen.py                       # depth 1 (the default job's cache)
    .venv/bin/python bench/bench_frozen.py --depth 0 --compile   # phase-1 split; + torch.compile

EfficientNet-Lite1 (offline weights), the frozen part at `--depth` (`CXRClassifier.frozen_forward`),
on the same real images (the first `--images` of a shard split, `--input-size` px) for every
setting. Every backend is built first (export/quantization time printed: the one-time cost, from
an empty work dir), then the settings are timed **interleaved**: each repeat runs every setting
once over all the images, so load from other users of a shared machine hits all of them alike;
medians and min-max over the repeats. GFLOP/s from FLOPs counted on the eager model
(torch.utils.flop_counter: 2 per multiply-add); % of peak against threads x FLOP/cycle x clock,
the fp32 FMA peak (`--flop-per-cycle`, default 32: two 256-bit FMA pipes; int8 VNNI has 4x that).

The last line is `speedup X.XX`: `--fast` (the project's fast path) over eager.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cxr_dist.config import FROZEN_BACKENDS, LoaderConfig, ModelConfig
from cxr_dist.data.index import load_index
from cxr_dist.model.frozen_runtime import FrozenPart, build_runner, calibration_batches
from cxr_dist.model.classifier import build_model
from cxr_dist.data.stream import eval_loader


def clock_ghz() -> float:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) / 1000
    except OSError:
        pass
    return float("nan")


def flops_per_image(model, depth: int, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    part = FrozenPart(model, depth).eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        part(torch.zeros(1, 3, size, size))
    return fc.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="out/sources/shards/iu_kermany_ext")
    ap.add_argument("--split", default="val", help="images timed (int8 calibrates on 'train')")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--input-size", type=int, default=240)
    ap.add_argument("--depth", type=int, default=1, help="frozen part's split (the default job caches at 1)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backends", default=",".join(b for b in FROZEN_BACKENDS if b != "eager"))
    ap.add_argument("--compile", action="store_true", help="also torch.compile (inductor) of the eager part")
    ap.add_argument("--fast", default="openvino", help="the backend the final speedup line reports")
    ap.add_argument("--flop-per-cycle", type=float, default=32.0)
    ap.add_argument("--threads", type=int, default=0, help="0: torch's default")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    data = LoaderConfig(input_size=args.input_size, batch_size=args.batch_size, num_workers=0)
    index = load_index(args.shards)
    batches, n = [], 0
    for b in eval_loader(data, args.split, 0, 1, index):
        batches.append(b["image"])
        n += len(b["image"])
        if n >= args.images:
            break
    images = torch.cat(batches)[: args.images]
    batches = list(images.split(args.batch_size))

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="tf_efficientnet_lite1", weights="lite1-package")).eval()
    model.set_phase(args.depth)
    gflop = flops_per_image(model, args.depth, args.input_size) / 1e9
    ghz = clock_ghz()
    peak = threads * args.flop_per_cycle * ghz
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} threads, "
          f"{ghz:.2f} GHz, fp32 peak {peak:.0f} GFLOP/s ({args.flop_per_cycle:.0f} FLOP/cycle/core); "
          f"torch {torch.__version__}")
    print(f"frozen part: tf_efficientnet_lite1 depth {args.depth}, {args.input_size} px, {gflop:.3f} GFLOP/image; "
          f"{len(images)} {args.split} images of {args.shards}, batch {args.batch_size}")

    runs = {"eager": model.frozen_forward}
    ref = torch.cat([model.frozen_forward(b) for b in batches])
    work = Path(tempfile.mkdtemp(prefix="bench-frozen-"))
    calib = None
    for backend in [b for b in args.backends.split(",") if b]:
        if backend == "int8":
            calib = calibration_batches(data, "train", index, 128)
        t0 = time.time()
        runner = build_runner(model, backend, args.depth, args.input_size, work, calibration=calib)
        first = time.time() - t0
        t0 = time.time()
        runner = build_runner(model, backend, args.depth, args.input_size, work, calibration=calib)
        again = time.time() - t0
        runs[backend] = runner
        out = torch.cat([runner(b) for b in batches])
        cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min().item()
        print(f"  {backend:14s} build {first:6.1f} s (export/quantize + load), {again:5.1f} s from the kept "
              f"export; max |diff| {(out - ref).abs().max().item():.2e}, min cosine {cos:.6f}")
    if args.compile:
        part = FrozenPart(model, args.depth).eval()
        compiled = torch.compile(part)
        t0 = time.time()
        with torch.no_grad():
            out = torch.cat([compiled(model.normalize(b)) for b in batches])  # the last batch may recompile
        print(f"  {'torch.compile':14s} build {time.time() - t0:6.1f} s (first pass, compiling); "
              f"max |diff| {(out - ref).abs().max().item():.2e}")
        runs["torch.compile"] = lambda x: compiled(model.normalize(x))

    times = {k: [] for k in runs}
    with torch.no_grad():
        for name, run in runs.items():  # warm-up: one batch each
            run(batches[0])
        for _ in range(args.repeats):
            for name, run in runs.items():
                t0 = time.perf_counter()
                for b in batches:
                    run(b)
                times[name].append(len(images) / (time.perf_counter() - t0))

    def ratio(name: str) -> float:  # per repeat, then the median: both sides saw the same load
        return statistics.median(r / e for r, e in zip(times[name], times["eager"]))
    print(f"\n{'setting':14s} {'images/s':>9s} {'(min-max)':>15s} {'GFLOP/s':>8s} {'% peak':>7s} {'vs eager':>8s}")
    for name, rates in times.items():
        med = statistics.median(rates)
        print(f"{name:14s} {med:9.1f} {f'({min(rates):.1f}-{max(rates):.1f})':>15s} {med * gflop:8.1f} "
              f"{100 * med * gflop / peak:6.1f}% {ratio(name):7.2f}x")
    print(f"speedup {ratio(args.fast):.2f}")


if __name__ == "__main__":
    main()
