"""Per-image cost of the augmentation on a uint8 tensor vs. the same v2 ops on a PIL image (1 thread).

    .venv/bin/python bench/bench_transforms.py

Why transforms.py hands PIL images to torchvision's v2 ops (docs/data.md): v2's RandomAffine on
a uint8 tensor goes through float grid_sample; on a PIL image it uses PIL's C affine.
"""
from __future__ import annotations

import time

import torch
from PIL import Image
from torchvision.transforms import v2

from cxr_dist.data.transforms import train_transform


def ms_per_call(f, x, n: int = 200) -> float:
    f(x)
    start = time.perf_counter()
    for _ in range(n):
        f(x)
    return (time.perf_counter() - start) / n * 1e3


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tensor = torch.randint(0, 255, (1, 256, 256), dtype=torch.uint8)
    pil = Image.fromarray(tensor[0].numpy())
    affine = v2.RandomAffine(degrees=7, translate=(0.05, 0.05), scale=(0.9, 1.1), fill=0)
    jitter = v2.ColorJitter(brightness=0.2, contrast=0.2)
    resize = v2.Resize((240, 240), antialias=True)
    rows = [
        ("train_transform(240), whole", ms_per_call(train_transform(240), tensor), ms_per_call(train_transform(240), pil)),
        ("Resize 256 -> 240", ms_per_call(resize, tensor), ms_per_call(resize, pil)),
        ("RandomAffine", ms_per_call(affine, resize(tensor)), ms_per_call(affine, resize(pil))),
        ("ColorJitter", ms_per_call(jitter, resize(tensor)), ms_per_call(jitter, resize(pil))),
    ]
    print("| op (256 px grayscale in) | uint8 tensor ms | PIL image ms | ratio |")
    print("|---|---:|---:|---:|")
    for name, t, p in rows:
        print(f"| {name} | {t:.2f} | {p:.2f} | {t / p:.1f}x |")


if __name__ == "__main__":
    main()
