"""Stream: rank/worker splitting (world 2 x 2 workers simulated in one process, which is legit:
the stream splits itself by the rank it is given), eval exactly-once, equal train batch counts."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch

from cxr_dist.config import DataConfig, LoaderConfig
from cxr_dist.errors import DataError
from cxr_dist.data.shards import write_shards
from cxr_dist.data.index import ShardIndex, load_index
from cxr_dist.data.stream import eval_loader, train_loader, views_loader
from cxr_dist.data.transforms import eval_transform, seeded_transform, train_transform, view_seed
from tests.datagen import make_dataset


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> DataConfig:
    root = tmp_path_factory.mktemp("iu")
    data = make_dataset(root / "data", n_uids=40)
    # 7 per shard: an odd number of uneven shards per split (train 7, val 1, test 1 here)
    c = DataConfig(data_dir=str(data), shards_dir=str(root / "shards"), image_size=40, samples_per_shard=7,
                   prepare_workers=1)
    write_shards(c, c.shards_dir)
    return c


@pytest.fixture(scope="module")
def cfg() -> LoaderConfig:
    """How the tests read the shards (4 per batch, 2 worker(s))."""
    return LoaderConfig(input_size=32, batch_size=4, num_workers=2, shuffle_buffer=16)


@pytest.fixture(scope="module")
def index(prepared) -> ShardIndex:
    return load_index(prepared.shards_dir)


def _keys(index, split) -> list[str]:
    import webdataset as wds

    files = [s.path for s in index.shards([split])]
    return [s["__key__"] for s in wds.WebDataset(files, shardshuffle=False)]


def _check_batch(b, cfg, full: bool) -> None:
    n = len(b["key"])
    assert b["image"].dtype == torch.uint8 and b["image"].shape[1:] == (1, cfg.input_size, cfg.input_size)
    assert b["label"].dtype == torch.int64 and b["label"].shape == (b["image"].shape[0],) == (n,)
    assert len(b["uid"]) == n and all(isinstance(k, str) for k in b["key"] + b["uid"])
    assert (n == cfg.batch_size) if full else (1 <= n <= cfg.batch_size)


def test_index_and_class_counts(cfg, index):
    n_norm, n_abn = index.class_counts(["train", "val"])
    assert n_norm + n_abn == index.split("train").total + index.split("val").total
    assert n_norm > 0 and n_abn > 0
    with pytest.raises(DataError, match="run `cxr-dist prepare"):
        load_index(index.root + "-missing")


@pytest.mark.parametrize("world,workers", [(2, 2), (1, 0), (3, 2)])
@pytest.mark.parametrize("split", ["train", "test"])  # 7 shards; 1 shard (more slots than shards)
def test_eval_sees_every_key_exactly_once(cfg, index, world, workers, split):
    c = replace(cfg, num_workers=workers)
    seen: list[str] = []
    for rank in range(world):
        loader = eval_loader(c, split, rank, world, index)
        batches = list(loader)
        assert len(batches) == len(loader)
        for b in batches:
            _check_batch(b, c, full=False)
            seen += b["key"]
    assert sorted(seen) == sorted(_keys(index, split))
    assert max(Counter(seen).values()) == 1


def test_eval_is_deterministic(cfg, index):
    a = [b["key"] for b in eval_loader(cfg, "val", 0, 2, index)]
    b = [b["key"] for b in eval_loader(cfg, "val", 0, 2, index)]
    assert a == b


# "val" has 1 shard: more slots (rank x worker) than shards
@pytest.mark.parametrize("world,workers,batch,split",
                         [(2, 2, 4, "train"), (2, 3, 5, "train"), (3, 2, 3, "train"), (2, 0, 4, "train"), (2, 2, 2, "val")])
def test_train_equal_full_batches_per_rank(cfg, index, world, workers, batch, split):
    c = replace(cfg, num_workers=workers, batch_size=batch)
    total = index.split(split).total
    counts = []
    for rank in range(world):
        loader, n = train_loader(c, [split], rank, world, seed=1, index=index)
        assert n == total // (world * batch) and len(loader) == n
        batches = list(loader)
        for b in batches:
            _check_batch(b, c, full=True)
        counts.append(len(batches))
    assert counts == [n] * world


def test_train_covers_most_samples_and_ranks_differ(cfg, index):
    seen = []
    for rank in range(2):
        loader, _ = train_loader(cfg, ["train", "val"], rank, 2, seed=0, index=index)
        seen.append([k for b in loader for k in b["key"]])
    keys = set(_keys(index, "train")) | set(_keys(index, "val"))
    assert set(seen[0]) | set(seen[1]) <= keys
    assert len(set(seen[0]) | set(seen[1])) >= 0.6 * len(keys)  # one epoch is about one pass
    assert not set(seen[0]) & set(seen[1]) or len(set(seen[0]) & set(seen[1])) < len(seen[0]) / 2


def test_train_epochs_differ_and_are_reproducible(cfg, index):
    loader, _ = train_loader(cfg, ["train"], 0, 2, seed=3, index=index)
    e0 = [k for b in loader for k in b["key"]]
    e1 = [k for b in loader for k in b["key"]]  # no set_epoch: advances by itself
    loader.set_epoch(0)
    again = [(k, img.sum().item()) for b in loader for k, img in zip(b["key"], b["image"])]
    assert e0 != e1
    assert [k for k, _ in again] == e0
    loader2, _ = train_loader(cfg, ["train"], 0, 2, seed=3, index=index)
    assert [(k, img.sum().item()) for b in loader2 for k, img in zip(b["key"], b["image"])] == again


def test_train_stream_leaves_global_rng_alone(cfg, index):
    c = replace(cfg, num_workers=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    loader, _ = train_loader(c, ["train"], 0, 1, seed=0, index=index)
    for _ in loader:
        pass
    assert torch.equal(torch.rand(3), expected)


def _images(loader) -> dict[str, torch.Tensor]:
    return {k: img for b in loader for k, img in zip(b["key"], b["image"])}


def test_keyed_views_are_the_same_on_any_world_size(cfg, index):
    """Test-time augmentation (keyed views): view v of an image does not depend on which rank or
    worker reads it, so evaluating with 1 or 3 processes averages the same views."""
    def views(world: int, workers: int, view: int) -> dict[str, torch.Tensor]:
        out = {}
        for rank in range(world):
            loader = views_loader(replace(cfg, num_workers=workers), ["train"], rank, world, 0, index, keyed=True)
            loader.set_epoch(view)
            out.update(_images(loader))
        return out

    one, three = views(1, 0, 0), views(3, 2, 0)
    assert one.keys() == three.keys() and len(one) == index.split("train").total
    assert all(torch.equal(one[k], three[k]) for k in one)
    plain = _images(eval_loader(cfg, "train", 0, 1, index))
    other = views(1, 0, 1)
    assert sum(not torch.equal(one[k], plain[k]) for k in one) > 0.9 * len(one)  # augmented
    assert sum(not torch.equal(one[k], other[k]) for k in one) > 0.9 * len(one)  # each view its own


def test_a_keyed_view_is_the_seeded_transform_of_its_image(cfg, index):
    """View v of image k is train_transform under view_seed(0, v, k), nothing else: what
    `cxr-dist predict --tta` applies to an image file (no stream there)."""
    import io

    import webdataset as wds
    from PIL import Image

    files = [s.path for s in index.shards(["val"])]
    raw = {s["__key__"]: s["jpg"] for s in wds.WebDataset(files, shardshuffle=False)}
    loader = views_loader(cfg, ["val"], 0, 1, 0, index, keyed=True)
    loader.set_epoch(2)
    streamed = _images(loader)
    assert streamed.keys() == raw.keys()
    augment = train_transform(cfg.input_size)
    torch.manual_seed(123)
    before = torch.rand(1)
    for key, jpg in raw.items():
        with Image.open(io.BytesIO(jpg)) as im:
            img = im.convert("L")
        assert torch.equal(seeded_transform(augment, img, view_seed(0, 2, key)), streamed[key])
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # seeded_transform left the caller's RNG alone


def test_unknown_split(cfg, index):
    with pytest.raises(DataError, match="fold0.*not in"):
        train_loader(cfg, ["fold0"], 0, 1, seed=0, index=index)
    with pytest.raises(DataError, match="fold0.*not in"):
        index.class_counts(["fold0"])


def test_transforms_keep_aspect_and_shape():
    img = torch.full((1, 60, 30), 200, dtype=torch.uint8)
    out = eval_transform(20)(img)
    assert out.shape == (1, 20, 20) and out.dtype == torch.uint8
    # padded left/right with black, the image itself in the middle
    assert out[0, :, 0].max() == 0 and out[0, :, -1].max() == 0 and out[0, 10, 10] == 200
    torch.manual_seed(0)
    aug = train_transform(20)(img)
    assert aug.shape == (1, 20, 20) and aug.dtype == torch.uint8
