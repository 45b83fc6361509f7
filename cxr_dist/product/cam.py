"""Grad-CAM: where in the film the classifier finds its evidence for a class, as a heat map and
an overlay PNG (`cxr-dist predict --cam DIR`, and the examples logged at the end of a run).

Grad-CAM (Selvaraju et al. 2017) on the last convolutional feature map A (the backbone's
`forward_features`: the output of `bn2`, 1280 x 8 x 8 at 240 px): each channel k is weighted by
the spatial mean of d score / d A_k, the weighted sum is clipped at zero, upsampled bilinearly to
the input size and scaled to [0, 1] per image.

Our own ~50 lines, not the `grad-cam` package (pytorch-grad-cam 1.5.7): its install requires
opencv-python-headless, ttach, scikit-learn and scipy (PKG-INFO, Requires-Dist), and it works by
installing forward/backward hooks on a target layer and running the model's forward. Here that
forward is `CXRClassifier.forward`, whose frozen part is `@torch.no_grad` (no graph to hook
into), and backward hooks would need parameters or inputs that require grad. Instead the
feature map is computed without a graph and then made a leaf that requires grad; the rest of
the network (`forward_head` pooling + MLP head, the same path `trainable_forward` takes at any
depth) runs on it, and `torch.autograd.grad` takes the gradient with respect to that leaf only.
So no hook is ever installed, no parameter's `requires_grad` or `.grad` is touched, and only
the small head builds a graph; the model is put in eval mode for the pass (dropout off,
BatchNorm on running statistics: each image's map is independent of its batch) and every
module's mode is restored exactly afterwards.

The score is the target class's log-odds, `logit[target] - logsumexp(other logits)`; with the
project's two classes that is `logit1 - logit0`, the quantity the abnormal probability is a
function of (adding a constant to both logits changes neither it nor the map).

The resolution is the feature map's: one cell is 32 x 32 input pixels, so a map's peak is good
to about half a cell (tests/test_cam.py: on a trained tf_efficientnet_lite1 at 160 px, the peak
lies within the blob + 16 px for ~90% of films). The upsampling is the plain align_corners=False
resize (cell i centred at 32 i + 15.5). Correcting it for the geometric centre of the receptive
field (TF-"same" padding pads bottom/right only: +31 px) was tried and made the peaks worse on
the pretrained tf_* weights: their kernels were learnt with that padding and compensate for it.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..fileio import write_bytes_atomic


def _feature_map(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last conv feature map (N x C x h x w), computed without an autograd graph."""
    bb = model.backbone
    with torch.no_grad():
        feats = bb.forward_features(model.normalize(images))
    if feats.ndim != 4:
        raise ValueError(f"Grad-CAM needs a convolutional feature map; {type(bb).__name__} gives shape "
                         f"{tuple(feats.shape)}")
    return feats


def grad_cam(model: nn.Module, images: torch.Tensor, target: int | str = 1) -> torch.Tensor:
    """Grad-CAM heat maps of `model` (a CXRClassifier) for class `target` (1 = abnormal), or for
    a finding of its findings head (`target` its name: the finding's logit is the score).

    images: uint8 (or [0, 1] float) N x 1 x S x S (or N x 3 x S x S), as `eval_transform` makes
    them; moved to the model's device. Returns float32 N x S x S in [0, 1] on the CPU (an image
    with no positive evidence for the class gets all zeros). The model's train/eval modes,
    requires_grad flags and gradients are as they were before the call.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be N x C x H x W, got shape {tuple(images.shape)}")
    n, _, height, width = images.shape
    if n == 0:
        return torch.zeros(0, height, width)
    device = next(model.parameters()).device
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        # inference_mode(False): a caller inside torch.inference_mode() still gets a graph; the
        # clone makes an inference-mode input an ordinary tensor.
        with torch.inference_mode(False), torch.enable_grad():
            feats = _feature_map(model, images.to(device).clone()).detach().float().requires_grad_(True)
            pooled = model.backbone.forward_head(feats, pre_logits=True)
            if isinstance(target, str):  # a finding: its own logit (log-odds of its sigmoid)
                findings = tuple(getattr(model, "findings", ()))
                if target not in findings:
                    raise ValueError(f"no finding {target!r} in this model (its findings: {', '.join(findings) or 'none'})")
                score = model.finding_logits(pooled)[:, findings.index(target)]
            else:
                logits = model.head(pooled)
                if not 0 <= target < logits.shape[1]:
                    raise ValueError(f"target={target}, but the model has {logits.shape[1]} classes")
                others = torch.cat([logits[:, :target], logits[:, target + 1:]], dim=1)
                score = logits[:, target] - torch.logsumexp(others, dim=1)
            # Images are independent in eval mode: the gradient of the sum is each image's own.
            (grads,) = torch.autograd.grad(score.sum(), feats)
        weights = grads.mean(dim=(2, 3), keepdim=True)  # alpha_k: spatial mean of the gradient
        cam = F.relu((weights * feats.detach()).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        low = cam.amin(dim=(1, 2), keepdim=True)
        span = cam.amax(dim=(1, 2), keepdim=True) - low
        cam = torch.where(span > 0, (cam - low) / span.clamp_min(1e-12), torch.zeros_like(cam))
        return cam.float().cpu()
    finally:
        for m, training in modes:
            m.training = training


def peak(heat: torch.Tensor) -> tuple[int, int]:
    """(row, col) of the hottest pixel of an H x W heat map (the first one on ties)."""
    if heat.ndim != 2:
        raise ValueError(f"heat must be H x W, got shape {tuple(heat.shape)}")
    flat = int(torch.argmax(heat))
    return flat // heat.shape[1], flat % heat.shape[1]


def _gray_array(image: torch.Tensor | Image.Image) -> np.ndarray:
    """A film as uint8 H x W: a PIL image (any mode), or a uint8 / [0, 1] float tensor H x W,
    1 x H x W or 3 x H x W."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("L"))
    t = image.detach().cpu()
    if t.ndim == 3:
        t = t[0] if t.shape[0] == 1 else t.float().mean(dim=0)
    if t.ndim != 2:
        raise ValueError(f"image must be H x W, 1 x H x W or 3 x H x W, got shape {tuple(image.shape)}")
    if t.dtype != torch.uint8:
        t = (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return t.numpy()


def overlay(image: torch.Tensor | Image.Image, heat: torch.Tensor, cmap: str = "jet",
            max_alpha: float = 0.6) -> Image.Image:
    """The film in gray with the colormap `cmap` blended in where `heat` (H x W, [0, 1]) is high:
    the colour's weight is max_alpha * heat, so cold regions show the plain film. A heat map of
    another size (the same field of view) is resized bilinearly to the film's. Returns RGB."""
    from matplotlib import colormaps  # colormaps only: no pyplot, no backend

    gray = _gray_array(image).astype(np.float32) / 255.0
    h = heat.detach().float().cpu()
    if h.ndim != 2:
        raise ValueError(f"heat must be H x W, got shape {tuple(heat.shape)}")
    if h.shape != gray.shape:
        h = F.interpolate(h[None, None], size=gray.shape, mode="bilinear", align_corners=False)[0, 0]
    h = h.clamp(0, 1).numpy()
    colour = colormaps[cmap](h)[..., :3].astype(np.float32)
    alpha = (max_alpha * h)[..., None]
    rgb = (1 - alpha) * gray[..., None] + alpha * colour
    return Image.fromarray((rgb * 255).round().clip(0, 255).astype(np.uint8), mode="RGB")


def safe_name(name: str) -> str:
    """A file-name-safe stem: characters outside [A-Za-z0-9_-] become `_` (the shard key rule)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "_"


def write_overlays(model: nn.Module, images: torch.Tensor, names: list[str], out_dir: str | Path,
                   target: int | str = 1, batch_size: int = 16, taken: set[str] | None = None) -> list[Path]:
    """Grad-CAM overlays of `images` (N x 1 x S x S, as for grad_cam) as `out_dir/<name>_cam.png`,
    one per image, written atomically; `out_dir` is created. Names are made safe (`safe_name`);
    two that become the same get `-2`, `-3`... appended. `taken`: the stems already written by
    earlier calls of the same job (updated here), so that calls batch by batch never overwrite
    one another's files. Returns the paths in the images' order."""
    if len(names) != len(images):
        raise ValueError(f"{len(images)} images but {len(names)} names")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    used: set[str] = set() if taken is None else taken
    for start in range(0, len(images), batch_size):  # bounds memory on large inputs
        chunk = images[start:start + batch_size]
        heats = grad_cam(model, chunk, target)
        for image, heat, name in zip(chunk, heats, names[start:start + batch_size]):
            stem = base = safe_name(name)
            k = 2
            while stem in used:
                stem, k = f"{base}-{k}", k + 1
            used.add(stem)
            buf = io.BytesIO()
            overlay(image, heat).save(buf, format="PNG")
            path = out_dir / f"{stem}_cam.png"
            write_bytes_atomic(path, buf.getvalue())
            paths.append(path)
    return paths
