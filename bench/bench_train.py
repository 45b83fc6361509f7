"""Training-step throughput: phase 1 vs phase 2, 1 vs 2 processes, fp32 vs bf16, and the cache.

    .venv/bin/python bench/bench_train.py [--input-size 240] [--batch-size 32] [--steps 4]

Each setting is a real `accelerate launch` of bench/step_worker.py (DDP over gloo on the CPU)
that times `--steps` optimizer steps on random uint8 images after one warm-up step, in the
normal mode (frozen part recomputed every step) and on cached frozen features (what
`train.cache_views` trains on). Prints a table of images/s (all processes together) and ratios.
All settings run in one invocation so that the ratios compare like with like.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(procs: int, precision: str, phase: int, cached: bool, args) -> float:
    launch = ["--cpu"] if procs == 1 else ["--multi_gpu"]
    cmd = [str(BIN / "accelerate"), "launch", *launch, "--num_processes", str(procs), "--num_machines", "1",
           "--mixed_precision", precision, "--dynamo_backend", "no", str(ROOT / "bench" / "step_worker.py"),
           "--phase", str(phase), "--input-size", str(args.input_size), "--batch-size", str(args.batch_size),
           "--steps", str(args.steps), *(["--cached"] if cached else [])]
    # Two cores: one process gets both as threads, two processes one each.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // procs))}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-4000:])
    return json.loads(lines[-1])["images_per_s"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input-size", type=int, default=240)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    rows = []
    for phase, procs, precision in itertools.product((1, 2), (1, 2), ("no", "bf16")):
        ips = run(procs, precision, phase, False, args)
        cached = run(procs, precision, phase, True, args) if precision == "no" else float("nan")
        rows.append((phase, procs, precision, ips, cached))
        print(f"phase {phase}  procs {procs}  {precision:>4}  {ips:8.1f} img/s  cached {cached:8.1f} img/s", flush=True)
    base = {(p, pr): ips for p, n, pr, ips, _ in rows if n == 1}
    print(f"\ninput {args.input_size} px, batch {args.batch_size}/process, {os.cpu_count()} cores")
    print("| phase | processes | precision | images/s | vs 1 process | cached images/s | cached speed-up |")
    print("|---|---|---|---|---|---|---|")
    for phase, procs, precision, ips, cached in rows:
        speed = f"{cached / ips:.0f}x" if cached == cached else "-"
        print(f"| {phase} | {procs} | {precision} | {ips:.1f} | {ips / base[(phase, precision)]:.2f}x | "
              f"{cached:.1f} | {speed} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
