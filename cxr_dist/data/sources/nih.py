"""NIH ChestX-ray14 (format "nih") as users download it.

Layout of src.path::

    Data_Entry_2017*.csv          exactly one (the official file, or the 2020 revision *_v2020.csv)
    images/*.png                  the images flat in one folder, or as shipped:
    images_001/images/*.png ... images_012/images/*.png

Images are matched by ``Image Index`` (file name) across all of those folders. Labels: ``No
Finding`` -> 0; otherwise ``Finding Labels`` is a "|"-separated list of the 14 ChestX-ray14
findings -> 1 (``findings`` keeps the list). NIH labels every image, so there is no conflict
check. patient = ``Patient ID`` (text as written), study = ``{patient}_{Follow-up #}``, view from
``View Position`` (PA/AP). ``finding_values`` keeps the labels for the findings vocabulary
(data/findings.py; "No Finding" lists none). Rows of the table without an image are skipped as
``missing_image``: using a subset of the 42 GB collection is normal, and the skip list says how
much of it is there.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ...config import SourceConfig
from ...errors import DataError
from ..findings import FINDING_VALUES, encode_values
from .common import drop_duplicate_keys, drop_missing, first_few, is_image, read_table, safe_key, views_of

FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
            "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax")
NO_FINDING = "No Finding"
COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "View Position", "Follow-up #")
TABLE_GLOB = "Data_Entry_2017*.csv"
HINT = (f"expected the NIH ChestX-ray14 layout: one {TABLE_GLOB} (columns {', '.join(COLUMNS)}) and the "
        "images in DIR/images/ or DIR/images_001/images/ ... DIR/images_012/images/")


def _table(root: Path) -> Path:
    tables = sorted(root.glob(TABLE_GLOB))
    if len(tables) != 1:
        found = ", ".join(p.name for p in tables) if tables else "none"
        raise DataError(f"{root}: expected exactly one {TABLE_GLOB}, found {found}; {HINT}")
    return tables[0]


def _image_dirs(root: Path) -> list[Path]:
    dirs = [d for d in [root / "images", *sorted(root.glob("images_*/images"))] if d.is_dir()]
    if not dirs:
        raise DataError(f"{root}: no images/ or images_*/images/ folder; {HINT}")
    return dirs


def index_images(dirs: list[Path]) -> dict[str, str]:
    """File name -> path of every image directly in the given folders (the first folder wins).

    os.scandir, not Path objects: the full collection has 112,120 files.
    """
    found: dict[str, str] = {}
    for d in dirs:
        with os.scandir(d) as it:
            for entry in sorted(it, key=lambda e: e.name):
                if is_image(entry.name) and entry.is_file():
                    found.setdefault(entry.name, entry.path)
    return found


def _labels(values: pd.Series, table: Path) -> tuple[pd.Series, pd.Series]:
    """(label, findings) per row; unknown finding names -> DataError listing them."""
    labels: dict[str, int] = {}
    findings: dict[str, str] = {}
    unknown: set[str] = set()
    for value in pd.unique(values):  # a few hundred distinct combinations in 112k rows
        names = [n.strip() for n in str(value).split("|")]
        if names == [NO_FINDING]:
            labels[value], findings[value] = 0, NO_FINDING
            continue
        unknown.update(n for n in names if n not in FINDINGS)
        labels[value], findings[value] = 1, "|".join(names)
    if unknown:
        raise DataError(
            f"{table}: unknown value(s) in 'Finding Labels': {first_few(sorted(repr(u) for u in unknown), 10)}; "
            f"expected '{NO_FINDING}' or '|'-separated findings among: {', '.join(FINDINGS)}"
        )
    return values.map(labels), values.map(findings)


def _values(findings: str) -> str:
    """The row's labels as raw finding values (findings.encode_values): {label: "1"}, {} for No Finding."""
    return encode_values({} if findings == NO_FINDING else {n: "1" for n in findings.split("|")})


def read(src: SourceConfig) -> tuple[pd.DataFrame, list[dict]]:
    """Rows of the NIH folder src.path (see the module docstring) and the skipped table rows."""
    root = Path(src.path)
    if not root.is_dir():
        raise DataError(f"NIH folder {str(src.path)!r} does not exist; {HINT}")
    table = _table(root)
    dirs = _image_dirs(root)
    # The official header "OriginalImage[Width,Height]" splits into two fields; other columns are
    # allowed (age, gender, sizes), so only the ones we use are required.
    raw = read_table(table, COLUMNS, hint=HINT)
    names = raw["Image Index"].str.strip()
    patient = raw["Patient ID"].str.strip()
    label, findings = _labels(raw["Finding Labels"], table)
    images = index_images(dirs)
    df = pd.DataFrame({
        "key": names.map(safe_key),
        "path": names.map(images).fillna(""),
        "patient": patient,
        "study": patient + "_" + raw["Follow-up #"].str.strip(),
        "view": views_of(raw["View Position"], f"{table} column 'View Position'"),
        "label": label,
        "findings": findings,
        "report": "",  # ChestX-ray14 ships no reports
        "filename": names,
        FINDING_VALUES: findings.map({v: _values(v) for v in pd.unique(findings)}),
    })
    df, skipped = drop_missing(df, src, f"{root} (images/, images_*/images/)", present=df["path"] != "")
    df, dups = drop_duplicate_keys(df, src)
    return df, skipped + dups
