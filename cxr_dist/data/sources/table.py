"""A CSV file that lists the images (format "csv").

Columns (any other column is refused, so a typo does not silently lose information):

    path       required; relative to the CSV file's folder unless absolute
    label      required; through src.normal_labels / src.abnormal_labels (case-insensitive)
    patient    required; the unit that must never be split across train/val/test
    study      optional; default the patient (stored as PATIENT/STUDY: unique per patient). The label
               belongs to the study: a study whose rows carry different labels is skipped entirely
               (reason conflicting_labels)
    view       optional; PA, AP, LATERAL, FRONTAL or empty (empty -> src.view)
    findings   optional; free text
    report     optional; free text
    FINDING    optional finding columns, CheXpert style: a column named like a finding or a CheXpert
               column ("Cardiomegaly", "Pleural Effusion", "pleural_thickening", ...), or any column
               that src.findings_map names; cells 1 (present), 0 (absent), -1 (uncertain) or blank
               (also 1.0, 0.0, -1.0); src.uncertain and src.blank say what -1 and blank become
               (the findings vocabulary, data/findings.py; kept in the row column finding_values)

A path listed twice (same key) is skipped after its first row (duplicate_key); a path that is
not a file is skipped as missing_image.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ...config import SourceConfig
from ...errors import DataError
from ..findings import FINDING_VALUES, cell_value, encode_values, source_mapping
from .common import drop_duplicate_keys, drop_missing, first_few, labels_of, read_table, safe_key, skip, views_of

REQUIRED = ("path", "label", "patient")
OPTIONAL = ("view", "findings", "study", "report")
HINT = "See docs/sources.md (format \"csv\"); finding columns: docs/findings.md"


def _key_path(text: str, base: Path) -> str:
    """The path a key is made from: relative to the CSV's folder when inside it, else as written."""
    p = Path(text)
    if p.is_absolute():
        rel = os.path.relpath(p, base)
        return text.lstrip("/") if rel.startswith("..") else rel
    return text


def _conflicts(df: pd.DataFrame, src: SourceConfig) -> tuple[pd.DataFrame, list[dict]]:
    """Studies whose rows disagree on the label -> every row of them skipped (conflicting_labels)."""
    n_labels = df.groupby(["patient", "study"])["label"].transform("nunique")
    bad = df[n_labels > 1]
    skipped = []
    for (patient, study), rows in bad.groupby(["patient", "study"], sort=True):
        values = ", ".join(f"{v!r} ({n})" for v, n in rows["label_text"].value_counts().sort_index().items())
        detail = f"study {study!r} of patient {patient!r} has rows labelled {values}"
        skipped += [skip(src, r, patient, "conflicting_labels", detail) for r in rows["filename"]]
    return df[n_labels <= 1], skipped


def _finding_values(raw: pd.DataFrame, columns: list[str], table: Path) -> pd.Series:
    """Each row's finding columns as raw finding values (findings.encode_values); DataError listing
    the cells that are not 1, 0, -1 or blank."""
    cells = {c: raw[c].map(cell_value) for c in columns}
    bad = sorted({f"{c}={v!r}" for c in columns for v in raw[c][cells[c].isna()]})
    if bad:
        raise DataError(f"{table}: finding column value(s) {first_few(bad, 10)}; expected 1 (present), 0 (absent), "
                        f"-1 (uncertain) or blank (also 1.0, 0.0, -1.0)")
    return pd.Series([encode_values(dict(zip(columns, vals))) for vals in zip(*(cells[c] for c in columns))]
                     if columns else [encode_values({})] * len(raw), index=raw.index, dtype=object)


def read(src: SourceConfig) -> tuple[pd.DataFrame, list[dict]]:
    """Rows of the CSV file src.path (see the module docstring) and the skipped ones."""
    table = Path(src.path)
    mapping = source_mapping(src)
    try:  # the header only, for the finding columns (read_table reports a file it cannot read)
        header = [str(c).strip() for c in pd.read_csv(table, nrows=0).columns]
    except Exception:
        header = []
    finding_cols = [c for c in header if c not in REQUIRED + OPTIONAL and mapping.knows(c)]
    raw = read_table(table, REQUIRED, OPTIONAL + tuple(finding_cols), hint=HINT)
    base = table.parent
    raw = raw.apply(lambda c: c.str.strip())
    empty = raw.index[(raw["path"] == "") | (raw["patient"] == "")]
    if len(empty):
        lines = first_few([str(i + 2) for i in empty])  # +2: header line, 1-based
        raise DataError(f"{table}: empty path or patient on line(s) {lines}; every row needs both")
    patient = raw["patient"]
    # A study id is only unique within its patient in many exports ("1", "2" per patient):
    # qualified by the patient, so that two patients' study "1" never pool together.
    study = (patient + "/" + raw["study"]).where(raw["study"] != "", patient) if "study" in raw else patient
    view_col = raw["view"] if "view" in raw else pd.Series("", index=raw.index)
    df = pd.DataFrame({
        "key": raw["path"].map(lambda t: safe_key(_key_path(t, base))),
        "path": raw["path"].map(lambda t: str(base / t)),  # base / absolute = absolute
        "patient": patient,
        "study": study,
        "view": views_of(view_col, f"{table} column 'view'", default=src.view),
        "label": labels_of(raw["label"], src, f"{table} column 'label'"),
        "label_text": raw["label"],
        "findings": raw["findings"] if "findings" in raw else "",
        "report": raw["report"] if "report" in raw else "",
        "filename": raw["path"],
        FINDING_VALUES: _finding_values(raw, finding_cols, table),
    })
    df, skipped = drop_duplicate_keys(df, src)
    df, conflicts = _conflicts(df, src)
    df, missing = drop_missing(df, src, str(table))
    return df.drop(columns="label_text"), skipped + conflicts + missing
