"""Shards -> batches for one rank. Splits itself by rank and DataLoader worker: never pass these
loaders to ``accelerator.prepare`` (it would split them a second time).

Work is dealt to *slots*, one per (rank, worker): slot = rank * W + worker, n_slots = world * W.
When a split has at least n_slots shards, each slot reads whole shards (shards[slot::n_slots]);
otherwise every slot reads all shards and keeps every n_slots-th sample, so that no slot is ever
empty ("No samples found") however many workers there are.

Train stream (``train_loader``): every rank yields exactly ``batches_per_epoch`` full batches per
epoch, computed from index.json as total_samples // (world * batch_size), so no rank waits for
another at a collective. Each epoch the shard order is re-permuted (same permutation on every
rank) and each slot reads its part through a shuffle buffer, wrapping around when its part is
short and stopping when its budget is met. Epoch e's stream depends only on (seed, e, rank):
call ``loader.set_epoch(e)`` before iterating (like DistributedSampler); without it, each
iteration advances to the next epoch by itself. With several sources (a shard holds one), each
slot reads every source's part as its own endless shuffled stream and draws the source of each
sample by the sources' weights (``_ShardStream._mix``).

Decode on the device (``on_device=True``, loader.decode_on): the workers only read and shuffle,
and a batch carries its JPEG files (``jpeg``, ``jpeg_sizes``: device_input.pack_jpegs) instead of
``image``; ``device_input.DeviceInput`` decodes and augments it on the training device. Same
samples in the same order as the PIL path (shuffling draws from its own RNG).

Findings (docs/findings.md): when the index has a findings vocabulary (``index.findings``), every
batch also carries ``findings`` (float32 ``B x F``, 1.0 / 0.0 in vocabulary order) and
``findings_mask`` (bool ``B x F``, True where the sample's source annotates the finding; a masked
entry's value is 0.0 and means nothing).

Eval stream (``eval_loader``): every sample of the split exactly once across all ranks and
workers, in a fixed order, no augmentation; the last batch of a worker may be short and ranks
may get different numbers of batches.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
import random
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import LoaderConfig
from .device_input import pack_jpegs
from ..errors import DataError
from .index import LEGACY_SOURCE, Shard, ShardIndex
from .preprocess import decode_film
from .transforms import eval_transform, train_transform, view_seed

Batch = dict[str, Any]


def _read_tar(path: str) -> Iterator[dict]:
    from webdataset.tariterators import tarfile_samples

    yield from tarfile_samples([{"url": path}])


def _slot_samples(shards: list[Shard], n_slots: int, slot: int) -> Iterator[dict]:
    """The raw samples of one slot, for shards in the given order (see the module docstring)."""
    if len(shards) >= n_slots:
        for shard in shards[slot::n_slots]:
            yield from _read_tar(shard.path)
        return
    i = 0
    for shard in shards:
        for sample in _read_tar(shard.path):
            if i % n_slots == slot:
                yield sample
            i += 1


def _slot_count(shards: list[Shard], n_slots: int, slot: int) -> int:
    if len(shards) >= n_slots:
        return sum(s.count for s in shards[slot::n_slots])
    n = sum(s.count for s in shards)
    return max(0, (n - slot + n_slots - 1) // n_slots)


def _shuffled(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle buffer: holds up to ``size`` raw (still encoded) samples, yields a random one."""
    buf: list[dict] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        j = rng.randrange(len(buf))
        buf[j], s = s, buf[j]
        yield s
    rng.shuffle(buf)
    yield from buf


def _collate(items: list[tuple]) -> Batch:
    if isinstance(items[0][0], bytes):  # on_device: the files, packed into one tensor
        data, sizes = pack_jpegs([x[0] for x in items])
        pixels = {"jpeg": data, "jpeg_sizes": sizes}
    else:
        pixels = {"image": torch.stack([x[0] for x in items])}
    if len(items[0]) > 6:  # a findings vocabulary: (values, annotated) per sample
        pixels["findings"] = torch.tensor([x[6][0] for x in items], dtype=torch.float32)
        pixels["findings_mask"] = torch.tensor([x[6][1] for x in items], dtype=torch.bool)
    return {
        **pixels,
        "label": torch.tensor([x[1] for x in items], dtype=torch.int64),
        "key": [x[2] for x in items],
        "uid": [x[3] for x in items],
        "source": [x[4] for x in items],
        "view": [x[5] for x in items],
    }


_LEGACY_VIEWS = {"Frontal": "FRONTAL", "Lateral": "LATERAL"}


def sample_source_view(meta: dict) -> tuple[str, str]:
    """(source, view) of a sample's JSON; shards written before sources existed are IU's, with
    the view taken from their `projection`."""
    view = meta["view"] if "view" in meta else _LEGACY_VIEWS.get(meta.get("projection", ""), "")
    return meta.get("source", LEGACY_SOURCE), view


@dataclass(frozen=True)
class Reading:
    """How one stream reads its shards: train_loader, eval_loader and views_loader each make one."""

    train: bool = False  # shuffled, repeated, `batches_per_epoch` full batches; else every sample once
    seed: int = 0
    batches_per_epoch: int = 0
    # Default: = train. Separate so that the frozen-compute cache can read every sample once *with*
    # augmentation.
    augment: bool | None = None
    # Each sample's augmentation seeded by (seed, epoch, key), so a view of an image is the same
    # whichever rank or worker reads it (test-time augmentation gives the same answer on any number
    # of processes). Otherwise one stream per (rank, worker), cheaper to seed.
    keyed: bool = False
    weights: dict[str, float] | None = None  # source -> share of the training mix
    on_device: bool = False  # yield the JPEG bytes: decoded and augmented by device_input
    findings: tuple[str, ...] = ()  # the index's vocabulary: batches carry findings + findings_mask


class _ShardStream(IterableDataset):
    """Batches of one rank; each DataLoader worker (loader.num_workers) produces its own slot's batches."""

    def __init__(self, shards: list[Shard], cfg: LoaderConfig, rank: int, world: int, reading: Reading) -> None:
        super().__init__()
        self.shards, self.rank, self.world, self.workers = shards, rank, world, max(1, cfg.num_workers)
        self.batch_size, self.buffer, self.train, self.seed = cfg.batch_size, cfg.shuffle_buffer, reading.train, reading.seed
        self.augment = (reading.train if reading.augment is None else reading.augment) and cfg.augment
        self.transform = (train_transform(cfg.input_size, cfg.shift_augment) if self.augment
                          else eval_transform(cfg.input_size))
        self.weights = reading.weights or {}
        self.batches_per_epoch, self.input_size = reading.batches_per_epoch, cfg.input_size
        self.keyed, self.on_device, self.findings = reading.keyed, reading.on_device, tuple(reading.findings)
        self.epoch = 0

    def __len__(self) -> int:
        if self.train:
            return self.batches_per_epoch
        n_slots = self.world * self.workers
        slots = range(self.rank * self.workers, (self.rank + 1) * self.workers)
        return sum(-(-_slot_count(self.shards, n_slots, s) // self.batch_size) for s in slots)

    def _decode(self, sample: dict) -> tuple:
        meta = json.loads(sample["json"])
        tail = (int(sample["cls"]), sample["__key__"], str(meta["uid"]), *sample_source_view(meta))
        if self.findings:  # the sample's annotated findings; a missing one is masked
            targets = meta.get("finding_targets", {})
            tail += (([float(targets.get(f, 0)) for f in self.findings], [f in targets for f in self.findings]),)
        if self.on_device:
            return (sample["jpg"], *tail)
        return (self._image(sample), *tail)

    def _image(self, sample: dict) -> torch.Tensor:
        # PIL rather than torchvision.io.decode_jpeg (deprecated in torchvision 0.29); the same
        # decode as `cxr-dist predict` (preprocess.decode_film), so both see the same pixels.
        img = decode_film(sample["jpg"], self.input_size)
        if self.augment:
            # Augmentation draws from torch's global RNG; swap in this stream's own state so that
            # the stream is reproducible and never disturbs the trainer's RNG (num_workers = 0).
            saved = torch.get_rng_state()
            if self.keyed:
                seed = view_seed(self.seed, self.epoch, sample["__key__"])
                self._rng_state = torch.Generator().manual_seed(seed).get_state()
            torch.set_rng_state(self._rng_state)
            img = self.transform(img)
            self._rng_state = torch.get_rng_state()
            torch.set_rng_state(saved)
        else:
            img = self.transform(img)
        return img

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        slot, n_slots = self.rank * self.workers + worker, self.world * self.workers
        tag = f"{self.seed}-{self.epoch}"
        if not self.train:
            if self.augment:
                aug_seed = random.Random(f"aug-once-{tag}-{self.rank}-{worker}").getrandbits(63)
                self._rng_state = torch.Generator().manual_seed(aug_seed).get_state()
            yield from self._batches(_slot_samples(self.shards, n_slots, slot), None)
            return
        order = list(self.shards)
        random.Random(f"shards-{tag}").shuffle(order)  # same on every rank: the slots stay disjoint
        rng = random.Random(f"buffer-{tag}-{self.rank}-{worker}")
        gen = torch.Generator().manual_seed(random.Random(f"aug-{tag}-{self.rank}-{worker}").getrandbits(63))
        self._rng_state = gen.get_state()
        base, extra = divmod(self.batches_per_epoch, self.workers)
        n_batches = base + (1 if worker < extra else 0)
        by_source: dict[str, list[Shard]] = {}
        for shard in order:
            by_source.setdefault(shard.source, []).append(shard)
        if len(by_source) == 1:
            samples = _shuffled(self._repeat(order, n_slots, slot), self.buffer, rng)
        else:
            samples = self._mix(by_source, n_slots, slot, f"{tag}-{self.rank}-{worker}")
        yield from self._batches(samples, n_batches)

    def _mix(self, by_source: dict[str, list[Shard]], n_slots: int, slot: int, tag: str) -> Iterator[dict]:
        """Sources drawn by their weight for every sample, each from its own endless shuffled
        stream: a 112k-image source does not drown a 7k-image one (equal weights: equal shares)."""
        names = list(by_source)
        streams = [_shuffled(self._repeat(by_source[s], n_slots, slot), self.buffer, random.Random(f"buffer-{tag}-{s}"))
                   for s in names]
        weights = [self.weights.get(s, 1.0) for s in names]
        rng = random.Random(f"mix-{tag}")
        while True:
            yield next(streams[rng.choices(range(len(names)), weights)[0]])

    def _repeat(self, order: list[Shard], n_slots: int, slot: int) -> Iterator[dict]:
        """The slot's samples over and over (the budget stops it); all samples if the slot's part is empty."""
        part = order if _slot_count(order, n_slots, slot) == 0 else None
        while True:
            yield from (_read_all(part) if part is not None else _slot_samples(order, n_slots, slot))

    def _batches(self, samples: Iterator[dict], n_batches: int | None) -> Iterator[Batch]:
        if n_batches == 0:
            return
        items, done = [], 0
        for s in samples:
            items.append(self._decode(s))
            if len(items) == self.batch_size:
                yield _collate(items)
                items, done = [], done + 1
                if n_batches is not None and done >= n_batches:
                    return
        if items and n_batches is None:
            yield _collate(items)


def _read_all(shards: list[Shard]) -> Iterator[dict]:
    for shard in shards:
        yield from _read_tar(shard.path)


class EpochLoader(DataLoader):
    """DataLoader whose stream depends on an epoch number: ``set_epoch(e)`` before iterating;
    without it each new iteration uses the next epoch. Workers are not persistent, so each
    epoch's workers receive the current epoch."""

    def __init__(self, dataset: _ShardStream, num_workers: int) -> None:
        # Own generator: DataLoader draws worker base seeds from it, not from the global RNG
        # (which would otherwise shift the trainer's random numbers at every epoch).
        super().__init__(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False,
                         generator=torch.Generator().manual_seed(0))
        self._next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration produce epoch ``epoch``'s stream."""
        self._next_epoch = int(epoch)

    def __iter__(self):  # type: ignore[override]
        self.dataset.epoch = self._next_epoch
        self._next_epoch += 1
        return super().__iter__()


def train_loader(loader: LoaderConfig, splits: list[str], rank: int, world: int, seed: int,
                 index: ShardIndex, weights: dict[str, float] | None = None,
                 on_device: bool = False) -> tuple[EpochLoader, int]:
    """Augmented, shuffled training batches for ``rank`` of ``world`` from the given splits.

    Returns (loader, batches_per_epoch); every rank gets the same batches_per_epoch, all batches
    full. ``seed`` must be the same on every rank (the shard permutation is shared); the
    per-rank streams differ by construction. Use ``loader.set_epoch(e)`` for epoch e. With
    several sources, ``weights`` ({source: weight}, default 1 each) sets each one's share of the
    batches. ``index``: the shard index, read once by the entry point (index.load_index).
    ``on_device``: batches of JPEG bytes for ``device_input.DeviceInput`` (the module docstring).
    """
    shards = index.shards(splits)
    total = sum(s.count for s in shards)
    if total == 0:
        raise DataError(f"splits {splits} in {index.root} hold no samples")
    # At least one batch even for tiny data (samples then repeat within the epoch).
    batches = max(1, total // (world * loader.batch_size))
    reading = Reading(train=True, seed=seed, batches_per_epoch=batches, weights=weights, on_device=on_device,
                      findings=index.findings)
    ds = _ShardStream(shards, loader, rank, world, reading)
    return EpochLoader(ds, loader.num_workers), batches


def eval_loader(loader: LoaderConfig, split: str, rank: int, world: int, index: ShardIndex,
                on_device: bool = False) -> EpochLoader:
    """Every sample of ``split`` exactly once across all ranks and workers; no augmentation.

    Ranks may yield different numbers of batches (gather results without collectives inside
    the loop). ``len(loader)`` is this rank's number of batches. ``on_device``: batches of JPEG
    bytes, for ``device_input.DeviceInput(..., augment=False)``.
    """
    ds = _ShardStream(index.shards([split]), loader, rank, world, Reading(on_device=on_device, findings=index.findings))
    return EpochLoader(ds, loader.num_workers)


def views_loader(loader: LoaderConfig, splits: list[str], rank: int, world: int, seed: int,
                 index: ShardIndex, keyed: bool = False) -> EpochLoader:
    """Every sample of ``splits`` exactly once across ranks, in a fixed order, augmented with a
    stream seeded by (seed, epoch): ``set_epoch(v)`` gives view v. For the frozen-compute cache;
    ``keyed``: seeded per sample, the same views on any number of ranks and workers (for TTA)."""
    reading = Reading(seed=seed, augment=True, keyed=keyed, findings=index.findings)
    ds = _ShardStream(index.shards(splits), loader, rank, world, reading)
    return EpochLoader(ds, loader.num_workers)
