"""Several chest X-ray sources (issue 13): prepare, splits, index v2, the weighted mix, loss weights,
per-source / per-view metrics, early stopping, and real runs (1 and 2 processes) on generated data.

Three generated sources throughout: ``iu`` (IU layout, trained on), ``kermany`` (a folder per
class, trained on) and ``ext`` (another folder source, role "external": evaluated, never trained).
"""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
import shutil
import sys
import tarfile
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tomli_w
import torch
from sklearn.metrics import roc_auc_score

from cxr_dist.model.feature_cache import CachedBatches, FeatureCache
from cxr_dist.config import ConfigError, DataConfig, LoaderConfig, SourceConfig, load_config
from cxr_dist.errors import UserError
from cxr_dist.data.index import ShardIndex, SourceInfo, load_index
from cxr_dist.data.sources.iu import build_manifest
from cxr_dist.eval.metrics import breakdown, compute_metrics, group_metrics
from cxr_dist.data.mixing import ANY_VIEW, SampleWeightedLoss, loss_weight_table
from cxr_dist.data.shards import write_shards
from cxr_dist.data.split import assign_splits
from cxr_dist.data.stream import sample_source_view, train_loader
from cxr_dist.train.loop import check_metrics, improved, metric_mode, stop_early
from tests.conftest import ROOT, VENV_BIN, accelerate_launch, run_cmd
from tests.datagen import KERMANY_REGEX, make_dataset, make_folder_dataset

CLI = str(VENV_BIN / "cxr-dist")
DATA = {"image_size": 48, "samples_per_shard": 16, "prepare_workers": 1}  # [data]: baked into the shards
LOADER = {"input_size": 32, "batch_size": 8, "num_workers": 0, "shuffle_buffer": 32}  # [loader]
TRAIN_SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------- data and configs


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ms-data")
    return {
        "iu": make_dataset(root / "iu", n_uids=32, size=48),
        "kermany": make_folder_dataset(root / "kermany", n_patients=20, size=48),
        # Another "hospital", flat layout, the same file names as kermany (keys differ by prefix).
        "ext": make_folder_dataset(root / "ext", n_patients=8, size=48, seed=7, subsets=False),
    }


def source_tables(paths: dict[str, Path], names=("iu", "kermany", "ext")) -> list[dict]:
    table = {
        "iu": {"name": "iu", "format": "iu", "path": str(paths["iu"])},
        "kermany": {"name": "kermany", "format": "folder", "path": str(paths["kermany"]),
                    "patient_regex": KERMANY_REGEX},
        "ext": {"name": "ext", "format": "folder", "path": str(paths["ext"]), "patient_regex": KERMANY_REGEX,
                "role": "external"},
    }
    return [table[n] for n in names]


def write_config(path: Path, srcs: list[dict], shards: Path, run_dir: Path, **train_extra) -> Path:
    cfg = {
        "data": {"sources": srcs, "shards_dir": str(shards), **DATA},
        "loader": {**LOADER, "balance_views": True},
        "model": {"backbone": "efficientnet_b1", "pretrained": False},
        "train": {"phases": [{"name": "head", "epochs": 3, "unfreeze_blocks": 0, "lr": 1e-3},
                             {"name": "finetune", "epochs": 1, "unfreeze_blocks": 1, "lr": 1e-3,
                              "backbone_lr": 1e-3}],
                  "run_dir": str(run_dir), **train_extra},
        "selection": {"early_stop_patience": 1}, "schedule": {"plateau_patience": 1},
        "tracking": {"enabled": False},
    }
    path.write_text(tomli_w.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def multi(sources, tmp_path_factory) -> tuple[Path, Path]:
    """(config, shards): the three sources prepared through the real CLI."""
    tmp = tmp_path_factory.mktemp("ms-prep")
    cfg = write_config(tmp / "ms.toml", source_tables(sources), tmp / "unused", tmp / "run")
    shards = tmp / "shards"
    res = run_cmd([CLI, "prepare", "--config", str(cfg), "--out", str(shards)], cwd=tmp)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "kermany" in res.stdout  # the per-source lines of the summary
    return cfg, shards


def read_tars(shards: Path) -> dict[str, list[dict]]:
    """{shard file: [sample json + key + cls]} for every shard listed in index.json."""
    index = json.loads((shards / "index.json").read_text())
    out: dict[str, list[dict]] = {}
    for split in index["splits"].values():
        for shard in split["shards"]:
            members: dict[str, dict] = defaultdict(dict)
            with tarfile.open(shards / shard["file"]) as tar:
                for m in tar.getmembers():
                    key, ext = m.name.split(".", 1)
                    members[key][ext] = tar.extractfile(m).read()
            out[shard["file"]] = [{**json.loads(v["json"]), "__key__": k, "cls": int(v["cls"]), "has_jpg": "jpg" in v}
                                  for k, v in members.items()]
    return out


def keys_by_split(shards: Path, source: str | None = None) -> dict[str, set[str]]:
    index = json.loads((shards / "index.json").read_text())
    tars = read_tars(shards)
    return {name: {s["__key__"] for sh in sp["shards"] for s in tars[sh["file"]]
                   if source is None or s["source"] == source}
            for name, sp in index["splits"].items()}


def n_images(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))


# ----------------------------------------------------------------------------- 1. prepare


def test_prepare_two_sources_index_v2_and_sample_format(multi, sources):
    _, shards = multi
    index = json.loads((shards / "index.json").read_text())
    assert index["version"] == 2
    assert [s["name"] for s in index["sources"]] == ["iu", "kermany", "ext"]
    assert set(index["splits"]) == {*TRAIN_SPLITS, "external"}
    tars = read_tars(shards)
    seen_by_cell: Counter = Counter()
    patient_sides: dict[tuple[str, str], set[str]] = defaultdict(set)
    for name, split in index["splits"].items():
        # Per-source counts by view x label add up to the source's and to the split's totals.
        per_source = split["sources"]
        assert sum(s["total"] for s in per_source.values()) == split["total"]
        for lab in ("normal", "abnormal"):
            assert sum(s["labels"][lab] for s in per_source.values()) == split["labels"][lab]
        for src, info in per_source.items():
            assert sum(c["normal"] + c["abnormal"] for c in info["views"].values()) == info["total"]
            for lab in ("normal", "abnormal"):
                assert sum(c[lab] for c in info["views"].values()) == info["labels"][lab]
        assert sum(s["count"] for s in split["shards"]) == split["total"]
        for shard in split["shards"]:
            samples = tars[shard["file"]]
            assert len(samples) == shard["count"]
            assert {s["source"] for s in samples} == {shard["source"]}  # one source per shard
            for s in samples:
                assert s["has_jpg"] and s["split"] == name
                assert s["label"] == s["cls"] in (0, 1)
                assert s["__key__"].startswith(s["source"] + "__")
                assert s["uid"] == f"{s['source']}__{s['study']}"
                assert s["patient"] and "view" in s
                seen_by_cell[(name, s["source"], s["view"], s["label"])] += 1
                patient_sides[(s["source"], s["patient"])].add(name)
        # The index's view x label cells are exactly what the tars hold.
        for src, info in per_source.items():
            for view, c in info["views"].items():
                assert (seen_by_cell[(name, src, view, 0)], seen_by_cell[(name, src, view, 1)]) == \
                       (c["normal"], c["abnormal"])
    assert sum(seen_by_cell.values()) == index["totals"]["samples"]
    # No patient of a source on two sides.
    assert all(len(sides) == 1 for sides in patient_sides.values())
    assert {s for (s, _) in patient_sides} == {"iu", "kermany", "ext"}
    # IU records frontal/lateral, the folder sources no view.
    assert set(index["splits"]["train"]["sources"]["iu"]["views"]) == {"FRONTAL", "LATERAL"}
    assert set(index["splits"]["train"]["sources"]["kermany"]["views"]) == {""}
    # The external source lands whole in "external", and nothing else does.
    ext = index["splits"]["external"]
    assert set(ext["sources"]) == {"ext"} and ext["total"] == n_images(sources["ext"])
    for name in TRAIN_SPLITS:
        assert set(index["splits"][name]["sources"]) == {"iu", "kermany"}
        assert index["splits"][name]["sources"]["kermany"]["labels"]["normal"] > 0
        assert index["splits"][name]["sources"]["kermany"]["labels"]["abnormal"] > 0
    assert sum(index["splits"][n]["sources"]["kermany"]["total"] for n in TRAIN_SPLITS) == n_images(sources["kermany"])


def test_adding_a_source_does_not_move_the_others_patients(multi, sources, tmp_path):
    _, shards = multi
    alone = DataConfig(sources=(SourceConfig(name="iu", format="iu", path=str(sources["iu"])),),
                       **{k: v for k, v in DATA.items()})
    write_shards(alone, tmp_path / "alone")
    with_others = keys_by_split(shards, "iu")
    by_itself = keys_by_split(tmp_path / "alone")
    assert set(by_itself) == set(TRAIN_SPLITS)
    for name in TRAIN_SPLITS:
        assert with_others[name] == by_itself[name] and by_itself[name]
    assert not with_others["external"]


def test_prepare_without_an_iu_source(sources, tmp_path):
    """A config whose sources are all non-IU (folder, csv, nih) is valid, and it is what
    `cxr-dist evaluate --data DIR --format folder|csv|nih` prepares on the fly."""
    kermany = SourceConfig(name="kermany", format="folder", path=str(sources["kermany"]), patient_regex=KERMANY_REGEX)
    index = write_shards(DataConfig(sources=(kermany,), **DATA), tmp_path / "shards")
    assert index.totals["samples"] == n_images(sources["kermany"])
    assert index.no_indexing_counts["images"] == 0 and index.no_indexing_counts["uids"] == 0
    assert {s for name in index.split_names for s in index.sources_in(name)} == {"kermany"}
    assert [(s.name, s.format, s.role) for s in index.sources] == [("kermany", "folder", "train")]


# ----------------------------------------------------------------------------- 2. legacy


@pytest.fixture(scope="module")
def legacy(sources, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ms-legacy") / "shards"
    write_shards(DataConfig(data_dir=str(sources["iu"]), **DATA), out)
    return out


def test_legacy_data_dir_keeps_keys_and_splits(legacy, multi, sources):
    df, _ = build_manifest(str(sources["iu"]), "drop")
    expected = dict(zip(df["key"], assign_splits(df, 0.15, 0.15, 0, 42)))
    got = {k: name for name, keys in keys_by_split(legacy).items() for k in keys}
    assert got == expected  # unprefixed keys, the split of the pre-sources code
    assert not any("__" in k for k in got)
    samples = [s for ss in read_tars(legacy).values() for s in ss]
    assert all(s["uid"] == s["patient"] and "__" not in s["uid"] for s in samples)
    # The same IU patients on the same sides when IU is one of several [[data.sources]].
    multi_iu = keys_by_split(multi[1], "iu")
    assert {n: {"iu__" + k for k in ks} for n, ks in keys_by_split(legacy).items()} == \
           {n: multi_iu[n] for n in TRAIN_SPLITS}


def test_version_1_index_is_read_as_iu(legacy, tmp_path):
    v2 = json.loads((legacy / "index.json").read_text())
    v1 = json.loads(json.dumps(v2))
    v1.pop("version")
    v1.pop("sources")
    for split in v1["splits"].values():
        split.pop("sources")
        for shard in split["shards"]:
            shard.pop("source")
    old = tmp_path / "v1"
    old.mkdir()
    for f in legacy.glob("*.tar"):
        shutil.copy(f, old / f.name)
    (old / "index.json").write_text(json.dumps(v1))
    index = load_index(old)
    assert not index.has_views and load_index(legacy).has_views
    shards = index.shards(["train", "val"])
    assert shards and {s.source for s in shards} == {"iu"}
    assert sum(s.count for s in shards) == v2["splits"]["train"]["total"] + v2["splits"]["val"]["total"]
    assert index.source_view_counts(["train"]) == {"iu": {"": index.class_counts(["train"])}}
    # The same counts as the v2 index, which knows the views.
    v2_counts = load_index(legacy).source_view_counts(["train"])
    assert set(v2_counts) == {"iu"}
    assert tuple(map(sum, zip(*v2_counts["iu"].values()))) == index.class_counts(["train"])
    # One source, "iu", without text fields or views; its counts are the split's.
    assert index.sources == (SourceInfo(name="iu", format="iu", path=v1["data_dir"]),)
    (iu,) = index.sources_in("train").values()
    assert (iu.total, (iu.normal, iu.abnormal), iu.views) == (v2["splits"]["train"]["total"],
                                                              index.class_counts(["train"]), {})
    assert index.views_in("train") == set() and index.checksum == v2["checksum"]
    # Samples written before sources existed: IU's, the view from their projection.
    assert sample_source_view({"uid": "1", "projection": "Lateral"}) == ("iu", "LATERAL")
    assert sample_source_view({"uid": "1", "projection": "Frontal"}) == ("iu", "FRONTAL")
    loader, n = train_loader(LoaderConfig(**LOADER), ["train"], 0, 1, seed=0, index=index)
    batches = list(loader)
    assert len(batches) == n and all(set(b["source"]) == {"iu"} for b in batches)


# ----------------------------------------------------------------------------- 3. the mix


def _source_share(data: LoaderConfig, index: ShardIndex, weights, epochs: int) -> tuple[float, int]:
    """Share of 'iu' samples over `epochs` epochs of both ranks of world 2; checks full, equal batches."""
    counts: Counter = Counter()
    per_rank = []
    for rank in (0, 1):
        loader, n = train_loader(data, ["train"], rank, 2, seed=5, index=index, weights=weights)
        n_rank = 0
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == n == len(loader)
            for b in batches:
                assert len(b["key"]) == data.batch_size == len(b["source"]) == b["image"].shape[0]
                assert all(k.startswith(s + "__") for k, s in zip(b["key"], b["source"]))
                counts.update(b["source"])
            n_rank += len(batches)
        per_rank.append(n_rank)
    assert per_rank[0] == per_rank[1]
    total = sum(counts.values())
    assert set(counts) <= {"iu", "kermany"}
    return counts["iu"] / total, total


def test_train_stream_mixes_sources_by_weight(multi):
    cfg, shards = multi
    data = replace(load_config(cfg).loader, num_workers=0)
    index = load_index(shards)
    sizes = index.sources_in("train")
    natural = sizes["iu"].total / (sizes["iu"].total + sizes["kermany"].total)
    assert natural > 0.58  # sources of clearly different sizes, or equal weights would prove nothing
    for weights, expected in (({"iu": 3.0, "kermany": 1.0}, 0.75), (None, 0.5), ({"iu": 1.0, "kermany": 1.0}, 0.5)):
        share, n = _source_share(data, index, weights, epochs=10)
        # Each sample's source is an independent draw: 4 binomial standard deviations.
        tol = 4 * math.sqrt(expected * (1 - expected) / n)
        assert abs(share - expected) < tol, (weights, share, n)
        assert abs(share - natural) > tol  # and not the shares of the sources' sizes


def _cache(sources_: list[str], n_views: int = 2) -> FeatureCache:
    n = len(sources_)
    feats = torch.stack([torch.arange(n, dtype=torch.float32) + 1000 * v for v in range(n_views)])[..., None]
    return FeatureCache(feats, torch.tensor([i % 2 for i in range(n)]), [f"k{i}" for i in range(n)],
                        [f"u{i}" for i in range(n)], 0, sources_, [""] * n)


def test_cached_batches_mix_sources_by_weight():
    cache = _cache(["a"] * 30 + ["b"] * 10)
    for weights, expected in (({"a": 1.0, "b": 3.0}, 0.75), (None, 0.5)):
        counts: Counter = Counter()
        lengths = []
        for rank in (0, 1):
            cb = CachedBatches(cache, 8, 40, seed=3, rank=rank, weights=weights)
            n_rank = 0
            for epoch in range(3):
                cb.set_epoch(epoch)
                batches = list(cb)
                assert len(batches) == len(cb) == 40
                b_order = []
                for b in batches:
                    assert len(b["key"]) == 8 == b["features"].shape[0] == len(b["label"])
                    idx = (b["features"][:, 0] % 1000).long().tolist()
                    assert b["key"] == [f"k{i}" for i in idx] and b["source"] == [cache.sources[i] for i in idx]
                    b_order += [i for i in idx if cache.sources[i] == "b"]
                    counts.update(b["source"])
                # Within a source, whole permutations back to back: every member once before repeats.
                assert sorted(b_order[:10]) == list(range(30, 40))
                n_rank += len(batches)
            lengths.append(n_rank)
        assert lengths[0] == lengths[1]
        n = sum(counts.values())
        tol = 4 * math.sqrt(expected * (1 - expected) / n)
        assert abs(counts["b"] / n - expected) < tol, (weights, counts)


def test_cached_batches_one_source_is_the_old_permutation_order():
    n, n_views, bs, nb, seed = 13, 3, 4, 9, 11
    cache = _cache(["iu"] * n, n_views)
    for rank in (0, 1):
        for epoch in (0, 2):
            cb = CachedBatches(cache, bs, nb, seed=seed, rank=rank, weights={"iu": 5.0})
            cb.set_epoch(epoch)
            feats = torch.cat([b["features"][:, 0] for b in cb])
            rng = np.random.default_rng([seed, epoch, rank])
            need = nb * bs
            order = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])[:need]
            views = rng.integers(0, n_views, size=need)
            assert (feats % 1000).long().tolist() == order.tolist()
            assert (feats // 1000).long().tolist() == views.tolist()


# ----------------------------------------------------------------------------- 4. loss weights


COUNTS = {"a": {"FRONTAL": (3, 9), "LATERAL": (6, 2)}, "b": {"": (10, 30), "PA": (4, 1)}}


def _cells(counts):
    return [(s, v, y, c[y]) for s, views in counts.items() for v, c in views.items() for y in (0, 1)]


@pytest.mark.parametrize("balance_views", [False, True])
def test_loss_weight_table_balances_within_each_source(balance_views):
    table = loss_weight_table(COUNTS, balance_views)
    loss = SampleWeightedLoss(table)
    for source, views in COUNTS.items():
        cells = [(v, y, n) for s, v, y, n in _cells(COUNTS) if s == source]
        total = sum(n for _, _, n in cells)
        weighted = sum(n * loss.weight(source, v, y) for v, y, n in cells)
        assert weighted / total == pytest.approx(1.0)  # the source's mean weight is 1
        per_label = [sum(n * loss.weight(source, v, y) for v, yy, n in cells if yy == y) for y in (0, 1)]
        if balance_views:  # every non-empty (view, label) cell weighs the same in all
            cell_totals = [n * loss.weight(source, v, y) for v, y, n in cells if n]
            assert cell_totals == pytest.approx([cell_totals[0]] * len(cell_totals))
        else:
            assert per_label[0] == pytest.approx(per_label[1])
            assert all((source, v, y) not in table for v, y, _ in cells if v != ANY_VIEW)
    # The label-only weight is always there (a view without a cell of its own falls back to it).
    for source in COUNTS:
        n0 = sum(c[0] for c in COUNTS[source].values())
        n1 = sum(c[1] for c in COUNTS[source].values())
        assert table[(source, ANY_VIEW, 0)] == pytest.approx((n0 + n1) / (2 * n0))
        assert loss.weight(source, "AP", 1) == table[(source, ANY_VIEW, 1)]
    assert loss.weight("never-trained", "PA", 1) == 1.0


def test_sample_weighted_loss_one_source_is_classic_cross_entropy():
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 2), torch.randint(0, 2, (16,))
    table = loss_weight_table({"iu": {"FRONTAL": (5, 11), "LATERAL": (4, 9)}}, balance_views=False)
    w = torch.tensor([table[("iu", ANY_VIEW, 0)], table[("iu", ANY_VIEW, 1)]])
    expected = torch.nn.CrossEntropyLoss(weight=w)(logits, labels)
    loss = SampleWeightedLoss(table)
    assert torch.equal(loss(logits, labels), expected)
    assert torch.equal(loss(logits, labels, ["iu"] * 16, ["FRONTAL"] * 16), expected)
    assert torch.equal(SampleWeightedLoss(None)(logits, labels), torch.nn.functional.cross_entropy(logits, labels))


def test_sample_weighted_loss_two_sources_is_the_weighted_mean():
    torch.manual_seed(1)
    logits, labels = torch.randn(12, 2, dtype=torch.float64), torch.randint(0, 2, (12,))
    table = loss_weight_table(COUNTS, balance_views=True)
    loss = SampleWeightedLoss(table)
    srcs = ["a", "b", "zzz"] * 4  # zzz: never trained on -> weight 1
    views = ["FRONTAL", "", "PA", "LATERAL", "PA", "", "AP", "", "PA", "LATERAL", "", "FRONTAL"]
    w = [table.get((s, v, int(y)), table.get((s, ANY_VIEW, int(y)), 1.0)) for s, v, y in zip(srcs, views, labels)]
    per = [-torch.log_softmax(logits[i], 0)[labels[i]].item() for i in range(12)]
    expected = sum(wi * li for wi, li in zip(w, per)) / sum(w)
    assert loss(logits, labels, srcs, views).item() == pytest.approx(expected, rel=1e-12)
    assert w[2] == 1.0 and w[6] == table[("a", ANY_VIEW, int(labels[6]))]  # AP: no cell in a


# ----------------------------------------------------------------------------- 5. metrics


def test_group_metrics_and_breakdown():
    rng = np.random.default_rng(0)
    n = 90
    labels = rng.integers(0, 2, n)
    probs = np.clip(0.3 * labels + rng.uniform(0, 0.7, n), 0, 1)
    groups = np.array(["a"] * 40 + ["b"] * 35 + ["c"] * 15)
    labels[75:] = 1  # group c: one class only
    out = group_metrics(probs, labels, groups, studies=[f"s{i // 2}" for i in range(n)], interval=True)
    assert list(out) == ["a", "b", "c"]
    for g in ("a", "b"):
        sel = groups == g
        assert out[g]["auroc"] == pytest.approx(roc_auc_score(labels[sel], probs[sel]), abs=1e-12)
        assert out[g]["n"] == sel.sum() and out[g]["n_abnormal"] == labels[sel].sum()
        assert out[g]["n_normal"] == (sel & (labels == 0)).sum()
        assert out[g]["mean_prob_normal"] == pytest.approx(probs[sel & (labels == 0)].mean())
        assert out[g]["mean_prob_abnormal"] == pytest.approx(probs[sel & (labels == 1)].mean())
        low, high = out[g]["auroc_ci95"]
        assert low <= out[g]["auroc"] <= high
    assert math.isnan(out["c"]["auroc"]) and math.isnan(out["c"]["mean_prob_normal"])
    assert out["c"]["mean_prob_abnormal"] == pytest.approx(probs[75:].mean())

    views = np.array(["FRONTAL", "LATERAL", ""] * 30)
    flat = breakdown(probs, labels, groups, views, train_sources=["a", "b", "c", "absent"])
    assert flat["source/a/auroc"] == out["a"]["auroc"] and flat["source/b/n"] == 35.0
    assert math.isnan(flat["source/c/auroc"])
    # The mean over the training sources present with a defined AUROC (c: one class; absent: absent).
    assert flat["source_mean_auroc"] == pytest.approx((out["a"]["auroc"] + out["b"]["auroc"]) / 2)
    assert flat["view/unknown/n"] == 30.0 and "view/FRONTAL/auroc" in flat
    sel = views == "LATERAL"
    assert flat["view/LATERAL/auroc"] == pytest.approx(roc_auc_score(labels[sel], probs[sel]))
    # A source not trained on (external) is reported but not in the mean.
    only_a = breakdown(probs, labels, groups, views, train_sources=["a"])
    assert only_a["source_mean_auroc"] == out["a"]["auroc"] and "source/b/auroc" in only_a
    # One source: the mean is the pooled AUROC.
    one = breakdown(probs[:75], labels[:75], ["iu"] * 75, views[:75], ["iu"])
    assert one["source_mean_auroc"] == pytest.approx(compute_metrics(probs[:75], labels[:75])["auroc"], abs=1e-12)


# ----------------------------------------------------------------------------- 6. early stopping, config


def _history(values, first_epoch=1, metric="source_mean_auroc", before=()):
    rows = [{"epoch": i + 1, f"val/{metric}": v} for i, v in enumerate(before)]
    return rows + [{"epoch": first_epoch + i, f"val/{metric}": v} for i, v in enumerate(values)]


def test_stop_early_on_hand_made_histories():
    m = "source_mean_auroc"
    # patience 0: never
    assert not stop_early(_history([0.9, 0.5, 0.4, 0.3, 0.2]), 1, m, "max", 0)
    # stops exactly after `patience` epochs without a new best
    for patience in (1, 2, 3):
        vals = [0.6, 0.7] + [0.65] * patience
        for k in range(1, len(vals) + 1):
            assert stop_early(_history(vals[:k]), 1, m, "max", patience) == (k == len(vals)), (patience, k)
    assert not stop_early(_history([0.6, 0.7, 0.65, 0.71]), 1, m, "max", 2)
    # equal is not better
    assert stop_early(_history([0.7, 0.7]), 1, m, "max", 1)
    # min mode (a loss)
    assert not stop_early(_history([0.5, 0.4], metric="loss"), 1, "loss", "min", 1)
    assert stop_early(_history([0.5, 0.6], metric="loss"), 1, "loss", "min", 1)
    # NaN never improves; a NaN first epoch then a number: the number is the first best
    assert stop_early(_history([0.5, math.nan]), 1, m, "max", 1)
    assert not stop_early(_history([math.nan, 0.5]), 1, m, "max", 1)
    assert stop_early(_history([math.nan, math.nan]), 1, m, "max", 1)
    # only the current phase's rows count: an earlier phase's better values do not
    earlier = [0.99, 0.98, 0.97, 0.96]
    assert not stop_early(_history([0.5, 0.6], first_epoch=5, before=earlier), 5, m, "max", 1)
    assert not stop_early(_history([0.5], first_epoch=5, before=earlier), 5, m, "max", 1)
    assert stop_early(_history([0.6, 0.5], first_epoch=5, before=earlier), 5, m, "max", 1)
    # a missing metric reads as NaN
    assert stop_early([{"epoch": 1, "val/loss": 0.3}, {"epoch": 2, "val/loss": 0.2}], 1, m, "max", 1)


def test_metric_mode_and_improved():
    assert metric_mode("loss") == "min" and metric_mode("val_loss") == "min"
    assert metric_mode("source_mean_auroc") == "max" and metric_mode("source/iu/auroc") == "max"
    assert metric_mode("loss", "max") == "max" and metric_mode("auroc", "min") == "min"
    assert improved(0.1, -math.inf, "max") and improved(5.0, -math.inf, "min")
    assert improved(0.1, math.nan, "max") and improved(0.1, math.inf, "min")
    assert not improved(math.nan, -math.inf, "max") and not improved(math.nan, 0.3, "min")
    assert improved(0.6, 0.5, "max") and not improved(0.5, 0.5, "max") and not improved(0.4, 0.5, "max")
    assert improved(0.4, 0.5, "min") and not improved(0.5, 0.5, "min")


def _cfg(tmp_path: Path, *overrides: str):
    srcs = [{"name": "iu", "format": "iu", "path": "x"},
            {"name": "kermany", "format": "folder", "path": "y"},
            {"name": "ext", "format": "folder", "path": "z", "role": "external"}]
    path = write_config(tmp_path / "c.toml", srcs, tmp_path / "shards", tmp_path / "run")
    return load_config(path, list(overrides))


def test_check_metrics_refuses_before_any_work(tmp_path):
    cfg = _cfg(tmp_path)
    one_class = ShardIndex.from_json({"splits": {"val": {"labels": {"normal": 0, "abnormal": 7}}}}, tmp_path)
    both = ShardIndex.from_json({"version": 2, "splits": {"val": {"labels": {"normal": 3, "abnormal": 7}, "sources": {
        "iu": {"views": {"FRONTAL": {"normal": 2, "abnormal": 4}}},
        "kermany": {"views": {"": {"normal": 1, "abnormal": 3}}}}}}}, tmp_path)
    with pytest.raises(ConfigError, match=r"selection\.best_metric = 'source_mean_auroc'.*both classes") as e:
        check_metrics(cfg, one_class, "val")
    assert isinstance(e.value, UserError)
    with pytest.raises(ConfigError, match=r"schedule\.plateau_metric"):
        check_metrics(_cfg(tmp_path, "--selection.best_metric", "loss", "--schedule.plateau_metric", "auroc"),
                      one_class, "val")
    check_metrics(_cfg(tmp_path, "--selection.best_metric", "loss"), one_class, "val")  # loss: fine
    check_metrics(cfg, both, "val")
    check_metrics(_cfg(tmp_path, "--selection.best_metric", "source/kermany/auroc"), both, "val")
    with pytest.raises(ConfigError, match=r"selection\.best_metric = 'source/ext/auroc'.*not trained on"):
        check_metrics(_cfg(tmp_path, "--selection.best_metric", "source/ext/auroc"), both, "val")
    with pytest.raises(ConfigError, match=r"source/nope/auroc"):
        check_metrics(_cfg(tmp_path, "--schedule.plateau_metric", "source/nope/auroc", "--schedule.plateau_mode", "max"),
                      both, "val")
    # train() checks first: nothing is read, built or written (the accelerator is never touched).
    from cxr_dist.train.loop import train

    accelerator = SimpleNamespace(process_index=0, num_processes=1)
    with pytest.raises(ConfigError, match="both classes"):
        train(cfg, accelerator, tracker=None, index=one_class)
    assert not (tmp_path / "run").exists()


def test_check_metrics_refuses_a_metric_that_validation_never_reports(multi, tmp_path):
    """best_metric / plateau_metric are looked up in each epoch's validation metrics
    (`val_m[name]`): a name validation never reports (a view the split lacks, a typo) must be
    refused before any work, not end the run with a KeyError traceback after the first epoch."""
    index = load_index(multi[1])  # val views: FRONTAL, LATERAL (iu), "" -> "unknown" (kermany)
    for name in ("view/FRONTAL/auroc", "view/unknown/auroc", "source/kermany/auroc", "source_mean_auroc",
                 "auroc", "loss", "f1", "balanced_accuracy"):
        check_metrics(_cfg(tmp_path, "--selection.best_metric", name), index, "val")
    for field, name in (("selection.best_metric", "view/PA/auroc"), ("selection.best_metric", "aucroc"),
                        ("schedule.plateau_metric", "view/AP/auroc")):
        with pytest.raises(ConfigError, match=re.escape(field)):
            check_metrics(_cfg(tmp_path, f"--{field}", name), index, "val")


@pytest.mark.parametrize("edit,field", [
    (lambda c: c["data"]["sources"][1].update(format="dicom"), "data.sources[1] (kermany): format"),
    (lambda c: c["data"]["sources"][1].update(name="iu"), "the name 'iu' is used twice"),
    (lambda c: [s.update(role="external") for s in c["data"]["sources"]], "data.sources: at least one source"),
    (lambda c: c["data"]["sources"][0].update(role="test"), "data.sources[0] (iu): role"),
    (lambda c: c["data"]["sources"][0].update(name="i u"), "data.sources[0] (i u): name"),
    (lambda c: c["data"]["sources"][0].update(weight=0.0), "data.sources[0] (iu): weight"),
    (lambda c: c["data"]["sources"][1].update(normal_labels=["Pneumonia"]), "data.sources[1] (kermany): label"),
    (lambda c: c["data"].update(data_dir="/some/iu"), "data.data_dir"),
    (lambda c: c["data"].update(intensity="clahe"), "data.intensity"),
    (lambda c: c["data"].update(resize="crop"), "data.resize"),
    (lambda c: c["train"].update(best_mode="up"), "selection.best_mode"),
    (lambda c: c["train"].update(early_stop_patience=-1), "selection.early_stop_patience"),
    (lambda c: c["data"]["sources"][0].update(colour="x"), "data.sources[0].colour"),
])
def test_config_errors_name_the_field(tmp_path, edit, field):
    import tomllib

    path = tmp_path / "c.toml"
    write_config(path, [{"name": "iu", "format": "iu", "path": "x"},
                        {"name": "kermany", "format": "folder", "path": "y"}], tmp_path / "s", tmp_path / "r")
    raw = tomllib.loads(path.read_text())
    edit(raw)
    path.write_text(tomli_w.dumps(raw))
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config(path)


# ----------------------------------------------------------------------------- training loss


class _SpyLoss(SampleWeightedLoss):
    def __init__(self, table):
        super().__init__(table)
        self.calls: list[tuple] = []

    def forward(self, logits, labels, sources=None, views=None):
        self.calls.append((sources, views))
        return super().forward(logits, labels, sources, views)


def test_training_steps_weight_the_loss_by_source_and_view(multi):
    """The training loss must be the per-source (view x label) weighted loss that mix.py builds:
    train_epoch has to pass each batch's sources and views to the loss, as evaluation does.
    Without them every sample of a multi-source run weighs 1 (and balance_views does nothing)."""
    import contextlib

    from cxr_dist.config import ModelConfig
    from cxr_dist.model.classifier import build_model
    from cxr_dist.train.loop import train_epoch
    from cxr_dist.train.state import Progress

    cfg_path, shards = multi
    cfg = load_config(cfg_path, ["--data.shards_dir", str(shards)])
    index = load_index(shards)
    table = loss_weight_table(index.source_view_counts(["train"]), balance_views=True)
    loss_fn = _SpyLoss(table)
    loader, n = train_loader(cfg.loader, ["train"], 0, 1, seed=0, index=index, weights={"iu": 1, "kermany": 1})
    torch.manual_seed(0)
    model = build_model(ModelConfig(pretrained=False))
    model.set_phase(0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    accelerator = SimpleNamespace(device=torch.device("cpu"), process_index=0, is_main_process=False,
                                  sync_gradients=True, accumulate=lambda m: contextlib.nullcontext(),
                                  backward=lambda loss: loss.backward(), clip_grad_norm_=lambda *a: None)
    run = SimpleNamespace(cfg=cfg, accelerator=accelerator, wrapped=model, optimizer=optimizer, loss_fn=loss_fn,
                          loader=loader, batches_per_epoch=n, progress=Progress(), inputs=None, reports=None, findings_loss=None,
                          watch=SimpleNamespace(requested=lambda: False))
    metrics, partial = train_epoch(run, 1)
    assert partial is None and len(loss_fn.calls) == n
    for sources_, views in loss_fn.calls:
        assert sources_ is not None and views is not None, "train_epoch calls the loss without sources/views"
        assert set(sources_) <= {"iu", "kermany"} and len(sources_) == cfg.loader.batch_size


# ----------------------------------------------------------------------------- 7. one process, end to end


def _train_1proc(multi, tmp: Path) -> Path:
    cfg, shards = multi
    run_dir = tmp / "run1"
    res = run_cmd([sys.executable, "-m", "cxr_dist.train", "--config", str(cfg), "--data.shards_dir", str(shards),
                   "--train.run_dir", str(run_dir)], cwd=tmp, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return run_dir


@pytest.fixture(scope="module")
def run1(multi, tmp_path_factory) -> Path:
    return _train_1proc(multi, tmp_path_factory.mktemp("ms-run1"))


GROUP_FIELDS = {"n", "auroc", "auroc_ci95", "mean_prob_normal", "mean_prob_abnormal"}


def test_one_process_run_reports_per_source_and_view(run1, multi, sources):
    from cxr_dist.model.checkpoint import load_checkpoint

    _, shards = multi
    index = load_index(shards)
    history = json.loads((run1 / "history.json").read_text())
    for row in history:
        for key in ("val/source/iu/auroc", "val/source/kermany/auroc", "val/view/FRONTAL/auroc",
                    "val/view/LATERAL/auroc", "val/view/unknown/auroc", "val/source_mean_auroc"):
            assert key in row, key
        assert "val/source/ext/auroc" not in row  # never in validation
        assert row["val/source_mean_auroc"] == pytest.approx(
            np.nanmean([row["val/source/iu/auroc"], row["val/source/kermany/auroc"]]))
    # Early stopping with patience 1 in phase 1 (3 epochs): the phase ran until stop_early said so.
    phase1 = [r for r in history if r["phase"] == 1]
    k = len(phase1)
    assert 2 <= k <= 3 and [r["epoch"] for r in phase1] == list(range(1, k + 1))
    assert k == 3 or stop_early(phase1, 1, "source_mean_auroc", "max", 1)
    assert not stop_early(phase1[:-1], 1, "source_mean_auroc", "max", 1)
    assert [r["epoch"] for r in history if r["phase"] == 2] == [4]
    # The best checkpoint is the (first) epoch with the highest val/source_mean_auroc.
    values = np.array([r["val/source_mean_auroc"] for r in history])
    best_epoch = history[int(np.nanargmax(values))]["epoch"]
    _, _, meta = load_checkpoint(run1 / "checkpoints" / "best")
    assert meta["progress"]["epoch"] == best_epoch
    assert meta["progress"]["best"] == pytest.approx(np.nanmax(values))

    evaluation = json.loads((run1 / "evaluation.json").read_text())
    assert {"val", "test", "external", "external_at_val_threshold", "test_at_val_threshold"} <= set(evaluation)
    for name in ("val", "test", "external", "external_at_val_threshold"):
        rep = evaluation[name]
        assert rep["by_source"] and rep["by_view"] and "normal_prob_spread_across_views" in rep
        for group in [*rep["by_source"].values(), *rep["by_view"].values()]:
            assert GROUP_FIELDS <= set(group)
        assert sum(g["n"] for g in rep["by_source"].values()) == rep["image_level"]["n"]
        assert sum(g["n"] for g in rep["by_view"].values()) == rep["image_level"]["n"]
        normals = [g["mean_prob_normal"] for g in rep["by_view"].values() if g["n_normal"]]
        assert rep["normal_prob_spread_across_views"] == pytest.approx(max(normals) - min(normals))
    assert set(evaluation["external"]["by_source"]) == {"ext"}
    assert set(evaluation["val"]["by_source"]) == set(evaluation["test"]["by_source"]) == {"iu", "kermany"}
    assert set(evaluation["val"]["by_view"]) == {"FRONTAL", "LATERAL", "unknown"}
    for name in ("val", "test", "external"):
        for src, g in evaluation[name]["by_source"].items():
            assert g["n"] == index.sources_in(name)[src].total
    # The best checkpoint evaluated again on val gives the history's number of that epoch.
    best_row = next(r for r in history if r["epoch"] == best_epoch)
    assert np.mean([evaluation["val"]["by_source"][s]["auroc"] for s in ("iu", "kermany")]) == \
           pytest.approx(best_row["val/source_mean_auroc"], abs=1e-6)

    with open(run1 / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"split", "key", "uid", "label", "prob_abnormal", "source", "view"} <= set(rows[0])
    external = [r for r in rows if r["split"] == "external"]
    assert len(external) == n_images(sources["ext"]) == len({r["key"] for r in external})
    assert {r["source"] for r in external} == {"ext"} and all(r["key"].startswith("ext__") for r in external)
    assert {r["view"] for r in rows if r["source"] == "iu"} == {"FRONTAL", "LATERAL"}
    assert Counter(r["split"] for r in rows) == {n: index.split(n).total for n in ("val", "test", "external")}


def test_best_metric_naming_an_external_source_fails_cleanly(multi, tmp_path):
    cfg, shards = multi
    run_dir = tmp_path / "never"
    res = run_cmd([sys.executable, "-m", "cxr_dist.train", "--config", str(cfg), "--data.shards_dir", str(shards),
                   "--train.run_dir", str(run_dir), "--selection.best_metric", "source/ext/auroc"], cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "selection.best_metric" in res.stderr and "Traceback" not in res.stderr
    assert not run_dir.exists()


# ----------------------------------------------------------------------------- 8. two processes


@pytest.mark.slow
def test_two_processes_count_every_validation_sample_once(run1, multi, tmp_path):
    cfg, shards = multi
    run_dir = tmp_path / "run2"
    res = accelerate_launch(["-m", "cxr_dist.train", "--config", str(cfg), "--data.shards_dir", str(shards),
                             "--train.run_dir", str(run_dir)], cwd=tmp_path, timeout=500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    index = load_index(shards)
    val = index.split("val")
    two = json.loads((run_dir / "history.json").read_text())
    one = json.loads((run1 / "history.json").read_text())
    assert two and one
    n_keys = lambda row: {k: v for k, v in row.items() if k.startswith("val/") and k.endswith("/n")}  # noqa: E731
    for row in two:
        assert row["val/n"] == val.total
        assert row["val/source/iu/n"] + row["val/source/kermany/n"] == val.total
        assert row["val/source/iu/n"] == val.sources["iu"].total
        assert n_keys(row) == n_keys(one[0])
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    for name in ("val", "test", "external"):
        assert evaluation[name]["image_level"]["n"] == index.split(name).total
        for src, g in evaluation[name]["by_source"].items():
            assert g["n"] == index.sources_in(name)[src].total


# ----------------------------------------------------------------------------- 9. evaluate --data --format


def _evaluate(run_dir: Path, *args: str, cwd: Path):
    return run_cmd([CLI, "evaluate", "--checkpoint", str(run_dir), *args], cwd=cwd, timeout=200)


def test_evaluate_data_in_other_formats(run1, sources, tmp_path):
    folder = make_folder_dataset(tmp_path / "other", n_patients=6, size=48, seed=3, subsets=False)
    res = _evaluate(run1, "--data", str(folder), "--format", "folder", "--patient-regex", KERMANY_REGEX,
                    "--predictions", str(tmp_path / "f.csv"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    # Read as the run's own folder source: its name, labels and patient regex.
    assert set(out["by_source"]) == {"kermany"} and out["by_source"]["kermany"]["n"] == n_images(folder)
    assert set(out["by_view"]) == {"unknown"} and out["image_level"]["n"] == n_images(folder)
    assert out["study_level"]["n"] == 6  # patients from the regex: person1 has two films
    keys = [r["key"] for r in csv.DictReader(open(tmp_path / "f.csv"))]
    assert len(keys) == n_images(folder) and all(k.startswith("kermany__") for k in keys)

    table = tmp_path / "table"
    table.mkdir()
    rows = []
    for i, p in enumerate(sorted((sources["iu"] / "images" / "images_normalized").glob("*.png"))[:10]):
        shutil.copy(p, table / f"img{i}.png")
        # Two films per patient (one study), one label per patient.
        rows.append({"path": f"img{i}.png", "label": ["normal", "abnormal"][(i // 2) % 2], "patient": f"p{i // 2}",
                     "view": ["PA", "AP"][i % 2 if i < 6 else 0]})
    with open(table / "list.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["path", "label", "patient", "view"])
        w.writeheader()
        w.writerows(rows)
    res = _evaluate(run1, "--data", str(table / "list.csv"), "--format", "csv", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert set(out["by_source"]) == {"csv"} and out["image_level"]["n"] == 10
    assert {v: g["n"] for v, g in out["by_view"].items()} == {"AP": 3, "PA": 7}
    assert out["study_level"]["n"] == 5

    res = _evaluate(run1, "--data", str(folder), "--format", "dicom", cwd=tmp_path)
    assert res.returncode == 2 and "--format" in res.stderr and "Traceback" not in res.stderr

    res = _evaluate(run1, "--data", str(sources["iu"]), "--predictions", str(tmp_path / "iu.csv"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    df, _ = build_manifest(str(sources["iu"]), "drop")
    assert set(out["by_source"]) == {"iu"} and out["image_level"]["n"] == len(df)
    assert set(out["by_view"]) == {"FRONTAL", "LATERAL"}
    keys = {r["key"] for r in csv.DictReader(open(tmp_path / "iu.csv"))}
    assert keys == set(df["key"])  # unprefixed, as before sources


# ----------------------------------------------------------------------------- 10. paired_auroc.py


def _paired():
    spec = importlib.util.spec_from_file_location("paired_auroc", ROOT / "bench" / "paired_auroc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_preds(path: Path, rows: list[tuple]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "key", "uid", "label", "prob_abnormal", "source", "view"])
        w.writerows(rows)
    return path


def test_paired_auroc_by_source_and_common_images(tmp_path, capsys):
    rng = np.random.default_rng(4)
    lab_iu, lab_k = np.repeat(rng.integers(0, 2, 15), 2), rng.integers(0, 2, 24)  # iu: 2 views per study
    lab_iu[:4], lab_k[:2] = (0, 0, 1, 1), (0, 1)
    iu = [(f"iu__{i}", f"iu__s{i // 2}", int(y), "iu", "FRONTAL") for i, y in enumerate(lab_iu)]
    ker = [(f"kermany__{i:02d}", f"kermany__p{i}", int(y), "kermany", "") for i, y in enumerate(lab_k)]
    pa = {k: float(np.clip(0.4 * y + rng.uniform(0, 0.6), 0, 1)) for k, _, y, _, _ in iu + ker}
    pb = {k: float(np.clip(0.6 * y + rng.uniform(0, 0.4), 0, 1)) for k, _, y, _, _ in iu + ker}

    def rows(split, items, probs):
        return [(split, k, u, y, f"{probs[k]:.6f}", s, v) for k, u, y, s, v in items]

    a = _write_preds(tmp_path / "a.csv", rows("test", iu + ker, pa) + rows("external", ker[:20], pa))
    b = _write_preds(tmp_path / "b.csv", rows("test", iu + ker[4:], pb))
    paired = _paired()

    def auroc(items, probs):
        return roc_auc_score([y for _, _, y, _, _ in items], [round(probs[k], 6) for k, _, _, _, _ in items])

    assert paired.main([str(a), str(a), "--source", "iu"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"| {len(iu)} | {auroc(iu, pa):.4f} | +0.0000" in line
    # b lacks 4 kermany test images: refused without --common
    with pytest.raises(UserError, match="--common"):
        paired.main([str(a), str(b), "--source", "kermany"])
    capsys.readouterr()
    # An IU-only run's "external" kermany images against a mixed run's kermany test images: the shared ones.
    assert paired.main([str(a), str(b), "--common", "--split", "external", "--other-split", "test",
                        "--source", "kermany"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    shared = ker[4:20]
    gain = auroc(shared, pb) - auroc(shared, pa)
    assert f"| {len(shared)} | {auroc(shared, pb):.4f} | {gain:+.4f} (" in line
    with pytest.raises(UserError, match="no test predictions of source 'nih'"):
        paired.main([str(a), str(b), "--source", "nih"])
    # The script's own error path: exit 2, a message, no traceback.
    res = run_cmd([sys.executable, str(ROOT / "bench" / "paired_auroc.py"), str(a), str(b), "--source", "kermany"],
                  cwd=tmp_path, timeout=120)
    assert res.returncode == 2 and "paired_auroc.py:" in res.stderr and "Traceback" not in res.stderr


def test_sources_table_of_two_runs(tmp_path):
    """bench/sources_table.py (the tables of docs/results.md "Several sources"): per run and source
    the AUROC of the right split (test for trained sources, external for held-out ones), the
    per-view shortcut table, and the paired gain on the images both runs scored."""
    rng = np.random.default_rng(7)
    lab_iu, lab_k = np.repeat(rng.integers(0, 2, 20), 2), rng.integers(0, 2, 30)
    lab_iu[:4], lab_k[:2] = (0, 0, 1, 1), (0, 1)
    iu = [(f"iu__{i}", f"iu__s{i // 2}", int(y), "iu", ("FRONTAL", "LATERAL")[i % 2]) for i, y in enumerate(lab_iu)]
    ker = [(f"kermany__{i:02d}", f"kermany__p{i}", int(y), "kermany", "") for i, y in enumerate(lab_k)]
    out = tmp_path / "out"
    for run, items in (("iu_only", [("test", iu), ("external", ker)]), ("iu_kermany", [("test", iu + ker[:10])])):
        probs = {k: float(np.clip(0.5 * y + rng.uniform(0, 0.5), 0, 1)) for _, part in items for k, _, y, _, _ in part}
        (out / "runs" / run).mkdir(parents=True)
        _write_preds(out / "runs" / run / "predictions.csv",
                     [(split, k, u, y, f"{probs[k]:.6f}", s, v) for split, part in items for k, u, y, s, v in part])
        (out / "runs" / run / "history.json").write_text(json.dumps([{"epoch": 1, "val/source_mean_auroc": 0.7}]))
    (out / "times.tsv").write_text("iu_only\t10\t100\niu_kermany\t20\t200\n")
    res = run_cmd([sys.executable, str(ROOT / "bench" / "sources_table.py"), str(out)], cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(l.startswith("| iu_only | kermany | external | 30 |") for l in lines)
    assert any(l.startswith("| iu_kermany | kermany | test | 10 |") for l in lines)
    assert any(l.startswith("| iu_only | iu | LATERAL | 20 |") for l in lines)
    assert any(l.startswith("| iu_only -> iu_kermany | iu (test / test) | 40 |") for l in lines)
    assert any(l.startswith("| iu_only -> iu_kermany | kermany (external / test) | 10 |") for l in lines)
    assert "| iu_kermany | 20 | 200 |" in res.stdout
