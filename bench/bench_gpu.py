"""Training-step throughput on one CUDA GPU: phase 1 vs phase 2 depths, fp32 vs bf16, normal vs cached.

    python bench/bench_gpu.py [--batch-size 32] [--steps 50] [--input-size 240]

The GPU counterpart of bench/bench_train.py (which launches CPU processes). One process, so
that all settings share one warm GPU and the ratios compare like with like: each setting times
`--steps` optimizer steps of the real model (tf_efficientnet_lite1 + MLP head, random weights)
on uint8 images already on the GPU, after 5 warm-up steps, between torch.cuda.synchronize()
calls. bf16 is torch.autocast(bfloat16), what Accelerate's `mixed_precision="bf16"` wraps the
forward in. Data loading is not timed here: the per-epoch images/s of a real run
(history.json) includes it.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import time

import torch
from torch import nn

from cxr_dist.config import ModelConfig, PhaseConfig
from cxr_dist.model.classifier import build_model, count_trainable, param_groups

DEPTHS = {"1 (head)": 0, "2 (1 block)": 1, "2 (6 blocks)": 6, "2 (16 blocks)": 16}


def images_per_s(depth: int, bf16: bool, cached: bool, args) -> tuple[float, int]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="tf_efficientnet_lite1", pretrained=False)).cuda()
    phase = PhaseConfig(epochs=1, unfreeze_blocks=depth)
    model.set_phase(depth)
    model.train()
    optimizer = torch.optim.Adam(param_groups(model, phase))
    x = torch.randint(0, 255, (args.batch_size, 1, args.input_size, args.input_size), dtype=torch.uint8).cuda()
    y = torch.randint(0, 2, (args.batch_size,)).cuda()
    if cached:
        x = model.frozen_forward(x).half()  # what the cache stores
    loss_fn = nn.CrossEntropyLoss()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            loss = loss_fn(model(x, cached=cached).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    return args.steps * args.batch_size / (time.perf_counter() - t0), count_trainable(model)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--input-size", type=int, default=240)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device (use bench/bench_train.py on the CPU)", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch_size}, "
          f"input {args.input_size} px, {args.steps} timed steps per setting")
    print("| phase (unfrozen) | trainable | precision | images/s | bf16 vs fp32 | cached images/s | cached speed-up |")
    print("|---|---|---|---|---|---|---|")
    fp32 = {}
    for (name, depth), bf16 in itertools.product(DEPTHS.items(), (False, True)):
        ips, n = images_per_s(depth, bf16, False, args)
        cached, _ = images_per_s(depth, bf16, True, args)
        fp32.setdefault(name, ips)
        print(f"| {name} | {n:,} | {'bf16' if bf16 else 'fp32'} | {ips:,.0f} | {ips / fp32[name]:.2f}x | "
              f"{cached:,.0f} | {cached / ips:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
