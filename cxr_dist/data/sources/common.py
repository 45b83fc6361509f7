"""What every source reader shares: the row schema, label and view vocabularies, keys, checks.

Readers turn one collection into rows of ROW_COLUMNS plus a list of skipped rows. They only read
tables and list files: images are decoded later (prepare), which is where corrupt files are found.
Structural problems (missing file or column, unknown label or view value) raise DataError naming
the file and what is expected; row-level problems are skipped with a reason, never lost silently.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path, PurePath

import pandas as pd

from ...config import SourceConfig
from ...errors import DataError

ROW_COLUMNS = ["source", "key", "path", "patient", "study", "view", "label", "findings", "report", "filename"]
# FRONTAL = a frontal film whose PA/AP was not recorded; "" = view unknown.
VIEWS = ("PA", "AP", "LATERAL", "FRONTAL", "")
# ERROR_REASONS count toward data.max_skip_frac; DECISION_REASONS are choices made by the config.
ERROR_REASONS = ("missing_image", "corrupt_image", "no_report", "duplicate_key", "conflicting_labels", "duplicate_image", "constant_image")
DECISION_REASONS = ("no_indexing",)
# Image files Pillow reads; DICOM files are listed too so that they are found and counted
# (decoding them is prepare's business).
RASTER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
IMAGE_EXTENSIONS = RASTER_EXTENSIONS + (".dcm",)

_VIEW_SYNONYMS = {
    "pa": "PA", "ap": "AP", "ap supine": "AP", "ap erect": "AP",
    "lateral": "LATERAL", "lat": "LATERAL", "ll": "LATERAL", "rl": "LATERAL",
    "frontal": "FRONTAL", "": "",
}
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def sample_key(filename: str) -> str:
    """The WebDataset key of an image: its file stem with dots replaced by '_'.

    WebDataset splits tar member names at the FIRST dot of the base name, so the Kaggle stem
    ``1_IM-0001-4001.dcm`` would be read back as key ``1_IM-0001-4001`` with a field ``dcm.jpg``.
    Any character outside [A-Za-z0-9_-] is replaced too, so keys are safe file names.
    """
    stem = Path(filename).stem
    return re.sub(r"[^A-Za-z0-9_\-]", "_", stem)


def _norm(text: object) -> str:
    """Lower case, surrounding and repeated spaces removed: how labels and views are compared."""
    return " ".join(str(text).split()).lower()


def normalize_view(text: str, where: str) -> str:
    """One of VIEWS for a recorded view ("ap supine" -> "AP", "LL" -> "LATERAL"); DataError otherwise."""
    view = _VIEW_SYNONYMS.get(_norm(text))
    if view is None:
        raise DataError(
            f"{where}: unknown view {text!r}; expected one of PA, AP (AP supine, AP erect), "
            f"LATERAL (LAT, LL, RL), FRONTAL or empty (unknown), case-insensitive"
        )
    return view


def views_of(values: pd.Series, where: str, default: str = "") -> pd.Series:
    """normalize_view over a column (empty cells -> `default`); all unknown values in one error."""
    mapping: dict[str, str] = {}
    unknown: list[str] = []
    for value in pd.unique(values):
        text = value if _norm(value) else default
        try:
            mapping[value] = normalize_view(text, where)
        except DataError:
            unknown.append(str(text))
    if unknown:
        raise DataError(
            f"{where}: unknown view value(s) {', '.join(repr(u) for u in sorted(unknown)[:10])}; expected "
            f"PA, AP (AP supine, AP erect), LATERAL (LAT, LL, RL), FRONTAL or empty, case-insensitive"
        )
    return values.map(mapping)


def _label_map(src: SourceConfig) -> dict[str, int]:
    out = {_norm(v): 0 for v in src.normal_labels}
    out.update({_norm(v): 1 for v in src.abnormal_labels})
    return out


def _unknown_labels_error(unknown: Iterable[str], src: SourceConfig, where: str) -> DataError:
    return DataError(
        f"{where}: unknown label value(s) {', '.join(repr(u) for u in sorted(set(unknown))[:20])}; "
        f"accepted (case-insensitive): normal = {', '.join(repr(v) for v in src.normal_labels)}, "
        f"abnormal = {', '.join(repr(v) for v in src.abnormal_labels)} "
        f"(set data.sources.normal_labels / abnormal_labels of source {src.name!r})"
    )


def label_from(value: str, src: SourceConfig, where: str) -> int:
    """0 or 1 for one label value through src.normal_labels / abnormal_labels; DataError otherwise."""
    label = _label_map(src).get(_norm(value))
    if label is None:
        raise _unknown_labels_error([str(value)], src, where)
    return label


def labels_of(values: pd.Series, src: SourceConfig, where: str) -> pd.Series:
    """label_from over a column (int64); every distinct unknown value is listed in one error."""
    mapping = _label_map(src)
    normed = values.map(_norm)
    unknown = values[~normed.isin(list(mapping))]
    if len(unknown):
        raise _unknown_labels_error(unknown.astype(str), src, where)
    return normed.map(mapping).astype("int64")


def safe_key(text: str) -> str:
    """A sample key from a file name or relative path: extension dropped, [^A-Za-z0-9_-] -> "_".

    Like sample_key, but the folders stay in the key ("train/NORMAL/IM-1.jpeg" ->
    "train_NORMAL_IM-1"), so equal file names in different folders do not collide.
    """
    p = PurePath(str(text))
    return _UNSAFE.sub("_", str(p.with_suffix("")) if p.suffix else str(p))


def is_image(name: str) -> bool:
    """Whether a file name has one of the accepted image extensions (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def read_table(path: Path, required: Iterable[str], optional: Iterable[str] | None = None,
               hint: str = "") -> pd.DataFrame:
    """A CSV as text (no NaN, column names stripped), checked for required columns.

    With `optional` given, any column outside required + optional is refused too (formats whose
    columns we define); with None, other columns are allowed (formats defined by someone else).
    """
    required = list(required)
    if not path.is_file():
        raise DataError(f"missing file {path}; {hint}".rstrip("; "))
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises several types for malformed files
        raise DataError(f"cannot read {path} as CSV: {e}") from e
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks column(s) {', '.join(missing)} (has: {', '.join(df.columns)}); "
                        f"required: {', '.join(required)}. {hint}".strip())
    if optional is not None:
        allowed = required + list(optional)
        extra = [c for c in df.columns if c not in allowed]
        if extra:
            raise DataError(f"{path} has unexpected column(s) {', '.join(extra)}; allowed: "
                            f"{', '.join(allowed)} (required: {', '.join(required)}). {hint}".strip())
    return df


def skip(src: SourceConfig, filename: str, patient: str, reason: str, detail: str) -> dict:
    """One skipped row in the shape every reader reports."""
    return {"source": src.name, "filename": filename, "patient": patient, "reason": reason, "detail": detail}


def drop_missing(df: pd.DataFrame, src: SourceConfig, where: str,
                 present: pd.Series | None = None) -> tuple[pd.DataFrame, list[dict]]:
    """Rows whose `path` is not a file (or whose `present` flag is False) -> missing_image skips."""
    ok = (df["path"].map(os.path.isfile) if present is None else present).astype(bool)
    skipped = [skip(src, r["filename"], r["patient"], "missing_image",
                    f"{where}: no file {r['path'] or r['filename']}")
               for r in df[~ok].to_dict("records")]
    return df[ok], skipped


def drop_duplicate_keys(df: pd.DataFrame, src: SourceConfig) -> tuple[pd.DataFrame, list[dict]]:
    """Rows whose key repeats an earlier row's (in table order) -> duplicate_key skips."""
    dup = df["key"].duplicated(keep="first")
    first = df[~dup].set_index("key")["filename"]
    skipped = [skip(src, r["filename"], r["patient"], "duplicate_key",
                    f"key {r['key']} already used by {first[r['key']]}") for r in df[dup].to_dict("records")]
    return df[~dup], skipped


def finish(df: pd.DataFrame, src: SourceConfig, skipped: list[dict], where: str) -> pd.DataFrame:
    """The reader's rows in contract shape: ROW_COLUMNS first, text columns, int64 label, sorted by key.

    Raises DataError when nothing is usable (a configured source without images is a mistake).
    """
    if df.empty:
        counts = dict(sorted(Counter(s["reason"] for s in skipped).items()))
        first = f"; first: {skipped[0]['detail']}" if skipped else ""
        raise DataError(f"source {src.name!r}: no usable images in {where} "
                        f"(skipped by reason: {counts or 'none'}){first}")
    df = df.assign(source=src.name)
    extra = [c for c in df.columns if c not in ROW_COLUMNS]
    df = df[ROW_COLUMNS + extra].copy()
    for c in df.columns:
        if c != "label":
            df[c] = df[c].astype(str)
    df["label"] = df["label"].astype("int64")
    # The schema is our promise to prepare/shards: a broken reader must fail here, not downstream.
    assert df["key"].str.fullmatch(r"[A-Za-z0-9_\-]+").all(), "reader produced an unsafe key"
    assert df["key"].is_unique, "reader produced duplicate keys"
    assert df["view"].isin(VIEWS).all() and df["label"].isin((0, 1)).all()
    return df.sort_values("key", kind="stable").reset_index(drop=True)


def first_few(items: Iterable[str], n: int = 5) -> str:
    """ "a, b, c (and 7 more)" for error messages."""
    items = list(items)
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
