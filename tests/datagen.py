"""Tiny Kaggle-layout IU X-ray look-alikes for tests (no real data needed).

    from tests.datagen import make_dataset      # or `from datagen import make_dataset` in tests/
    root = make_dataset(tmp_path / "iu", n_uids=24)

Layout: ``root/indiana_reports.csv``, ``root/indiana_projections.csv``,
``root/images/images_normalized/{uid}_IM-{uid:04d}-{v}001.dcm.png`` (as on Kaggle).
Images are synthetic, non-square, with a learnable signal: abnormal uids get a bright disc.
Variety on purpose: grayscale and RGB PNGs, one JPEG and one WebP named ``.png`` in the CSV (found by stem),
Problems spelt ``" Normal "`` once, and ``No Indexing`` for every 12th uid (uid % 12 == 11).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

REPORT_HEADER = ["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"]
ABNORMAL = ["Cardiomegaly", "Lung;Opacity", "Calcified Granuloma", "Pleural Effusion;Atelectasis"]

# broken=True adds exactly these error rows (one each), on top of the normal ones:
BROKEN_CASES = {
    "missing_image": "9001_IM-9001-1001.dcm.png",  # in the CSV, no file
    "corrupt_image": "9002_IM-9002-1001.dcm.png",  # a file of garbage bytes
    "no_report": "9003_IM-9003-1001.dcm.png",  # uid 9003 has no report row
}


def problems_of(uid: int) -> str:
    """The Problems text of generated uid ``uid`` (label rule: 'normal' -> 0, else 1)."""
    if uid % 12 == 11:
        return "No Indexing"
    if uid == 3:
        return " Normal "
    return "normal" if uid % 5 in (0, 3) else ABNORMAL[uid % len(ABNORMAL)]


def expected_label(uid: int) -> int | None:
    """0 normal, 1 abnormal, None for No Indexing."""
    p = problems_of(uid).strip().lower()
    return None if p == "no indexing" else int(p != "normal")


def _image(rng: np.random.Generator, size: int, abnormal: bool) -> np.ndarray:
    h, w = size, int(size * rng.uniform(0.75, 0.95))  # portrait, not square, like many CXRs
    yy, xx = np.mgrid[0:h, 0:w]
    img = 60 + 80 * np.exp(-(((xx - w / 2) / (w / 3)) ** 2)) + rng.normal(0, 8, (h, w))
    if abnormal:
        cy, cx, r = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, size / 6
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 230
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(root: str | Path, n_uids: int = 24, size: int = 64, broken: bool = False, seed: int = 0) -> Path:
    """Write a Kaggle-layout dataset under ``root`` and return ``root``.

    uids 1..n_uids; uid % 4 == 2 has a frontal view only, all others frontal + lateral. With
    ``broken=True`` it adds one row each for missing_image, corrupt_image and no_report
    (BROKEN_CASES): 3 error rows, so keep n_uids >= 32 or raise data.max_skip_frac (default 5%).
    """
    root = Path(root)
    img_dir = root / "images" / "images_normalized"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    reports, projections = [], []
    for uid in range(1, n_uids + 1):
        problems = problems_of(uid)
        label = expected_label(uid)
        reports.append([uid, problems, problems, "Xray Chest PA and Lateral", "Cough.", "None.",
                        f"Findings of study {uid}.", "Normal chest." if label == 0 else f"{problems.strip()}."])
        views = [("Frontal", 1)] if uid % 4 == 2 else [("Frontal", 1), ("Lateral", 2)]
        for projection, v in views:
            name = f"{uid}_IM-{uid:04d}-{v}001.dcm.png"
            projections.append([uid, name, projection])
            arr = _image(rng, size, bool(label))
            if uid == 5 and v == 1:  # stored as JPEG under another extension: matched by stem
                Image.fromarray(arr).save(img_dir / name.replace(".png", ".jpg"), quality=90)
            elif uid == 7 and v == 1:  # WebP (what bench/compact_copy.py writes), also by stem
                Image.fromarray(arr).save(img_dir / name.replace(".png", ".webp"), lossless=True)
            elif uid % 3 == 0:
                Image.fromarray(np.stack([arr] * 3, axis=-1)).save(img_dir / name)  # RGB PNG
            else:
                Image.fromarray(arr).save(img_dir / name)
    if broken:
        for reason, name in BROKEN_CASES.items():
            uid = int(name.split("_")[0])
            projections.append([uid, name, "Frontal"])
            if reason != "no_report":
                reports.append([uid, "Cardiomegaly", "Cardiomegaly", "Xray", "", "", "Big heart.", "Cardiomegaly."])
            if reason == "corrupt_image":
                (img_dir / name).write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png" * 4)
    _write_csv(root / "indiana_reports.csv", REPORT_HEADER, reports)
    _write_csv(root / "indiana_projections.csv", ["uid", "filename", "projection"], projections)
    return root


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


KERMANY_REGEX = r"^(?P<patient>person\d+|IM-\d+)"


def make_folder_dataset(root: str | Path, n_patients: int = 24, size: int = 56, seed: int = 1,
                        subsets: bool = True) -> Path:
    """A Kermany-like folder-per-class source under ``root`` (``train/``, ``test/`` when ``subsets``).

    Patient p has 1-2 films; even patients are normal (``NORMAL/IM-{p:04d}-000{k}.jpeg``), odd ones
    pneumonia (``PNEUMONIA/person{p}_bacteria_{k}.jpeg``); every 4th patient's films sit under
    ``test/``. Another "hospital" than make_dataset: square films on a brighter background, the
    same learnable signal (a bright disc for abnormal). Patients come from KERMANY_REGEX.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for p in range(1, n_patients + 1):
        abnormal = p % 2 == 1
        subset = ("test" if p % 4 == 0 else "train") if subsets else ""
        folder = root / subset / ("PNEUMONIA" if abnormal else "NORMAL")
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(1, 2 + p % 2):
            arr = np.clip(_image(rng, size, abnormal).astype(np.int16) + 40, 0, 255).astype(np.uint8)
            arr = np.asarray(Image.fromarray(arr).resize((size, size)))
            name = f"person{p}_bacteria_{k}.jpeg" if abnormal else f"IM-{p:04d}-000{k}.jpeg"
            Image.fromarray(arr).save(folder / name, quality=92)
    return root


NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
NIH_LABELS = ["No Finding", "Cardiomegaly", "Effusion|Atelectasis", "No Finding", "Infiltration|Mass|Nodule",
              "Pneumothorax", "Hernia"]


def nih_labels_of(p: int, k: int) -> str:
    """The `Finding Labels` of generated NIH patient p's k-th film (make_nih_dataset)."""
    return NIH_LABELS[(p + k) % len(NIH_LABELS)]


def make_nih_dataset(root: str | Path, n_patients: int = 12, size: int = 48, seed: int = 2) -> Path:
    """A ChestX-ray14-like folder under ``root``: ``Data_Entry_2017.csv`` and ``images/`` (PNG).

    Patient p has 1-2 films ``{p:08d}_{k:03d}.png`` (k = follow-up), labelled nih_labels_of(p, k),
    PA for even p, AP for odd; the table also lists one film without an image (``missing_image``).
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(1, n_patients + 1):
        for k in range(1 + p % 2):
            labels = nih_labels_of(p, k)
            name = f"{p:08d}_{k:03d}.png"
            rows.append([name, labels, k, p, 50, "F", "PA" if p % 2 == 0 else "AP", size, size, 0.14, 0.14])
            arr = np.clip(_image(rng, size, labels != "No Finding").astype(np.int16) - 20, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / "images" / name)
    rows.append([f"{n_patients + 1:08d}_000.png", "Cardiomegaly", 0, n_patients + 1, 60, "M", "PA", size, size, 0.1, 0.1])
    _write_csv(root / "Data_Entry_2017.csv", NIH_HEADER, rows)
    return root


def make_csv_dataset(root: str | Path, rows: list[dict], size: int = 48, seed: int = 3) -> Path:
    """A csv-format source: ``root/list.csv`` with `rows` (dicts; their keys are the columns, in the
    first row's order) and a generated PNG at each row's relative ``path`` (label "1" or "abnormal":
    the bright disc). Returns the CSV's path."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for r in rows:
        path = root / r["path"]
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_image(rng, size, str(r["label"]).lower() in ("1", "abnormal"))).save(path)
    header = list(rows[0])
    _write_csv(root / "list.csv", header, [[r.get(c, "") for c in header] for r in rows])
    return root / "list.csv"
