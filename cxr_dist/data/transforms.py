"""Image transforms (torchvision.transforms.v2): grayscale PIL image (or uint8 1 x H x W tensor)
in, uint8 1 x S x S tensor out.

Both pad to a square first (black borders, aspect ratio kept: a squashed chest changes the
apparent heart size, which is itself a finding). The stream hands them PIL images: PIL's C
affine on an 8-bit image is ~9x faster than the same v2 op on a tensor (which goes through
float grid_sample), the whole train transform ~2.4x (bench/bench_transforms.py, docs/data.md).
Normalisation to the backbone's mean/std is the model's job, not the data pipeline's.
device_input.py does the same on batches of tensors on the training device (loader.decode_on),
with the ranges below.
"""
from __future__ import annotations

import math
import random

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


# The augmentation's ranges, shared with device_input.py (so both draw from the same distributions).
DEGREES, TRANSLATE, SCALE = 7.0, 0.05, (0.9, 1.1)  # affine: rotation, shift (share of the side), zoom
BRIGHTNESS, CONTRAST, SHIFT_CONTRAST = 0.2, 0.2, 0.4  # factors in [1 - x, 1 + x]
CROP_SCALE, CROP_RATIO = (0.75, 1.0), (0.9, 1.1)  # shift: crop area and aspect ratio
GAMMA = (0.7, 1.5)  # shift: log-uniform
BLUR_P, BLUR_SIGMA = 0.3, (0.3, 1.5)  # shift: probability, sigma in pixels
NOISE_P, NOISE_STD = 0.3, (2.0, 8.0)  # shift: probability, std in grey levels


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


def _uniform(low: float, high: float) -> float:
    """One draw from torch's global RNG, which the stream seeds and swaps per sample."""
    return float(torch.empty(1).uniform_(low, high))


class RandomGamma(torch.nn.Module):
    """x -> 255 * (x / 255) ** gamma with log(gamma) uniform in [log low, log high]: detectors
    and their look-up tables differ in how they map dose to grey level, not only in a linear gain.
    Log-uniform, so that brightening (gamma < 1) and darkening are drawn about equally often."""

    def __init__(self, low: float, high: float) -> None:
        super().__init__()
        self.log_low, self.log_high = math.log(low), math.log(high)

    def forward(self, img: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        gamma = math.exp(_uniform(self.log_low, self.log_high))
        if isinstance(img, Image.Image):
            # One 256-entry table: PIL's point() costs a look-up per pixel (torchvision's PIL
            # adjust_gamma converts to RGB and back).
            return img.point([round(255 * (v / 255) ** gamma) for v in range(256)])
        return F.adjust_gamma(img, gamma)


class RandomBlur(torch.nn.Module):
    """With probability p, a Gaussian blur of sigma uniform in `sigma` (pixels): films differ in
    sharpness (detector, scatter grid, processing, how often they were resized before us)."""

    def __init__(self, p: float, sigma: tuple[float, float]) -> None:
        super().__init__()
        self.p, self.sigma = p, sigma

    def forward(self, img: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        if float(torch.rand(1)) >= self.p:
            return img
        sigma = _uniform(*self.sigma)
        if isinstance(img, Image.Image):
            return img.filter(ImageFilter.GaussianBlur(sigma))  # PIL's C blur: no tensor round trip
        return F.gaussian_blur(img, [2 * math.ceil(3 * sigma) + 1] * 2, [sigma, sigma])


class RandomNoise(torch.nn.Module):
    """With probability p, additive Gaussian noise of std uniform in `std` grey levels on a uint8
    tensor (rounded, clipped): quantum noise differs with dose and detector. Last in the chain, on
    the tensor, because PIL has no noise op and any later resampling would smooth it away."""

    def __init__(self, p: float, std: tuple[float, float]) -> None:
        super().__init__()
        self.p, self.std = p, std

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if float(torch.rand(1)) >= self.p:
            return img
        noisy = img.float() + torch.randn(img.shape) * _uniform(*self.std)
        return noisy.round_().clamp_(0, 255).to(torch.uint8)


def train_transform(input_size: int, shift: bool = False) -> v2.Compose:
    """eval_transform plus mild augmentation that keeps a chest X-ray plausible.

    Small rotation (+-7 deg), shift (5%) and zoom (0.9-1.1): patient positioning varies that much.
    Brightness/contrast +-20%: exposure and processing differ between machines.
    No horizontal flip: left and right are not interchangeable on a chest radiograph (the heart
    sits on the left; a mirrored image looks like dextrocardia, itself an abnormal finding, and
    mirrors the side markers). No vertical flip or large rotations for the same reason.

    shift=True (loader.shift_augment) adds what differs between hospitals rather than between
    patients, still a plausible film and still no flips: a random crop of 75-100% of the padded
    square's area (aspect 0.9-1.1; collimation and field of view differ), gamma 0.7-1.5 (the
    detector's grey-level curve), contrast +-40% instead of +-20%, a Gaussian blur in 30% of the
    images (sigma 0.3-1.5 px: sharpness) and Gaussian noise in 30% (std 2-8 grey levels: dose,
    detector). All but the noise run on the PIL image (the module docstring says why).
    shift=False gives exactly the transform, and the RNG draws, of the runs made before it existed.
    """
    # Resize (shift: crop and resize) before the affine: the affine then works on input_size
    # pixels, not image_size.
    resize = (v2.RandomResizedCrop(input_size, scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True) if shift
              else v2.Resize((input_size, input_size), antialias=True))
    return v2.Compose([
        PadToSquare(),
        resize,
        v2.RandomAffine(degrees=DEGREES, translate=(TRANSLATE, TRANSLATE), scale=SCALE, fill=0),
        *([RandomGamma(*GAMMA)] if shift else []),
        v2.ColorJitter(brightness=BRIGHTNESS, contrast=SHIFT_CONTRAST if shift else CONTRAST),
        *([RandomBlur(BLUR_P, BLUR_SIGMA)] if shift else []),
        v2.PILToTensor(),  # PIL -> uint8 1 x S x S (a tensor input passes through)
        *([RandomNoise(NOISE_P, NOISE_STD)] if shift else []),
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
