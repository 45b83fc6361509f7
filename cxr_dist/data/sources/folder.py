"""A folder per class (format "folder"), e.g. Kermany's pediatric pneumonia collection.

Layout of src.path, either flat or split into subsets (recorded in the extra column ``subset``)::

    CLASS/IMAGE                   e.g. NORMAL/IM-0115-0001.jpeg, PNEUMONIA/person1_virus_6.jpeg
    SUBSET/CLASS/IMAGE            SUBSET one of train, test, val (case-insensitive)

Class folder names go through src.normal_labels / src.abnormal_labels (case-insensitive); an
unknown class is an error, as is an image anywhere else (directly in src.path, directly in a
subset folder, one level deeper) or a mix of both layouts: nothing is ignored silently except
files that are not images (.DS_Store, README ...). A class or subset folder may be a symbolic link
(followed; a link that loops back to a folder containing it is an error).

The patient comes from src.patient_regex, matched (re.match) against the file name: its named
group ``patient``, else its first group, else the whole match. Without a regex every image is its
own patient (the file stem), which is only right when the collection has one image per patient.
The layout has no studies: study = patient. ``findings`` is the class folder name, and so is the
one raw label in ``finding_values`` (the findings vocabulary, data/findings.py: a class maps to the
findings it names; a source annotates only the findings its classes map to).
"""
from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

import pandas as pd

from ...config import SourceConfig
from ...errors import DataError
from ..findings import FINDING_VALUES, encode_values
from .common import drop_duplicate_keys, first_few, is_image, labels_of, normalize_view, safe_key

SUBSETS = ("train", "test", "val")
HINT = ("expected one folder per class (e.g. NORMAL/, PNEUMONIA/) directly under the source folder, or under "
        "train/, test/ (and val/) subfolders")


def _list_images(root: Path) -> list[PurePosixPath]:
    """Relative paths of every image file under root, sorted. Symbolic links to folders are
    followed (a class folder is often a link into a bigger collection); a link to a folder that
    contains it (a loop, which would never end) is a DataError naming the link."""
    out = []
    chains = {str(root): (os.path.realpath(root),)}  # each folder's real path and its ancestors'
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        chain = chains.pop(dirpath)
        for d in dirnames:
            real = os.path.realpath(os.path.join(dirpath, d))
            if real in chain:
                link = Path(dirpath, d)
                raise DataError(f"{root}: the link {link.relative_to(root).as_posix()} points to {real}, a folder "
                                f"that contains it (a loop); remove or fix the link; {HINT}")
            chains[os.path.join(dirpath, d)] = chain + (real,)
        rel = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        out += [rel / f for f in sorted(filenames) if is_image(f)]
    return sorted(out)


def _place(rel: PurePosixPath) -> tuple[str, str] | None:
    """(subset, class) of an image in an expected place, else None."""
    parts = rel.parts
    if len(parts) == 2 and parts[0].lower() not in SUBSETS:
        return "", parts[0]
    if len(parts) == 3 and parts[0].lower() in SUBSETS:
        return parts[0], parts[1]
    return None


def patient_of(regex: re.Pattern, name: str) -> str | None:
    """The patient in a file name by the rule of the module docstring; None when it does not match."""
    m = regex.match(name)
    if m is None:
        return None
    if "patient" in regex.groupindex:
        return m.group("patient") or None
    return (m.group(1) if regex.groups else m.group(0)) or None


def _patients(names: list[str], src: SourceConfig, root: Path) -> list[str]:
    if not src.patient_regex:
        return [PurePosixPath(n).stem for n in names]
    try:
        regex = re.compile(src.patient_regex)
    except re.error as e:
        raise DataError(f"source {src.name!r}: patient_regex {src.patient_regex!r} is not a valid regex: {e}") from e
    patients = [patient_of(regex, n) for n in names]
    bad = [n for n, p in zip(names, patients) if p is None]
    if bad:
        raise DataError(
            f"{root}: patient_regex {src.patient_regex!r} does not match {len(bad)} file name(s), e.g. "
            f"{first_few(bad)}; it must match (re.match, from the start) every image's file name and "
            "capture the patient in a group named 'patient' or the first group"
        )
    return patients  # type: ignore[return-value]


def read(src: SourceConfig) -> tuple[pd.DataFrame, list[dict]]:
    """Rows of the class folders under src.path (see the module docstring) and the skipped ones."""
    root = Path(src.path)
    if not root.is_dir():
        raise DataError(f"class folder root {str(src.path)!r} does not exist; {HINT}")
    rels = _list_images(root)
    places = [_place(r) for r in rels]
    misplaced = [str(r) for r, p in zip(rels, places) if p is None]
    if misplaced:
        raise DataError(f"{root}: image(s) outside a class folder: {first_few(misplaced)}; {HINT}")
    if len({bool(p[0]) for p in places}) > 1:  # type: ignore[index]
        raise DataError(f"{root}: mixes class folders at the top with subset folders ({', '.join(SUBSETS)}); {HINT}")
    classes = pd.Series([p[1] for p in places], dtype=str)  # type: ignore[index]
    names = [r.name for r in rels]
    view = normalize_view(src.view, f"source {src.name!r}: view")
    df = pd.DataFrame({
        "key": [safe_key(str(r)) for r in rels],
        "path": [str(root / r) for r in rels],
        "patient": _patients(names, src, root),
        "view": view,
        "label": labels_of(classes, src, f"{root}: class folder name(s)"),
        "findings": classes,
        "report": "",
        "filename": [str(r) for r in rels],
        "subset": [p[0] for p in places],  # type: ignore[index]
        FINDING_VALUES: classes.map(lambda c: encode_values({c: "1"})),
    })
    df["study"] = df["patient"]
    return drop_duplicate_keys(df, src)
