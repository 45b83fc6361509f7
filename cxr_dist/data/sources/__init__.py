"""Source readers: every configured collection -> rows of one schema, plus what was skipped.

    df, skipped = read_sources(cfg.data)      # all sources of sources_of(cfg.data), with `role`
    df, skipped = read_source(src)            # one SourceConfig

Formats (docs/sources.md): "iu" (Kaggle IU X-ray, iu.py), "nih" (ChestX-ray14, nih.py), "folder"
(a folder per class, folder.py), "csv" (a listing table, table.py). Rows have at least
ROW_COLUMNS; ``label`` is int64 0/1, the rest text. Readers check that image files exist but do
not decode them: prepare does, and records ``corrupt_image`` itself.
"""
from __future__ import annotations

from collections import Counter
from types import ModuleType

import pandas as pd

from ...config import DataConfig, SourceConfig, sources_of
from ...errors import DataError
from . import folder, iu, nih, table
from .common import DECISION_REASONS, ERROR_REASONS, IMAGE_EXTENSIONS, ROW_COLUMNS, VIEWS, finish, first_few

__all__ = ["ROW_COLUMNS", "VIEWS", "ERROR_REASONS", "DECISION_REASONS", "IMAGE_EXTENSIONS", "KEY_SEPARATOR",
           "READERS", "label_text_fields", "read_source", "read_sources"]

READERS: dict[str, ModuleType] = {"iu": iu, "nih": nih, "folder": folder, "csv": table}
KEY_SEPARATOR = "__"  # global key = f"{source}{KEY_SEPARATOR}{local key}" with [[data.sources]]


def label_text_fields(src: SourceConfig) -> tuple[str, ...]:
    """The text fields `src`'s label was derived from: the source's `label_text_fields` when set,
    else its format's (iu: findings and impression; the other formats carry no text)."""
    if src.label_text_fields:
        return tuple(src.label_text_fields)
    return tuple(getattr(READERS.get(src.format), "LABEL_TEXT_FIELDS", ()))


def read_source(src: SourceConfig) -> tuple[pd.DataFrame, list[dict]]:
    """One source's rows (ROW_COLUMNS first, sorted by key, keys local to the source) and skips.

    Raises DataError for an unknown format, structurally bad input (the reader's message names
    the file and what is expected) or when no image is usable.
    """
    reader = READERS.get(src.format)
    if reader is None:
        raise DataError(f"source {src.name!r}: unknown format {src.format!r}; known: {', '.join(READERS)}")
    df, skipped = reader.read(src)
    return finish(df, src, skipped, str(src.path)), skipped


def read_sources(data: DataConfig) -> tuple[pd.DataFrame, list[dict]]:
    """All sources of sources_of(data), concatenated, with a column ``role``; and all skips.

    With [[data.sources]] every key becomes ``f"{name}__{local key}"``; with the legacy
    ``data.data_dir`` shorthand keys stay as manifest.build_manifest makes them, so shards and
    predictions made before stay comparable. Columns that only some sources have (``uid``,
    ``subset`` ...) are NaN in the other sources' rows (ROW_COLUMNS and ``role`` never are).
    Patients are only unique within a source: group by (source, patient). Raises DataError when a key repeats across sources or nothing is usable.
    """
    prefix = bool(data.sources)
    frames, skipped = [], []
    for src in sources_of(data):
        df, sk = read_source(src)
        if prefix:
            df["key"] = f"{src.name}{KEY_SEPARATOR}" + df["key"]
        frames.append(df.assign(role=src.role))
        skipped += sk
    df = pd.concat(frames, ignore_index=True)
    if df.empty:  # pragma: no cover - read_source already refuses an empty source
        raise DataError("no usable images in any source")
    dup = df["key"][df["key"].duplicated(keep=False)]
    if len(dup):
        counts = Counter(df.loc[dup.index, "source"])
        raise DataError(
            f"sample key(s) used by more than one source ({dict(counts)}): {first_few(sorted(set(dup)))}; "
            f"keys are '<source>{KEY_SEPARATOR}<local key>': rename a source so no name plus local key collides"
        )
    return df.sort_values("key", kind="stable").reset_index(drop=True), skipped
