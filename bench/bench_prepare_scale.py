"""Prepare at the scale of the big collections (issue 16.4): images/s per core of prepare's per-image
work on full-size films, the cost of the serial merge of an array prepare, and the projected wall
time for NIH (112,120 films) on 8 nodes x 32 cores.

    .venv/bin/python bench/bench_prepare_scale.py [--n 40] [--unique 8] [--repeats 5] [--image-size 256]

Films are generated in a temporary folder (never real data), full size, --unique distinct films
per kind hard-linked to --n files (decode cost does not depend on having seen a file before):
  png8-1024    8-bit grayscale PNG, 1024 x 1024          (NIH ChestX-ray14's own format)
  png16-1024   16-bit PNG, 1024 x 1024, 12-bit values    (a detector's film stored as is)
  png16-2000   16-bit PNG, 2000 x 2400, 12-bit values    (~2,000 px, CheXpert/MIMIC original size)
  jpeg-2000    8-bit JPEG q95, 2000 x 2400               (CheXpert / MIMIC-CXR-JPG's format)
Content: smooth "anatomy" (sums of Gaussians) plus detector noise, so that PNG compression (and
so decode cost) is neither that of flat images nor of pure noise.

Per-image work = preprocess.encode_film, the function prepare's pool runs: read + decode, high
bit depth -> 8-bit scale, LANCZOS resize to --image-size (letterbox), JPEG q95 encode. One
process, one core (OMP/BLAS threads pinned to 1). One untimed warm-up pass per kind, then
--repeats passes, the kinds interleaved (rotated order each repeat) so that load from other
users of the machine hits all kinds alike. Reported: images/s, median and min..max over repeats.
The files are read from the page cache after the warm-up: storage I/O is NOT measured.

Merge: png8-1024 films as a folder source of --merge-sizes films (two sizes), each prepared as
an array of 2 tasks (untimed), then merge_parts timed over the repeats (parts restored before
each): reading the table, the split, the tars, sha256, writes to local disk. The cost per film is
the slope between the two sizes; the intercept is the fixed cost (imports aside).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from cxr_dist.config import DataConfig, SourceConfig  # noqa: E402
from cxr_dist.data.preprocess import encode_film  # noqa: E402
from cxr_dist.data.shards import PARTS_DIR, merge_parts, write_part  # noqa: E402

KINDS = {  # name: (width, height, bits, format)
    "png8-1024": (1024, 1024, 8, "PNG"),
    "png16-1024": (1024, 1024, 16, "PNG"),
    "png16-2000": (2000, 2400, 16, "PNG"),
    "jpeg-2000": (2000, 2400, 8, "JPEG"),
}
COLLECTIONS = {"NIH ChestX-ray14": 112_120, "CheXpert": 224_316, "MIMIC-CXR": 377_110}
NODES, CORES = 8, 32


def film(rng: np.random.Generator, w: int, h: int, bits: int) -> np.ndarray:
    """A smooth chest-like film plus noise, in 0..2^bits - 1."""
    top = 2**bits - 1
    # Low-frequency content built small and upscaled (cheap at 2000 px), then fine noise.
    sw, sh = max(8, w // 16), max(8, h // 16)
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
    img = np.full((sh, sw), 0.25, np.float32)
    for _ in range(6):
        cx, cy, s, a = rng.uniform(0, sw), rng.uniform(0, sh), rng.uniform(0.1, 0.4) * sw, rng.uniform(-0.3, 0.5)
        img += a * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
    big = np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR))
    big = big + rng.normal(0, 0.006, (h, w)).astype(np.float32)
    return (np.clip(big, 0, 1) * (top * 0.9)).astype(np.uint16 if bits > 8 else np.uint8)


def make_films(root: Path, n: int, unique: int, seed: int = 0) -> dict[str, list[Path]]:
    rng = np.random.default_rng(seed)
    out: dict[str, list[Path]] = {}
    for kind, (w, h, bits, fmt) in KINDS.items():
        folder = root / kind
        folder.mkdir(parents=True)
        paths = []
        for i in range(n):
            p = folder / f"IM-{i:04d}-0001.{'png' if fmt == 'PNG' else 'jpeg'}"
            if i < unique:
                arr = film(rng, w, h, bits)
                if bits == 16:  # 12-bit values stored in a 16-bit PNG
                    arr = (arr.astype(np.uint32) * 4095 // 65535).astype(np.uint16)
                Image.fromarray(arr).save(p, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
            else:
                os.link(paths[i % unique], p)
            paths.append(p)
        out[kind] = paths
    return out


def merge_times(root: Path, films: list[Path], n: int, image_size: int, repeats: int) -> list[float]:
    """Seconds of merge_parts for a folder source of n films (cycled from `films`), 2 tasks."""
    src = root / f"source-{n}"
    for i in range(n):
        folder = src / ("NORMAL" if i % 2 else "PNEUMONIA")
        folder.mkdir(parents=True, exist_ok=True)
        os.link(films[i % len(films)], folder / f"IM-{i:05d}-0001.png")
    cfg = DataConfig(sources=(SourceConfig(name="gen", format="folder", path=str(src),
                                           patient_regex=r"^(?P<patient>IM-\d+)"),),
                     image_size=image_size, prepare_workers=1, samples_per_shard=256)
    out, backup = root / f"shards-{n}", root / f"parts-{n}"
    for t in range(2):
        write_part(cfg, out, t, 2)
    shutil.copytree(out / PARTS_DIR, backup)
    times = []
    for r in range(repeats + 1):
        if r:
            shutil.copytree(backup, out / PARTS_DIR)
        start = time.perf_counter()
        merge_parts(cfg, out, 2)
        if r:  # the first merge is the warm-up
            times.append(time.perf_counter() - start)
    return times


def encode_pass(paths: list[Path], image_size: int) -> float:
    """images/s of encode_film over `paths`, one process."""
    start = time.perf_counter()
    for p in paths:
        encode_film(p, image_size, "letterbox", "none")
    return len(paths) / (time.perf_counter() - start)


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.1f}  ({min(xs):.1f}..{max(xs):.1f})"


def hms(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m{s:02d}s" if m >= 60 else f"{m}m{s:02d}s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40, help="films per kind and pass")
    ap.add_argument("--unique", type=int, default=8, help="distinct films per kind (the rest hard links)")
    ap.add_argument("--merge-sizes", type=int, nargs=2, default=(50, 400), help="collection sizes of the merge")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=256, help="data.image_size (longest stored side)")
    args = ap.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"{platform.system()} {platform.release()}, python {platform.python_version()}, "
          f"Pillow {Image.__version__}, numpy {np.__version__}")
    print(f"films per kind {args.n}, repeats {args.repeats}, image_size {args.image_size}, 1 process")
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        films = make_films(root / "films", args.n, args.unique)
        print(f"generated {args.unique * len(KINDS)} films in {time.perf_counter() - t0:.0f} s; "
              + ", ".join(f"{k} {np.mean([p.stat().st_size for p in v]) / 1e6:.2f} MB/film" for k, v in films.items()))

        rates: dict[str, list[float]] = {k: [] for k in KINDS}
        for kind in KINDS:  # warm-up: page cache, imports, first-call costs
            encode_pass(films[kind], args.image_size)
        kinds = list(KINDS)
        for r in range(args.repeats):
            for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                rates[kind].append(encode_pass(films[kind], args.image_size))

        small, large = args.merge_sizes
        merges = {n: merge_times(root, films["png8-1024"], n, args.image_size, args.repeats) for n in (small, large)}

    print(f"\nper-image work (decode, 16-bit scale, resize to {args.image_size}, JPEG q95), 1 core:")
    print(f"  {'kind':<12} {'images/s/core: median (min..max)':>34}  ms/image")
    for kind, xs in rates.items():
        print(f"  {kind:<12} {spread(xs):>34}  {1000 / statistics.median(xs):7.1f}")
    med = {n: statistics.median(t) for n, t in merges.items()}
    merge_ms = 1000 * (med[large] - med[small]) / (large - small)
    fixed = med[small] - small * merge_ms / 1000
    print(f"merge (serial, 2 parts): {small} films {med[small]:.2f} s ({min(merges[small]):.2f}..{max(merges[small]):.2f}), "
          f"{large} films {med[large]:.2f} s ({min(merges[large]):.2f}..{max(merges[large]):.2f}) "
          f"-> {merge_ms:.3f} ms/film + {fixed:.2f} s fixed")

    cores = NODES * CORES
    print(f"\nprojection: {NODES} nodes x {CORES} cores = {cores} decode processes (array of {NODES} tasks, "
          f"{CORES} workers each), linear per-core scaling, storage I/O and queue wait not included; "
          f"merge serial at {fixed:.2f} s + {merge_ms:.3f} ms/film")
    for name, n_films in COLLECTIONS.items():
        for kind in (("png8-1024", "png16-1024") if name.startswith("NIH") else ("png16-2000", "jpeg-2000")):
            rate = statistics.median(rates[kind])
            decode = n_films / (cores * rate)
            merge = fixed + n_films * merge_ms / 1000
            print(f"  {name:<17} {n_films:>7} films as {kind:<10}: decode {hms(decode):>8} + merge {hms(merge):>7} "
                  f"= {hms(decode + merge):>8}   (1 core: {hms(n_films / rate)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
