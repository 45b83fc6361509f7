"""Sources -> splits by patient -> WebDataset tars per split, ``index.json`` and ``skipped.jsonl``.

Images are decoded and resized once here (in a process pool), so that training only decodes
small JPEGs. Output, all in OUT:

    {split}-{i:05d}.tar   samples: __key__, jpg (grayscale, q95, longest side image_size), cls, json;
                          one source per shard; splits train/val/test (or fold0..), external
    index.json            per split: shards [{file, count, sha256, source}], total, labels, and per
                          source its counts by view x label; skipped; checksum (index.py); with
                          data.findings, the vocabulary and per split (and source) each finding's
                          positive / negative / masked counts
    skipped.jsonl         one line per input row that is not in any shard, with its reason
    .cxr-dist-shards      the marker that says prepare made this folder (`_check_out_dir`)

Every film is decoded once (preprocess.shard_film): its JPEG, a digest of its decoded pixels and the
constant-image check of predict. A blank film is skipped (`constant_image`); films with the same
pixels under several names keep one copy (`_duplicates`: `duplicate_image` skips), and copies with
different labels stop prepare.

Every file is written to a temporary name in OUT and renamed (os.replace), so a reader never
sees half a file. Tars have fixed mtime/owner in their headers: the same inputs and seed give
byte-identical output.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import multiprocessing
import re
import shutil
import tarfile
import zlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from ..config import DataConfig, sources_of
from ..errors import DataError
from ..fileio import write_bytes_atomic as atomic_write
from .index import INDEX_FORMAT, INDEX_VERSION, ShardIndex, has_shard_index
from ..log import progress
from . import findings as fnd
from .sources.iu import label_of
from .preprocess import ConstantImageError, shard_film
from .sources import ERROR_REASONS, label_text_fields, read_sources
from .split import split_by_source, split_names

SHARD_RE = re.compile(r"^(?:train|val|test|external|fold\d+)-\d{5}\.tar$")
PARTS_DIR = ".prepare-parts"  # OUT/.prepare-parts/part-TTTT-of-NNNN.tar: an array prepare's tasks
MARKER = ".cxr-dist-shards"  # written into every folder prepare makes: only such a folder is ours
MARKER_TEXT = (b"cxr-dist prepare made this folder: it writes, replaces and deletes its shards, index.json and\n"
               b"skipped.jsonl here. Do not keep other files in it.\n")
OUR_FILE_RE = re.compile(r"^(?:(?:train|val|test|external|fold\d+)-\d{5}\.tar|index\.json|skipped\.jsonl"
                         r"|\.prepare-parts|\.cxr-dist-shards|\.[^/]+\.tmp(?:-[0-9a-f]+)?)$")
PART_FORMAT = 2  # 2: parts carry each film's pixel digest and skip reason


# ----------------------------------------------------------------------------- images


class Encoded(NamedTuple):
    """One film through preprocess.shard_film: its JPEG bytes and pixel digest, or why not (a skip
    reason, "corrupt_image" or "constant_image", and the message)."""
    jpg: bytes | None
    digest: str | None
    reason: str | None
    error: str


def _encode_job(job: tuple[int, str, int, str, str]) -> tuple[int, Encoded]:
    i, path, image_size, resize, intensity = job
    try:
        jpg, digest = shard_film(path, image_size, resize, intensity)
        return i, Encoded(jpg, digest, None, "")
    except ConstantImageError as e:  # a blank film: what predict refuses
        return i, Encoded(None, None, "constant_image", str(e))
    except DataError as e:  # says what and why already
        return i, Encoded(None, None, "corrupt_image", str(e))
    except Exception as e:  # any decoder failure means the file is unusable: skip it, say why
        return i, Encoded(None, None, "corrupt_image", f"{type(e).__name__}: {e}")


def encode_films(paths: list[str], data: DataConfig) -> list[Encoded]:
    """Each path through preprocess.shard_film (encode_film's JPEG, the function prepare, evaluate
    --data and predict share; the pixel digest; the constant-image check), in order;
    data.prepare_workers processes."""
    workers = data.prepare_workers
    jobs = [(i, p, data.image_size, data.resize, data.intensity) for i, p in enumerate(paths)]
    out: list[Encoded] = [Encoded(None, None, "corrupt_image", "")] * len(jobs)
    bar = progress(len(jobs), "decode+resize (films)")  # a bar on a terminal, else a log line every 30 s
    if workers <= 1:
        for i, enc in map(_encode_job, jobs):
            out[i] = enc
            bar.update()
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for i, enc in pool.imap_unordered(_encode_job, jobs, chunksize=8):
                out[i] = enc
                bar.update()
    bar.close()
    return out


def encode_all(paths: list[str], data: DataConfig) -> list[tuple[bytes | None, str]]:
    """(jpeg bytes or None, error text) for each path, in order (`encode_films`, fewer fields)."""
    return [(e.jpg, e.error) for e in encode_films(paths, data)]


# ----------------------------------------------------------------------------- output folder


def _check_out_dir(out: Path, data_paths: list[str]) -> None:
    """Refuse an OUT that prepare did not make, or that holds anything prepare did not write: it
    never overwrites or deletes user data. Ours: empty or absent (prepare makes it and puts its
    MARKER in), marked, or made by a version before the marker (an index.json of ours: adopted)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"shards folder {out} exists and is not a folder")
    if any(p and out.resolve() == Path(p).resolve() for p in data_paths):
        raise DataError(f"shards folder {out} is a dataset folder; choose another --out")
    if out.is_dir():
        entries = sorted(p.name for p in out.iterdir())
        # Another task of the same array may be writing the marker right now (atomic_write's temp
        # name, `.<MARKER>.tmp-<hex>`): that folder is being claimed by prepare, not a user's.
        marked = any(name == MARKER or name.startswith(f".{MARKER}.tmp-") for name in entries)
        if entries and not marked and not _made_by_old_prepare(out):
            shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
            raise DataError(
                f"shards folder {out} is not empty and cxr-dist prepare did not make it (no {MARKER} file; it "
                f"holds {shown}); prepare never overwrites or deletes files it did not write: choose an empty "
                "or new folder"
            )
        foreign = [name for name in entries if not OUR_FILE_RE.match(name)]
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise DataError(
                f"shards folder {out} holds files that cxr-dist prepare did not write ({shown}); "
                "choose an empty or new folder"
            )


def _made_by_old_prepare(out: Path) -> bool:
    """A folder of a prepare from before the marker: its index.json says format "cxr-dist-shards"."""
    return has_shard_index(out)


def _claim(out: Path) -> None:
    """Create OUT if needed and mark it as prepare's (before prepare writes anything else into it)."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).is_file():
        atomic_write(out / MARKER, MARKER_TEXT)


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
TEXT_PREFIX = "text_"  # a reader's column text_X is the sample's text field X (json "text": {X: ...})
META_FIELDS = ("source", "patient", "study", "view", "label", "findings", "report", "filename", "subset",
               "uid", "projection", "problems", "impression", "report_findings")


def _uid(row: dict, prefixed: bool) -> str:
    """The study-level pooling unit that evaluation reads as `uid`: IU's uid in the one-folder
    shorthand (as always); with [[data.sources]], the study qualified by its source, so that two
    collections' study "1" never pool together."""
    if not prefixed:
        return row["uid"]
    return f"{row['source']}__{row['study']}"


def _sample(row: dict, jpg: bytes, fold: int | None, prefixed: bool, targets: dict[str, int] | None = None) -> dict:
    # Rows of several sources share one table: a column another source has is NaN here.
    meta = {k: row[k] for k in META_FIELDS if isinstance(row.get(k), str)}
    meta.update(label=int(row["label"]), uid=_uid(row, prefixed), split=row["split"], fold=fold)
    if targets is not None:  # data.findings: the annotated findings only (a missing one is masked)
        meta["finding_targets"] = targets
    # The source's text fields (IU: its report's sections), for image+text models.
    text = {k[len(TEXT_PREFIX):]: row[k] for k in row if k.startswith(TEXT_PREFIX) and isinstance(row[k], str)}
    if text:
        meta["text"] = text
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


def write_shards(data_cfg: DataConfig, out_dir: str | Path, single_split: str | None = None) -> ShardIndex:
    """Read every source of data_cfg, split it, write shards into out_dir; return their index.

    Sources with role "train" are split by patient into train/val/test (or folds); sources with
    role "external" go whole into the split "external" (evaluated, never trained on). With
    `single_split`, every image goes into that one split (no split by patient): `cxr-dist evaluate
    --data DIR` uses it to score a whole external folder.

    Raises DataError for bad input, for an out_dir that holds foreign files, when the share of
    error skips (missing/corrupt images, rows without report, conflicting labels) exceeds
    data_cfg.max_skip_frac, or when nothing is left.
    """
    out = Path(out_dir)
    sources, df, skipped = _read_table(data_cfg, out)
    encoded = encode_films(df["path"].tolist(), data_cfg)
    index = _write_output(data_cfg, out, sources, df, skipped,
                          [None if e.jpg is not None else (e.reason, e.error) for e in encoded],
                          [e.digest for e in encoded], lambda i: encoded[i].jpg, single_split)
    shutil.rmtree(out / PARTS_DIR, ignore_errors=True)  # parts of an earlier, unfinished array prepare
    return index


def _read_table(data_cfg: DataConfig, out: Path) -> tuple[list, pd.DataFrame, list[dict]]:
    """(sources, the table of usable rows, the rows skipped while reading): cheap, no image decoded."""
    sources = sources_of(data_cfg)
    fnd.check(data_cfg)  # data.findings and the sources' findings settings, before any work
    _check_out_dir(out, [s.path for s in sources])
    df, skipped = read_sources(data_cfg)
    return sources, df, skipped


def _write_output(data_cfg: DataConfig, out: Path, sources: list, df: pd.DataFrame, skipped: list[dict],
                  errors: list[tuple[str, str] | None], digests: list[str | None], jpg_of,
                  single_split: str | None) -> ShardIndex:
    """Everything after decoding: error skips, duplicates, the split (which depends on which images
    decoded), the shard tars, skipped.jsonl and index.json. `errors[i]` is None when row i of df
    encoded, else (skip reason, message); `digests[i]` its pixel digest; `jpg_of(i)` returns row i's
    JPEG bytes. One code path for the single-process prepare and the merge of an array prepare, so
    that both write the same bytes."""
    n_rows = len(df) + len(skipped)
    skipped = list(skipped)
    ok = np.array([err is None for err in errors], dtype=bool)
    prefixed = bool(data_cfg.sources)
    records = df.to_dict("records")
    vocab = fnd.vocabulary(data_cfg.findings)
    # Per row (by jpg_index), None without data.findings: then nothing below changes a byte.
    targets, finding_info = fnd.sample_targets(vocab, sources, records) if vocab else ([None] * len(records), {})
    for err, rec in zip(errors, records):
        if err is not None:
            skipped.append({"source": rec["source"], "patient": rec["patient"], "uid": _uid(rec, prefixed),
                            "filename": rec["filename"], "reason": err[0], "detail": f"{rec['path']}: {err[1]}"})
    dropped, dup_skips = _duplicates(records, digests, ok, [s.name for s in sources], prefixed)
    ok[dropped] = False
    skipped += dup_skips
    n_err = sum(1 for s in skipped if s["reason"] in ERROR_REASONS)
    counts = dict(sorted(Counter(s["reason"] for s in skipped).items()))
    if n_rows and n_err / n_rows > data_cfg.max_skip_frac:
        examples = "; ".join(f"{s['filename']}: {s['reason']}" for s in skipped if s["reason"] in ERROR_REASONS)
        raise DataError(
            f"{n_err} of {n_rows} images ({n_err / n_rows:.1%}) are missing, unreadable, blank, duplicates, have no "
            f"report or conflicting labels, more than data.max_skip_frac = {data_cfg.max_skip_frac:.1%} (skipped by reason: "
            f"{counts}). First ones: {examples[:600]}. If that is expected, raise it: --data.max_skip_frac 0.2"
        )
    df = df.assign(jpg_index=np.arange(len(df)))[ok].reset_index(drop=True)
    if df.empty:
        raise DataError(f"no readable images in {', '.join(s.path for s in sources)} (skipped by reason: {counts})")
    if single_split:
        df["split"] = single_split
        names = [single_split]
    else:
        df["split"] = split_by_source(df, data_cfg)
        names = split_names(data_cfg.k_folds) + (["external"] if (df["role"] == "external").any() else [])

    _claim(out)
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
                samples = [_sample(r, jpg_of(r["jpg_index"]), fold, bool(data_cfg.sources), targets[r["jpg_index"]])
                           for r in rows]
                data = _tar_bytes(samples)
                atomic_write(out / file, data)
                written.add(file)
                shards.append({"file": file, "count": size, "sha256": hashlib.sha256(data).hexdigest(),
                               "source": source})
                lines += [f"{r['key']}\t{name}\t{file}\t{r['label']}\t{hashlib.sha256(s['jpg']).hexdigest()}"
                          + (f"\t{json.dumps(targets[r['jpg_index']], sort_keys=True)}" if vocab else "") + "\n"
                          for r, s in zip(rows, samples)]
        splits[name] = {**_counts(part), "shards": shards,
                        "sources": {src: {**_counts(g), "views": _view_counts(g)}
                                    for src, g in part.groupby("source", sort=False)}}
        if vocab:
            splits[name]["findings"] = fnd.counts((targets[i] for i in part["jpg_index"]), vocab)
            for src, g in part.groupby("source", sort=False):
                splits[name]["sources"][src]["findings"] = fnd.counts((targets[i] for i in g["jpg_index"]), vocab)

    skipped.sort(key=lambda s: (s.get("source", ""), s["reason"], s["filename"], str(s.get("patient", ""))))
    atomic_write(out / "skipped.jsonl",
                 "".join(json.dumps(s, sort_keys=True, ensure_ascii=False) + "\n" for s in skipped).encode())
    index = _index(data_cfg, sources, df, splits, counts, n_rows, n_err, skipped, sorted(lines))
    if vocab:  # the vocabulary, and what each source annotates and how (docs/findings.md)
        index["findings"] = list(vocab)
        for entry in index["sources"]:
            entry["findings"] = finding_info[entry["name"]]
    atomic_write(out / "index.json", (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    for p in out.iterdir():  # shards of an earlier, larger run (ours: the folder check passed)
        if SHARD_RE.match(p.name) and p.name not in written:
            p.unlink()
    return ShardIndex.from_json(index, out)


def _duplicates(records: list[dict], digests: list[str | None], ok: np.ndarray, source_order: list[str],
                prefixed: bool) -> tuple[list[int], list[dict]]:
    """Rows whose decoded pixels equal another row's (`digests`; only rows with `ok`), within a
    source or across sources: (the rows to drop, their `duplicate_image` skips naming the copy kept).

    The copy kept is the first by (source in config order, patient, key): every duplicate between
    two patients is kept on the same patient's side, so a patient's films stay together, and a
    film both in a training source and in an external one stays in the training source (the
    external evaluation must not hold training films). Copies with different labels: DataError.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, digest in enumerate(digests):
        if ok[i] and digest is not None:
            groups[digest].append(i)
    order = {name: k for k, name in enumerate(source_order)}
    dropped, skips, conflicts = [], [], []
    for members in groups.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda i: (order.get(records[i]["source"], len(order)), str(records[i]["patient"]),
                                    records[i]["key"]))
        if len({int(records[i]["label"]) for i in members}) > 1:
            conflicts.append(members)
            continue
        kept = records[members[0]]
        for i in members[1:]:
            rec = records[i]
            dropped.append(i)
            skips.append({"source": rec["source"], "patient": rec["patient"], "uid": _uid(rec, prefixed),
                          "filename": rec["filename"], "reason": "duplicate_image", "kept": kept["filename"],
                          "detail": f"{rec['path']}: the same pixels as {kept['filename']} (source {kept['source']}, "
                                    f"patient {kept['patient']}), which is kept"})
    if conflicts:
        conflicts.sort(key=lambda m: records[m[0]]["key"])
        shown = "; ".join(" = ".join(f"{records[i]['source']}:{records[i]['filename']} (label {int(records[i]['label'])})"
                                     for i in m) for m in conflicts[:5])
        raise DataError(
            f"{len(conflicts)} film(s) occur under several names with different labels (the same decoded pixels): "
            f"{shown}{' ...' if len(conflicts) > 5 else ''}. One film has one label: correct the labels, or "
            "remove the wrong copies, then prepare again")
    return dropped, skips


def text_fields_of(src, df: pd.DataFrame) -> dict:
    """What the index records of a source's text: the fields its samples carry, and those its
    label was derived from (an input that reads them reads the label: config.validate)."""
    rows = df[df["source"] == src.name]
    fields = sorted(c[len(TEXT_PREFIX):] for c in df.columns if c.startswith(TEXT_PREFIX) and rows[c].notna().any())
    return {"text_fields": fields, "label_text_fields": [f for f in label_text_fields(src) if f in fields]}


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
                     "weight": s.weight, **text_fields_of(s, df)} for s in sources],
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


# ----------------------------------------------------------------------------- array prepare
#
# Which images decode is known only after decoding them, and the split depends on it (a film that
# fails to decode leaves the table before the patients are split). So no task can know the shard
# membership of its films: task T of N decodes rows T, T+N, T+2N, ... of the table (interleaved:
# the table is grouped by source, and sources differ in film size) into a part file, and the merge
# runs the same _write_output as a single-process prepare on the parts' bytes, read lazily.

# DataConfig fields that do not change what prepare writes: they may differ between tasks.
_NOT_OUTPUT = ("shards_dir", "prepare_workers", "input_size", "fold", "batch_size", "num_workers",
               "shuffle_buffer", "augment", "shift_augment", "balance_views", "decode_on")


def part_path(out_dir: str | Path, task: int, tasks: int) -> Path:
    """Where task `task` of `tasks` writes its part: OUT/.prepare-parts/part-TTTT-of-NNNN.tar."""
    return Path(out_dir) / PARTS_DIR / f"part-{task:04d}-of-{tasks:04d}.tar"


def _check_task(task: int, tasks: int) -> None:
    if tasks < 1 or not 0 <= task < tasks:
        raise DataError(f"task {task} of {tasks}: need tasks >= 1 and 0 <= task < tasks")


def _fingerprint(data_cfg: DataConfig, df: pd.DataFrame, tasks: int) -> str:
    """What a part depends on: the output-relevant config (seed included: a task of another seed
    belongs to another prepare), the task count and the table (keys and paths, in order)."""
    fields = {k: v for k, v in dataclasses.asdict(data_cfg).items() if k not in _NOT_OUTPUT}
    h = hashlib.sha256(json.dumps({"config": fields, "tasks": tasks, "part_format": PART_FORMAT},
                                  sort_keys=True, default=str).encode())
    for key, path in zip(df["key"], df["path"]):
        h.update(f"{key}\t{path}\n".encode())
    return h.hexdigest()


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))


def write_part(data_cfg: DataConfig, out_dir: str | Path, task: int, tasks: int) -> dict:
    """Task `task` of `tasks` of an array prepare: decode its rows (task, task + tasks, ...) and write
    them, with the rows that failed and why, to part_path(out_dir, task, tasks) (atomically).
    Returns {"task", "tasks", "rows", "encoded", "failed"}. `merge_parts` then writes the shards."""
    _check_task(task, tasks)
    out = Path(out_dir)
    _, df, _ = _read_table(data_cfg, out)
    _claim(out)
    (out / "index.json").unlink(missing_ok=True)  # the folder is being rebuilt: not complete
    rows = list(range(task, len(df), tasks))
    encoded = encode_films([df["path"].iat[r] for r in rows], data_cfg)
    meta = {"fingerprint": _fingerprint(data_cfg, df, tasks), "task": task, "tasks": tasks, "rows": rows,
            "errors": {str(r): [e.reason, e.error] for r, e in zip(rows, encoded) if e.jpg is None},
            "digests": {str(r): e.digest for r, e in zip(rows, encoded) if e.jpg is not None}}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        _tar_add(tar, "meta.json", json.dumps(meta, sort_keys=True).encode())
        for r, e in zip(rows, encoded):
            if e.jpg is not None:
                _tar_add(tar, f"{r:08d}.jpg", e.jpg)
    atomic_write(part_path(out, task, tasks), buf.getvalue())
    return {"task": task, "tasks": tasks, "rows": len(rows), "encoded": len(rows) - len(meta["errors"]),
            "failed": len(meta["errors"])}


def merge_parts(data_cfg: DataConfig, out_dir: str | Path, tasks: int) -> ShardIndex:
    """Combine the parts of tasks 0..tasks-1 into the shards, skipped.jsonl and index.json that
    write_shards(data_cfg, out_dir) would write (byte for byte), then delete the parts; the index.

    Raises DataError when a part is missing, unreadable, or was written for another config,
    seed, task count or table (every task must run the same command line on the same data).
    """
    _check_task(0, tasks)
    out = Path(out_dir)
    sources, df, skipped = _read_table(data_cfg, out)
    fingerprint = _fingerprint(data_cfg, df, tasks)
    missing = [t for t in range(tasks) if not part_path(out, t, tasks).is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} of {tasks} tasks have no part in {out / PARTS_DIR} (task(s) "
            f"{', '.join(map(str, missing[:10]))}): they failed or have not run. Run them "
            f"(`cxr-dist prepare ... --task T --tasks {tasks}`, the same command line) and merge again")
    errors: list[tuple[str, str] | None] = [None] * len(df)
    digests: list[str | None] = [None] * len(df)
    where: dict[int, tuple[int, int, int]] = {}  # row -> (task, offset, size) of its JPEG
    for t in range(tasks):
        path = part_path(out, t, tasks)
        try:
            with tarfile.open(path) as tar:
                members = tar.getmembers()
                meta = json.loads(tar.extractfile(members[0]).read()) if members[0].name == "meta.json" else {}
        except (OSError, tarfile.TarError, ValueError, IndexError) as e:
            raise DataError(f"part {path} is unreadable ({type(e).__name__}: {e}); run task {t} again") from e
        if meta.get("fingerprint") != fingerprint or meta.get("task") != t:
            raise DataError(
                f"part {path} was written by another prepare (a different config, seed, --tasks or dataset "
                f"table than this merge): every task and the merge must run the same command line on the same "
                f"data. Run the array again, or delete {out / PARTS_DIR}")
        # tarfile lists a file cut short without complaint: its last member would read short.
        if members[-1].offset_data + members[-1].size > path.stat().st_size:
            raise DataError(f"part {path} is cut short (a task killed while writing, a full disk?); run task {t} again")
        for r, (reason, err) in meta["errors"].items():
            errors[int(r)] = (reason, err)
        for r, digest in meta["digests"].items():
            digests[int(r)] = digest
        for m in members[1:]:
            where[int(m.name.split(".")[0])] = (t, m.offset_data, m.size)
    lost = [r for r in range(len(df)) if errors[r] is None and r not in where]
    if lost:
        raise DataError(f"the parts in {out / PARTS_DIR} lack {len(lost)} row(s) of the table; run the array again")

    files = [open(part_path(out, t, tasks), "rb") for t in range(tasks)]
    try:
        def jpg_of(row: int) -> bytes:  # read on demand: the merge never holds every film in memory
            t, offset, size = where[row]
            files[t].seek(offset)
            return files[t].read(size)

        index = _write_output(data_cfg, out, sources, df, skipped, errors, digests, jpg_of, None)
    finally:
        for f in files:
            f.close()
    shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
    return index
