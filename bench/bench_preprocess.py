"""Cost of preprocess.load_film per intensity mode, and what running the intensity step after the
resize (as load_film does) changes compared with running it on the full-size film (PIL and
numpy here run on one thread).

    .venv/bin/python bench/bench_preprocess.py [IMAGES_DIR]   # default: ../shared/data/iu_xray_small/images

Inputs: a few real films of the shared copy (256 px JPEGs) and two synthetic full-size films
(2500 x 2048, an 8-bit JPEG and a 12-bit film in a 16-bit PNG), the sizes hospitals export.
Prints the median of repeated calls in ms, and the mean |difference| in grey levels between
"resize, then intensity" and "intensity, then resize".
"""
from __future__ import annotations

import io
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_dist.data.preprocess import INTENSITY_MODES, load_film, map_intensity, read_image, resize_image


def median_ms(f, repeats: int) -> float:
    f()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def synthetic(h: int = 2500, w: int = 2048) -> tuple[bytes, bytes]:
    """A full-size film-like image as 8-bit JPEG bytes and as 12-bit values in a 16-bit PNG."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    film = 0.3 + 0.4 * y / h + 0.1 * np.sin(x / 40)
    film -= 0.25 * ((((x - 0.3 * w) / (0.15 * w)) ** 2 + ((y - 0.45 * h) / (0.3 * h)) ** 2) < 1)
    film = np.clip(film + rng.normal(0, 0.02, film.shape), 0, 1)
    jpg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray((film * 255).astype(np.uint8)).save(jpg, format="JPEG", quality=90)
    Image.fromarray((film * 4095).astype(np.uint16)).save(png, format="PNG")
    return jpg.getvalue(), png.getvalue()


def order_difference(src: bytes | Path, image_size: int, intensity: str) -> float:
    """Mean |(resize, then intensity) - (intensity, then resize)| in grey levels, both from the
    full-size decode (no JPEG draft, which would change the pixels for another reason)."""
    full = read_image(src, 1 << 16)  # a draft size above the film's: decoded at full size
    after = map_intensity(resize_image(full, image_size, "letterbox"), intensity)
    before = resize_image(map_intensity(full, intensity), image_size, "letterbox")
    return float(np.abs(np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)).mean())


def main() -> None:
    default = Path(__file__).resolve().parents[2] / "shared/data/iu_xray_small/images"
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    real = sorted(folder.glob("*"))[::500][:6] if folder.is_dir() else []
    jpg, png = synthetic()
    inputs = [(f"real {len(real)} films (256 px JPEG) -> 128", real, 128, 30),
              ("2500x2048 8-bit JPEG -> 256", [jpg], 256, 5),
              ("2500x2048 12-bit in 16-bit PNG -> 256", [png], 256, 3)]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, Pillow {Image.__version__}, 1 thread")
    print("| input | intensity | ms per film (median) | mean abs diff, intensity after vs before resize |")
    print("|---|---|---:|---:|")
    for name, sources, size, repeats in inputs:
        if not sources:
            print(f"| {name} | - | skipped: {folder} not found | |")
            continue
        for mode in INTENSITY_MODES:
            ms = statistics.median(median_ms(lambda s=s: load_film(s, size, intensity=mode), repeats) for s in sources)
            diff = statistics.mean(order_difference(s, size, mode) for s in sources)
            print(f"| {name} | {mode} | {ms:.2f} | {diff:.2f} |")


if __name__ == "__main__":
    main()
