"""Source readers (cxr_dist/sources): generated data for every format and error, plus the real
NIH label table and the real Kermany copy of shared/data (skipped when absent)."""
from __future__ import annotations

import gzip
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_dist.config import DataConfig, SourceConfig
from cxr_dist.errors import DataError
from cxr_dist.data.sources.iu import build_manifest
from cxr_dist.data.sources import ERROR_REASONS, ROW_COLUMNS, VIEWS, read_source, read_sources
from cxr_dist.data.sources.common import label_from, labels_of, normalize_view, safe_key
from tests.datagen import expected_label, make_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
NIH_TABLE = SHARED / "nih_labels" / "Data_Entry_2017_v2020.csv.gz"
NIH_ROWS = 112_120
KERMANY = SHARED / "kermany_pediatric"
KERMANY_REGEX = r"^(?P<patient>person\d+|NORMAL2-IM-\d+|IM-\d+)"


def _png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 6), value, dtype=np.uint8)).save(path)
    return path


def _check_contract(df: pd.DataFrame, name: str) -> None:
    """What every reader promises, whatever the format."""
    assert list(df.columns[: len(ROW_COLUMNS)]) == ROW_COLUMNS
    assert df["label"].dtype == np.int64 and set(df["label"]) <= {0, 1}
    assert (df["source"] == name).all()
    assert df["key"].is_unique and df["key"].str.fullmatch(r"[A-Za-z0-9_-]+").all()
    assert df["key"].tolist() == sorted(df["key"])
    assert df["view"].isin(VIEWS).all()
    assert all(Path(p).is_file() for p in df["path"])
    for c in ROW_COLUMNS:
        if c != "label":
            assert df[c].map(type).eq(str).all(), c


# ----------------------------------------------------------------------------- common


def test_normalize_view_and_safe_key():
    cases = {"PA": "PA", "pa": "PA", " AP supine ": "AP", "AP Erect": "AP", "ap": "AP", "LAT": "LATERAL",
             "ll": "LATERAL", "RL": "LATERAL", "Lateral": "LATERAL", "frontal": "FRONTAL", "": ""}
    assert {k: normalize_view(k, "x") for k in cases} == cases
    with pytest.raises(DataError, match=r"somewhere: unknown view 'oblique'.*PA, AP"):
        normalize_view("oblique", "somewhere")
    assert safe_key("train/NORMAL/IM-0115-0001.jpeg") == "train_NORMAL_IM-0115-0001"
    assert safe_key("1_IM-0001-4001.dcm.png") == "1_IM-0001-4001_dcm"
    assert safe_key("a b+c/noext") == "a_b_c_noext"


def test_labels_are_case_insensitive_and_unknowns_listed():
    src = SourceConfig(name="s", normal_labels=("Normal",), abnormal_labels=("Pneumonia", "TB"))
    assert label_from(" normal ", src, "w") == 0 and label_from("tb", src, "w") == 1
    assert labels_of(pd.Series(["NORMAL", "pneumonia", "Tb"]), src, "w").tolist() == [0, 1, 1]
    with pytest.raises(DataError, match=r"w: unknown label value\(s\) 'covid', 'maybe'; accepted .*'Normal'.*'TB'"):
        labels_of(pd.Series(["normal", "maybe", "covid", "maybe"]), src, "w")


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(DataError, match="unknown format 'dicomdir'"):
        read_source(SourceConfig(name="x", format="dicomdir", path=str(tmp_path)))


# ----------------------------------------------------------------------------- iu


def test_iu_reader_wraps_manifest(tmp_path):
    root = make_dataset(tmp_path / "iu", n_uids=24, size=32, broken=True)
    df, skipped = read_source(SourceConfig(name="iu", format="iu", path=str(root)))
    _check_contract(df, "iu")
    assert (df["patient"] == df["uid"]).all() and (df["study"] == df["uid"]).all()
    assert set(df["view"]) == {"FRONTAL", "LATERAL"}
    assert (df["view"] == df["projection"].str.upper()).all()
    assert (df["findings"] == df["problems"]).all()
    assert df["label"].tolist() == [expected_label(int(u)) for u in df["uid"]]
    row = df[df["uid"] == "5"].iloc[0]
    assert row["report"] == "Findings of study 5. Normal chest." and row["report_findings"] == "Findings of study 5."
    reasons = {s["reason"] for s in skipped}
    assert reasons == {"missing_image", "no_report", "no_indexing"}  # corrupt_image is prepare's job
    assert all(s["source"] == "iu" and s["patient"] == s["uid"] for s in skipped)


def test_legacy_data_dir_gives_build_manifest_keys(tmp_path):
    root = make_dataset(tmp_path / "iu", n_uids=30, size=32, broken=True)
    legacy, legacy_skipped = build_manifest(root)
    df, skipped = read_sources(DataConfig(data_dir=str(root)))
    assert df["key"].tolist() == legacy["key"].tolist()  # unprefixed
    assert df["label"].tolist() == legacy["label"].tolist()
    assert df["path"].tolist() == legacy["path"].tolist()
    assert (df["role"] == "train").all() and (df["source"] == "iu").all()
    assert len(skipped) == len(legacy_skipped)


# ----------------------------------------------------------------------------- folder


def _folder_source(root: Path, **kw) -> SourceConfig:
    kw.setdefault("patient_regex", r"^(?P<patient>p\d+)_")
    return SourceConfig(name="kids", format="folder", path=str(root), **kw)


def test_folder_with_subsets(tmp_path):
    root = tmp_path / "kids"
    for rel in ["train/NORMAL/p1_a.png", "train/NORMAL/p2_a.jpeg", "train/pneumonia/p3_a.png",
                "train/pneumonia/p3_b.png", "test/NORMAL/p4_a.png", "test/PNEUMONIA/p5_a.webp"]:
        _png(root / rel)
    (root / "train" / ".DS_Store").write_bytes(b"\0\1")  # not an image: ignored
    (root / "README.txt").write_text("about")
    df, skipped = read_source(_folder_source(root, view="pa"))
    _check_contract(df, "kids")
    assert skipped == []
    by_key = df.set_index("key")
    assert by_key.loc["train_pneumonia_p3_b", "patient"] == "p3" and by_key.loc["train_pneumonia_p3_b", "label"] == 1
    assert by_key.loc["train_NORMAL_p2_a", "filename"] == "train/NORMAL/p2_a.jpeg"
    assert dict(df.groupby("subset")["label"].sum()) == {"test": 1, "train": 2}
    assert (df["study"] == df["patient"]).all() and set(df["view"]) == {"PA"}


def test_folder_flat_without_regex_and_duplicate_keys(tmp_path):
    root = tmp_path / "flat"
    for rel in ["Normal/x 1.png", "Normal/x_1.png", "Abnormal/y.png"]:
        _png(root / rel)
    df, skipped = read_source(_folder_source(root, patient_regex=""))
    assert df["key"].tolist() == ["Abnormal_y", "Normal_x_1"]
    assert df["patient"].tolist() == ["y", "x 1"]  # no regex: the file stem is the patient
    assert (df["subset"] == "").all() and (df["view"] == "").all()
    assert [(s["reason"], s["filename"]) for s in skipped] == [("duplicate_key", "Normal/x_1.png")]


def test_folder_follows_linked_class_folders_and_refuses_loops(tmp_path):
    elsewhere = tmp_path / "collection" / "pneumonia_films"
    _png(elsewhere / "p3_a.png")
    _png(elsewhere / "p4_a.png")
    root = tmp_path / "kids"
    _png(root / "train" / "NORMAL" / "p1_a.png")
    (root / "train" / "PNEUMONIA").symlink_to(elsewhere, target_is_directory=True)  # a linked class folder
    (root / "test").symlink_to(tmp_path / "other_test", target_is_directory=True)  # a linked subset folder
    _png(tmp_path / "other_test" / "NORMAL" / "p5_a.png")
    df, skipped = read_source(_folder_source(root))
    assert skipped == []
    assert df["filename"].tolist() == ["test/NORMAL/p5_a.png", "train/NORMAL/p1_a.png", "train/PNEUMONIA/p3_a.png",
                                       "train/PNEUMONIA/p4_a.png"]
    assert df["label"].tolist() == [0, 0, 1, 1]
    assert df["path"].iloc[2] == str(root / "train" / "PNEUMONIA" / "p3_a.png")
    (elsewhere / "again").symlink_to(root / "train", target_is_directory=True)  # train/PNEUMONIA/again -> train
    with pytest.raises(DataError, match=r"link train/PNEUMONIA/again points to .*train.*loop"):
        read_source(_folder_source(root))


@pytest.mark.parametrize("files,pattern", [
    (["NORMAL/p1_a.png", "COVID/p2_a.png", "Maybe/p3_a.png"], r"unknown label value\(s\) 'COVID', 'Maybe'"),
    (["NORMAL/p1_a.png", "p2_a.png"], r"image\(s\) outside a class folder: p2_a.png"),
    (["train/NORMAL/p1_a.png", "train/p2_a.png"], r"outside a class folder: train/p2_a.png"),
    (["NORMAL/sub/p1_a.png"], r"outside a class folder: NORMAL/sub/p1_a.png"),
    (["NORMAL/p1_a.png", "test/NORMAL/p2_a.png"], r"mixes class folders"),
    (["NORMAL/p1_a.png", "NORMAL/q7_a.png", "NORMAL/x.png"], r"does not match 2 file name\(s\), e.g. q7_a.png, x.png"),
])
def test_folder_errors(tmp_path, files, pattern):
    for rel in files:
        _png(tmp_path / "d" / rel)
    with pytest.raises(DataError, match=pattern):
        read_source(_folder_source(tmp_path / "d"))


def test_folder_missing_root_and_bad_view(tmp_path):
    with pytest.raises(DataError, match=r"'.*nowhere' does not exist; expected one folder per class"):
        read_source(_folder_source(tmp_path / "nowhere"))
    _png(tmp_path / "d" / "NORMAL" / "p1_a.png")
    with pytest.raises(DataError, match=r"unknown view 'sideways'"):
        read_source(_folder_source(tmp_path / "d", view="sideways"))


@pytest.mark.skipif(not KERMANY.is_dir(), reason=f"real Kermany copy not found at {KERMANY}")
def test_folder_on_real_kermany():
    df, skipped = read_source(SourceConfig(name="kermany", format="folder", path=str(KERMANY),
                                           patient_regex=KERMANY_REGEX))
    _check_contract(df, "kermany")
    assert len(df) == 5840 and skipped == []
    counts = df.groupby(["subset", "findings"]).size().to_dict()
    assert counts == {("train", "NORMAL"): 1341, ("train", "PNEUMONIA"): 3875,
                      ("test", "NORMAL"): 234, ("test", "PNEUMONIA"): 390}
    assert (df["label"] == (df["findings"] == "PNEUMONIA")).all()
    assert df.groupby("patient")["label"].nunique().max() == 1  # every patient has one label
    print(f"kermany: {df['patient'].nunique()} patients")


# ----------------------------------------------------------------------------- csv


def _csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_csv_reader(tmp_path):
    base = tmp_path / "tbl"
    _png(base / "img" / "a.png")
    _png(base / "img" / "b.png")
    _png(base / "img" / "c1.png")
    _png(base / "img" / "c2.png")
    outside = _png(tmp_path / "elsewhere" / "d.png")
    inside_abs = base / "img" / "e.png"
    _png(inside_abs)
    rows = [
        {"path": "img/a.png", "label": "Normal", "patient": "P1", "study": "", "view": "AP supine"},
        {"path": "img/b.png", "label": "ABNORMAL", "patient": "P1", "study": "S2", "view": ""},
        {"path": "img/c1.png", "label": "normal", "patient": "P2", "study": "S3", "view": "PA"},
        {"path": "img/c2.png", "label": "abnormal", "patient": "P2", "study": "S3", "view": "LL"},
        {"path": str(outside), "label": "1", "patient": "P3", "study": "", "view": "PA"},
        {"path": str(inside_abs), "label": "0", "patient": "P4", "study": "", "view": ""},
        {"path": "img/a.png", "label": "normal", "patient": "P1", "study": "", "view": ""},
        {"path": "img/missing.png", "label": "normal", "patient": "P5", "study": "", "view": ""},
    ]
    src = SourceConfig(name="t", format="csv", path=str(_csv(base / "list.csv", rows)), view="frontal")
    out_key = re.sub(r"[^A-Za-z0-9_-]", "_", str(outside)[1:-len(".png")])
    df, skipped = read_source(src)
    _check_contract(df, "t")
    got = df.set_index("key")[["patient", "study", "view", "label"]].T.to_dict("list")
    assert got == {
        "img_a": ["P1", "P1", "AP", 0],  # study defaults to the patient
        "img_b": ["P1", "P1/S2", "FRONTAL", 1],  # empty view -> src.view; the study qualified by its patient
        out_key: ["P3", "P3", "PA", 1],  # absolute outside the CSV folder: key from the whole path
        "img_e": ["P4", "P4", "FRONTAL", 0],  # absolute inside the CSV folder: key as if relative
    }
    assert df.set_index("key").loc["img_a", "path"] == str(base / "img" / "a.png")
    reasons = sorted((s["reason"], s["filename"]) for s in skipped)
    assert reasons == [("conflicting_labels", "img/c1.png"), ("conflicting_labels", "img/c2.png"),
                       ("duplicate_key", "img/a.png"), ("missing_image", "img/missing.png")]
    conflict = next(s for s in skipped if s["reason"] == "conflicting_labels")
    assert conflict["patient"] == "P2"
    assert "'abnormal' (1)" in conflict["detail"] and "'normal' (1)" in conflict["detail"]
    assert all(s["reason"] in ERROR_REASONS for s in skipped)


@pytest.mark.parametrize("rows,pattern", [
    ([{"path": "a.png", "label": "normal", "patient": "1", "age": "3"}],
     r"unexpected column\(s\) age; allowed: path, label, patient, view, findings, study, report"),
    ([{"path": "a.png", "label": "normal"}], r"lacks column\(s\) patient"),
    ([{"path": "a.png", "label": "sick", "patient": "1"}, {"path": "b.png", "label": "?", "patient": "2"}],
     r"column 'label': unknown label value\(s\) '\?', 'sick'; accepted"),
    ([{"path": "a.png", "label": "normal", "patient": "1", "view": "oblique"}], r"column 'view': unknown view value"),
    ([{"path": "a.png", "label": "normal", "patient": ""}], r"empty path or patient on line\(s\) 2"),
])
def test_csv_errors(tmp_path, rows, pattern):
    _png(tmp_path / "a.png")
    with pytest.raises(DataError, match=pattern):
        read_source(SourceConfig(name="t", format="csv", path=str(_csv(tmp_path / "l.csv", rows))))


def test_csv_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"missing file .*nope.csv"):
        read_source(SourceConfig(name="t", format="csv", path=str(tmp_path / "nope.csv")))


# ----------------------------------------------------------------------------- read_sources


def test_read_sources_prefixes_keys_and_refuses_collisions(tmp_path):
    iu = make_dataset(tmp_path / "iu", n_uids=12, size=32)
    _png(tmp_path / "kids" / "NORMAL" / "p1_a.png")
    _png(tmp_path / "kids" / "PNEUMONIA" / "p2_a.png")
    data = DataConfig(sources=(SourceConfig(name="iu", format="iu", path=str(iu)),
                               _folder_source(tmp_path / "kids", role="external")))
    df, skipped = read_sources(data)
    one, _ = read_source(data.sources[0])
    assert df[df["source"] == "iu"]["key"].tolist() == ["iu__" + k for k in one["key"]]
    assert df[df["source"] == "kids"]["key"].tolist() == ["kids__NORMAL_p1_a", "kids__PNEUMONIA_p2_a"]
    assert df.groupby("source")["role"].unique().map(list).to_dict() == {"iu": ["train"], "kids": ["external"]}
    assert df[df["source"] == "kids"]["uid"].isna().all() and df["key"].is_unique
    assert not df[ROW_COLUMNS + ["role"]].isna().any().any() and df["label"].dtype == np.int64
    assert {s["source"] for s in skipped} == {"iu"}  # the No Indexing uid
    # "a" + "b__c" and "a__b" + "c" give the same global key.
    _png(tmp_path / "t" / "b__c.png")
    _png(tmp_path / "t" / "c.png")
    t1 = _csv(tmp_path / "t" / "1.csv", [{"path": "b__c.png", "label": "0", "patient": "1"}])
    t2 = _csv(tmp_path / "t" / "2.csv", [{"path": "c.png", "label": "0", "patient": "1"}])
    clash = DataConfig(sources=(SourceConfig(name="a", format="csv", path=str(t1)),
                                SourceConfig(name="a__b", format="csv", path=str(t2))))
    with pytest.raises(DataError, match=r"used by more than one source.*a__b__c"):
        read_sources(clash)


# ----------------------------------------------------------------------------- nih


def _nih_header() -> str:
    return ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
            "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")


def test_nih_errors(tmp_path):
    src = SourceConfig(name="nih", format="nih", path=str(tmp_path))
    with pytest.raises(DataError, match=r"exactly one Data_Entry_2017\*.csv, found none"):
        read_source(src)
    (tmp_path / "Data_Entry_2017.csv").write_text(_nih_header())
    (tmp_path / "Data_Entry_2017_v2020.csv").write_text(_nih_header())
    with pytest.raises(DataError, match=r"found Data_Entry_2017.csv, Data_Entry_2017_v2020.csv"):
        read_source(src)
    (tmp_path / "Data_Entry_2017.csv").unlink()
    with pytest.raises(DataError, match=r"no images/ or images_\*/images/ folder"):
        read_source(src)
    _png(tmp_path / "images" / "00000001_000.png")
    table = tmp_path / "Data_Entry_2017_v2020.csv"
    table.write_text(_nih_header() + "00000001_000.png,Cardiomegaly|Sadness,0,1,57,M,PA,1,2,0.1,0.1\n")
    with pytest.raises(DataError, match=r"unknown value\(s\) in 'Finding Labels': 'Sadness'"):
        read_source(src)
    table.write_text(_nih_header() + "00000001_000.png,Cardiomegaly,0,1,57,M,LL-decub,1,2,0.1,0.1\n")
    with pytest.raises(DataError, match=r"'View Position': unknown view value\(s\) 'LL-decub'"):
        read_source(src)
    table.write_text("Image Index,Finding Labels,Patient ID\n00000001_000.png,Cardiomegaly,1\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) View Position, Follow-up #"):
        read_source(src)


@pytest.fixture(scope="module")
def nih_table(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """The real table decompressed once, and the ~40 rows given images (both labels, PA and AP,
    patients with several follow-ups, one whose file number differs from its Follow-up #)."""
    if not NIH_TABLE.is_file():
        pytest.skip(f"real NIH label table not found at {NIH_TABLE}")
    out = tmp_path_factory.mktemp("nih") / "Data_Entry_2017_v2020.csv"
    with gzip.open(NIH_TABLE, "rb") as f_in, open(out, "wb") as f_out:
        shutil.copyfileobj(f_in, f_out)
    full = pd.read_csv(out, dtype=str, keep_default_na=False)
    chosen = pd.concat([full.head(32), full.tail(8)])
    assert set(chosen["View Position"]) == {"PA", "AP"} and (chosen["Finding Labels"] == "No Finding").any()
    assert chosen["Patient ID"].value_counts().max() > 3
    return out, chosen


@pytest.mark.parametrize("layout", ["flat", "split"])
def test_nih_on_real_table(tmp_path, nih_table, layout):
    table, chosen = nih_table
    shutil.copy(table, tmp_path / table.name)
    names = chosen["Image Index"].tolist()
    written = {}
    for i, name in enumerate(names):
        sub = "images" if layout == "flat" else f"images_{1 + i % 2:03d}/images"
        written[name] = str(_png(tmp_path / sub / name, value=i))
    df, skipped = read_source(SourceConfig(name="nih", format="nih", path=str(tmp_path)))
    _check_contract(df, "nih")
    exp = chosen.set_index("Image Index").loc[df["filename"]]
    assert sorted(df["filename"]) == sorted(names)
    assert df["label"].tolist() == (exp["Finding Labels"] != "No Finding").astype(int).tolist()
    assert df["findings"].tolist() == exp["Finding Labels"].tolist()
    assert df["patient"].tolist() == exp["Patient ID"].tolist()
    assert df["study"].tolist() == (exp["Patient ID"] + "_" + exp["Follow-up #"]).tolist()
    assert df["view"].tolist() == exp["View Position"].tolist()
    assert df.set_index("filename").loc["00000003_000.png", "study"] == "3_7"  # Follow-up #, not the file number
    assert df["path"].tolist() == [written[n] for n in df["filename"]]
    assert len(skipped) == NIH_ROWS - len(names)
    assert {s["reason"] for s in skipped} == {"missing_image"}
    assert not {s["filename"] for s in skipped} & set(names)
