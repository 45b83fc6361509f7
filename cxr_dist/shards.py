"""Manifest + splits -> WebDataset tars per split, ``index.json`` and ``skipped.jsonl``.

Images are decoded and resized once here (in a process pool), so that training only decodes
small JPEGs. Output, all in OUT:

    {split}-{i:05d}.tar   samples: __key__, jpg (grayscale, q95, longest side image_size), cls, json
    index.json            per split: shards [{file, count, sha256}], total, labels; skipped; checksum
    skipped.jsonl         one line per input row that is not in any shard, with its reason

Every file is written to a temporary name in OUT and renamed (os.replace), so a reader never
sees half a file. Tars have fixed mtime/owner in their headers: the same inputs and seed give
byte-identical output.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from .config import DataConfig
from .errors import DataError
from .manifest import ERROR_REASONS, build_manifest, label_of
from .split import assign_splits, split_names

INDEX_FORMAT = "cxr-dist-shards"
INDEX_VERSION = 1
JPEG_QUALITY = 95
SHARD_RE = re.compile(r"^(?:train|val|test|fold\d+)-\d{5}\.tar$")
OUR_FILE_RE = re.compile(r"^(?:(?:train|val|test|fold\d+)-\d{5}\.tar|index\.json|skipped\.jsonl|\.[^/]+\.tmp)$")


# ----------------------------------------------------------------------------- images


def _to_gray(im: Image.Image) -> Image.Image:
    if im.mode == "L":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        # 16-bit PNGs: map the full 16-bit range to 8 bits (fixed, not per-image min/max,
        # so that intensities stay comparable between images).
        arr = np.asarray(im, dtype=np.float32) / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    return im.convert("L")  # RGB/RGBA/P/LA: ITU-R 601 luma; the Kaggle PNGs have R = G = B


def encode_image(path: str | Path, image_size: int) -> bytes:
    """Read any PNG/JPEG, convert to 8-bit grayscale, resize so the longest side is image_size
    (aspect ratio kept), and return JPEG bytes (quality 95). Raises on unreadable files."""
    with Image.open(path) as im:
        # JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale (still >= the target size);
        # a ~2000 px input then costs a fraction of a full decode.
        im.draft("L", (image_size, image_size))
        im.load()
        gray = _to_gray(im)
    w, h = gray.size
    scale = image_size / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != gray.size:
        gray = gray.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    gray.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _encode_job(job: tuple[int, str, int]) -> tuple[int, bytes | None, str]:
    i, path, image_size = job
    try:
        return i, encode_image(path, image_size), ""
    except Exception as e:  # any decoder failure means the file is unusable: skip it, say why
        return i, None, f"{type(e).__name__}: {e}"


def encode_all(paths: list[str], image_size: int, workers: int) -> list[tuple[bytes | None, str]]:
    """(jpeg bytes or None, error text) for each path, in order; a pool of ``workers`` processes."""
    jobs = [(i, p, image_size) for i, p in enumerate(paths)]
    out: list[tuple[bytes | None, str]] = [(None, "")] * len(jobs)
    bar = tqdm(total=len(jobs), desc="decode+resize", unit="img", file=sys.stderr, disable=None)
    if workers <= 1:
        results = map(_encode_job, jobs)
        for i, data, err in results:
            out[i] = (data, err)
            bar.update()
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for i, data, err in pool.imap_unordered(_encode_job, jobs, chunksize=8):
                out[i] = (data, err)
                bar.update()
    bar.close()
    return out


# ----------------------------------------------------------------------------- output folder


def _check_out_dir(out: Path, data_dir: str) -> None:
    """Refuse an OUT that holds anything prepare did not write: it never deletes user data."""
    if out.exists() and not out.is_dir():
        raise DataError(f"shards folder {out} exists and is not a folder")
    if data_dir and out.resolve() == Path(data_dir).resolve():
        raise DataError(f"shards folder {out} is the dataset folder; choose another --out")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not OUR_FILE_RE.match(p.name))
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise DataError(
                f"shards folder {out} holds files that cxr-dist prepare did not write ({shown}); "
                "choose an empty or new folder"
            )


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _tar_bytes(samples: list[dict]) -> bytes:
    import webdataset as wds

    buf = io.BytesIO()
    # Fixed mtime/owner/mode: identical inputs give byte-identical tars.
    with wds.TarWriter(buf, encoder=False, mtime=0.0, user="cxr-dist", group="cxr-dist", mode=0o444) as w:
        for s in samples:
            w.write(s)
    return buf.getvalue()


# ----------------------------------------------------------------------------- main entry


def _shard_sizes(n: int, per_shard: int) -> list[int]:
    """Cut n samples into ceil(n / per_shard) shards whose sizes differ by at most one."""
    k = max(1, -(-n // per_shard))
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _sample(row: dict, jpg: bytes, fold: int | None) -> dict:
    meta = {
        "uid": row["uid"], "projection": row["projection"], "label": int(row["label"]),
        "problems": row["problems"], "findings": row["findings"], "impression": row["impression"],
        "split": row["split"], "fold": fold, "filename": row["filename"],
    }
    return {
        "__key__": row["key"], "jpg": jpg, "cls": str(int(row["label"])).encode(),
        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
    }


def write_shards(data_cfg: DataConfig, out_dir: str | Path, single_split: str | None = None) -> dict:
    """Build the manifest of data_cfg.data_dir, split it, write shards into out_dir; return the index.

    With `single_split`, every image goes into that one split (no uid split): `cxr-dist evaluate
    --data DIR` uses it to score a whole external folder.

    Raises DataError for bad input, for an out_dir that holds foreign files, when the share of
    error skips (missing/corrupt images, rows without report) exceeds data_cfg.max_skip_frac,
    or when nothing is left.
    """
    out = Path(out_dir)
    _check_out_dir(out, data_cfg.data_dir)
    df, skipped = build_manifest(data_cfg.data_dir, data_cfg.no_indexing)
    n_rows = len(df) + len(skipped)

    encoded = encode_all(df["path"].tolist(), data_cfg.image_size, data_cfg.prepare_workers)
    ok = np.array([data is not None for data, _ in encoded], dtype=bool)
    for (data, err), rec in zip(encoded, df.to_dict("records")):
        if data is None:
            skipped.append({"uid": rec["uid"], "filename": rec["filename"], "reason": "corrupt_image",
                            "detail": f"{rec['path']}: {err}"})
    n_err = sum(1 for s in skipped if s["reason"] in ERROR_REASONS)
    counts = dict(sorted(Counter(s["reason"] for s in skipped).items()))
    if n_rows and n_err / n_rows > data_cfg.max_skip_frac:
        examples = "; ".join(f"{s['filename']}: {s['reason']}" for s in skipped if s["reason"] in ERROR_REASONS)
        raise DataError(
            f"{n_err} of {n_rows} images ({n_err / n_rows:.1%}) are missing, unreadable or have no report, "
            f"more than data.max_skip_frac = {data_cfg.max_skip_frac:.1%} (skipped by reason: {counts}). "
            f"First ones: {examples[:600]}. If that is expected, raise it: --data.max_skip_frac 0.2"
        )
    jpgs = [data for data, _ in encoded]
    df = df.assign(jpg_index=np.arange(len(df)))[ok].reset_index(drop=True)
    if df.empty:
        raise DataError(f"no readable images in {data_cfg.data_dir} (skipped by reason: {counts})")
    if single_split:
        df["split"] = single_split
    else:
        df["split"] = assign_splits(df, data_cfg.val_frac, data_cfg.test_frac, data_cfg.k_folds, data_cfg.seed)

    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").unlink(missing_ok=True)  # a half-updated folder must not look complete
    splits: dict[str, dict] = {}
    lines: list[str] = []
    written: set[str] = set()
    for name in [single_split] if single_split else split_names(data_cfg.k_folds):
        part = df[df["split"] == name].sort_values("key", kind="stable")
        # Seeded order inside the split, so every shard mixes uids and labels.
        rng = np.random.default_rng([data_cfg.seed, zlib.crc32(name.encode())])
        part = part.iloc[rng.permutation(len(part))].reset_index(drop=True)
        fold = int(name[4:]) if name.startswith("fold") else None
        shards, start = [], 0
        for i, size in enumerate(_shard_sizes(len(part), data_cfg.samples_per_shard) if len(part) else []):
            file = f"{name}-{i:05d}.tar"
            rows = part.iloc[start:start + size].to_dict("records")
            start += size
            samples = [_sample(r, jpgs[r["jpg_index"]], fold) for r in rows]
            data = _tar_bytes(samples)
            _atomic_write(out / file, data)
            written.add(file)
            shards.append({"file": file, "count": size, "sha256": hashlib.sha256(data).hexdigest()})
            lines += [f"{r['key']}\t{name}\t{file}\t{r['label']}\t{hashlib.sha256(s['jpg']).hexdigest()}\n"
                      for r, s in zip(rows, samples)]
        n_abn = int(part["label"].sum())
        splits[name] = {"total": len(part), "uids": int(part["uid"].nunique()),
                        "labels": {"normal": len(part) - n_abn, "abnormal": n_abn}, "shards": shards}

    skipped.sort(key=lambda s: (s["reason"], s["filename"], s["uid"]))
    _atomic_write(out / "skipped.jsonl",
                  "".join(json.dumps(s, sort_keys=True, ensure_ascii=False) + "\n" for s in skipped).encode())
    index = _index(data_cfg, df, splits, counts, n_rows, n_err, skipped, sorted(lines))
    _atomic_write(out / "index.json", (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    for p in out.iterdir():  # shards of an earlier, larger run (ours: the folder check passed)
        if SHARD_RE.match(p.name) and p.name not in written:
            p.unlink()
    return index


def _index(cfg: DataConfig, df: pd.DataFrame, splits: dict, counts: dict, n_rows: int, n_err: int,
           skipped: list[dict], lines: list[str]) -> dict:
    no_idx_in = df["problems"].map(label_of).isna()
    no_idx_skipped = [s for s in skipped if s["reason"] == "no_indexing"]
    n_abn = int(df["label"].sum())
    return {
        "format": INDEX_FORMAT, "version": INDEX_VERSION,
        "data_dir": str(Path(cfg.data_dir).resolve()),
        "seed": cfg.seed, "image_size": cfg.image_size, "val_frac": cfg.val_frac, "test_frac": cfg.test_frac,
        "k_folds": cfg.k_folds, "no_indexing": cfg.no_indexing, "samples_per_shard": cfg.samples_per_shard,
        "splits": splits,
        "skipped": counts,
        "no_indexing_counts": {
            "treatment": cfg.no_indexing,
            "images": int(no_idx_in.sum()) + len(no_idx_skipped),
            "uids": int(df.loc[no_idx_in, "uid"].nunique()) + len({s["uid"] for s in no_idx_skipped}),
        },
        "totals": {"rows": n_rows, "samples": len(df), "uids": int(df["uid"].nunique()),
                   "normal": len(df) - n_abn, "abnormal": n_abn,
                   "skipped": sum(counts.values()), "error_skipped": n_err},
        "checksum": "sha256:" + hashlib.sha256("".join(lines).encode()).hexdigest(),
    }
