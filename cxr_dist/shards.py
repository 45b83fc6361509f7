"""Sources -> splits by patient -> WebDataset tars per split, ``index.json`` and ``skipped.jsonl``.

Images are decoded and resized once here (in a process pool), so that training only decodes
small JPEGs. Output, all in OUT:

    {split}-{i:05d}.tar   samples: __key__, jpg (grayscale, q95, longest side image_size), cls, json;
                          one source per shard; splits train/val/test (or fold0..), external
    index.json            per split: shards [{file, count, sha256, source}], total, labels, and per
                          source its counts by view x label; skipped; checksum (index.py)
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
import re
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from .config import DataConfig, sources_of
from .errors import DataError
from .fileio import write_bytes_atomic as atomic_write
from .index import INDEX_FORMAT, INDEX_VERSION
from .log import bars_enabled
from .manifest import label_of
from .preprocess import encode_film
from .sources import ERROR_REASONS, read_sources
from .split import split_by_source, split_names

SHARD_RE = re.compile(r"^(?:train|val|test|external|fold\d+)-\d{5}\.tar$")
OUR_FILE_RE = re.compile(
    r"^(?:(?:train|val|test|external|fold\d+)-\d{5}\.tar|index\.json|skipped\.jsonl|\.[^/]+\.tmp(?:-[0-9a-f]+)?)$")


# ----------------------------------------------------------------------------- images


def _encode_job(job: tuple[int, str, int, str, str]) -> tuple[int, bytes | None, str]:
    i, path, image_size, resize, intensity = job
    try:
        return i, encode_film(path, image_size, resize, intensity), ""
    except DataError as e:  # says what and why already
        return i, None, str(e)
    except Exception as e:  # any decoder failure means the file is unusable: skip it, say why
        return i, None, f"{type(e).__name__}: {e}"


def encode_all(paths: list[str], data: DataConfig) -> list[tuple[bytes | None, str]]:
    """(jpeg bytes or None, error text) for each path, in order, through preprocess.encode_film
    (the one function prepare, evaluate --data and predict use); data.prepare_workers processes."""
    workers = data.prepare_workers
    jobs = [(i, p, data.image_size, data.resize, data.intensity) for i, p in enumerate(paths)]
    out: list[tuple[bytes | None, str]] = [(None, "")] * len(jobs)
    bar = tqdm(total=len(jobs), desc="decode+resize", unit="img", file=sys.stderr, disable=not bars_enabled())
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


def _check_out_dir(out: Path, data_paths: list[str]) -> None:
    """Refuse an OUT that holds anything prepare did not write: it never deletes user data."""
    if out.exists() and not out.is_dir():
        raise DataError(f"shards folder {out} exists and is not a folder")
    if any(p and out.resolve() == Path(p).resolve() for p in data_paths):
        raise DataError(f"shards folder {out} is a dataset folder; choose another --out")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not OUR_FILE_RE.match(p.name))
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise DataError(
                f"shards folder {out} holds files that cxr-dist prepare did not write ({shown}); "
                "choose an empty or new folder"
            )


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


# Sample JSON fields (those a row has): the common ones of every source, then the IU report's.
META_FIELDS = ("source", "patient", "study", "view", "label", "findings", "report", "filename", "subset",
               "uid", "projection", "problems", "impression", "report_findings")


def _uid(row: dict, prefixed: bool) -> str:
    """The study-level pooling unit that evaluation reads as `uid`: IU's uid in the one-folder
    shorthand (as always); with [[data.sources]], the study qualified by its source, so that two
    collections' study "1" never pool together."""
    if not prefixed:
        return row["uid"]
    return f"{row['source']}__{row['study']}"


def _sample(row: dict, jpg: bytes, fold: int | None, prefixed: bool) -> dict:
    # Rows of several sources share one table: a column another source has is NaN here.
    meta = {k: row[k] for k in META_FIELDS if isinstance(row.get(k), str)}
    meta.update(label=int(row["label"]), uid=_uid(row, prefixed), split=row["split"], fold=fold)
    return {
        "__key__": row["key"], "jpg": jpg, "cls": str(int(row["label"])).encode(),
        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
    }


def _sorted_for_split(part: pd.DataFrame, seed: int, split: str, sources: list[str]) -> pd.DataFrame:
    """A split's rows in shard order: a seeded permutation (so every shard mixes patients and
    labels), then grouped by source in config order (a shard holds one source, so the train
    stream can mix sources by weight). With one source this is the permutation alone."""
    part = part.sort_values("key", kind="stable")
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    part = part.iloc[rng.permutation(len(part))]
    order = {s: i for i, s in enumerate(sources)}
    return part.sort_values("source", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)


def write_shards(data_cfg: DataConfig, out_dir: str | Path, single_split: str | None = None) -> dict:
    """Read every source of data_cfg, split it, write shards into out_dir; return the index.

    Sources with role "train" are split by patient into train/val/test (or folds); sources with
    role "external" go whole into the split "external" (evaluated, never trained on). With
    `single_split`, every image goes into that one split (no split by patient): `cxr-dist evaluate
    --data DIR` uses it to score a whole external folder.

    Raises DataError for bad input, for an out_dir that holds foreign files, when the share of
    error skips (missing/corrupt images, rows without report, conflicting labels) exceeds
    data_cfg.max_skip_frac, or when nothing is left.
    """
    out = Path(out_dir)
    sources = sources_of(data_cfg)
    _check_out_dir(out, [s.path for s in sources])
    df, skipped = read_sources(data_cfg)
    n_rows = len(df) + len(skipped)

    encoded = encode_all(df["path"].tolist(), data_cfg)
    ok = np.array([data is not None for data, _ in encoded], dtype=bool)
    for (data, err), rec in zip(encoded, df.to_dict("records")):
        if data is None:
            skipped.append({"source": rec["source"], "patient": rec["patient"], "uid": _uid(rec, bool(data_cfg.sources)),
                            "filename": rec["filename"], "reason": "corrupt_image", "detail": f"{rec['path']}: {err}"})
    n_err = sum(1 for s in skipped if s["reason"] in ERROR_REASONS)
    counts = dict(sorted(Counter(s["reason"] for s in skipped).items()))
    if n_rows and n_err / n_rows > data_cfg.max_skip_frac:
        examples = "; ".join(f"{s['filename']}: {s['reason']}" for s in skipped if s["reason"] in ERROR_REASONS)
        raise DataError(
            f"{n_err} of {n_rows} images ({n_err / n_rows:.1%}) are missing, unreadable, have no report or "
            f"conflicting labels, more than data.max_skip_frac = {data_cfg.max_skip_frac:.1%} (skipped by reason: "
            f"{counts}). First ones: {examples[:600]}. If that is expected, raise it: --data.max_skip_frac 0.2"
        )
    jpgs = [data for data, _ in encoded]
    df = df.assign(jpg_index=np.arange(len(df)))[ok].reset_index(drop=True)
    if df.empty:
        raise DataError(f"no readable images in {', '.join(s.path for s in sources)} (skipped by reason: {counts})")
    if single_split:
        df["split"] = single_split
        names = [single_split]
    else:
        df["split"] = split_by_source(df, data_cfg)
        names = split_names(data_cfg.k_folds) + (["external"] if (df["role"] == "external").any() else [])

    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").unlink(missing_ok=True)  # a half-updated folder must not look complete
    source_names = [s.name for s in sources]
    splits: dict[str, dict] = {}
    lines: list[str] = []
    written: set[str] = set()
    for name in names:
        part = _sorted_for_split(df[df["split"] == name], data_cfg.seed, name, source_names)
        fold = int(name[4:]) if name.startswith("fold") else None
        shards, i = [], 0
        for source in source_names:
            rows_s = part[part["source"] == source].to_dict("records")
            start = 0
            for size in _shard_sizes(len(rows_s), data_cfg.samples_per_shard) if rows_s else []:
                file = f"{name}-{i:05d}.tar"
                rows = rows_s[start:start + size]
                start, i = start + size, i + 1
                samples = [_sample(r, jpgs[r["jpg_index"]], fold, bool(data_cfg.sources)) for r in rows]
                data = _tar_bytes(samples)
                atomic_write(out / file, data)
                written.add(file)
                shards.append({"file": file, "count": size, "sha256": hashlib.sha256(data).hexdigest(),
                               "source": source})
                lines += [f"{r['key']}\t{name}\t{file}\t{r['label']}\t{hashlib.sha256(s['jpg']).hexdigest()}\n"
                          for r, s in zip(rows, samples)]
        splits[name] = {**_counts(part), "shards": shards,
                        "sources": {src: {**_counts(g), "views": _view_counts(g)}
                                    for src, g in part.groupby("source", sort=False)}}

    skipped.sort(key=lambda s: (s.get("source", ""), s["reason"], s["filename"], str(s.get("patient", ""))))
    atomic_write(out / "skipped.jsonl",
                 "".join(json.dumps(s, sort_keys=True, ensure_ascii=False) + "\n" for s in skipped).encode())
    index = _index(data_cfg, sources, df, splits, counts, n_rows, n_err, skipped, sorted(lines))
    atomic_write(out / "index.json", (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    for p in out.iterdir():  # shards of an earlier, larger run (ours: the folder check passed)
        if SHARD_RE.match(p.name) and p.name not in written:
            p.unlink()
    return index


def _counts(part: pd.DataFrame) -> dict:
    n_abn = int(part["label"].sum())
    return {"total": len(part), "uids": int(part[["source", "study"]].drop_duplicates().shape[0]),
            "patients": int(part[["source", "patient"]].drop_duplicates().shape[0]),
            "labels": {"normal": len(part) - n_abn, "abnormal": n_abn}}


def _view_counts(part: pd.DataFrame) -> dict:
    return {view: {"normal": int((g["label"] == 0).sum()), "abnormal": int((g["label"] == 1).sum())}
            for view, g in part.groupby("view", sort=True)}


def _index(cfg: DataConfig, sources, df: pd.DataFrame, splits: dict, counts: dict, n_rows: int, n_err: int,
           skipped: list[dict], lines: list[str]) -> dict:
    # 'No Indexing' is an IU notion: counted over the IU rows (those with a Problems text).
    iu = df[df["problems"].notna()] if "problems" in df else df.iloc[:0]
    no_idx_in = iu["problems"].map(label_of).isna() if len(iu) else pd.Series([], dtype=bool)
    no_idx_skipped = [s for s in skipped if s["reason"] == "no_indexing"]
    n_abn = int(df["label"].sum())
    return {
        "format": INDEX_FORMAT, "version": INDEX_VERSION,
        "data_dir": str(Path(cfg.data_dir).resolve()) if cfg.data_dir else "",
        "sources": [{"name": s.name, "format": s.format, "path": str(Path(s.path).resolve()), "role": s.role,
                     "weight": s.weight} for s in sources],
        "seed": cfg.seed, "image_size": cfg.image_size, "val_frac": cfg.val_frac, "test_frac": cfg.test_frac,
        "k_folds": cfg.k_folds, "no_indexing": cfg.no_indexing, "samples_per_shard": cfg.samples_per_shard,
        "resize": cfg.resize, "intensity": cfg.intensity,
        "splits": splits,
        "skipped": counts,
        "no_indexing_counts": {
            "treatment": cfg.no_indexing,
            "images": int(no_idx_in.sum()) + len(no_idx_skipped),
            "uids": (int(iu.loc[no_idx_in, "uid"].nunique()) if len(iu) else 0) + len({s.get("uid", "") for s in no_idx_skipped}),
        },
        "totals": {"rows": n_rows, "samples": len(df), "uids": int(df[["source", "study"]].drop_duplicates().shape[0]),
                   "patients": int(df[["source", "patient"]].drop_duplicates().shape[0]),
                   "normal": len(df) - n_abn, "abnormal": n_abn,
                   "skipped": sum(counts.values()), "error_skipped": n_err},
        "checksum": "sha256:" + hashlib.sha256("".join(lines).encode()).hexdigest(),
    }
