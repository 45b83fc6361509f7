"""Decode and augment batches on the training device (`loader.decode_on`): the GPU input pipeline.

With the PIL path (transforms.py in the DataLoader workers) a phase-1 epoch on a GPU runs at the
pace of the workers, not of the GPU (docs/performance.md, section 5). Here the workers only read
the tars and hand over each batch's JPEG bytes (``pack_jpegs``: one flat uint8 tensor and the
lengths, so a batch crosses the worker queue as one shared-memory block, not 32); the main
process decodes them with ``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG's batched
decode on a GPU, libjpeg-turbo on the CPU), letterboxes and resizes them as batches of tensors,
and applies the training augmentation as batched tensor ops. The same code runs on the CPU, where
the tests check it against the PIL path.

What is the same as transforms.py, and what is not:
- Eval (no augmentation): pad to a square (black, centred), antialiased bilinear resize, pixel
  for pixel as the workers path on the CPU: decode_jpeg's libjpeg-turbo decode equals PIL's, and
  ``pillow_resize`` is Pillow's fixed-point resampling as two exact float64 matrix products
  (torchvision's tensor resize differs from Pillow's by up to 2 grey levels). On a GPU, nvJPEG's
  IDCT may differ from libjpeg's by a level here and there (bench/bench_gpu_pipeline.py
  measures it). One exception: when the stored image is >= 2x input_size, the workers path lets
  libjpeg decode at 1/2, 1/4 scale (`preprocess.decode_film`'s draft) and decode_jpeg cannot,
  so pixels differ more there (never with the shipped configs: 256 -> 240, 48 -> 32).
- Training: the same operations in the same order with the same parameter distributions
  (v2.RandomAffine's angle, integer translation, scale and nearest interpolation; ColorJitter's
  brightness/contrast factors in random order; with shift: RandomResizedCrop, gamma, blur,
  noise), drawn per sample. Computed in float and rounded once at the end, where PIL rounds after
  every step; the Gaussian blur is exact where PIL's is a box approximation.
- Random numbers: every parameter is drawn from a CPU ``torch.Generator`` seeded by
  (seed, epoch, rank, step) (``batch_seed``), so the parameters do not depend on the device and a
  resumed epoch replays its batches exactly; the noise pixels come from a generator on the device
  seeded from the same draw. Ranks differ by construction; torch's global RNG is never touched.
"""
from __future__ import annotations

import contextlib
import math
import queue
import random
import threading
import warnings
from typing import Iterable, Iterator

import torch
import torch.nn.functional as nnf

from ..config import LoaderConfig
from ..errors import DataError
from .transforms import (BLUR_P, BLUR_SIGMA, BRIGHTNESS, CONTRAST, CROP_RATIO, CROP_SCALE, DEGREES, GAMMA,
                         NOISE_P, NOISE_STD, SCALE, SHIFT_CONTRAST, TRANSLATE)

Params = dict[str, torch.Tensor]

CROP_TRIES = 10  # v2.RandomResizedCrop's attempts at a box that fits
_BLUR_RADIUS = math.ceil(3 * BLUR_SIGMA[1])  # F.gaussian_blur's kernel half-size at the largest sigma


def decode_where(loader: LoaderConfig, device: torch.device | str) -> str:
    """Where training images are decoded: "workers" or "device" (`loader.decode_on`; "auto" is
    "device" when the training device is a GPU, else "workers": on a CPU the main process would
    decode alone what the workers decode in parallel)."""
    if loader.decode_on != "auto":
        return loader.decode_on
    return "device" if torch.device(device).type == "cuda" else "workers"


def pack_jpegs(blobs: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's JPEG files -> (flat uint8 tensor, int64 lengths): what a worker yields."""
    data = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
    return data, torch.tensor([len(b) for b in blobs], dtype=torch.int64)


def decode_jpegs(data: torch.Tensor, sizes: torch.Tensor, device: torch.device | str) -> list[torch.Tensor]:
    """(flat bytes, lengths) -> list of 1 x H x W uint8 images on `device` (batched on a GPU)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    blobs = list(torch.split(data, sizes.tolist()))
    with warnings.catch_warnings():
        # torchvision 0.29 (pinned) warns on every call that its decoders move to TorchCodec; it
        # still ships nvJPEG's batched decode, which is what this module is for.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return decode_jpeg(blobs, mode=ImageReadMode.GRAY, device=device)
        except RuntimeError as e:
            raise DataError(f"could not decode a JPEG of the batch on {device}: {e}") from e


def letterbox(images: list[torch.Tensor], input_size: int, crops: torch.Tensor | None = None) -> torch.Tensor:
    """transforms.eval_transform on tensors: each image padded to a square (centred, black) and
    resized to input_size (Pillow's antialiased bilinear) -> B x 1 x S x S uint8. Images of the same padded side
    are resized as one batch (in letterboxed shards usually all of them: one resize call).
    `crops` (shift augmentation, from `draw_params`): a random crop of each padded square first,
    as v2.RandomResizedCrop, one image at a time."""
    n = len(images)
    device = images[0].device
    out = torch.empty((n, 1, input_size, input_size), dtype=torch.uint8, device=device)
    groups: dict[int, list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(max(img.shape[-2:]), []).append(i)
    for side, idx in groups.items():
        canvas = torch.zeros((len(idx), 1, side, side), dtype=torch.uint8, device=device)
        for j, i in enumerate(idx):
            h, w = images[i].shape[-2:]
            top, left = (side - h) // 2, (side - w) // 2  # PadToSquare: the extra pixel goes after
            canvas[j, :, top:top + h, left:left + w] = images[i]
        if crops is None:
            out[idx] = pillow_resize(canvas, input_size)
            continue
        for j, i in enumerate(idx):
            t, l, h, w = _crop_box(side, crops[i])
            out[i] = pillow_resize(canvas[j:j + 1, :, t:t + h, l:l + w], input_size)[0]
    return out


_PRECISION_BITS = 22  # Pillow's fixed-point weights for 8-bit images (Resample.c: 32 - 8 - 2)
_weights_cache: dict[tuple[int, int, str], torch.Tensor] = {}


def pillow_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 N x 1 x H x W -> N x 1 x size x size, bit for bit what Pillow's antialiased bilinear
    resize gives (what the workers path runs): Pillow's fixed-point weights, horizontal pass
    first, rounded to 8 bits between the passes. torchvision's tensor resize is off by up to 2
    grey levels in ~6% of pixels. The passes are matrix products in float64, exact because every
    term is an integer below 2**53 (255 * 2**22 per tap), so the GPU gives the same bits."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    rows, cols = _pillow_weights(h, size, x.device), _pillow_weights(w, size, x.device)
    half, unit = float(1 << (_PRECISION_BITS - 1)), float(1 << _PRECISION_BITS)
    y = torch.floor_divide(torch.matmul(x.double(), cols.T) + half, unit).clamp_(0, 255)
    y = torch.floor_divide(torch.matmul(rows, y) + half, unit).clamp_(0, 255)
    return y.to(torch.uint8)


def _pillow_weights(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """Pillow's bilinear resampling weights (Resample.c: precompute_coeffs, then
    normalize_coeffs_8bpc) as an out_size x in_size float64 matrix of integers (scaled 2**22)."""
    key = (in_size, out_size, str(device))
    if key not in _weights_cache:
        m = torch.zeros(out_size, in_size, dtype=torch.float64)
        scale = in_size / out_size
        filterscale = max(scale, 1.0)
        support = 1.0 * filterscale  # the bilinear (triangle) filter's support is 1
        for xx in range(out_size):
            center = (xx + 0.5) * scale
            xmin = max(int(center - support + 0.5), 0)  # int(): C's truncation toward zero
            xmax = min(int(center + support + 0.5), in_size)
            k = [max(0.0, 1.0 - abs((x + xmin - center + 0.5) / filterscale)) for x in range(xmax - xmin)]
            total = sum(k)
            for x, v in enumerate(k):
                v = v / total if total != 0.0 else v
                m[xx, xmin + x] = int(v * (1 << _PRECISION_BITS) + (0.5 if v >= 0 else -0.5))
        _weights_cache[key] = m.to(device)
    return _weights_cache[key]


def _crop_box(side: int, tries: torch.Tensor) -> tuple[int, int, int, int]:
    """v2.RandomResizedCrop's box on a side x side square from pre-drawn tries (area scale, log
    aspect ratio, top and left as uniforms in [0, 1)); the centre crop if no try fits."""
    area = side * side
    for scale, log_ratio, u_top, u_left in tries.tolist():
        ratio = math.exp(log_ratio)
        w = int(round(math.sqrt(area * scale * ratio)))
        h = int(round(math.sqrt(area * scale / ratio)))
        if 0 < w <= side and 0 < h <= side:
            return int(u_top * (side - h + 1)), int(u_left * (side - w + 1)), h, w
    return 0, 0, side, side  # square and ratio range around 1: the whole square, as torchvision's fallback


def batch_seed(seed: int, epoch: int, rank: int, step: int) -> int:
    """The seed of one training batch's augmentation: each rank, epoch and step its own."""
    return random.Random(f"device-aug-{seed}-{epoch}-{rank}-{step}").getrandbits(63)


def draw_params(gen: torch.Generator, n: int, shift: bool) -> Params:
    """Augmentation parameters of n images from a CPU generator (the ranges of train_transform)."""
    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.empty(shape or (n,), dtype=torch.float64).uniform_(low, high, generator=gen)

    p: Params = {
        "angle": uniform(-DEGREES, DEGREES),
        # v2.RandomAffine rounds the translation to whole pixels: a fraction of the side here,
        # turned into pixels (and rounded) once the side is known.
        "translate": uniform(-TRANSLATE, TRANSLATE, n, 2),
        "scale": uniform(*SCALE),
        "brightness": uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS),
        "contrast": uniform(1 - (SHIFT_CONTRAST if shift else CONTRAST), 1 + (SHIFT_CONTRAST if shift else CONTRAST)),
        "brightness_first": uniform(0, 1) < 0.5,  # ColorJitter's random order of its ops
    }
    if shift:
        log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
        p["crop"] = torch.stack([uniform(*CROP_SCALE, n, CROP_TRIES), uniform(*log_ratio, n, CROP_TRIES),
                                 uniform(0, 1, n, CROP_TRIES), uniform(0, 1, n, CROP_TRIES)], dim=-1)
        p["gamma"] = torch.exp(uniform(math.log(GAMMA[0]), math.log(GAMMA[1])))
        p["blur"] = uniform(0, 1) < BLUR_P
        p["sigma"] = uniform(*BLUR_SIGMA)
        p["noise"] = uniform(0, 1) < NOISE_P
        p["noise_std"] = uniform(*NOISE_STD)
        p["noise_seed"] = torch.randint(0, 2**62, (1,), generator=gen)
    return p


def identity_params(n: int, shift: bool) -> Params:
    """Parameters under which `augment` returns its input (and `letterbox` crops nothing)."""
    p: Params = {"angle": torch.zeros(n, dtype=torch.float64), "translate": torch.zeros(n, 2, dtype=torch.float64),
                 "scale": torch.ones(n, dtype=torch.float64), "brightness": torch.ones(n, dtype=torch.float64),
                 "contrast": torch.ones(n, dtype=torch.float64), "brightness_first": torch.ones(n, dtype=torch.bool)}
    if shift:
        crop = torch.zeros(n, CROP_TRIES, 4, dtype=torch.float64)
        crop[:, :, 0] = 1.0  # the whole area, aspect ratio 1
        p.update(crop=crop, gamma=torch.ones(n, dtype=torch.float64), blur=torch.zeros(n, dtype=torch.bool),
                 sigma=torch.ones(n, dtype=torch.float64), noise=torch.zeros(n, dtype=torch.bool),
                 noise_std=torch.zeros(n, dtype=torch.float64), noise_seed=torch.zeros(1, dtype=torch.int64))
    return p


def augment(x: torch.Tensor, p: Params) -> torch.Tensor:
    """The training augmentation of a letterboxed uint8 B x 1 x S x S batch, on its device:
    affine (nearest, black fill), [gamma], brightness/contrast, [blur], [noise]; uint8 out."""
    dev, b, s = x.device, x.shape[0], x.shape[-1]

    def col(name: str) -> torch.Tensor:  # a per-sample parameter shaped to broadcast over images
        return p[name].to(dev, torch.float32).view(b, 1, 1, 1)

    y = _affine(x.float(), p)
    if "gamma" in p:
        y = 255.0 * (y / 255.0).pow(col("gamma"))
    bright, contrast = col("brightness"), col("contrast")

    def adjust_contrast(z: torch.Tensor) -> torch.Tensor:  # blend with the image's mean grey, as ColorJitter
        return (contrast * z + (1 - contrast) * z.mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 255)

    first = p["brightness_first"].to(dev).view(b, 1, 1, 1)
    y = torch.where(first, adjust_contrast((y * bright).clamp(0, 255)), (adjust_contrast(y) * bright).clamp(0, 255))
    if "blur" in p:
        y = torch.where(p["blur"].to(dev).view(b, 1, 1, 1), _blur(y, p["sigma"]), y)
    if "noise" in p:
        gen = torch.Generator(device=dev).manual_seed(int(p["noise_seed"]))
        noise = torch.randn((b, 1, s, s), generator=gen, device=dev)
        y = y + noise * (col("noise_std") * p["noise"].to(dev).view(b, 1, 1, 1))
    return y.round_().clamp_(0, 255).to(torch.uint8)


def _affine(x: torch.Tensor, p: Params) -> torch.Tensor:
    """F.affine's tensor path (centre of rotation at the image centre, angle, whole-pixel
    translation, scale; nearest, zero fill) for a batch with one matrix per image."""
    b, s, dev = x.shape[0], x.shape[-1], x.device
    rot = torch.deg2rad(p["angle"])
    cos, sin = torch.cos(rot) / p["scale"], torch.sin(rot) / p["scale"]
    tx, ty = (p["translate"][:, 0] * s).round(), (p["translate"][:, 1] * s).round()
    # torchvision's inverse matrix (_get_inverse_affine_matrix, no shear, centre 0): output pixel
    # -> input pixel, both in coordinates centred on the image.
    inv = torch.stack([torch.stack([cos, sin, -cos * tx - sin * ty], -1),
                       torch.stack([-sin, cos, sin * tx - cos * ty], -1)], 1)
    # In float32 on the device, as torchvision's _gen_affine_grid (the main process must not
    # spend milliseconds per batch on the CPU building B x S x S grids).
    grid = _base_grid(s, dev) @ inv.to(dev, torch.float32).transpose(1, 2) / (0.5 * s)  # to [-1, 1]
    return nnf.grid_sample(x, grid.view(b, s, s, 2), mode="nearest", padding_mode="zeros", align_corners=False)


_grid_cache: dict[tuple[int, str], torch.Tensor] = {}


def _base_grid(s: int, device: torch.device) -> torch.Tensor:
    """1 x S*S x 3 pixel-centre coordinates (x, y, 1), centred on the image (torchvision's)."""
    key = (s, str(device))
    if key not in _grid_cache:
        coords = torch.linspace(-s * 0.5 + 0.5, s * 0.5 - 0.5, s)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        _grid_cache[key] = torch.stack([xx, yy, torch.ones_like(xx)], -1).view(1, s * s, 3).to(device)
    return _grid_cache[key]


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """F.gaussian_blur (kernel 2 * ceil(3 sigma) + 1, reflect padding) with one sigma per image:
    every kernel padded with zeros to the widest one, so that one grouped convolution does all."""
    b, dev, r = x.shape[0], x.device, _BLUR_RADIUS
    taps = torch.arange(-r, r + 1, dtype=torch.float64).view(1, -1)
    sig = sigma.view(-1, 1)
    k = torch.exp(-0.5 * (taps / sig) ** 2) * (taps.abs() <= torch.ceil(3 * sig))
    k = (k / k.sum(1, keepdim=True)).to(dev, torch.float32)
    y = nnf.pad(x.transpose(0, 1), (r, r, r, r), mode="reflect")  # 1 x B x S x S: one channel per image
    y = nnf.conv2d(y, k.view(b, 1, 1, -1), groups=b)
    y = nnf.conv2d(y, k.view(b, 1, -1, 1), groups=b)
    return y.transpose(0, 1)


class DeviceInput:
    """Turns a batch of JPEG bytes (``stream.train_loader(..., on_device=True)``) into the usual
    batch with ``image`` (uint8 B x 1 x S x S) on `device`; other batches pass through unchanged.

    augment: the training augmentation (loader.augment, loader.shift_augment), seeded by
    (seed, epoch, rank, step); False: the eval transform."""

    def __init__(self, loader: LoaderConfig, device: torch.device | str, seed: int = 0, rank: int = 0,
                 augment: bool = True) -> None:
        self.device, self.seed, self.rank = torch.device(device), seed, rank
        self.input_size, self.shift = loader.input_size, loader.shift_augment
        self.augment = augment and loader.augment

    def __call__(self, batch: dict, epoch: int = 0, step: int = 0) -> dict:
        if "jpeg" not in batch:
            return batch
        images = decode_jpegs(batch["jpeg"], batch["jpeg_sizes"], self.device)
        out = {k: v for k, v in batch.items() if k not in ("jpeg", "jpeg_sizes")}
        if not self.augment:
            out["image"] = letterbox(images, self.input_size)
            return out
        gen = torch.Generator().manual_seed(batch_seed(self.seed, epoch, self.rank, step))
        p = draw_params(gen, len(images), self.shift)
        out["image"] = augment(letterbox(images, self.input_size, p.get("crop")), p)
        return out

    def batches(self, loader: Iterable[dict], epoch: int, n: int, skip: int = 0, ahead: int = 2) -> Iterator[dict]:
        """Batches 0..n-1 of `loader`, ready for the model, prepared `ahead` batches in advance by
        a background thread (on its own CUDA stream on a GPU): the training step waits on the GPU
        every step (loss.item()), so without this, decoding batch k+1 could not overlap step k.
        The first `skip` batches (a resumed epoch) are passed on undecoded. Closing the iterator
        (break, return, an error) stops the thread."""
        box: queue.Queue = queue.Queue(maxsize=max(1, ahead))
        stop = threading.Event()
        cuda = self.device.type == "cuda"

        def put(item) -> None:
            while not stop.is_set():
                try:
                    box.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def work() -> None:
            try:
                stream = torch.cuda.Stream(self.device) if cuda else None
                with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                    for step, batch in enumerate(loader):
                        if step >= n or stop.is_set():
                            break
                        if step >= skip:
                            batch = self(batch, epoch, step)
                            if cuda:
                                stream.synchronize()  # this thread waits, not the training step
                        put(batch)
                put(_END)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
                put(e)

        thread = threading.Thread(target=work, name="device-input", daemon=True)
        thread.start()
        try:
            while True:
                item = box.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                if cuda and "image" in item:
                    # made on the side stream: keep its memory from being reused while the
                    # training stream still reads it
                    item["image"].record_stream(torch.cuda.current_stream(self.device))
                yield item
        finally:
            stop.set()
            thread.join(timeout=60)


_END = object()  # the background thread's "no more batches"
