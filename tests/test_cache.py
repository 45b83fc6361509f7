"""The frozen-compute cache: same features as the normal path, phase hand-over, batch sampling."""
from __future__ import annotations

import json

import pytest
import torch

from cxr_dist.model.feature_cache import CacheSpec, CachedBatches, build_cache, cache_name, cached_on_disk, load_cache
from cxr_dist.config import ModelConfig, load_config
from cxr_dist.data.index import load_index
from cxr_dist.model.classifier import build_model
from cxr_dist.data.stream import eval_loader
from tests.conftest import QUICK_END, TINY
from tests.test_train import assert_same_state, params_of, probe


@pytest.fixture(scope="module")
def setup(tiny_shards):
    cfg = load_config(TINY, ["--data.shards_dir", str(tiny_shards), "--loader.num_workers", "0"])
    torch.manual_seed(0)
    model = build_model(ModelConfig(pretrained=False))
    model.set_phase(1)
    return cfg, model, load_index(tiny_shards)


def test_unaugmented_cache_equals_the_normal_frozen_forward(setup):
    cfg, model, index = setup
    cache = build_cache(model, cfg.loader, index, CacheSpec(["val"]), torch.device("cpu"))
    images = torch.cat([b["image"] for b in eval_loader(cfg.loader, "val", 0, 1, index)])
    direct = model.frozen_forward(images)
    torch.testing.assert_close(cache.feats[0].float(), direct, atol=2e-2, rtol=1e-2)  # stored in fp16
    # Carried to phase 1 (head only), it equals phase 1's own frozen forward.
    model.set_phase(0)
    torch.testing.assert_close(cache.at_depth(model, 0).feats[0].float(), model.frozen_forward(images),
                               atol=2e-2, rtol=1e-2)
    model.set_phase(1)


def test_views_differ_and_cover_every_sample_once_per_rank(setup):
    cfg, model, index = setup
    parts = [build_cache(model, cfg.loader, index, CacheSpec(["train"], 2, 7, True, r, 2), torch.device("cpu"))
             for r in (0, 1)]
    keys = parts[0].keys + parts[1].keys
    assert sorted(keys) == sorted(set(keys)) and len(keys) == index.split("train").total
    assert parts[0].feats.shape[0] == 2 and not torch.equal(parts[0].feats[0], parts[0].feats[1])


def test_cached_batches_fixed_count_full_coverage_and_seeded(setup):
    cfg, model, index = setup
    cache = build_cache(model, cfg.loader, index, CacheSpec(["train"], 2, 7, True), torch.device("cpu"))
    n = len(cache.keys)
    loader = CachedBatches(cache, batch_size=8, n_batches=n // 8 + 2, seed=1, rank=0)
    loader.set_epoch(3)
    batches = list(loader)
    assert len(batches) == n // 8 + 2 and all(len(b["key"]) == 8 for b in batches)
    seen = [k for b in batches for k in b["key"]]
    assert set(seen[:n]) == set(cache.keys)  # every sample once before any repeats
    loader.set_epoch(3)
    assert [b["key"] for b in loader] == [b["key"] for b in batches]
    loader.set_epoch(4)
    assert [b["key"] for b in loader] != [b["key"] for b in batches]


@pytest.mark.slow
def test_two_process_cached_training_keeps_ranks_identical(tiny_shards, tmp_path):
    # The end of a run is not under test here (QUICK_END): the cache, the ranks and the resume are.
    res, run_dir, params = probe(tmp_path, tiny_shards, "cached", "--train.cache_views", "2", *QUICK_END)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert [r["phase"] for r in json.loads((run_dir / "history.json").read_text())] == [1, 1, 2]
    r0, r1 = params_of(params, 0), params_of(params, 1)
    for k in r0:
        if "running_" not in k and "num_batches" not in k:
            assert torch.equal(r0[k], r1[k]), k
    # Each rank saved its train and val cache; a second run (new run_dir, same cache_dir) loads
    # them instead of recomputing, and trains to bit-identical weights on both ranks.
    cache_dir = run_dir / "cache"
    assert sorted(p.name.split("-")[0] + p.name.split("-")[1] for p in cache_dir.glob("*.safetensors")) == [
        "trainr0", "trainr1", "valr0", "valr1"]
    res2, _, params2 = probe(tmp_path, tiny_shards, "cached-again", "--train.cache_views", "2",
                             "--train.cache_dir", str(cache_dir), *QUICK_END)
    assert res2.returncode == 0, res2.stdout[-3000:] + res2.stderr[-5000:]
    assert "loaded the frozen-compute cache" in res2.stdout + res2.stderr
    assert not (tmp_path / "cached-again" / "cache").exists()
    for rank in (0, 1):
        assert_same_state(params_of(params, rank), params_of(params2, rank))


def test_disk_cache_round_trip_names_and_damage(setup, tmp_path):
    cfg, model, index = setup
    built = []

    def build():
        built.append(1)
        return build_cache(model, cfg.loader, index, CacheSpec(["val"], 2, 7, True), torch.device("cpu"))

    path = tmp_path / cache_name("val-r0", {"views": 2})
    first = cached_on_disk(path, build, print)
    again = cached_on_disk(path, build, print)
    assert len(built) == 1 and torch.equal(first.feats, again.feats) and torch.equal(first.labels, again.labels)
    assert (first.keys, first.uids, first.depth) == (again.keys, again.uids, again.depth) and first.depth == 1
    assert not list(tmp_path.glob(".*tmp*"))  # written under a temporary name, then renamed
    # Anything the content depends on changes the name: a stale cache is never read.
    assert cache_name("val-r0", {"views": 3}) != path.name and cache_name("val-r0", {"views": 2}) == path.name
    # A damaged file is rebuilt, not trusted.
    path.write_bytes(path.read_bytes()[:100])
    messages = []
    rebuilt = cached_on_disk(path, build, messages.append)
    assert len(built) == 2 and "unreadable" in messages[0] and torch.equal(rebuilt.feats, first.feats)
    assert torch.equal(load_cache(path).feats, first.feats)
