"""One way to read a film, for every path: `prepare` (the shards), `evaluate --data` and `predict`.

    load_film(src, image_size, resize, intensity)    any PNG/JPEG/WebP/DICOM -> 8-bit grayscale PIL image
    encode_film(...)                                  the same as JPEG q95 bytes: what a shard stores
    decode_film(jpg, input_size)                      those bytes -> PIL image, as the stream decodes them
    shard_film(...)                                   prepare's: encode_film's bytes, refusing a constant
                                                      film, and a digest of the decoded pixels (duplicates)
    read_image, resize_image, map_intensity           load_film's three steps one by one (bench/bench_preprocess.py)

A model only sees what this module gives it, so a film read by `predict` must go through exactly the
steps its shard sample went through (read, resize, intensity, JPEG q95, decode): otherwise one
hospital's PNGs and another's JPEGs, or `prepare` and `predict`, differ in ways the model was never
trained on. For 8-bit inputs with the defaults (letterbox, intensity "none") the bytes are those of
the first `shards.encode_image`, so existing shards, caches and training histories stay valid
(tests/test_preprocess.py keeps a frozen copy of that function to check it).

Steps, in this order:
1. read: 8-bit L/RGB/RGBA/P/LA/1 -> "L" (RGB: ITU-R 601 luma, PIL's convert("L")); JPEGs decoded by
   libjpeg at 1/2, 1/4 or 1/8 scale when that is still >= image_size (draft). High bit depth
   (16-bit PNG "I;16"/"I;16B", 32-bit "I", float "F") -> float 0..255, scaled, never clipped
   (see `_scale_high_depth`), and kept in float through steps 2 and 3; except 8-bit data in a deeper
   container (`_eight_bit`: every value a multiple of 257, or within half a stored level of a whole
   grey level, as dicom.read_dicom detects it), which takes the 8-bit path: a 16-bit PNG of an 8-bit
   film gives the 8-bit PNG's bytes. DICOM (by content: "DICM" at
   byte 128; or a .dcm name): dicom.read_dicom decodes it, applies the Modality LUT and the VOI LUT or
   window, maps that window to 0..255 and inverts MONOCHROME1, giving "L" or "F" like the other formats.
2. resize: longest side image_size, aspect kept ("letterbox": the transforms pad it to a square),
   or image_size x image_size ("squash"); LANCZOS with reducing_gap 3.0.
3. intensity: "none", "percentile" (0.5th..99.5th percentile -> 0..255, clipped) or "equalize"
   (histogram equalisation), then rounded to 8 bits.

Why intensity comes after the resize: it is 100x cheaper on image_size^2 pixels than on the full
film (percentile: ~2.5 ms instead of ~350 ms for 2500 x 2048 px, 1 core), and it measures the image
the model sees. It changes little: LANCZOS is a low-pass filter that keeps the intensity
distribution and only trims its noisy extreme tails, which the 0.5/99.5 percentile window ignores
anyway; equalisation is a monotone map, which nearly commutes with a smooth resampling
(bench/bench_preprocess.py: 0.5-2 grey levels apart on average, on real and synthetic films).
What does matter is precision, so high-bit-depth films stay in float until step 3: a 12-bit film
whose lungs span 500 raw levels keeps ~256 grey levels after a percentile window, instead of ~31
levels stretched (posterised) from an early 8-bit copy. And it runs before the padding to a square
(transforms.py), so black borders never count in a percentile or a histogram.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

from . import dicom
from .dicom import BIT_DEPTHS  # the detector depths, defined with the DICOM reader
from ..errors import DataError

JPEG_QUALITY = 95
RESIZE_MODES = ("letterbox", "squash")
INTENSITY_MODES = ("none", "percentile", "equalize")
PERCENTILES = (0.5, 99.5)
# Bins for equalising a float (high-bit-depth) image: 12 bits, finer than the 8-bit output.
FLOAT_LEVELS = 4096
# A film whose grey levels span less than this between its 1st and 99th percentile (8-bit, before
# any intensity mapping) is no film: blank or nearly so. The rule of eval.ood.check_not_constant
# (predict and serve refuse such a film; prepare skips it), which must keep the same value (tested).
MIN_SPREAD = 8.0


_BYTES = (bytes, bytearray, memoryview)


def _name(src: str | Path | bytes) -> str:
    return "<bytes>" if isinstance(src, _BYTES) else str(src)


def _scale_high_depth(arr: np.ndarray, is_float: bool) -> np.ndarray:
    """A high-bit-depth film -> float32 0..255, scaled by the bit depth its values fit in.

    A PNG does not say how many of its 16 bits are used: a 12-bit detector's film (0..4095) is
    usually stored as is, and dividing it by 65535 (the first prepare's rule) leaves it at 1/16
    brightness, almost black. A per-image min/max would instead make intensities incomparable
    between films (an underexposed film would look like a normal one). Middle way: divide by
    2^b - 1 for the smallest common detector depth b in BIT_DEPTHS that holds the film's maximum.
    A film's maximum (direct exposure, burnt-in markers) sits near the top of its detector's range,
    so all films of one source get the same divisor, and a fixed divisor keeps their intensities
    comparable; only a film that uses less than half of its range is brightened (by a power of 4),
    where /65535 would leave it nearly black. Float images in 0..1 are taken as 0..1; values above
    65535 (32-bit "I") as 0..max. Negative values and NaN become 0.
    """
    return _scaled_and_full(arr, is_float)[0]


def _scaled_and_full(arr: np.ndarray, is_float: bool) -> tuple[np.ndarray, float]:
    """(`_scale_high_depth(arr)`, the value it maps to 255)."""
    arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(arr.max()) if arr.size else 0.0
    if is_float and top <= 1.0:
        full = 1.0
    else:
        full = next((2.0**b - 1 for b in BIT_DEPTHS if top <= 2**b - 1), top)
    return np.clip(arr, 0.0, full) * np.float32(255.0 / full), full


def _high_depth(arr: np.ndarray, is_float: bool) -> Image.Image:
    """A high-bit-depth film -> "L" when it holds 8-bit data (`_eight_bit`), else "F" (float 0..255)."""
    eight = _eight_bit(arr, is_float)
    return Image.fromarray(eight if eight is not None else _scale_high_depth(arr, is_float))


def _eight_bit(arr: np.ndarray, is_float: bool) -> np.ndarray | None:
    """The uint8 grey levels of 8-bit data stored in a deeper container, else None.

    A 16-bit PNG of an 8-bit film must give the 8-bit film's pixels: PIL resizes "L" in integers
    and "F" in float, so the float path would leave it up to a grey level apart (more after the
    JPEG step). Recognised, as dicom.read_dicom recognises an 8-bit DICOM: values that are all
    multiples of 257 (p * 65535 / 255, what most tools write when they widen 8 bits to 16), or,
    once scaled like any high-depth film (`_scale_high_depth`), all within half a stored level of
    a whole grey level: 8-bit values stored as they are (all < 256), or scaled into 10-14 bits
    (round(p * (2^b - 1) / 255)). A real 10-16-bit film never is.
    """
    if not arr.size:
        return None
    if not is_float and arr.min() >= 0 and arr.max() <= 65535:
        levels = arr.astype(np.int64)
        if not np.any(levels % 257):
            return (levels // 257).astype(np.uint8)
    scaled, full = _scaled_and_full(arr, is_float)
    whole = np.rint(scaled)
    step = 255.0 / full  # one stored level, in grey levels (the same tolerance as dicom.read_dicom)
    tol = (0.5 * step if step < 0.5 else 0.0) + 1e-3  # + float32 slack
    if float(np.max(np.abs(scaled - whole), initial=0.0)) <= tol:
        return whole.astype(np.uint8)
    return None


def read_image(src: str | Path | bytes, image_size: int) -> Image.Image:
    """Step 1 of `load_film`: decode `src` -> "L" (8-bit sources) or "F" (float 0..255, high bit
    depth), JPEGs drafted down to no less than `image_size`; DataError if unusable."""
    name = _name(src)
    if dicom.is_dicom(src):  # "DICM" at byte 128, or a .dcm name: decoded and windowed in dicom.py
        return dicom.read_dicom(src, name)
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, _BYTES) else src) as im:
            # JPEG only (a no-op otherwise): let libjpeg decode at 1/2, 1/4 or 1/8 scale, still
            # >= image_size on both sides; a ~2000 px input then costs a fraction of a full decode.
            im.draft("L", (image_size, image_size))
            im.load()  # leaving `with` only closes the file; the loaded pixels stay
    except FileNotFoundError as e:
        raise DataError(f"no such image: {name}") from e
    except Exception as e:  # any decoder failure (PIL raises OSError, SyntaxError, ValueError...): unusable
        raise DataError(f"cannot read image {name}: {type(e).__name__}: {e}") from e
    if im.mode == "L":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        return _high_depth(np.asarray(im), im.mode == "F")
    return im.convert("L")  # RGB/RGBA/P/LA/1/CMYK: ITU-R 601 luma; the Kaggle PNGs have R = G = B


def resize_image(im: Image.Image, image_size: int, resize: str) -> Image.Image:
    """Step 2 of `load_film`: longest side `image_size` ("letterbox") or `image_size` square
    ("squash"), LANCZOS; "L" and "F" images stay in their mode."""
    if resize == "squash":
        size = (image_size, image_size)
    else:  # letterbox
        w, h = im.size
        scale = image_size / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == im.size:
        return im
    return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _equalize(arr: np.ndarray, levels: int) -> np.ndarray:
    """Histogram equalisation of a 0..255 array binned into `levels` levels -> float 0..255.

    The classic CDF map: the darkest occupied level -> 0, the brightest -> 255, the others spread
    by how many pixels lie below them. A constant image has nothing to spread and stays as it is.
    """
    # clipped: a float image resized by LANCZOS overshoots a little below 0 and above 255 at edges
    q = np.clip(np.rint(arr * ((levels - 1) / 255.0)), 0, levels - 1).astype(np.int64)
    cdf = np.cumsum(np.bincount(q.ravel(), minlength=levels))
    low = cdf[q.min()]
    if cdf[-1] == low:  # one level only
        return arr
    return (cdf[q] - low) * (255.0 / (cdf[-1] - low))


def map_intensity(im: Image.Image, intensity: str) -> Image.Image:
    """Step 3 of `load_film`: "L" or "F" image -> "L" with the `intensity` mapping ("none",
    "percentile", "equalize") applied, then rounded and clipped."""
    if intensity == "none" and im.mode == "L":
        return im  # the 8-bit default path: untouched, so its bytes equal the first encode_image's
    arr = np.asarray(im, dtype=np.float32)
    if intensity == "percentile":
        lo, hi = np.percentile(arr, PERCENTILES)
        if hi > lo:  # a constant image (hi == lo) has no window to stretch: left as it is
            arr = (arr - lo) * np.float32(255.0 / (hi - lo))
    elif intensity == "equalize":
        arr = _equalize(arr, 256 if im.mode == "L" else FLOAT_LEVELS)
    # LANCZOS overshoots at edges in float, and the window maps outliers beyond 0..255: clip.
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def load_film(src: str | Path | bytes, image_size: int, resize: str = "letterbox",
              intensity: str = "none") -> Image.Image:
    """Any PNG/JPEG/WebP/DICOM film (path or bytes; any size, mode or bit depth) -> 8-bit grayscale ("L")
    PIL image: longest side `image_size` ("letterbox", aspect kept) or `image_size` square
    ("squash"), with the `intensity` mapping ("none", "percentile", "equalize") applied.

    Raises DataError naming the file and the reason when it is missing or cannot be decoded;
    ValueError for an unknown `resize`/`intensity` (the config refuses those before they get here).
    """
    _check_modes(resize, intensity)  # before reading, so that a bad mode is never reported as a bad file
    return map_intensity(resize_image(read_image(src, image_size), image_size, resize), intensity)


def _check_modes(resize: str, intensity: str) -> None:
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, not {resize!r}")
    if intensity not in INTENSITY_MODES:
        raise ValueError(f"intensity must be one of {INTENSITY_MODES}, not {intensity!r}")


def encode_film(src: str | Path | bytes, image_size: int, resize: str = "letterbox",
                intensity: str = "none") -> bytes:
    """load_film(...) as JPEG bytes, quality JPEG_QUALITY: the `jpg` field of a shard sample."""
    return film_jpeg(load_film(src, image_size, resize, intensity))


class ConstantImageError(DataError):
    """A film that is blank or nearly so (`check_not_constant`): a `constant_image` skip in prepare."""


def grey_spread(film: Image.Image) -> float:
    """Grey levels between the 1st and 99th percentile of an 8-bit film."""
    low, high = np.percentile(np.asarray(film.convert("L"), dtype=np.float32), [1, 99])
    return float(high - low)


def check_not_constant(film: Image.Image, name: str) -> None:
    """Raise ConstantImageError (a DataError) when the 8-bit film (as load_film reads it with
    intensity "none": an intensity mapping would stretch sensor noise to the full range) spans
    less than MIN_SPREAD grey levels: the rule predict and serve apply (eval.ood.check_not_constant)."""
    spread = grey_spread(film)
    if spread < MIN_SPREAD:
        raise ConstantImageError(f"{name}: the image is (nearly) constant: its grey levels span {spread:.1f} of 255 "
                                 f"between the 1st and 99th percentile (a film spans > {MIN_SPREAD:.0f}); not a chest film")


def pixels_digest(im: Image.Image) -> str:
    """sha256 of a decoded image's mode, size and pixels: equal for the same film under two names, or
    re-encoded losslessly (another PNG compression, other metadata, a DICOM with another header)."""
    h = hashlib.sha256(f"{im.mode} {im.size[0]}x{im.size[1]}\n".encode())
    h.update(im.tobytes())
    return h.hexdigest()


def shard_film(src: str | Path | bytes, image_size: int, resize: str = "letterbox",
               intensity: str = "none") -> tuple[bytes, str]:
    """What prepare stores for a film: (encode_film's bytes, `pixels_digest` of the film as decoded,
    before the resize). Decoded once. Raises DataError as load_film does, and ConstantImageError for a
    film that predict would refuse (`check_not_constant` on the same image predict checks)."""
    _check_modes(resize, intensity)
    full = read_image(src, image_size)
    digest = pixels_digest(full)
    small = resize_image(full, image_size, resize)
    check_not_constant(map_intensity(small, "none"), _name(src))
    return film_jpeg(map_intensity(small, intensity)), digest


def film_jpeg(film: Image.Image) -> bytes:
    """A film as load_film returns it -> the JPEG bytes a shard stores for it (quality JPEG_QUALITY)."""
    buf = io.BytesIO()
    film.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def decode_film(jpg: bytes, input_size: int) -> Image.Image:
    """A shard sample's JPEG bytes -> the "L" image the transforms get, decoded as the stream does.

    draft(): when the stored image is >= 2x input_size, libjpeg decodes it at 1/2, 1/4... scale,
    which changes the pixels a little; `predict` must do the same to match `evaluate` exactly.
    """
    with Image.open(io.BytesIO(jpg)) as im:
        im.draft("L", (input_size, input_size))
        return im.convert("L")  # a new, loaded image
