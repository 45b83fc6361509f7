"""One way to read a film, for every path: `prepare` (the shards), `evaluate --data` and `predict`.

    load_film(src, image_size, resize, intensity)    any PNG/JPEG/WebP/DICOM -> 8-bit grayscale PIL image
    encode_film(...)                                  the same as JPEG q95 bytes: what a shard stores
    decode_film(jpg, input_size)                      those bytes -> PIL image, as the stream decodes them

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
   (see `_scale_high_depth`), and kept in float through steps 2 and 3. DICOM (by content: "DICM" at
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
    arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(arr.max()) if arr.size else 0.0
    if is_float and top <= 1.0:
        full = 1.0
    else:
        full = next((2.0**b - 1 for b in BIT_DEPTHS if top <= 2**b - 1), top)
    return np.clip(arr, 0.0, full) * np.float32(255.0 / full)


def _read(src: str | Path | bytes, image_size: int) -> Image.Image:
    """Decode `src` -> "L" (8-bit sources) or "F" (float 0..255, high bit depth); DataError if unusable."""
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
        return Image.fromarray(_scale_high_depth(np.asarray(im), im.mode == "F"))
    return im.convert("L")  # RGB/RGBA/P/LA/1/CMYK: ITU-R 601 luma; the Kaggle PNGs have R = G = B


def _resize(im: Image.Image, image_size: int, resize: str) -> Image.Image:
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


def _intensity(im: Image.Image, intensity: str) -> Image.Image:
    """"L" or "F" image -> "L" with the intensity mapping applied (then rounded and clipped)."""
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
    # Checked before reading, so that a bad mode is never reported as a bad file.
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, not {resize!r}")
    if intensity not in INTENSITY_MODES:
        raise ValueError(f"intensity must be one of {INTENSITY_MODES}, not {intensity!r}")
    return _intensity(_resize(_read(src, image_size), image_size, resize), intensity)


def encode_film(src: str | Path | bytes, image_size: int, resize: str = "letterbox",
                intensity: str = "none") -> bytes:
    """load_film(...) as JPEG bytes, quality JPEG_QUALITY: the `jpg` field of a shard sample."""
    return film_jpeg(load_film(src, image_size, resize, intensity))


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
