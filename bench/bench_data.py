"""Throughput of the training stream vs. a plain one-file-at-a-time map Dataset.

    .venv/bin/python bench/bench_data.py [--data DIR] [--images 1536] [--workers 2] [--kaggle-size 192]

Measures images/s (and per DataLoader worker) of
  1. cxr-dist's train stream: WebDataset shards (256 px JPEG) -> decode -> pad/resize -> augment;
  2. a torchvision-style map Dataset over the same images as files: PIL open, RGB, Resize(S), ToTensor
     (what the original experiment did), on the shared 256 px JPEGs;
  3. the same map Dataset on Kaggle-size inputs (--kaggle-size N images upscaled to ~2000 px
     RGB PNGs in a temp folder, as the original experiment read full-size PNGs), and the
     one-time cost of `prepare` on those PNGs.
Timing starts after the first batch, so worker start-up is excluded on both sides.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from cxr_dist.config import DataConfig, LoaderConfig, replace
from cxr_dist.data.index import load_index
from cxr_dist.data.sources.iu import build_manifest
from cxr_dist.data.shards import encode_all, write_shards
from cxr_dist.data.stream import train_loader

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/iu_xray_small"


class FileDataset(Dataset):
    """The baseline: one image file per item, PIL decode, resize, ToTensor."""

    def __init__(self, paths: list[str], size: int) -> None:
        self.paths = paths
        self.tf = T.Compose([T.Resize((size, size)), T.ToTensor()])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as im:
            return self.tf(im.convert("RGB")), 0


def _rate(batches, n_images: int) -> tuple[int, float]:
    """Images and seconds after the first batch, up to n_images."""
    it = iter(batches)
    first = next(it)
    seen = len(first["key"]) if isinstance(first, dict) else len(first[0])
    start = time.perf_counter()
    n = 0
    for b in it:
        n += len(b["key"]) if isinstance(b, dict) else len(b[0])
        if seen + n >= n_images:
            break
    return n, time.perf_counter() - start


def _make_kaggle_size(paths: list[str], out: Path, side: int, workers: int) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(p, str(out / (Path(p).stem + ".png")), side) for p in paths]
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(_upscale, jobs)


def _upscale(job: tuple[str, str, int]) -> str:
    src, dst, side = job
    rng = np.random.default_rng(abs(hash(src)) % 2**32)
    with Image.open(src) as im:
        # ~2000 px portrait like the Kaggle PNGs; mild noise so PNG compression is not unrealistically easy
        big = np.asarray(im.convert("L").resize((int(side * 0.85), side), Image.Resampling.BICUBIC), dtype=np.float32)
    big = np.clip(big + rng.normal(0, 2.0, big.shape), 0, 255).astype(np.uint8)
    Image.fromarray(np.stack([big] * 3, -1)).save(dst)  # Kaggle PNGs are RGB with R = G = B
    return dst


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
    try:
        return _run(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # shards and Kaggle-size PNGs: ~2 GB


def _run(tmp: Path) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("CXR_SHARED_DATA", str(DEFAULT_DATA)))
    ap.add_argument("--shards", default="", help="existing shards folder (default: prepare into a temp folder)")
    ap.add_argument("--images", type=int, default=1536, help="images to time per loader")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--input-size", type=int, default=240)
    ap.add_argument("--kaggle-size", type=int, default=192, help="images upscaled to ~2000 px PNG (0: skip)")
    ap.add_argument("--kaggle-side", type=int, default=2048)
    args = ap.parse_args()
    torch.set_num_threads(1)  # like a DataLoader worker; the main process only collects batches

    load0 = os.getloadavg()[0]  # other jobs on the machine skew the numbers: print the load with them
    shards = args.shards or str(tmp / "shards")
    cfg = LoaderConfig(input_size=args.input_size, batch_size=args.batch_size, num_workers=args.workers)
    if not args.shards:
        write_shards(DataConfig(data_dir=args.data, shards_dir=shards, prepare_workers=2), shards)
    index = load_index(shards)
    df, _ = build_manifest(args.data, "drop")
    rows = []

    loader, _ = train_loader(cfg, ["train"], rank=0, world=1, seed=0, index=index)
    n, s = _rate(loader, args.images)
    rows.append(("stream: shards 256px JPEG, decode+pad+resize+augment", n, s))
    loader, _ = train_loader(replace(cfg, augment=False), ["train"], rank=0, world=1, seed=0, index=index)
    n, s = _rate(loader, args.images)
    rows.append(("stream, augment=false: decode+pad+resize", n, s))

    paths = df["path"].sample(frac=1.0, random_state=0).tolist()
    base = DataLoader(FileDataset(paths, args.input_size), batch_size=args.batch_size, shuffle=False,
                      num_workers=args.workers)
    n, s = _rate(base, args.images)
    rows.append(("map Dataset: 256px JPEG files, PIL+Resize+ToTensor", n, s))

    if args.kaggle_size:
        t0 = time.perf_counter()
        big = _make_kaggle_size(paths[: args.kaggle_size], tmp / "kaggle", args.kaggle_side, 2)
        print(f"(made {len(big)} Kaggle-size PNGs in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        base = DataLoader(FileDataset(big, args.input_size), batch_size=args.batch_size, num_workers=args.workers)
        n, s = _rate(base, len(big))  # all but the first batch
        rows.append((f"map Dataset: {args.kaggle_side}px PNG files (Kaggle-size), same", n, s))
        t0 = time.perf_counter()
        encode_all(big, DataConfig(image_size=256, prepare_workers=2))
        rows.append((f"prepare (one-time): {args.kaggle_side}px PNG -> 256px JPEG, 2 procs", len(big),
                     time.perf_counter() - t0))

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"load average before/after: {load0:.2f}/{os.getloadavg()[0]:.2f}; "
          f"batch {args.batch_size}, input {args.input_size}px, {args.workers} DataLoader workers\n")
    print(f"| {'loader':<58} | images | seconds | images/s | per worker |")
    print(f"| {'-' * 58} | -----: | ------: | -------: | ---------: |")
    for name, n, s in rows:
        per = n / s / (2 if name.startswith("prepare") else max(1, args.workers))
        print(f"| {name:<58} | {n:>6} | {s:>7.2f} | {n / s:>8.1f} | {per:>10.1f} |")
    stream = rows[0][1] / rows[0][2]
    print()
    for name, n, s in rows[2:]:
        if name.startswith("map") and n:
            print(f"stream / {name.split(':')[1].split(',')[0].strip()}: {stream / (n / s):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
