"""The shard index (`OUT/index.json`): its format, reading it, and what it says about the splits.

Read once per process (`load_index`) and passed down: the loaders, the loss weights and the final
evaluation all take the index, not the folder, so a run parses it once. This module is small on
purpose: training processes import it without pandas or the process pool of `shards.py`.

Version 2 (multi-source) adds, per split, `sources: {name: {total, labels, views}}` with
`views: {view: {"normal": n, "abnormal": n}}`, a `source` on every shard entry (a shard holds one
source), and the top-level `sources` list. A version-1 index (one IU source, written before
sources existed) is still read: all its shards belong to the source "iu" and views are unknown.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from ..config import DataConfig
from ..errors import DataError

INDEX_FORMAT = "cxr-dist-shards"
INDEX_VERSION = 2
LEGACY_SOURCE = "iu"  # the source of every sample of a version-1 index


class Shard(NamedTuple):
    path: str
    count: int
    source: str


def load_index(shards_dir: str | Path) -> dict:
    """Read and check OUT/index.json; the index gets ``root`` (the folder) added. DataError if absent."""
    root = Path(shards_dir)
    path = root / "index.json"
    if not path.is_file():
        raise DataError(f"no index.json in {root}: run `cxr-dist prepare --data DIR --out {root}` first")
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not readable JSON ({e}); run `cxr-dist prepare` again") from e
    if index.get("format") != INDEX_FORMAT:
        raise DataError(f"{path} is not a cxr-dist shard index; run `cxr-dist prepare` again")
    if index.get("version", 1) > INDEX_VERSION:
        raise DataError(f"{path} has index version {index['version']}, newer than this cxr-dist reads "
                        f"({INDEX_VERSION}); update cxr-dist")
    missing = [s["file"] for sp in index["splits"].values() for s in sp["shards"] if not (root / s["file"]).is_file()]
    if missing:
        raise DataError(f"{root} lacks shard file(s) {', '.join(missing[:5])}; run `cxr-dist prepare` again")
    index["root"] = str(root)
    return index


def train_val_splits(data_cfg: DataConfig) -> tuple[list[str], str]:
    """(training split names, validation split name) for the configured fold: the splits of the
    index that a run trains on and validates on. (Here, not in split.py, so that a training
    process need not import pandas.)

    k_folds == 0 -> (["train"], "val"); k_folds == K -> every fold but data.fold, and f"fold{fold}".
    """
    if data_cfg.k_folds > 0:
        folds = [f"fold{i}" for i in range(data_cfg.k_folds)]
        val = f"fold{data_cfg.fold}"
        return [f for f in folds if f != val], val
    return ["train"], "val"


def check_splits(index: dict, splits: list[str]) -> None:
    for name in splits:
        if name not in index["splits"]:
            raise DataError(f"split {name!r} is not in {index['root']} (has: {', '.join(index['splits'])}); "
                            "were the shards prepared with the same data.k_folds?")


def shard_list(index: dict, splits: list[str]) -> list[Shard]:
    """The shards of `splits`, in index order, with their sample counts and sources."""
    check_splits(index, splits)
    return [Shard(str(Path(index["root"]) / s["file"]), int(s["count"]), s.get("source", LEGACY_SOURCE))
            for name in splits for s in index["splits"][name]["shards"]]


def class_counts(index: dict, splits: list[str]) -> tuple[int, int]:
    """(n_normal, n_abnormal) samples over the given splits."""
    labels = [index["splits"][s]["labels"] for s in splits]
    return sum(x["normal"] for x in labels), sum(x["abnormal"] for x in labels)


def source_view_counts(index: dict, splits: list[str]) -> dict[str, dict[str, tuple[int, int]]]:
    """{source: {view: (n_normal, n_abnormal)}} over `splits`. A version-1 index knows no views:
    its counts come under the view "" of the source "iu"."""
    check_splits(index, splits)
    out: dict[str, dict[str, list[int]]] = {}
    for name in splits:
        split = index["splits"][name]
        per_source = split.get("sources") or {LEGACY_SOURCE: {"views": {"": split["labels"]}}}
        for source, info in per_source.items():
            for view, lab in info["views"].items():
                cell = out.setdefault(source, {}).setdefault(view, [0, 0])
                cell[0] += lab["normal"]
                cell[1] += lab["abnormal"]
    return {s: {v: (c[0], c[1]) for v, c in views.items()} for s, views in out.items()}


def has_views(index: dict) -> bool:
    """Whether the index records each sample's view (version 2)."""
    return index.get("version", 1) >= 2
