"""The findings vocabulary (issue 22, docs/findings.md): per-source mappings, masking, the shards'
targets, the index's counts, the stream's tensors, config errors, and the shipped IU table against
the real IU copy (when present)."""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds

from cxr_dist.config import ConfigError, DataConfig, LoaderConfig, SourceConfig
from cxr_dist.data import findings as F
from cxr_dist.data.index import FindingCounts, ShardIndex, load_index
from cxr_dist.data.shards import merge_parts, write_part, write_shards
from cxr_dist.data.sources import read_source
from cxr_dist.data.sources.iu import term_values
from cxr_dist.data.stream import eval_loader, train_loader
from cxr_dist.errors import DataError
from tests.datagen import (KERMANY_REGEX, make_csv_dataset, make_dataset, make_folder_dataset, make_nih_dataset,
                           nih_labels_of, problems_of)

NIH14 = F.NIH14
VOCAB = F.vocabulary(("nih14",))
BASE = dict(image_size=48, samples_per_shard=9, prepare_workers=1, max_skip_frac=0.2)


def _iu(**kw) -> F.SourceMapping:
    return F.source_mapping(SourceConfig(name="iu", format="iu", path="x", **kw))


def _t(mapping: F.SourceMapping, values, label=1, vocab=VOCAB, raw=()) -> dict[str, int]:
    return mapping.targets(values, label, vocab, mapping.annotated(raw))


# ----------------------------------------------------------------------------- vocabulary


def test_vocabulary():
    assert F.vocabulary(()) == ()
    assert VOCAB == NIH14 + ("any_finding",) and len(VOCAB) == 15
    assert VOCAB[:3] == ("atelectasis", "cardiomegaly", "effusion") and "pleural_thickening" in VOCAB
    # names in the order given, spelt any way, duplicates dropped, any_finding always last
    assert F.vocabulary(["Pleural_Thickening", "any_finding", "cardiomegaly", "pleural thickening"]) == (
        "pleural_thickening", "cardiomegaly", "any_finding")
    assert F.vocabulary(["edema", "nih14"])[:2] == ("edema", "atelectasis")
    with pytest.raises(ConfigError, match=r"unknown finding\(s\) 'nih15', 'sadness'; allowed: 'nih14'.*hernia, any_finding"):
        F.vocabulary(["nih15", "cardiomegaly", "sadness"])


# ----------------------------------------------------------------------------- IU


def test_iu_terms():
    m = _iu()
    assert m.annotated() == NIH14  # IU's indexers coded every finding: all 14 reachable
    neg = {f: 0 for f in NIH14}
    assert _t(m, {}, label=0) == {**neg, "any_finding": 0}  # a normal report: every finding negative
    assert _t(m, {"Cardiomegaly/mild": "1", "Pleural Effusion/bilateral": "1"}) == {
        **neg, "cardiomegaly": 1, "effusion": 1, "any_finding": 1}
    # A term outside the 14 counts for any_finding only: negative for every finding, not masked.
    assert _t(m, {"Spine/degenerative": "1", "Calcified Granuloma/lung": "1"}) == {**neg, "any_finding": 1}
    # Trap names: subcutaneous emphysema is not emphysema, pericardial effusion not (pleural) effusion.
    t = _t(m, {"Subcutaneous Emphysema/neck": "1", "Pericardial Effusion": "1", "Cystic Fibrosis": "1"})
    assert t["emphysema"] == t["effusion"] == t["fibrosis"] == 0
    # Qualifiers in any order; the key with the most qualifiers wins.
    assert _t(m, {"Thickening/pleura/apex/bilateral": "1"})["pleural_thickening"] == 1
    assert _t(m, {"Thickening/bronchovascular": "1"})["pleural_thickening"] == 0
    assert _t(m, {"Cardiac Shadow/enlarged/moderate": "1"})["cardiomegaly"] == 1
    assert _t(m, {"Hydropneumothorax": "1"}) == {**neg, "pneumothorax": 1, "effusion": 1, "any_finding": 1}


@pytest.mark.parametrize("policy,expected", [("mask", None), ("0", 0), ("1", 1)])
def test_iu_uncertain_terms_follow_the_policy(policy, expected):
    m = _iu(uncertain=policy)
    t = _t(m, {"Opacity/lung/base/left": "1"})  # "?infiltration,?consolidation"
    assert t.get("infiltration") == expected and t.get("consolidation") == expected
    assert t["atelectasis"] == 0 and t["any_finding"] == 1
    t = _t(m, {"Costophrenic Angle/left/blunted/mild": "1"})
    assert t.get("effusion") == expected and t.get("pleural_thickening") == expected
    assert _t(m, {"Cardiomegaly/borderline": "1"}).get("cardiomegaly") == expected
    # Opacity outside the lung maps to nothing; a stated finding beats an uncertain one.
    assert _t(m, {"Opacity/ribs": "1"})["infiltration"] == 0
    assert _t(m, {"Opacity/lung": "1", "Infiltrate/lung": "1"})["infiltration"] == 1


def test_iu_no_indexing_masks_every_finding_but_any_finding():
    assert term_values("No Indexing", "No Indexing") is None
    assert term_values("normal", "normal") == {}
    assert term_values("Cardiomegaly/borderline;Lung/hypoinflation", "Cardiomegaly;Lung") == {
        "Cardiomegaly/borderline": "1", "Lung/hypoinflation": "1"}
    assert term_values("", "Cardiomegaly;Lung") == {"Cardiomegaly": "1", "Lung": "1"}  # no MeSH: Problems
    assert _iu().targets(None, 1, VOCAB, NIH14) == {"any_finding": 1}


def test_iu_reader_keeps_the_terms(tmp_path):
    root = make_dataset(tmp_path / "iu", n_uids=24, size=32)
    df, _ = read_source(SourceConfig(name="iu", format="iu", path=str(root), no_indexing="abnormal"))
    for uid, values in zip(df["uid"], df[F.FINDING_VALUES]):
        problems = problems_of(int(uid)).strip()
        if problems == "No Indexing":
            assert values == ""
        elif problems.lower() == "normal":
            assert json.loads(values) == {}
        else:
            assert set(json.loads(values)) == set(problems.split(";"))


def test_findings_map_overrides_the_shipped_table():
    m = _iu(findings_map=("Calcified Granuloma=nodule", "Pulmonary Atelectasis=", "Lung/hypoinflation=?atelectasis"))
    t = _t(m, {"Calcified Granuloma/lung": "1", "Pulmonary Atelectasis/base": "1"})
    assert t["nodule"] == 1 and t["atelectasis"] == 0
    assert "atelectasis" not in _t(m, {"Lung/hypoinflation/mild": "1"})  # uncertain -> masked


# ----------------------------------------------------------------------------- NIH, folder, csv


def test_nih_labels_are_the_findings(tmp_path):
    root = make_nih_dataset(tmp_path / "nih", n_patients=8)
    src = SourceConfig(name="nih", format="nih", path=str(root))
    df, skipped = read_source(src)
    assert [s["reason"] for s in skipped] == ["missing_image"]
    m = F.source_mapping(src)
    assert m.annotated() == NIH14
    for name, values, label in zip(df["filename"], df[F.FINDING_VALUES], df["label"]):
        p, k = int(name[:8]), int(name[9:12])
        labels = nih_labels_of(p, k)
        t = m.targets(F.decode_values(values), label, VOCAB, m.annotated())
        positive = set() if labels == "No Finding" else {n.lower() for n in labels.split("|")}
        assert t == {**{f: int(f in positive) for f in NIH14}, "any_finding": int(labels != "No Finding")}
    # An NIH label mapped to nothing is no longer annotated: masked, not negative.
    m2 = F.source_mapping(SourceConfig(name="nih", format="nih", path="x", findings_map=("Infiltration=",)))
    assert "infiltration" not in m2.annotated()
    assert "infiltration" not in m2.targets({"Infiltration": "1"}, 1, VOCAB, m2.annotated())


def test_folder_annotates_only_what_its_classes_map_to(tmp_path):
    root = make_folder_dataset(tmp_path / "k", n_patients=6, size=32)
    src = SourceConfig(name="k", format="folder", path=str(root), patient_regex=KERMANY_REGEX)
    df, _ = read_source(src)
    m = F.source_mapping(src)
    classes = [k for v in df[F.FINDING_VALUES] for k in json.loads(v)]
    assert set(classes) == {"NORMAL", "PNEUMONIA"} and m.annotated(classes) == ("pneumonia",)
    for cls, label in (("NORMAL", 0), ("PNEUMONIA", 1)):
        t = m.targets({cls: "1"}, label, VOCAB, m.annotated(classes))
        # cardiomegaly and the others: not annotated by a pneumonia collection, so masked
        assert t == {"pneumonia": label, "any_finding": label}
    # A class the shipped table does not know, mapped by the source's findings_map.
    m = F.source_mapping(SourceConfig(name="k", format="folder", path="x", findings_map=("BACTERIA=pneumonia",
                                                                                        "VIRUS=?pneumonia")))
    ann = m.annotated(["NORMAL", "BACTERIA", "VIRUS"])
    assert ann == ("pneumonia",)
    assert m.targets({"BACTERIA": "1"}, 1, VOCAB, ann)["pneumonia"] == 1
    assert "pneumonia" not in m.targets({"VIRUS": "1"}, 1, VOCAB, ann)


CSV_ROWS = [  # Cardiomegaly / Pleural Effusion / Edema / Support Devices / Big Heart
    {"path": "img/0.png", "label": "1", "patient": "P0", "Cardiomegaly": "1", "Pleural Effusion": "-1",
     "Edema": "", "Support Devices": "1", "Big Heart": ""},
    {"path": "img/1.png", "label": "0", "patient": "P1", "Cardiomegaly": "0.0", "Pleural Effusion": "",
     "Edema": "0", "Support Devices": "0", "Big Heart": "1"},
    {"path": "img/2.png", "label": "1", "patient": "P2", "Cardiomegaly": "-1.0", "Pleural Effusion": "1.0",
     "Edema": "-1", "Support Devices": "", "Big Heart": "0"},
]


@pytest.mark.parametrize("uncertain", F.POLICIES)
@pytest.mark.parametrize("blank", F.POLICIES)
def test_csv_columns_under_each_policy(tmp_path, uncertain, blank):
    table = make_csv_dataset(tmp_path / "t", CSV_ROWS)
    src = SourceConfig(name="t", format="csv", path=str(table), uncertain=uncertain, blank=blank,
                       findings_map=("Big Heart=cardiomegaly",))
    df, _ = read_source(src)
    m = F.source_mapping(src)
    raw = [k for v in df[F.FINDING_VALUES] for k in json.loads(v)]
    assert m.annotated(raw) == ("cardiomegaly", "effusion", "edema")  # Support Devices: not among the 14

    def policy(v: str):
        v = uncertain if v == "-1" else blank if v == "" else v
        return None if v == "mask" else int(v)

    got = {r["key"]: m.targets(F.decode_values(r[F.FINDING_VALUES]), r["label"], VOCAB, m.annotated(raw))
           for r in df.to_dict("records")}
    # cardiomegaly: two columns, the higher value wins (1 > -1 > 0 > blank)
    expected = {"img_0": {"cardiomegaly": 1, "effusion": policy("-1"), "edema": policy(""), "any_finding": 1},
                "img_1": {"cardiomegaly": 1, "effusion": policy(""), "edema": 0, "any_finding": 0},
                "img_2": {"cardiomegaly": policy("-1"), "effusion": 1, "edema": policy("-1"), "any_finding": 1}}
    assert got == {k: {f: v for f, v in t.items() if v is not None} for k, t in expected.items()}


def test_csv_refuses_bad_cells_and_unknown_columns(tmp_path):
    rows = [{**CSV_ROWS[0], "Cardiomegaly": "2"}, {**CSV_ROWS[1], "Cardiomegaly": "maybe"}]
    table = make_csv_dataset(tmp_path / "t", [{k: v for k, v in r.items() if k != "Big Heart"} for r in rows])
    with pytest.raises(DataError, match=r"finding column value\(s\) Cardiomegaly='2', Cardiomegaly='maybe'; "
                                        r"expected 1 \(present\), 0 \(absent\), -1 \(uncertain\) or blank"):
        read_source(SourceConfig(name="t", format="csv", path=str(table)))
    # "Big Heart" is a finding column only when findings_map names it; else a typo-guarded extra column.
    table = make_csv_dataset(tmp_path / "u", CSV_ROWS)
    with pytest.raises(DataError, match=r"unexpected column\(s\) Big Heart; allowed: path, label, patient"):
        read_source(SourceConfig(name="t", format="csv", path=str(table)))


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("src,pattern", [
    (dict(uncertain="maybe"), r"'iu': uncertain must be one of 'mask', '0', '1'.*not 'maybe'"),
    (dict(blank="-1"), r"'iu': blank must be one of 'mask', '0', '1'"),
    (dict(findings_map=("Cardiomegaly",)), r"findings_map entry 'Cardiomegaly' must be \"RAW=finding\""),
    (dict(findings_map=("=cardiomegaly",)), r"findings_map entry '=cardiomegaly' must be"),
    (dict(findings_map=("Cardiomegaly=big_heart",)), r"unknown finding 'big_heart'; allowed: atelectasis, .*hernia"),
    (dict(findings_map=("Cardiomegaly=any_finding",)), r"'any_finding' is the source's normal/abnormal label"),
])
def test_bad_findings_settings_are_refused_before_any_work(tmp_path, src, pattern):
    data = DataConfig(sources=(SourceConfig(name="iu", format="iu", path=str(tmp_path / "nope"), **src),),
                      findings=("nih14",), **BASE)
    with pytest.raises(ConfigError, match=pattern):
        write_shards(data, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=r"data.findings: unknown finding\(s\) 'lungs'"):
        write_shards(DataConfig(data_dir=str(tmp_path), findings=("lungs",), **BASE), tmp_path / "out")


# ----------------------------------------------------------------------------- prepare and stream


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("findings-data")
    rows = [{"path": f"img/{i}.png", "label": "1" if i % 3 == 0 else "0", "patient": f"P{i // 2}", "view": "PA"}
            for i in range(12)]
    return {"root": root,
            "iu": make_dataset(root / "iu", n_uids=40, size=48, broken=True),
            "ker": make_folder_dataset(root / "ker", n_patients=12, size=48),
            "nih": make_nih_dataset(root / "nih", n_patients=10),
            "tbl": make_csv_dataset(root / "tbl", rows)}


def _multi(sources: dict[str, Path], **kw) -> DataConfig:
    return DataConfig(sources=(
        SourceConfig(name="iu", format="iu", path=str(sources["iu"])),
        SourceConfig(name="ker", format="folder", path=str(sources["ker"]), patient_regex=KERMANY_REGEX),
        SourceConfig(name="nih", format="nih", path=str(sources["nih"])),
        SourceConfig(name="tbl", format="csv", path=str(sources["tbl"]), role="external")), **BASE, **kw)


def _structure_digest(out: Path, root: Path) -> str:
    """Everything prepare writes but the JPEG bytes (which depend on the JPEG library): tar member
    names and their other contents, index.json without hashes, skipped.jsonl; root paths replaced."""
    h = hashlib.sha256()

    def local(text: str) -> str:
        return text.replace(str(root.resolve()), "ROOT").replace(str(root), "ROOT")

    for p in sorted(out.iterdir()):
        if p.name.endswith(".tar"):
            with tarfile.open(p) as t:
                for m in t.getmembers():
                    h.update(m.name.encode())
                    if not m.name.endswith(".jpg"):
                        h.update(t.extractfile(m).read())
        elif p.name == "index.json":
            raw = json.loads(p.read_text())
            raw.pop("checksum")
            for sp in raw["splits"].values():
                for s in sp["shards"]:
                    s.pop("sha256")
            h.update(local(json.dumps(raw, sort_keys=True)).encode())
        elif p.name == "skipped.jsonl":
            h.update(local(p.read_text()).encode())
    return h.hexdigest()


# What the prepare below wrote before the findings vocabulary existed (commit 56702f1, measured with
# the same data and settings). If the shard format changes on purpose, update it and say so.
BEFORE_FINDINGS = "a3883fec470a8862cf1912ef1a5f30b6623321a8d67d3e4b6fc519e1880ed413"


@pytest.fixture(scope="module")
def prepared(sources, tmp_path_factory) -> dict[str, ShardIndex]:
    out = tmp_path_factory.mktemp("findings-shards")
    return {"plain": write_shards(_multi(sources), out / "plain"),
            "findings": write_shards(_multi(sources, findings=("nih14",)), out / "findings")}


def _samples(index: ShardIndex) -> dict[str, dict]:
    files = sorted(str(p) for p in Path(index.root).glob("*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(files, shardshuffle=False, empty_check=False)}


def test_without_findings_the_shards_are_as_before(prepared, sources):
    plain = prepared["plain"]
    assert plain.findings == () and plain.finding_counts("train") == {}
    assert "findings" not in json.loads((Path(plain.root) / "index.json").read_text())
    assert all("finding_targets" not in json.loads(s["json"]) for s in _samples(plain).values())
    assert _structure_digest(Path(plain.root), sources["root"]) == BEFORE_FINDINGS


def test_prepare_with_findings_writes_targets_and_counts(prepared, sources):
    plain, index = prepared["plain"], prepared["findings"]
    assert index.findings == VOCAB
    assert {s.name: s.annotated_findings for s in index.sources} == {
        "iu": NIH14, "ker": ("pneumonia",), "nih": NIH14, "tbl": ()}
    assert index.annotated("ker") == ("pneumonia", "any_finding")
    assert index.checksum != plain.checksum  # the targets are part of the content
    a, b = _samples(plain), _samples(index)
    assert a.keys() == b.keys()
    counted: dict[str, dict[str, list[int]]] = {}
    for key, s in b.items():
        meta, old = json.loads(s["json"]), json.loads(a[key]["json"])
        targets = meta.pop("finding_targets")
        assert meta == old and s["jpg"] == a[key]["jpg"] and s["cls"] == a[key]["cls"]  # only targets added
        assert targets["any_finding"] == meta["label"]
        assert set(targets) == set(index.annotated(meta["source"]))  # nothing else, no masked ones
        if meta["source"] == "iu" and meta["problems"].strip().lower() == "normal":
            assert not any(targets[f] for f in NIH14)
        if meta["source"] == "nih":
            assert {f for f in NIH14 if targets[f]} == (
                set() if meta["findings"] == "No Finding" else {n.lower() for n in meta["findings"].split("|")})
        if meta["source"] == "ker":
            assert targets == {"pneumonia": meta["label"], "any_finding": meta["label"]}
        for split in (meta["split"], f"{meta['split']}/{meta['source']}"):
            for f in VOCAB:
                c = counted.setdefault(split, {}).setdefault(f, [0, 0, 0])
                c[0 if targets.get(f) == 1 else 1 if f in targets else 2] += 1
    for split in index.split_names:
        assert index.finding_counts(split) == {f: FindingCounts(*c) for f, c in counted[split].items()}
        for source in index.sources_in(split):
            assert index.finding_counts(split, source) == {f: FindingCounts(*c)
                                                           for f, c in counted[f"{split}/{source}"].items()}
    train = index.finding_counts("train")
    assert sum(train["pneumonia"]) == index.split("train").total and train["cardiomegaly"].masked > 0
    assert load_index(index.root).findings == VOCAB  # read back from index.json


def test_array_prepare_with_findings_is_byte_identical(sources, prepared, tmp_path):
    data = _multi(sources, findings=("nih14",))
    for task in (1, 0):
        write_part(data, tmp_path / "out", task, 2)
    merge_parts(data, tmp_path / "out", 2)
    single = Path(prepared["findings"].root)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in single.iterdir())
    for p in single.iterdir():
        if p.is_file():
            assert (tmp_path / "out" / p.name).read_bytes() == p.read_bytes(), p.name


@pytest.mark.parametrize("on_device", [False, True])
def test_stream_batches_carry_findings_and_mask(prepared, on_device):
    index = prepared["findings"]
    samples = _samples(index)
    loader = LoaderConfig(input_size=32, batch_size=5, num_workers=0, shuffle_buffer=8)
    seen = 0
    for batch in eval_loader(loader, "train", 0, 1, index, on_device=on_device):
        assert batch["findings"].dtype == torch.float32 and batch["findings_mask"].dtype == torch.bool
        assert batch["findings"].shape == batch["findings_mask"].shape == (len(batch["key"]), len(VOCAB))
        for i, key in enumerate(batch["key"]):
            targets = json.loads(samples[key]["json"])["finding_targets"]
            assert batch["findings_mask"][i].tolist() == [f in targets for f in VOCAB]
            assert batch["findings"][i].tolist() == [float(targets.get(f, 0)) for f in VOCAB]
            assert batch["findings"][i, -1] == batch["label"][i]  # any_finding
        seen += len(batch["key"])
    assert seen == index.split("train").total
    batch = next(iter(train_loader(loader, ["train"], 0, 1, 0, index)[0]))
    assert batch["findings"].shape == (5, len(VOCAB)) and batch["findings_mask"].any(dim=1).all()
    plain = next(iter(eval_loader(loader, "train", 0, 1, prepared["plain"])))
    assert "findings" not in plain and "findings_mask" not in plain


def test_old_index_has_no_vocabulary(prepared):
    raw = json.loads((Path(prepared["plain"].root) / "index.json").read_text())
    index = ShardIndex.from_json(raw, prepared["plain"].root)
    assert index.findings == () and index.annotated("iu") == ()
    assert all(s.annotated_findings == () for s in index.sources)


# ----------------------------------------------------------------------------- the real IU copy


def _iu_copy() -> Path:
    env = os.environ.get("CXR_SHARED_DATA")
    if env:
        p = Path(env)
        return p / "iu_xray_small" if (p / "iu_xray_small").is_dir() else p
    return Path(__file__).resolve().parents[2] / "shared/data/iu_xray_small"


def test_shipped_iu_table_covers_the_common_terms():
    data = _iu_copy()
    if not (data / "indiana_reports.csv").is_file():
        pytest.skip(f"shared IU X-ray data not found at {data} (set CXR_SHARED_DATA to its folder)")
    counts = F.iu_term_counts(str(data / "indiana_reports.csv"))
    common = {t: n for t, n in counts.items() if n >= 20}
    assert len(common) > 40 and counts["Cardiomegaly"] > 200
    missing = [t for t in common if not F.iu_term_rules(t) and F.raw_key(t)[0] not in F.IU_SPECIAL]
    assert not missing, f"IU terms with >= 20 reports that docs/findings.md's table lacks: {missing}"
    assert all(reason for _, _, reason in F.IU_TERMS)
    # The reader and the table on the whole copy (no image decoded): every finding gets positives.
    src = SourceConfig(name="iu", format="iu", path=str(data))
    df, _ = read_source(src)
    targets, info = F.sample_targets(VOCAB, (src,), df.to_dict("records"))
    c = F.counts(targets, VOCAB)
    assert all(c[f]["positive"] > 0 for f in VOCAB)
    assert c["any_finding"]["masked"] == 0 and c["infiltration"]["masked"] > 0  # Opacity/lung: uncertain
    assert info["iu"]["annotated"] == list(NIH14)
