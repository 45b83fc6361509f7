"""One setting of bench/bench_train.py, run under `accelerate launch`; prints JSON on rank 0."""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from cxr_dist import dist
from cxr_dist.config import LoaderConfig, ModelConfig, OptimizerConfig, PhaseConfig, TrainConfig
from cxr_dist.model.classifier import build_model, param_groups


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", type=int, choices=(1, 2), default=1)
    ap.add_argument("--input-size", type=int, default=240)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cached", action="store_true", help="train on precomputed frozen features")
    args = ap.parse_args()

    accelerator = dist.make_accelerator(TrainConfig(), OptimizerConfig(), LoaderConfig(batch_size=args.batch_size))
    torch.manual_seed(0)
    raw = build_model(ModelConfig(backbone="tf_efficientnet_lite1", pretrained=False))
    phase = PhaseConfig(epochs=1, unfreeze_blocks=args.phase - 1)
    raw.set_phase(phase.unfreeze_blocks)
    optimizer = torch.optim.Adam(param_groups(raw, phase))
    model, optimizer = accelerator.prepare(raw, optimizer)
    x = torch.randint(0, 255, (args.batch_size, 1, args.input_size, args.input_size), dtype=torch.uint8)
    y = torch.randint(0, 2, (args.batch_size,))
    if args.cached:
        x = raw.frozen_forward(x).half()  # what the cache stores
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        with accelerator.autocast():
            loss = loss_fn(model(x, cached=args.cached).float(), y)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    steps = args.steps * (20 if args.cached else 1)  # cached steps are fast: time more of them
    step()  # warm-up
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dist.barrier()
    seconds = time.perf_counter() - t0
    if accelerator.is_main_process:
        ips = steps * args.batch_size * accelerator.num_processes / seconds
        print(json.dumps({"images_per_s": ips, "processes": accelerator.num_processes,
                          "precision": accelerator.mixed_precision, "phase": args.phase, "cached": args.cached}))


if __name__ == "__main__":
    main()
