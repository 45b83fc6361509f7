"""The Kaggle IU X-ray layout (format "iu"): its CSVs -> one labelled row per image.

Input layout (Kaggle dataset ``raddar/chest-xrays-indiana-university``)::

    DIR/indiana_reports.csv      uid, MeSH, Problems, image, indication, comparison, findings, impression
    DIR/indiana_projections.csv  uid, filename, projection
    DIR/images/**/FILE           e.g. images/images_normalized/1_IM-0001-4001.dcm.png

Image files are searched recursively under ``DIR/images/`` and matched by file name. When the
exact name is absent, a file with the same stem and another image extension is used (the shared
reduced copy stores ``X.dcm.jpg`` for Kaggle's ``X.dcm.png``; bench/compact_copy.py writes ``X.dcm.webp``).

Label rule: ``Problems`` equal to ``normal`` (case and surrounding spaces ignored) -> 0 (normal),
anything else -> 1 (abnormal). ``No Indexing`` reports carry no label: ``no_indexing="drop"``
skips them (reason ``no_indexing``), ``"abnormal"`` labels them 1.

This module only reads CSVs and lists files; images are decoded later (shards.py), which is where
corrupt files are found.

`read(src)` gives the rows in the common schema of every source (common.ROW_COLUMNS). IU has no
patient id: the uid (one study) is both the patient and the study. Column names in the output:

- ``findings``: the ``Problems`` field (what the label is read from), like the other formats'
  findings; ``report``: the report's findings + " " + impression text;
- IU's own columns kept: ``uid``, ``projection``, ``problems``, ``impression``, and
  ``report_findings`` (the report's findings text, build_manifest's ``findings`` column);
- ``finding_values``: the report's MeSH terms (``Problems`` when the copy has no MeSH column) for
  the findings vocabulary (data/findings.py), "" for a ``No Indexing`` report (findings unknown).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ...config import SourceConfig
from ...errors import DataError
from ..findings import FINDING_VALUES, encode_values
from .common import RASTER_EXTENSIONS, read_table, sample_key, skip

REPORTS_CSV = "indiana_reports.csv"
PROJECTIONS_CSV = "indiana_projections.csv"
REPORT_COLUMNS = ("uid", "Problems", "findings", "impression")
# The report's sections, kept as text fields of every sample (`text_<field>` columns, the shards'
# json "text"). indication and comparison are known before the film is read: legitimate inputs.
# The label (Problems) was coded from findings and impression: a model that reads them at prediction
# time reads its label (LABEL_TEXT_FIELDS; config.validate refuses them as inputs unless
# loader.allow_label_leakage). Copies without indication/comparison columns give empty texts.
TEXT_FIELDS = ("indication", "comparison", "findings", "impression")
LABEL_TEXT_FIELDS = ("findings", "impression")
PROJECTION_COLUMNS = ("uid", "filename", "projection")

MANIFEST_COLUMNS = ["key", "path", "filename", "uid", "projection", "label", "problems", "findings", "impression",
                    "indication", "comparison", "mesh"]

KAGGLE_HINT = (
    "expected the Kaggle layout of the dataset raddar/chest-xrays-indiana-university "
    "(https://www.kaggle.com/datasets/raddar/chest-xrays-indiana-university): "
    f"DIR/{REPORTS_CSV}, DIR/{PROJECTIONS_CSV} and the image files under DIR/images/ "
    "(e.g. DIR/images/images_normalized/1_IM-0001-4001.dcm.png)"
)


def label_of(problems: str) -> int | None:
    """0 for a normal report, 1 for abnormal, None for 'No Indexing' (no label was assigned)."""
    text = " ".join(str(problems).split()).lower()
    if text == "normal":
        return 0
    if text == "no indexing":
        return None
    return 1


def index_images(images_dir: Path) -> dict[str, Path]:
    """File name -> path for every image under images_dir (recursive; first in sorted order wins)."""
    found: dict[str, Path] = {}
    for p in sorted(images_dir.rglob("*")):
        if p.suffix.lower() in RASTER_EXTENSIONS and p.is_file():
            found.setdefault(p.name, p)
    return found


def _by_stem(images: dict[str, Path]) -> dict[str, Path]:
    """Stem -> path, preferring extensions in RASTER_EXTENSIONS order, for the fallback match."""
    out: dict[str, Path] = {}
    rank = {ext: i for i, ext in enumerate(RASTER_EXTENSIONS)}
    for name in sorted(images, key=lambda n: (Path(n).stem, rank[Path(n).suffix.lower()], n)):
        out.setdefault(Path(name).stem, images[name])
    return out


def build_manifest(data_dir: str | Path, no_indexing: str = "drop") -> tuple[pd.DataFrame, list[dict]]:
    """Read a Kaggle-layout folder into one row per usable image, plus the rows it skipped.

    Returns ``(df, skipped)``: ``df`` has the columns MANIFEST_COLUMNS (``uid`` as text,
    ``label`` 0/1), sorted by key; ``skipped`` holds one dict per dropped projection row with
    ``reason`` (``no_report``, ``no_indexing``, ``missing_image``, ``duplicate_key``), ``uid``,
    ``filename`` and ``detail``. Raises DataError for a missing folder, CSV or column, or when no
    image is usable.
    """
    if no_indexing not in ("drop", "abnormal"):
        raise DataError(f'no_indexing must be "drop" or "abnormal", got {no_indexing!r}')
    root = Path(data_dir) if str(data_dir) else None
    if root is None or not root.is_dir():
        raise DataError(f"dataset folder {str(data_dir)!r} does not exist; {KAGGLE_HINT}")
    reports = read_table(root / REPORTS_CSV, REPORT_COLUMNS, hint=KAGGLE_HINT)
    projections = read_table(root / PROJECTIONS_CSV, PROJECTION_COLUMNS, hint=KAGGLE_HINT)
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise DataError(f"no images/ folder in {root}; {KAGGLE_HINT}")
    images = index_images(images_dir)
    stems = _by_stem(images)

    reports["uid"] = reports["uid"].str.strip()
    # One report per uid in the collection; should a uid repeat, the first row is its report.
    reports = reports.drop_duplicates("uid", keep="first").set_index("uid")

    rows: list[dict] = []
    skipped: list[dict] = []
    seen_keys: dict[str, str] = {}
    for rec in projections.to_dict("records"):
        uid, filename = rec["uid"].strip(), rec["filename"].strip()
        base = {"uid": uid, "filename": filename}
        if uid not in reports.index:
            skipped.append({**base, "reason": "no_report", "detail": f"uid {uid} has no row in {REPORTS_CSV}"})
            continue
        report = reports.loc[uid]
        label = label_of(report["Problems"])
        if label is None:
            if no_indexing == "drop":
                skipped.append({**base, "reason": "no_indexing", "detail": "Problems is 'No Indexing' (no label)"})
                continue
            label = 1
        path = images.get(Path(filename).name) or stems.get(Path(filename).stem)
        if path is None:
            skipped.append({**base, "reason": "missing_image", "detail": f"no file {filename} under {images_dir}"})
            continue
        key = sample_key(filename)
        if key in seen_keys:
            skipped.append({**base, "reason": "duplicate_key",
                            "detail": f"key {key} already used by {seen_keys[key]}"})
            continue
        seen_keys[key] = filename
        rows.append({
            "key": key, "path": str(path), "filename": filename, "uid": uid,
            "projection": rec["projection"].strip(), "label": label,
            "problems": report["Problems"], "findings": report["findings"], "impression": report["impression"],
            "indication": report.get("indication", ""), "comparison": report.get("comparison", ""),
            "mesh": report.get("MeSH", ""),
        })
    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    if df.empty:
        counts = _reason_counts(skipped)
        raise DataError(
            f"no usable images in {root}: {len(projections)} rows in {PROJECTIONS_CSV}, "
            f"skipped by reason: {counts or 'none'}; {KAGGLE_HINT}"
        )
    df["label"] = df["label"].astype("int64")
    return df.sort_values("key", kind="stable").reset_index(drop=True), skipped


def _reason_counts(skipped: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in skipped:
        counts[s["reason"]] = counts.get(s["reason"], 0) + 1
    return dict(sorted(counts.items()))


_VIEWS = {"frontal": "FRONTAL", "lateral": "LATERAL"}  # IU records no PA/AP


def term_values(mesh: str, problems: str) -> dict[str, str] | None:
    """A report's terms as raw finding labels {term: "1"}: its MeSH terms with their qualifiers
    ("Opacity/lung/base/left"), or its Problems when MeSH is empty; {} for a normal report (nothing
    found), None for 'No Indexing' (not indexed: findings unknown)."""
    if label_of(problems) is None:
        return None
    text = mesh if str(mesh).strip() else problems
    terms = [t.strip() for t in str(text).split(";") if t.strip()]
    return {t: "1" for t in terms if label_of(t) != 0}


def read(src: SourceConfig) -> tuple[pd.DataFrame, list[dict]]:
    """Rows of the IU folder src.path (see the module docstring) and the skipped projection rows."""
    df, skipped = build_manifest(src.path, src.no_indexing)
    df = df.rename(columns={"findings": "report_findings"})
    df["patient"] = df["uid"]
    df["study"] = df["uid"]
    df["view"] = df["projection"].map(lambda p: _VIEWS.get(str(p).strip().lower(), ""))
    df["findings"] = df["problems"]
    df["report"] = (df["report_findings"].str.strip() + " " + df["impression"].str.strip()).str.strip()
    for field in TEXT_FIELDS:  # the report's sections as text fields (the module docstring)
        df[f"text_{field}"] = df["report_findings" if field == "findings" else field].fillna("").str.strip()
    df[FINDING_VALUES] = [encode_values(term_values(mesh, problems)) for mesh, problems in zip(df["mesh"], df["problems"])]
    df = df.drop(columns=["indication", "comparison", "mesh"])
    # The common fields first, then build_manifest's own (uid stays for split/shards).
    out = [{**skip(src, s["filename"], s["uid"], s["reason"], s["detail"]), **s} for s in skipped]
    return df, out
