"""Manifest: label rule, file matching, No Indexing handling and clear errors for bad input."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cxr_dist.errors import DataError
from cxr_dist.data.sources.common import sample_key
from cxr_dist.data.sources.iu import build_manifest, label_of
from tests.datagen import BROKEN_CASES, expected_label, make_dataset


@pytest.fixture(scope="module")
def iu(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("iu") / "data", n_uids=24)


@pytest.mark.parametrize("text,label", [
    ("normal", 0), (" Normal ", 0), ("NORMAL", 0), ("normal\t", 0),
    ("No Indexing", None), ("no  indexing", None),
    ("Cardiomegaly", 1), ("normal;Lung", 1), ("Lung;Opacity", 1), ("", 1),
])
def test_label_rule(text, label):
    assert label_of(text) == label


def test_key_has_no_dots():
    # WebDataset splits member names at the first dot: keys must not contain any.
    assert sample_key("1_IM-0001-4001.dcm.png") == "1_IM-0001-4001_dcm"
    assert sample_key("a b.c.jpg") == "a_b_c"


def test_manifest_rows_and_labels(iu):
    df, skipped = build_manifest(iu, "drop")
    proj = pd.read_csv(iu / "indiana_projections.csv", dtype=str)
    assert len(df) + len(skipped) == len(proj)
    assert {s["reason"] for s in skipped} == {"no_indexing"}
    assert df["key"].is_unique
    for uid, label in zip(df["uid"], df["label"]):
        assert expected_label(int(uid)) == label
    # uid 5's frontal view is stored as .jpg while the CSV says .png: matched by stem
    row = df[df["filename"] == "5_IM-0005-1001.dcm.png"].iloc[0]
    assert row["path"].endswith("5_IM-0005-1001.dcm.jpg")
    row = df[df["filename"] == "7_IM-0007-1001.dcm.png"].iloc[0]
    assert row["path"].endswith("7_IM-0007-1001.dcm.webp")


def test_no_indexing_abnormal(iu):
    dropped, skipped = build_manifest(iu, "drop")
    kept, skipped2 = build_manifest(iu, "abnormal")
    n_ni = sum(s["reason"] == "no_indexing" for s in skipped)
    assert n_ni > 0 and not skipped2
    assert len(kept) == len(dropped) + n_ni
    assert set(kept.loc[kept["uid"].isin(["11", "23"]), "label"]) == {1}


def test_broken_rows_are_skipped_with_reasons(tmp_path):
    root = make_dataset(tmp_path / "d", n_uids=12, broken=True)
    df, skipped = build_manifest(root, "drop")
    by_reason = {s["reason"]: s["filename"] for s in skipped if s["reason"] != "no_indexing"}
    assert by_reason == {"missing_image": BROKEN_CASES["missing_image"], "no_report": BROKEN_CASES["no_report"]}
    # the corrupt file is only found when decoding (shards.py): it is still in the manifest
    assert BROKEN_CASES["corrupt_image"] in set(df["filename"])


def test_missing_folder_names_the_kaggle_dataset(tmp_path):
    with pytest.raises(DataError, match="raddar/chest-xrays-indiana-university") as e:
        build_manifest(tmp_path / "nope")
    assert "indiana_projections.csv" in str(e.value) and "images/" in str(e.value)


@pytest.mark.parametrize("csv", ["indiana_reports.csv", "indiana_projections.csv"])
def test_missing_csv(tmp_path, iu, csv):
    root = tmp_path / "d"
    shutil.copytree(iu, root)
    (root / csv).unlink()
    with pytest.raises(DataError, match=f"missing file .*{csv}"):
        build_manifest(root)


def test_missing_column(tmp_path, iu):
    root = tmp_path / "d"
    shutil.copytree(iu, root)
    rep = pd.read_csv(root / "indiana_reports.csv", dtype=str).drop(columns=["Problems"])
    rep.to_csv(root / "indiana_reports.csv", index=False)
    with pytest.raises(DataError, match="lacks column.*Problems"):
        build_manifest(root)


def test_missing_images_folder(tmp_path, iu):
    root = tmp_path / "d"
    shutil.copytree(iu, root)
    shutil.rmtree(root / "images")
    with pytest.raises(DataError, match="no images/ folder"):
        build_manifest(root)


def test_empty_result_is_an_error(tmp_path, iu):
    root = tmp_path / "d"
    shutil.copytree(iu, root)
    rep = pd.read_csv(root / "indiana_reports.csv", dtype=str)
    rep["Problems"] = "No Indexing"
    rep.to_csv(root / "indiana_reports.csv", index=False)
    with pytest.raises(DataError, match="no usable images.*no_indexing"):
        build_manifest(root, "drop")


def test_compact_copy_keeps_samples_and_refuses_a_non_empty_target(tmp_path):
    # bench/compact_copy.py (how docs/results.md's GPU runs got their data): every image as WebP,
    # found by stem, so the manifest has the same keys, uids and labels; only the pixels change.
    script = Path(__file__).resolve().parents[1] / "bench" / "compact_copy.py"
    iu = make_dataset(tmp_path / "src", n_uids=32, broken=True)
    dst = tmp_path / "webp"
    res = subprocess.run([sys.executable, str(script), str(iu), str(dst), "--quality", "90", "--workers", "1"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "mean PSNR" in res.stdout
    assert "1 unreadable" in res.stdout  # the corrupt PNG travels as it is
    images = list((dst / "images").iterdir())
    assert sum(p.suffix == ".webp" for p in images) == len(images) - 1
    a, skip_a = build_manifest(iu, "drop")
    b, skip_b = build_manifest(dst, "drop")
    cols = ["key", "uid", "label", "projection"]
    assert a[cols].sort_values("key").reset_index(drop=True).equals(b[cols].sort_values("key").reset_index(drop=True))
    assert sorted(s["reason"] for s in skip_a) == sorted(s["reason"] for s in skip_b)
    again = subprocess.run([sys.executable, str(script), str(iu), str(dst)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "not empty" in again.stderr
