"""Image transforms (torchvision.transforms.v2): grayscale PIL image (or uint8 1 x H x W tensor)
in, uint8 1 x S x S tensor out.

Both pad to a square first (black borders, aspect ratio kept: a squashed chest changes the
apparent heart size, which is itself a finding). The stream hands them PIL images: PIL's C
affine on an 8-bit image is ~9x faster than the same v2 op on a tensor (which goes through
float grid_sample), the whole train transform ~2.4x (bench/bench_transforms.py, docs/data.md).
Normalisation to the backbone's mean/std is the model's job, not the data pipeline's.
"""
from __future__ import annotations

import random

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


class PadToSquare(torch.nn.Module):
    """Pad the shorter side symmetrically with zeros so that H == W (aspect ratio kept)."""

    def forward(self, img: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        w, h = img.size if isinstance(img, Image.Image) else img.shape[-1:-3:-1]
        if h == w:
            return img
        d = abs(h - w)
        a, b = d // 2, d - d // 2
        # v2 padding order: left, top, right, bottom
        pad = [a, 0, b, 0] if h > w else [0, a, 0, b]
        return F.pad(img, pad, fill=0)


def eval_transform(input_size: int) -> v2.Compose:
    """Deterministic: pad to square, resize to input_size x input_size (antialiased)."""
    return v2.Compose([PadToSquare(), v2.Resize((input_size, input_size), antialias=True), v2.PILToTensor()])


def train_transform(input_size: int) -> v2.Compose:
    """eval_transform plus mild augmentation that keeps a chest X-ray plausible.

    Small rotation (+-7 deg), shift (5%) and zoom (0.9-1.1): patient positioning varies that much.
    Brightness/contrast +-20%: exposure and processing differ between machines.
    No horizontal flip: left and right are not interchangeable on a chest radiograph (the heart
    sits on the left; a mirrored image looks like dextrocardia, itself an abnormal finding, and
    mirrors the side markers). No vertical flip or large rotations for the same reason.
    """
    return v2.Compose([
        PadToSquare(),
        # Resize before the affine: the affine then works on input_size pixels, not image_size.
        v2.Resize((input_size, input_size), antialias=True),
        v2.RandomAffine(degrees=7, translate=(0.05, 0.05), scale=(0.9, 1.1), fill=0),
        v2.ColorJitter(brightness=0.2, contrast=0.2),
        v2.PILToTensor(),  # PIL -> uint8 1 x S x S (a tensor input passes through)
    ])


def view_seed(seed: int, view: int, key: str) -> int:
    """The RNG seed of augmented view `view` of the image `key` (test-time augmentation): a view
    depends on nothing else, so it is the same on any number of processes and workers, and
    `cxr-dist predict` draws the same views of a file as `evaluate` does of its shard sample."""
    return random.Random(f"view-{seed}-{view}-{key}").getrandbits(63)


def seeded_transform(transform: v2.Compose, img: Image.Image, seed: int) -> torch.Tensor:
    """transform(img) with torch's CPU RNG seeded by `seed`; the caller's RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(torch.Generator().manual_seed(seed).get_state())
        return transform(img)
