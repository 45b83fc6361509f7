"""Frozen-compute cache (`train.cache_views > 0`): run the frozen part of the network once.

The backbone is frozen in phase 1 and all but its last block(s) in phase 2, yet the normal mode
recomputes that frozen part for every image in every epoch. The cache computes it once per image
for `cache_views` augmented views (the input of the first block that any phase unfreezes, in
fp16) and every epoch trains on it, picking one of the views per image at random. Validation
images are cached once, unaugmented (their frozen output never changes).

What it trades: augmentation is limited to the cached views (the normal mode draws a new one
every epoch), and each phase starts by pushing the cache through the blocks that this phase keeps
frozen. Each rank caches its own exactly-once share of the data, so it holds 1/world of it.

On disk (`train.cache_dir`, default RUN_DIR/cache): each rank's cache is saved as safetensors
(tensors + JSON metadata, nothing unpickled) under a name that hashes everything its content
depends on (shards checksum, data config, backbone and weights, depth, views, seed, rank/world).
A resumed run, or another run with the same frozen part (say a different learning rate), loads it
instead of recomputing it; any change to those inputs gives a new name, so a stale cache is never
read. Files are written to a temporary name and renamed, so a killed run leaves no half cache.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ..fileio import write_bytes_atomic
from ..log import progress
from ..config import Config, LoaderConfig, to_dict
from .frozen_runtime import attached, build_runner, calibration_batches
from .classifier import CXRClassifier
from ..data.index import ShardIndex
from ..data.stream import eval_loader, views_loader


@dataclass
class FeatureCache:
    """This rank's share: feats is views x N x (frozen output shape), fp16, aligned with labels/keys."""

    feats: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    uids: list[str]
    depth: int  # the model's depth (trainable last blocks) the features were computed for
    sources: list[str]
    views: list[str]

    def at_depth(self, model: CXRClassifier, depth: int, batch_size: int = 256) -> "FeatureCache":
        """The same cache carried forward, through `model`'s frozen blocks, to the split point of
        `depth` (<= self.depth: a phase that trains fewer blocks)."""
        if depth == self.depth:
            return self
        v, n = self.feats.shape[:2]
        flat = self.feats.reshape(v * n, *self.feats.shape[2:])
        out = torch.cat([model.frozen_from(flat[i : i + batch_size], self.depth, depth).half()
                         for i in range(0, len(flat), batch_size)])
        return FeatureCache(out.reshape(v, n, *out.shape[1:]), self.labels, self.keys, self.uids,
                            depth, self.sources, self.views)


@dataclass(frozen=True)
class CacheSpec:
    """What one cache holds: this rank's share (of `world`) of `splits`, `views` times, augmented
    (seeded by `seed`) or not."""
    splits: list[str]
    views: int = 1
    seed: int = 0
    augment: bool = False
    rank: int = 0
    world: int = 1


@torch.no_grad()
def build_cache(model: CXRClassifier, loader: LoaderConfig, index: ShardIndex, spec: CacheSpec,
                device: torch.device, show: bool = False) -> FeatureCache:
    """frozen_forward of every sample of `spec` on this rank, at the model's current depth
    (set_phase); `show`: a progress bar (the main process)."""
    splits, views, seed, augment, rank, world = (spec.splits, spec.views, spec.seed, spec.augment, spec.rank,
                                                  spec.world)
    was_training = model.training
    model.eval()
    per_view, labels, keys, uids = [], None, None, None
    for v in range(views):
        batches = (views_loader(loader, splits, rank, world, seed, index) if augment
                   else eval_loader(loader, splits[0], rank, world, index))
        batches.set_epoch(v)
        feats, lab, ks, us, srcs, vws = [], [], [], [], [], []
        bar = progress(len(batches), f"caching {'+'.join(splits)} view {v + 1}/{views} (batches)", show)
        for batch in batches:
            bar.update(1)
            feats.append(model.frozen_forward(batch["image"].to(device)).half().cpu())
            lab.append(batch["label"])
            ks += batch["key"]
            us += batch["uid"]
            srcs += batch["source"]
            vws += batch["view"]
        bar.close()
        if keys is not None and ks != keys:  # the views loader reads in a fixed order
            raise RuntimeError("cache views are not aligned: the stream order changed between views")
        per_view.append(torch.cat(feats))
        labels, keys, uids = torch.cat(lab), ks, us
    model.train(was_training)
    return FeatureCache(torch.stack(per_view), labels, keys, uids, model.depth, srcs, vws)


class CachedBatches:
    """Training batches drawn from a FeatureCache: `n_batches` per epoch (the same on every rank),
    a fresh permutation and a random view per sample each epoch, seeded by (seed, epoch, rank).
    With several sources, each sample's source is drawn by `weights` (as the shard stream does)."""

    def __init__(self, cache: FeatureCache, batch_size: int, n_batches: int, seed: int, rank: int,
                 weights: dict[str, float] | None = None) -> None:
        self.cache, self.batch_size, self.n_batches, self.seed, self.rank = cache, batch_size, n_batches, seed, rank
        self.weights = weights or {}
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self):
        n_views, n = self.cache.feats.shape[:2]
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        need = self.n_batches * self.batch_size
        names = sorted(set(self.cache.sources))
        if len(names) == 1:
            order = _permutations(rng, np.arange(n), need)
        else:  # a source per slot, drawn by weight; within a source, permutations back to back
            members = {s: np.flatnonzero(np.array(self.cache.sources) == s) for s in names}
            w = np.array([self.weights.get(s, 1.0) for s in names])
            pick = rng.choice(len(names), size=need, p=w / w.sum())
            order = np.empty(need, dtype=np.int64)
            for i, s in enumerate(names):
                order[pick == i] = _permutations(rng, members[s], int((pick == i).sum()))
        views = rng.integers(0, n_views, size=need)
        for b in range(self.n_batches):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            vi = views[b * self.batch_size : (b + 1) * self.batch_size]
            yield {"features": self.cache.feats[torch.from_numpy(vi), torch.from_numpy(idx)],
                   "label": self.cache.labels[torch.from_numpy(idx)], **_meta(self.cache, idx)}


def _permutations(rng: np.random.Generator, items: np.ndarray, need: int) -> np.ndarray:
    """`need` items: whole permutations back to back, so every item comes once before any repeats."""
    if need == 0:
        return items[:0]
    return np.concatenate([items[rng.permutation(len(items))] for _ in range(-(-need // len(items)))])[:need]


def _meta(cache: FeatureCache, idx) -> dict:
    return {"key": [cache.keys[i] for i in idx], "uid": [cache.uids[i] for i in idx],
            "source": [cache.sources[i] for i in idx], "view": [cache.views[i] for i in idx]}


def cached_eval_batches(cache: FeatureCache, batch_size: int = 256):
    """The (single, unaugmented) view of a validation cache, in order, as evaluation batches."""
    for i in range(0, len(cache.keys), batch_size):
        yield {"features": cache.feats[0, i : i + batch_size], "label": cache.labels[i : i + batch_size],
               **_meta(cache, range(i, min(i + batch_size, len(cache.keys))))}


def seed_views(seed: int) -> int:
    """The cache's augmentation seed, distinct from the training stream's."""
    return random.Random(f"cache-{seed}").getrandbits(31)


CACHE_FORMAT = 2  # 2: sources and views stored with the keys


def cache_name(kind: str, inputs: dict) -> str:
    """File name of a cache: `kind` plus a hash of everything its content depends on."""
    blob = json.dumps({"format": CACHE_FORMAT, **inputs}, sort_keys=True, default=str).encode()
    return f"{kind}-{hashlib.sha256(blob).hexdigest()[:16]}.safetensors"


def save_cache(cache: FeatureCache, path: Path) -> None:
    """Atomically write a cache as safetensors; keys/uids/sources/views/depth go in the (string) metadata."""
    meta = {"keys": json.dumps(cache.keys), "uids": json.dumps(cache.uids), "depth": str(cache.depth),
            "sources": json.dumps(cache.sources), "views": json.dumps(cache.views)}
    write_bytes_atomic(path, save({"feats": cache.feats.contiguous(), "labels": cache.labels.contiguous()},
                                  metadata=meta))


def load_cache(path: Path) -> FeatureCache:
    """Read a cache written by save_cache (tensors and JSON only: no pickle)."""
    with safe_open(str(path), framework="pt") as f:  # one read: tensors and metadata together
        meta = f.metadata()
        feats, labels = f.get_tensor("feats"), f.get_tensor("labels")
    return FeatureCache(feats, labels, json.loads(meta["keys"]), json.loads(meta["uids"]), int(meta["depth"]),
                        json.loads(meta["sources"]), json.loads(meta["views"]))


def cached_on_disk(path: Path, build: Callable[[], FeatureCache], log: Callable[[str], None]) -> FeatureCache:
    """Load the cache at `path` when it exists and reads back whole, else build and save it."""
    if path.is_file():
        try:
            cache = load_cache(path)
            log(f"loaded the frozen-compute cache {path}")
            return cache
        except (SafetensorError, OSError, KeyError, ValueError) as e:  # damaged: rebuild, never trust it
            log(f"cache {path} is unreadable ({type(e).__name__}: {e}); computing it again")
    cache = build()
    save_cache(cache, path)
    return cache


def frozen_caches(cfg: Config, model: CXRClassifier, index: ShardIndex, train_splits: list[str], val_split: str,
                  accelerator) -> tuple[FeatureCache, FeatureCache]:
    """This rank's train and val caches of the frozen part, loaded from train.cache_dir or built.

    Computed at the deepest depth any phase trains (each phase carries them to its own with
    `at_depth`); leaves `model` at that depth. No collectives: each rank builds or loads its own share.
    """
    t, rank, world = cfg.train, accelerator.process_index, accelerator.num_processes
    t0, show = time.time(), accelerator.is_main_process  # progress: a bar or log lines, on the main process
    depth = max(p.unfreeze_blocks for p in t.phases)
    model.set_phase(depth)
    cache_dir = Path(t.cache_dir or Path(t.run_dir) / "cache")
    # Everything the cached tensors depend on; the frozen part does not depend on the head.
    # (The text settings do not change image features: an image+text run shares the image-only cache.)
    # (The keys are those of the one data section before [loader] split from it, so caches carry over.)
    data = {k: v for k, v in {**to_dict(cfg.data), **to_dict(cfg.loader)}.items()
            if k not in ("text_fields", "allow_label_leakage", "report_fields", "findings")}
    inputs = {"data": data, "checksum": index.checksum, "seed": t.seed,
              "backbone": [cfg.model.backbone, cfg.model.pretrained, cfg.model.weights],
              "depth": depth, "rank": rank, "world": world}
    if cfg.model.frozen_backend == "int8":  # other numerics: never mixed with an fp32 cache
        inputs["frozen_backend"] = "int8"
    fast = FastFrozen(cfg, model, depth, index, train_splits[0], cache_dir, accelerator)
    train_cache = cached_on_disk(
        cache_dir / cache_name(f"train-r{rank}", {**inputs, "splits": train_splits, "views": t.cache_views}),
        lambda: fast(lambda: build_cache(model, cfg.loader, index, CacheSpec(train_splits, t.cache_views, seed_views(t.seed),
                                                                     True, rank, world), accelerator.device, show)),
        accelerator.print)
    val_cache = cached_on_disk(
        cache_dir / cache_name(f"val-r{rank}", {**inputs, "splits": [val_split]}),
        lambda: fast(lambda: build_cache(model, cfg.loader, index, CacheSpec([val_split], rank=rank, world=world),
                                         accelerator.device, show)), accelerator.print)
    accelerator.print(f"frozen-compute cache: {t.cache_views} views of {len(train_cache.keys)} training images "
                      f"on this rank, {tuple(train_cache.feats.shape[2:])} each, ready in {time.time() - t0:.0f} s")
    return train_cache, val_cache


class FastFrozen:
    """Runs a cache build (or any work through `model`'s frozen part: the final evaluation) with the
    frozen part through `model.frozen_backend` (frozen_runtime.py) when it is not "eager" and the
    device is the CPU. The runner is built (or its export loaded from `cache_dir`) once, and only
    if some work has to be done."""

    def __init__(self, cfg: Config, model: CXRClassifier, depth: int, index: ShardIndex, calib_split: str,
                 cache_dir: Path, accelerator) -> None:
        self.cfg, self.model, self.depth, self.index = cfg, model, depth, index
        self.calib_split, self.cache_dir, self.accelerator = calib_split, cache_dir, accelerator
        self.runner = None

    def __call__(self, build: Callable[[], FeatureCache]) -> FeatureCache:
        backend = self.cfg.model.frozen_backend
        if backend == "eager" or self.accelerator.device.type != "cpu":
            return build()
        if self.runner is None:
            calib = (calibration_batches(self.cfg.loader, self.calib_split, self.index)
                     if backend == "int8" else None)
            self.runner = build_runner(self.model, backend, self.depth, self.cfg.loader.input_size, self.cache_dir,
                                       calibration=calib, log=self.accelerator.print)
            self.accelerator.print(f"frozen part through {backend}: ready in {self.runner.build_s:.1f} s")
        with attached(self.model, self.runner):
            return build()
