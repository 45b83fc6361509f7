"""preprocess.py (one way to read a film for prepare, evaluate and predict) and the shift augmentation
of transforms.train_transform."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from cxr_dist.config import DataConfig, LoaderConfig
from cxr_dist.errors import DataError
from cxr_dist.data.preprocess import decode_film, encode_film, load_film
from cxr_dist.data.transforms import PadToSquare, RandomBlur, RandomGamma, RandomNoise, eval_transform, train_transform


def _shared_images() -> Path:
    env = os.environ.get("CXR_SHARED_DATA")
    if env:
        p = Path(env)
        return (p / "iu_xray_small" if (p / "iu_xray_small").is_dir() else p) / "images"
    return Path(__file__).resolve().parents[2] / "shared/data/iu_xray_small/images"


# ----------------------------------------------------------------------------- frozen references


def old_encode_image(path: str | Path, image_size: int) -> bytes:
    """Frozen copy of the first shards.encode_image (8-bit paths): the bytes in existing shards."""
    with Image.open(path) as im:
        im.draft("L", (image_size, image_size))
        im.load()
        gray = im if im.mode == "L" else im.convert("L")
    w, h = gray.size
    scale = image_size / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != gray.size:
        gray = gray.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    gray.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def old_train_transform(input_size: int) -> v2.Compose:
    """Frozen copy of train_transform before shift_augment: existing runs must stay reproducible."""
    return v2.Compose([
        PadToSquare(),
        v2.Resize((input_size, input_size), antialias=True),
        v2.RandomAffine(degrees=7, translate=(0.05, 0.05), scale=(0.9, 1.1), fill=0),
        v2.ColorJitter(brightness=0.2, contrast=0.2),
        v2.PILToTensor(),
    ])


# ----------------------------------------------------------------------------- inputs


def _chest(h: int = 300, w: int = 220, seed: int = 0) -> np.ndarray:
    """A film-like 8-bit image: bright body, darker lungs, a little noise, a gradient."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = 60 + 120 * (y / h) + 30 * np.sin(x / 9.0)
    for cx in (w * 0.3, w * 0.7):
        img -= 50 * (((x - cx) / (w * 0.15)) ** 2 + ((y - h * 0.45) / (h * 0.3)) ** 2 < 1)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def _save(tmp_path: Path, name: str, im: Image.Image, **kw) -> Path:
    path = tmp_path / name
    im.save(path, **kw)
    return path


def _px(im: Image.Image) -> np.ndarray:
    assert im.mode == "L"
    return np.asarray(im, dtype=np.float64)


def _png16(tmp_path: Path, arr: np.ndarray, name: str = "f16.png") -> Path:
    """arr (uint16) as a 16-bit grayscale PNG, checked to read back as such."""
    path = _save(tmp_path, name, Image.fromarray(arr.astype(np.uint16)))
    with Image.open(path) as im:
        assert im.mode.startswith("I;16") and np.array_equal(np.asarray(im), arr)
    return path


# ----------------------------------------------------------------------------- byte identity


def _eight_bit_inputs(tmp_path: Path) -> list[Path]:
    gray = Image.fromarray(_chest())
    rgb = Image.merge("RGB", [gray, gray.point(lambda v: v // 2), gray.point(lambda v: 255 - v)])
    return [
        _save(tmp_path, "gray.png", gray),
        _save(tmp_path, "gray.jpg", gray, quality=90),
        _save(tmp_path, "big.jpg", Image.fromarray(_chest(1400, 1100)), quality=90),  # draft decodes at 1/4
        _save(tmp_path, "rgb.png", rgb),
        _save(tmp_path, "rgb.jpg", rgb, quality=90),
        _save(tmp_path, "rgba.png", rgb.convert("RGBA")),
        _save(tmp_path, "p.png", rgb.convert("P")),
        _save(tmp_path, "la.png", gray.convert("LA")),
        _save(tmp_path, "wide.png", Image.fromarray(_chest(90, 333))),
        _save(tmp_path, "small.png", Image.fromarray(_chest(40, 30))),  # upscaled, as before
    ]


@pytest.mark.parametrize("size", [64, 256])
def test_encode_film_is_byte_identical_to_the_first_encode_image(tmp_path, size):
    for path in _eight_bit_inputs(tmp_path):
        assert encode_film(path, size) == old_encode_image(path, size), path.name
        assert encode_film(path.read_bytes(), size) == old_encode_image(path, size), path.name  # bytes in


def test_encode_film_is_byte_identical_on_real_films():
    images = sorted(_shared_images().glob("*"))[:: 700][:8] if _shared_images().is_dir() else []
    if not images:
        pytest.skip(f"shared IU X-ray images not found at {_shared_images()}")
    for path in images:
        for size in (128, 200, 256):
            assert encode_film(path, size) == old_encode_image(path, size), (path.name, size)


# ----------------------------------------------------------------------------- bit depth, colour


def test_16_bit_gradient_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (64, 1))  # left to right
    out = _px(load_film(_png16(tmp_path, ramp), 256))
    assert out.shape == (64, 256)
    row = out.mean(axis=0)
    assert row[0] <= 2 and row[-1] >= 253  # spans ~0..255
    assert np.all(np.diff(row) >= -1) and row[128] == pytest.approx(127.5, abs=3)  # in order, linear
    # convert("L") (the old predict) clips: everything above 255 raw is white.
    with Image.open(_png16(tmp_path, ramp, "again.png")) as im:
        assert np.asarray(im.convert("L")).mean() > 250


def test_12_bit_film_in_a_16_bit_png_is_not_black(tmp_path):
    film = (_chest().astype(np.float64) / 255 * 4095).round().astype(np.uint16)  # 12-bit values
    film[0, 0] = 4095  # a burnt-in marker: the top of the detector's range
    out = _px(load_film(_png16(tmp_path, film), 256))
    ref = _px(load_film(_save(tmp_path, "ref.png", Image.fromarray(_chest())), 256))
    assert out.mean() > 80  # /65535 would give ~1/16 of that: ~6
    assert abs(out.mean() - ref.mean()) < 2  # the same film as 8 bits
    # 14-bit (modern flat panels) is scaled by its own range too.
    out14 = _px(load_film(_png16(tmp_path, film.astype(np.uint32) * 4, "f14.png"), 256))
    assert abs(out14.mean() - out.mean()) < 1


@pytest.mark.parametrize("resize", ["letterbox", "squash"])
@pytest.mark.parametrize("intensity", ["none", "percentile", "equalize"])
def test_8_bit_film_in_a_16_bit_png_gives_the_8_bit_pixels(tmp_path, resize, intensity):
    """The same film saved as an 8-bit PNG and as a 16-bit PNG (widened by 257 as most tools do, stored
    as is, or scaled into 12 bits as a PACS import does): the same load_film output, resized or not."""
    film = _chest()
    dark = (film // 5).astype(np.uint8)  # a dark film (max ~50): its x257 copy must not be brightened
    for arr in (film, dark):
        ref = _save(tmp_path, "eight.png", Image.fromarray(arr))
        wide = arr.astype(np.uint16)
        copies = [("x257.png", wide * 257), ("as_is.png", wide)]
        if arr.max() > 4095 // 2 // 16:  # a 12-bit film using less than half its range is brightened as
            copies.append(("12bit.png", np.round(arr * 4095.0 / 255).astype(np.uint16)))  # 10-bit (by design)
        for name, sixteen in copies:
            path = _png16(tmp_path, sixteen, name)
            for size in (256, 300, 97):  # shrunk, the film's own size, upscaled
                want = np.asarray(load_film(ref, size, resize, intensity))
                got = np.asarray(load_film(path, size, resize, intensity))
                assert np.array_equal(got, want), (name, size, int(arr.max()))
            assert encode_film(path, 97, resize, intensity) == encode_film(ref, 97, resize, intensity)
    # Real 12-bit data is still read in float (not taken for 8 bits): one level off the 8-bit grid.
    twelve = np.round(film.astype(np.float64) * 4095 / 255).astype(np.uint16)
    twelve[::7, ::5] += 1
    assert not np.array_equal(np.asarray(load_film(_png16(tmp_path, twelve, "real12.png"), 97)),
                              np.asarray(load_film(_save(tmp_path, "e.png", Image.fromarray(film)), 97)))


def test_16_bit_big_endian_int32_and_float_modes(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 128), (16, 1))
    big = Image.fromarray(ramp.astype(">u2"))
    assert big.mode == "I;16B"
    int32 = Image.fromarray(ramp.astype(np.int32))
    assert int32.mode == "I"
    unit = Image.fromarray((ramp / 65535).astype(np.float32))
    assert unit.mode == "F"
    ref = _px(load_film(_png16(tmp_path, ramp.astype(np.uint16)), 128))
    for im, name in ((int32, "i.tiff"), (unit, "f.tiff"), (big, "b.tiff")):  # TIFF keeps these modes
        path = _save(tmp_path, name, im)
        with Image.open(path) as back:
            assert back.mode == im.mode
        assert np.abs(_px(load_film(path, 128)) - ref).max() <= 1, name


def test_rgb_is_itu_601_luma(tmp_path):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8), "RGB")
    out = load_film(_save(tmp_path, "rgb.png", rgb), 50)
    assert np.array_equal(np.asarray(out), np.asarray(rgb.convert("L")))
    r, g, b = (np.asarray(rgb, dtype=np.float64)[..., i] for i in range(3))
    assert np.abs(_px(out) - (0.299 * r + 0.587 * g + 0.114 * b)).max() <= 1


# ----------------------------------------------------------------------------- geometry


def test_letterbox_keeps_aspect_and_squash_gives_a_square(tmp_path):
    path = _save(tmp_path, "tall.png", Image.fromarray(_chest(300, 200)))
    assert load_film(path, 120).size == (80, 120)  # (w, h)
    assert load_film(path, 120, resize="letterbox").size == (80, 120)
    assert load_film(path, 120, resize="squash").size == (120, 120)
    wide = _save(tmp_path, "wide.jpg", Image.fromarray(_chest(100, 400)))
    assert load_film(wide, 200).size == (200, 50)
    assert load_film(wide, 200, resize="squash").size == (200, 200)
    assert load_film(_png16(tmp_path, np.full((30, 60), 3000, np.uint16)), 40, resize="squash").size == (40, 40)


# ----------------------------------------------------------------------------- intensity


def _spread(a: np.ndarray) -> float:
    return float(np.percentile(a, 99) - np.percentile(a, 1))


@pytest.mark.parametrize("sixteen", [False, True])
def test_percentile_and_equalize_spread_a_low_contrast_film(tmp_path, sixteen):
    dull = 100 + (_chest().astype(np.float64) * 40 / 255)  # grey levels 100..140
    path = (_png16(tmp_path, (dull * 16).round().astype(np.uint16)) if sixteen  # 12-bit 1600..2240
            else _save(tmp_path, "dull.png", Image.fromarray(dull.round().astype(np.uint8))))
    none = _px(load_film(path, 128))
    pct = _px(load_film(path, 128, intensity="percentile"))
    eq = _px(load_film(path, 128, intensity="equalize"))
    assert _spread(none) < 45
    assert _spread(pct) > 200 and pct.min() == 0 and pct.max() == 255
    assert _spread(eq) > 200 and eq.max() == 255
    # Both keep the order of grey levels (monotone maps): the bright bottom stays brighter.
    for out in (pct, eq):
        assert out[-20:].mean() > out[:20].mean() + 50
    # Equalised: roughly flat histogram (each quarter of the range holds ~a quarter of the pixels).
    quarters = np.histogram(eq, bins=4, range=(0, 256))[0] / eq.size
    assert quarters.min() > 0.12
    # High bit depth is windowed before it is cut to 8 bits: many more distinct levels survive.
    if sixteen:
        assert len(np.unique(pct)) > 150


@pytest.mark.parametrize("intensity", ["none", "percentile", "equalize"])
@pytest.mark.parametrize("sixteen", [False, True])
def test_constant_image_is_fine(tmp_path, intensity, sixteen):
    path = (_png16(tmp_path, np.full((40, 30), 2000, np.uint16)) if sixteen
            else _save(tmp_path, "c.png", Image.fromarray(np.full((40, 30), 77, np.uint8))))
    with np.errstate(all="raise"):  # no division by zero, no NaN
        out = _px(load_film(path, 32, intensity=intensity))
    assert out.shape == (32, 24) and out.std() == 0
    assert out[0, 0] == (77 if not sixteen else round(2000 / 4095 * 255))
    assert encode_film(path, 32, intensity=intensity)  # encodes too


# ----------------------------------------------------------------------------- errors


def test_missing_and_unreadable_files_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="no such image: .*nope.png"):
        load_film(tmp_path / "nope.png", 64)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="cannot read image .*garbage.png"):
        encode_film(garbage, 64)
    truncated = tmp_path / "truncated.jpg"
    good = _save(tmp_path, "good.jpg", Image.fromarray(_chest()))
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(DataError, match="truncated.jpg"):
        load_film(truncated, 64)
    with pytest.raises(DataError, match="cannot read image <bytes>"):
        load_film(b"\x89PNG\r\n\x1a\nbroken", 64)
    with pytest.raises(DataError):
        load_film(tmp_path, 64)  # a folder
    with pytest.raises(ValueError, match="resize"):
        load_film(good, 64, resize="crop")
    with pytest.raises(ValueError, match="intensity"):
        load_film(good, 64, intensity="clahe")


# ----------------------------------------------------------------------------- predict == evaluate


@pytest.mark.parametrize("intensity", ["none", "percentile"])
@pytest.mark.parametrize("input_size", [48, 100])  # 100: stored 256 >= 2 x 48, the decoder drafts
def test_predict_sees_what_evaluate_sees(tmp_path, intensity, input_size):
    """predict.load_image + eval_transform == the stream's decode + eval_transform of the file's
    shard sample (encode_film's bytes), for an 8-bit JPEG and a 16-bit PNG."""
    from cxr_dist.product.predict import load_image
    from cxr_dist.data.stream import Reading, _ShardStream

    cfg = DataConfig(image_size=256, intensity=intensity)
    loader = LoaderConfig(input_size=input_size, augment=False)
    stream = _ShardStream([], loader, 0, 1, Reading())
    plain = eval_transform(input_size)
    film16 = (_chest(700, 600).astype(np.uint16) * 16)
    for path in (_save(tmp_path, "a.jpg", Image.fromarray(_chest(700, 600))), _png16(tmp_path, film16)):
        sample = {"__key__": "k", "jpg": encode_film(path, cfg.image_size, cfg.resize, cfg.intensity),
                  "cls": b"1", "json": json.dumps({"uid": "7"}).encode()}
        by_stream = stream._decode(sample)[0]
        by_predict = plain(load_image(path, cfg, loader))
        assert by_predict.shape == (1, input_size, input_size) and by_predict.dtype == torch.uint8
        assert torch.equal(by_predict, by_stream)
        assert torch.equal(plain(decode_film(sample["jpg"], input_size)), by_stream)


# ----------------------------------------------------------------------------- train_transform


def _film_pil(h: int = 256, w: int = 200) -> Image.Image:
    return Image.fromarray(_chest(h, w))


def test_train_transform_without_shift_is_unchanged():
    """Same outputs and the same RNG draws as the frozen copy: earlier runs stay reproducible."""
    img = _film_pil()
    for seed in range(6):
        torch.manual_seed(seed)
        new = [train_transform(64)(img) for _ in range(3)], torch.get_rng_state()
        torch.manual_seed(seed)
        old = [old_train_transform(64)(img) for _ in range(3)], torch.get_rng_state()
        assert all(torch.equal(a, b) for a, b in zip(new[0], old[0]))
        assert torch.equal(new[1], old[1])
    assert torch.equal(_seeded(train_transform(64, shift=False), img, 3), _seeded(old_train_transform(64), img, 3))


def _seeded(t: v2.Compose, img, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return t(img)


def test_shift_augment_differs_is_deterministic_and_keeps_a_sane_brightness():
    img = _film_pil()
    shift, plain = train_transform(64, shift=True), train_transform(64)
    outs = [_seeded(shift, img, s) for s in range(60)]
    assert all(o.shape == (1, 64, 64) and o.dtype == torch.uint8 for o in outs)
    assert all(torch.equal(_seeded(shift, img, s), outs[s]) for s in (0, 7, 59))  # seeded -> same
    assert sum(not torch.equal(o, _seeded(plain, img, s)) for s, o in enumerate(outs)) == len(outs)
    assert len({o.numpy().tobytes() for o in outs}) == len(outs)
    base = eval_transform(64)(img).float().mean().item()
    means = np.array([o.float().mean().item() for o in outs])
    assert abs(means.mean() - base) < 0.15 * base  # no drift of the average brightness
    assert means.min() > 0.4 * base and means.max() < min(255, 1.8 * base)  # no black/white films
    assert means.std() > 0.03 * base  # but it does vary
    # A tensor input works too (the transforms take PIL images or uint8 tensors).
    t = _seeded(shift, torch.from_numpy(_chest(256, 200).copy())[None], 0)
    assert t.shape == (1, 64, 64) and t.dtype == torch.uint8


def _roughness(a: np.ndarray | torch.Tensor) -> float:
    a = np.asarray(a, dtype=np.float64).squeeze()
    return float(np.abs(np.diff(a, axis=1)).mean())


def test_shift_ops_on_pil_and_tensor():
    """Each added op, forced on: stays uint8 / L, keeps the size, and does what it says."""
    img = _film_pil(64, 64)
    arr = torch.from_numpy(np.asarray(img).copy())[None]
    torch.manual_seed(0)
    dark = RandomGamma(1.5, 1.5)(img)
    assert dark.mode == "L" and _px(dark).mean() < _px(img).mean() - 10
    assert (RandomGamma(1.5, 1.5)(arr)[0].double() - torch.from_numpy(_px(dark))).abs().max() <= 1
    assert _px(RandomGamma(0.7, 0.7)(img)).mean() > _px(img).mean() + 10
    for x in (img, arr):
        blurred = RandomBlur(1.0, (1.5, 1.5))(x)
        assert _roughness(blurred) < 0.7 * _roughness(x)
        assert (blurred.mode == "L" and blurred.size == img.size if x is img
                else blurred.shape == arr.shape and blurred.dtype == torch.uint8)
    noisy = RandomNoise(1.0, (5.0, 5.0))(arr)
    assert noisy.dtype == torch.uint8 and 3 < (noisy.float() - arr.float()).std() < 7
    assert torch.equal(RandomNoise(0.0, (5.0, 5.0))(arr), arr) and RandomBlur(0.0, (1, 2))(img) is img
