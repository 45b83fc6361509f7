"""The run context: everything one training process holds, built once and handed around whole.

`Run.build(cfg, accelerator, tracker, index)` makes, in this order (the order fixes the random
numbers each part draws, so a run is reproducible): the loss with its class weights, the training
batches (the stream, decoded in the workers or on the device), the model, the frozen-compute cache,
the text tables of a text model or of report supervision, and the progress of a previous attempt
(resume). `run.start_phase(i)` sets phase i's depth explicitly (`model.set_phase`), builds its
optimizer and scheduler and lets Accelerate wrap the model; saving and restoring the train state go
through the run (`state.save_state(run, ...)`), like torchtitan's Trainer and its Stateful parts.

Nothing here decides *when*: that is the loop (loop.py), which reads top to bottom.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import dist
from ..config import Config, ConfigError, PhaseConfig
from ..data.device_input import DeviceInput, decode_where
from ..data.index import ShardIndex, train_val_splits
from ..data.mixing import SampleWeightedLoss, loss_weight_table, source_weights
from ..data.stream import train_loader
from ..data.text import read_texts
from ..model.classifier import CXRClassifier, build_model, param_groups
from ..model.feature_cache import CachedBatches, FeatureCache, cached_eval_batches, frozen_caches
from ..model.findings_head import FindingsTable, MaskedBCE, head_findings, positive_weights
from ..model.text_inputs import TextTable, build_table
from .state import Progress, load_latest, optimizer_epoch, restore_state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def phase_at(phases: tuple[PhaseConfig, ...], epoch: int) -> int:
    """Index of the phase that 1-based `epoch` belongs to (phases run back to back)."""
    end = 0
    for i, phase in enumerate(phases):
        end += phase.epochs
        if epoch <= end:
            return i
    raise ValueError(f"epoch {epoch} is past the last phase ({end} epochs in all)")


@dataclass
class Run:
    cfg: Config
    accelerator: Any
    tracker: Any
    index: ShardIndex
    train_splits: list[str]
    val_split: str
    model: CXRClassifier  # the unwrapped model (checkpoints, evaluation)
    loss_fn: torch.nn.Module
    loader: Any  # the training batches of the stream (phases with a cache replace them)
    batches_per_epoch: int
    inputs: DeviceInput | None  # decodes and augments JPEG batches on the device (loader.decode_on)
    watch: dist.PreemptionWatch
    progress: Progress
    saved: dict | None  # the train state of the checkpoint resumed from, until its phase starts
    caches: tuple[FeatureCache, FeatureCache] | None = None  # frozen-compute cache: (train, val)
    reports: TextTable | None = None  # report supervision: report embeddings by key
    findings_loss: MaskedBCE | None = None  # shards with findings: the findings head's loss
    # Set by start_phase: the phase's wrapped model, optimizer and scheduler.
    wrapped: Any = None
    optimizer: Any = None
    scheduler: Any = None
    val_batches: Callable[[], Any] | None = field(default=None, repr=False)
    # Under DeepSpeed ZeRO-3: a plain copy of the model that eval_model() fills with the whole weights.
    whole: CXRClassifier | None = field(default=None, repr=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.run_dir)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @classmethod
    def build(cls, cfg: Config, accelerator, tracker, index: ShardIndex) -> "Run":
        t, rank, world = cfg.train, accelerator.process_index, accelerator.num_processes
        train_splits, val_split = train_val_splits(cfg.data)
        # Class weights within each source (and view x label cells with loader.balance_views).
        if cfg.loader.balance_views and not index.has_views:
            raise ConfigError("loader.balance_views needs shards that record views: prepare them again")
        table = loss_weight_table(index.source_view_counts(train_splits), cfg.loader.balance_views)
        loss_fn = SampleWeightedLoss(table if t.class_weighted_loss else None).to(accelerator.device)
        # loader.decode_on: decode and augment in the workers (PIL) or on the training device (the GPU's
        # input pipeline, device_input.py); the frozen-compute cache has its own loader.
        on_device = decode_where(cfg.loader, accelerator.device) == "device" and not t.cache_views
        loader, batches = train_loader(cfg.loader, train_splits, rank, world, t.seed, index, source_weights(cfg.data),
                                       on_device=on_device)
        inputs = DeviceInput(cfg.loader, accelerator.device, t.seed, rank) if on_device else None
        accelerator.print(f"training images decoded and augmented on {accelerator.device if on_device else 'the workers'}")

        seed_everything(t.seed)
        # Shards with findings (data.findings) and train.findings_weight > 0: a findings head
        # beside the abnormal head, its targets looked up by key (the cache's batches carry none).
        findings = head_findings(index) if t.findings_weight > 0 else ()
        model = build_model(cfg.model, findings)
        findings_loss = None
        if findings:
            model.findings_table = FindingsTable.build(index, [*train_splits, val_split], findings)
            findings_loss = MaskedBCE(positive_weights(index, train_splits, findings)).to(accelerator.device)
            accelerator.print(f"findings head: {', '.join(findings)}")
        caches = frozen_caches(cfg, model, index, train_splits, val_split, accelerator) if t.cache_views else None
        reports = _text_tables(cfg, model, index, train_splits, accelerator)
        progress, saved, latest = load_latest(t.run_dir, model) if t.resume else (Progress(), None, None)
        if latest is not None:
            accelerator.print(f"resuming from {latest} after epoch {progress.epoch} (step {progress.step_in_epoch})")
        return cls(cfg=cfg, accelerator=accelerator, tracker=tracker, index=index, train_splits=train_splits,
                   val_split=val_split, model=model, loss_fn=loss_fn, loader=loader, batches_per_epoch=batches,
                   inputs=inputs, watch=dist.PreemptionWatch(t.run_dir), progress=progress, saved=saved,
                   caches=caches, reports=reports, findings_loss=findings_loss)

    def train_counts(self) -> tuple[int, int]:
        return self.index.class_counts(self.train_splits)

    def start_phase(self, p_idx: int) -> dict | None:
        """Phase `p_idx`: its depth (the backbone's and the text encoder's trainable layers), the
        batches at that depth, a new optimizer and scheduler, the model wrapped again. Returns this
        rank's saved RNG and partial epoch when the checkpoint resumed from was taken in this phase."""
        t, phase = self.cfg.train, self.cfg.train.phases[p_idx]
        # Re-wrap at every phase boundary: DDP and DeepSpeed only synchronise parameters that
        # required grad when they were built (trap in docs/architecture.md).
        self.accelerator.free_memory()
        if dist.zero_stage(self.accelerator) == 3 and self.whole is None:  # before ZeRO-3 partitions it
            self.whole = copy.deepcopy(self.model).to(self.accelerator.device)
        for model in (self.model, self.whole):
            if model is not None:
                model.set_phase(phase.unfreeze_blocks, phase.unfreeze_text_layers, phase.text_lora)
        if self.model.text_table is not None:  # once the encoder trains, cached embeddings are stale
            self.model.text_table.tokens = any(p.unfreeze_text_layers or p.text_lora for p in t.phases[: p_idx + 1])
        self.val_batches = None
        if self.caches is not None:  # carry the cache to this phase's split point
            train_cache, val_cache = self.caches
            self.loader = CachedBatches(train_cache.at_depth(self.model, phase.unfreeze_blocks), self.cfg.loader.batch_size,
                                        self.batches_per_epoch, t.seed, self.rank, source_weights(self.cfg.data))
            phase_val = val_cache.at_depth(self.model, phase.unfreeze_blocks)
            self.val_batches = lambda: cached_eval_batches(phase_val)
        optimizer = torch.optim.Adam(param_groups(self.model, phase), weight_decay=self.cfg.optimizer.weight_decay)
        self.wrapped, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        # Not prepared: Accelerate would step it once per process (patience runs out N times faster).
        sch = self.cfg.schedule
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode=sch.plateau_mode, factor=sch.plateau_factor, patience=sch.plateau_patience)
        resume = None
        # The saved optimizer belongs to the phase of the epoch the checkpoint was taken in.
        if self.saved is not None and phase_at(t.phases, optimizer_epoch(self.progress)) == p_idx:
            resume = restore_state(self.saved, self)
        self.saved = None
        return resume


    def eval_model(self) -> CXRClassifier:
        """The model to evaluate and hand out: the trained model itself or, under DeepSpeed ZeRO-3, a
        whole copy on every rank. ZeRO-3 keeps a partition of each trained parameter per rank and
        gathers them inside every forward, a collective that ranks with unequal numbers of
        evaluation batches would deadlock on; the copy is gathered once, here (every rank calls
        this). It costs one more copy of the weights per rank, not of the optimizer state."""
        if self.whole is None:
            return self.model
        self.whole.load_state_dict(dist.whole_state(self.model, self.accelerator, everywhere=True))
        self.whole.text_table, self.whole.findings_table = self.model.text_table, self.model.findings_table
        return self.whole


def _text_tables(cfg: Config, model: CXRClassifier, index: ShardIndex, train_splits: list[str],
                 accelerator) -> TextTable | None:
    """The text a text model reads (every split of the index, attached to the model) and, with
    report supervision, the report embeddings of the training splits (returned). The main process
    embeds first and caches on disk; the other ranks then load the same files."""
    m, t = cfg.model, cfg.train
    if not (model.uses_text or m.report_supervision > 0):
        return None
    cache_dir = Path(t.cache_dir or Path(t.run_dir) / "cache")
    encoder = model.text_encoder
    if encoder is None:  # report supervision of an image model: the encoder embeds reports only
        from ..model.text_encoder import build_text_encoder

        encoder = build_text_encoder(m.text_encoder, m.text_pooling, m.max_tokens)
    splits = [s for s in index.split_names if index.has_samples(s)]
    reports = None
    for turn in ("main", "others"):  # the main process computes, then the others load its files
        if accelerator.is_main_process == (turn == "main"):
            if model.uses_text:
                model.text_table = build_table(read_texts(index, splits, cfg.loader.text_fields), encoder,
                                               cache_dir, "input", accelerator.print)
            if m.report_supervision > 0:
                reports = build_table(read_texts(index, train_splits, cfg.loader.report_fields), encoder,
                                      cache_dir, "report", accelerator.print)
        dist.barrier()
    return reports
