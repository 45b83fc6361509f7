"""Shards: every input row in exactly one shard or in skipped.jsonl, readable by plain WebDataset,
deterministic, safe with the output folder; `prepare` errors are clear."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from cxr_dist.data import prepare
from cxr_dist.config import DataConfig
from cxr_dist.errors import DataError
from cxr_dist.data.index import Shard, load_index
from cxr_dist.data.shards import write_shards
from tests.datagen import BROKEN_CASES, make_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("iu") / "data", n_uids=40, broken=True)


def _cfg(data_dir, **kw) -> DataConfig:
    base = dict(data_dir=str(data_dir), image_size=48, samples_per_shard=9, prepare_workers=1)
    return DataConfig(**{**base, **kw})


def _read_all(out: Path) -> list[dict]:
    files = sorted(str(p) for p in out.glob("*.tar"))
    return list(wds.WebDataset(files, shardshuffle=False, empty_check=False))


def test_every_row_in_one_shard_or_skipped(tmp_path, broken):
    out = tmp_path / "out"
    index = write_shards(_cfg(broken, max_skip_frac=0.1, prepare_workers=2), out)
    proj = pd.read_csv(broken / "indiana_projections.csv", dtype=str)
    samples = _read_all(out)
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    in_shards = sorted(json.loads(s["json"])["filename"] for s in samples)
    assert len(in_shards) == len(set(in_shards))
    assert sorted(in_shards + [s["filename"] for s in skipped]) == sorted(proj["filename"])
    reasons = {s["filename"]: s["reason"] for s in skipped}
    assert {reasons[f]: f for f in BROKEN_CASES.values()} == {r: f for r, f in BROKEN_CASES.items()}
    assert index.skipped == {"corrupt_image": 1, "missing_image": 1, "no_indexing": 6, "no_report": 1}
    assert index.totals["error_skipped"] == 3 and index.totals["rows"] == len(proj)
    assert index.no_indexing_counts == {"treatment": "drop", "images": 6, "uids": 3}
    # counts in the index match the tars
    for name in index.split_names:
        shards = index.shards([name])
        assert index.split(name).total == sum(s.count for s in shards) == sum(index.split_labels(name))
        for s in shards:
            n = sum(1 for _ in wds.WebDataset(s.path, shardshuffle=False))
            assert n == s.count and Path(s.path).parent == out and Path(s.path).name.startswith(f"{name}-")
    assert index.totals["samples"] == len(samples) == len(proj) - len(skipped)


def test_the_shard_index_says_what_index_json_says(tmp_path, broken):
    """ShardIndex (what every reader of the shards asks) against the JSON file prepare wrote."""
    out = tmp_path / "out"
    cfg = _cfg(broken, max_skip_frac=0.1, samples_per_shard=7)
    written = write_shards(cfg, out)
    raw = json.loads((out / "index.json").read_text())
    index = load_index(out)
    assert index == written and index.root == str(out) and index.version == raw["version"] == 2
    assert index.split_names == list(raw["splits"]) == ["test", "train", "val"]  # the file's (sorted) order
    assert written.split_names == ["train", "val", "test"]  # the order prepare wrote them (its summary's)
    assert index.has_split("val") and not index.has_split("fold0") and not index.has_samples("external")
    assert all(index.has_samples(name) for name in index.split_names)
    assert index.checksum == raw["checksum"] and index.checksum.startswith("sha256:")
    assert [(s.name, s.format, s.role, s.weight) for s in index.sources] == [("iu", "iu", "train", 1.0)]
    assert index.sources[0].label_text_fields == ("findings", "impression")
    made = index.prepared
    assert (made.image_size, made.resize, made.intensity, made.seed, made.val_frac, made.test_frac, made.k_folds,
            made.no_indexing, made.samples_per_shard) == (cfg.image_size, cfg.resize, cfg.intensity, cfg.seed,
                                                          cfg.val_frac, cfg.test_frac, cfg.k_folds, cfg.no_indexing, 7)
    for name, sp in raw["splits"].items():
        assert index.shards([name]) == [Shard(str(out / s["file"]), s["count"], s["source"]) for s in sp["shards"]]
        assert index.split_labels(name) == (sp["labels"]["normal"], sp["labels"]["abnormal"])
        assert index.split(name).uids == sp["uids"] and index.split(name).patients == sp["patients"]
        (iu,) = index.sources_in(name).values()
        assert (iu.total, iu.normal, iu.abnormal, iu.patients) == (sp["total"], *index.split_labels(name),
                                                                    sp["patients"])
        assert index.views_in(name) == set(sp["sources"]["iu"]["views"]) <= {"FRONTAL", "LATERAL"}
    assert index.has_views
    cells = index.source_view_counts(["train", "val"])["iu"]
    assert tuple(map(sum, zip(*cells.values()))) == index.class_counts(["train", "val"])
    # A split of whole shards (the end of training samples some for the OOD density): nothing else changes.
    picked = index.shards(["train"])[:2]
    more = index.with_split("sample", picked)
    assert more.shards(["sample"]) == picked and more.split("sample").total == sum(s.count for s in picked)
    assert more.split_names == [*index.split_names, "sample"] and "sample" not in index.split_names
    with pytest.raises(DataError, match="no label counts"):
        more.class_counts(["sample"])
    with pytest.raises(DataError, match="'fold1' is not in"):
        index.shards(["train", "fold1"])


def test_sample_format(tmp_path, broken):
    out = tmp_path / "out"
    write_shards(_cfg(broken, max_skip_frac=0.1), out)
    for s in _read_all(out):
        assert set(s) >= {"__key__", "jpg", "cls", "json"}  # plain WebDataset reads our keys
        meta = json.loads(s["json"])
        assert set(meta) >= {"uid", "projection", "label", "problems", "findings", "impression", "split", "fold"}
        assert s["__key__"] == Path(meta["filename"]).stem.replace(".", "_")
        assert int(s["cls"]) == meta["label"] and s["__url__"].split("/")[-1].startswith(meta["split"])
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.mode == "L" and img.format == "JPEG" and max(img.size) == 48
        assert img.size[0] < img.size[1]  # generated images are portrait: aspect ratio kept


def test_skip_threshold(tmp_path, broken):
    with pytest.raises(DataError, match=r"3 of \d+ images .*max_skip_frac") as e:
        write_shards(_cfg(broken, max_skip_frac=0.01), tmp_path / "out")
    assert "corrupt_image" in str(e.value) and "missing_image" in str(e.value)
    assert not (tmp_path / "out" / "index.json").exists()


def test_deterministic_byte_identical(tmp_path, broken):
    a = write_shards(_cfg(broken, max_skip_frac=0.1, prepare_workers=2), tmp_path / "a")
    b = write_shards(_cfg(broken, max_skip_frac=0.1, prepare_workers=1), tmp_path / "b")
    assert a.checksum == b.checksum and a.split_names == b.split_names
    for p in sorted((tmp_path / "a").iterdir()):  # index.json included
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes(), p.name
    c = write_shards(_cfg(broken, max_skip_frac=0.1, seed=5), tmp_path / "c")
    assert c.checksum != a.checksum


def test_k_fold_shards(tmp_path, broken):
    index = write_shards(_cfg(broken, max_skip_frac=0.1, k_folds=3), tmp_path / "out")
    assert index.split_names == ["fold0", "fold1", "fold2", "test"] and index.prepared.k_folds == 3
    for s in _read_all(tmp_path / "out"):
        meta = json.loads(s["json"])
        assert meta["fold"] == (int(meta["split"][4:]) if meta["split"] != "test" else None)


def test_out_dir_safety_and_rerun(tmp_path, broken):
    out = tmp_path / "out"
    write_shards(_cfg(broken, max_skip_frac=0.1, samples_per_shard=4), out)
    many = {p.name for p in out.glob("*.tar")}
    write_shards(_cfg(broken, max_skip_frac=0.1, samples_per_shard=100), out)  # rerun into our own folder
    few = {p.name for p in out.glob("*.tar")}
    assert few == {"train-00000.tar", "val-00000.tar", "test-00000.tar"} and few < many
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="did not write.*notes.txt"):
        write_shards(_cfg(broken, max_skip_frac=0.1), out)
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(DataError, match="dataset folder"):
        write_shards(_cfg(broken, max_skip_frac=0.1), broken)


def test_no_indexing_abnormal_goes_into_shards(tmp_path, broken):
    index = write_shards(_cfg(broken, max_skip_frac=0.1, no_indexing="abnormal"), tmp_path / "out")
    assert "no_indexing" not in index.skipped
    assert index.no_indexing_counts == {"treatment": "abnormal", "images": 6, "uids": 3}


def test_prepare_main_with_overrides(tmp_path, broken, capsys):
    out = tmp_path / "out"
    rc = prepare.main(["--data", str(broken), "--out", str(out), "--data.image_size", "40",
                       "--loader.input_size=32", "--data.max_skip_frac", "0.1", "--data.prepare_workers", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "train" in text and "no_indexing 6" in text and "corrupt_image 1" in text
    assert json.loads((out / "index.json").read_text())["image_size"] == 40


def test_python_m_prepare_error_is_clean(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cxr_dist.data.prepare", "--data", str(tmp_path / "missing"),
                        "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    assert "raddar/chest-xrays-indiana-university" in r.stderr and "Traceback" not in r.stderr
