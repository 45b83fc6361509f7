"""A smaller copy of a Kaggle-layout IU X-ray folder, for moving it to a machine with a size limit.

    .venv/bin/python bench/compact_copy.py SRC DST [--quality 85] [--workers 2]

Copies the two CSVs unchanged and re-encodes every image under SRC/images/ as 8-bit grayscale
WebP (lossy, `--quality`, slowest/best compression method) to DST/images/<stem>.webp. The
manifest finds Kaggle's `X.dcm.png` as `X.dcm.webp` by its stem, so `cxr-dist prepare --data DST`
makes the same samples, keys and uid-level splits as from SRC; only the pixels carry the codec's
error. The shared 6,311-image copy: 89 MB -> 34.1 MiB at quality 85, mean PSNR 41.2 dB against
the source (what docs/results.md's GPU runs trained on; they had to fit a 64 MiB upload).
Prints the size and the mean PSNR. Refuses to write into a non-empty DST.
"""
from __future__ import annotations

import argparse
import io
import shutil
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_dist.data.sources.common import RASTER_EXTENSIONS as IMAGE_EXTENSIONS
from cxr_dist.data.sources.iu import PROJECTIONS_CSV, REPORTS_CSV


def _convert(job: tuple[Path, Path, int]) -> tuple[int, float]:
    src, dst, quality = job
    try:
        with Image.open(src) as im:
            gray = im.convert("L")
    except OSError:  # unreadable: copied as it is, so that `prepare` skips it as it would the source
        shutil.copyfile(src, dst.with_name(src.name))
        return src.stat().st_size, float("nan")
    buf = io.BytesIO()
    gray.save(buf, format="WEBP", quality=quality, method=6)
    data = buf.getvalue()
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_bytes(data)
    tmp.rename(dst)
    a = np.asarray(gray, dtype=np.float64)
    b = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    return len(data), 10 * np.log10(255.0**2 / mse) if mse > 0 else float("inf")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--quality", type=int, default=85)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    missing = [n for n in (REPORTS_CSV, PROJECTIONS_CSV, "images") if not (args.src / n).exists()]
    if missing:
        print(f"compact_copy: {args.src} is not a Kaggle-layout folder (missing {', '.join(missing)})", file=sys.stderr)
        return 2
    if args.dst.exists() and any(args.dst.iterdir()):
        print(f"compact_copy: {args.dst} is not empty; refusing to write into it", file=sys.stderr)
        return 2
    (args.dst / "images").mkdir(parents=True, exist_ok=True)
    for name in (REPORTS_CSV, PROJECTIONS_CSV):
        shutil.copyfile(args.src / name, args.dst / name)
    images = sorted(p for p in (args.src / "images").rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    jobs = [(p, args.dst / "images" / (p.stem + ".webp"), args.quality) for p in images]
    with Pool(args.workers) as pool:
        out = pool.map(_convert, jobs, chunksize=32)
    size = sum(n for n, _ in out)
    print(f"{len(out)} images -> {args.dst}/images: {size / 2**20:.1f} MiB WebP q{args.quality}, "
          f"mean PSNR {np.nanmean([p for _, p in out]):.1f} dB; {sum(p != p for _, p in out)} unreadable, copied as they are")
    return 0


if __name__ == "__main__":
    sys.exit(main())
