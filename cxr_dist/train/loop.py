"""Two-phase training: `accelerate launch -m cxr_dist.train --config configs/X.toml [--train.seed 3 ...]`.

The loop reads top to bottom: for each phase of the config, freeze/unfreeze, (re)build the
optimizer and let Accelerate wrap the model; for each epoch, train a fixed number of batches,
evaluate on the validation split, step ReduceLROnPlateau once on the reduced metric, checkpoint,
log. Only the main process writes files, prints and logs; the others get a do-nothing tracker.

This module is the loop and nothing else: the train state that checkpoints save and resume
restores is `train_state.py`, the frozen-compute cache `cache.py`, and the evaluation of the best
checkpoint with the files a run leaves behind `final.py`.
"""
from __future__ import annotations

import argparse
import math
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import dist
from ..model.feature_cache import CachedBatches, cached_eval_batches, frozen_caches
from ..model.checkpoint import latest_checkpoint
from ..config import Config, ConfigError, PhaseConfig, describe_fields, dump_toml, load_config, to_dict, train_sources
from ..data.device_input import DeviceInput, decode_where
from ..errors import run_main
from ..eval.evaluate import evaluate_split
from .end_of_run import finish
from ..data.index import LEGACY_SOURCE, class_counts, has_views, load_index, source_view_counts, train_val_splits
from ..log import bars_enabled
from ..log import setup as setup_logging
from ..eval.metrics import compute_metrics, metric_mode, scalar_metrics, summary_line, view_name
from ..data.mixing import SampleWeightedLoss, loss_weight_table, source_weights
from ..model.classifier import CXRClassifier, build_model, count_trainable, logits_of, param_groups, weights_source
from ..data.stream import train_loader
from ..runs.tracking import check_reachable, make_tracker, resolve_uri
from .state import Progress, load_latest, optimizer_epoch, restore_rng, restore_state, save_state


def phase_at(phases: tuple[PhaseConfig, ...], epoch: int) -> int:
    """Index of the phase that 1-based `epoch` belongs to (phases run back to back)."""
    end = 0
    for i, phase in enumerate(phases):
        end += phase.epochs
        if epoch <= end:
            return i
    raise ValueError(f"epoch {epoch} is past the last phase ({end} epochs in all)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def improved(value: float, best: float, mode: str) -> bool:
    """Whether `value` beats `best` (a non-finite best means none yet; NaN never improves)."""
    if math.isnan(value):
        return False
    return not math.isfinite(best) or (value > best if mode == "max" else value < best)


def stop_early(history: list[dict], first_epoch: int, metric: str, mode: str, patience: int) -> bool:
    """Whether the phase that began at `first_epoch` is over: `patience` > 0 epochs of it in a row
    without a new best of `val/<metric>` within the phase. A pure function of the history, so a
    resumed run stops where the uninterrupted one would."""
    values = [row.get(f"val/{metric}", math.nan) for row in history if row["epoch"] >= first_epoch]
    if patience <= 0 or len(values) <= patience:
        return False
    best, best_at = math.nan, -1
    for i, v in enumerate(values):
        if improved(v, best, mode):
            best, best_at = v, i
    return len(values) - 1 - best_at >= patience


def check_metrics(cfg: Config, index: dict, val_split: str) -> None:
    """Fail before any work when the validation split cannot rank checkpoints: the AUROC-based
    metrics of train.best_metric / plateau_metric are undefined on a split with one class."""
    labels = index["splits"][val_split]["labels"]
    for field in ("best_metric", "plateau_metric"):
        name = getattr(cfg.train, field)
        if "auroc" in name and min(labels["normal"], labels["abnormal"]) == 0:
            raise ConfigError(
                f"train.{field} = {name!r} needs both classes in the validation split {val_split!r}, which has "
                f"{labels['normal']} normal and {labels['abnormal']} abnormal images (AUROC is undefined): "
                f"use a loss-based metric (--train.{field} loss) or a larger validation split")
    sources = train_sources(cfg.data)
    split = index["splits"][val_split]
    # What validation will report: the sources and views of the split (a version-1 index: IU, no views).
    in_val = split.get("sources") or {LEGACY_SOURCE: {"views": {}}}
    views = {view_name(v) for info in in_val.values() for v in info["views"]}
    for field in ("best_metric", "plateau_metric"):
        name = getattr(cfg.train, field)
        kind, _, rest = name.partition("/")
        group = rest.split("/")[0]
        if kind == "source" and group not in sources:
            raise ConfigError(f"train.{field} = {name!r} names a source that is not trained on "
                              f"(training sources: {', '.join(sources)})")
        if (kind == "source" and group not in in_val) or (kind == "view" and has_views(index) and group not in views):
            raise ConfigError(f"train.{field} = {name!r}: the validation split {val_split!r} has no images of that "
                              f"{kind} (sources: {', '.join(in_val)}; views: {', '.join(sorted(views)) or 'not recorded'})")


def train(cfg: Config, accelerator, tracker, index: dict | None = None) -> tuple[bool, CXRClassifier]:
    """Run (or resume) the whole schedule. Returns (finished, model); not finished = preempted.
    `index`: the shard index (`main` has read it already; read here only for callers without one),
    passed on to everything that reads the shards."""
    t, rank, world = cfg.train, accelerator.process_index, accelerator.num_processes
    run_dir = Path(t.run_dir)
    index = index or load_index(cfg.data.shards_dir)
    train_splits, val_split = train_val_splits(cfg.data)
    check_metrics(cfg, index, val_split)
    counts = class_counts(index, train_splits)
    # Class weights within each source (and view x label cells with data.balance_views).
    if cfg.data.balance_views and not has_views(index):
        raise ConfigError("data.balance_views needs shards that record views: prepare them again")
    table = loss_weight_table(source_view_counts(index, train_splits), cfg.data.balance_views)
    loss_fn = SampleWeightedLoss(table if t.class_weighted_loss else None).to(accelerator.device)
    weights = source_weights(cfg.data)
    # data.decode_on: decode and augment in the workers (PIL) or on the training device (the GPU's
    # input pipeline, device_input.py); the frozen-compute cache has its own loader.
    on_device = decode_where(cfg.data, accelerator.device) == "device" and not t.cache_views
    loader, batches_per_epoch = train_loader(cfg.data, train_splits, rank, world, t.seed, index, weights,
                                             on_device=on_device)
    inputs = DeviceInput(cfg.data, accelerator.device, t.seed, rank) if on_device else None
    accelerator.print(f"training images decoded and augmented on {accelerator.device if on_device else 'the workers'}")

    seed_everything(t.seed)
    raw = build_model(cfg.model)
    train_cache = val_cache = None
    if t.cache_views:
        train_cache, val_cache = frozen_caches(cfg, raw, index, train_splits, val_split, accelerator)
    progress, saved, latest = load_latest(run_dir, raw) if t.resume else (Progress(), None, None)
    if latest is not None:
        accelerator.print(f"resuming from {latest} after epoch {progress.epoch} (step {progress.step_in_epoch})")
    watch = dist.PreemptionWatch(run_dir)
    if accelerator.is_main_process:
        watch.clear()
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(dump_toml(cfg))
    dist.barrier()
    tracker.log_params({
        **to_dict(cfg), "world_size": world, "mixed_precision": accelerator.mixed_precision,
        "weights_source": weights_source(cfg.model), "data_checksum": index.get("checksum", ""),
        "train_counts": list(counts), "batches_per_epoch": batches_per_epoch,
        "deepspeed": accelerator.state.deepspeed_plugin is not None,
    })
    tracker.log_artifact(run_dir / "config.toml")

    total = t.total_epochs
    mode = metric_mode(t.best_metric, t.best_mode)
    first_epoch = 1
    for p_idx, phase in enumerate(t.phases):
        last_epoch = first_epoch + phase.epochs - 1
        if progress.epoch >= last_epoch:
            first_epoch = last_epoch + 1
            continue
        # Re-wrap at every phase boundary: DDP and DeepSpeed only synchronise parameters that
        # required grad when they were built (trap in docs/architecture.md).
        accelerator.free_memory()
        raw.set_phase(phase.unfreeze_blocks)
        val_batches = None
        if train_cache is not None:  # carry the cache to this phase's split point
            loader = CachedBatches(train_cache.at_depth(raw, phase.unfreeze_blocks), cfg.data.batch_size,
                                   batches_per_epoch, t.seed, rank, weights)
            phase_val = val_cache.at_depth(raw, phase.unfreeze_blocks)
            val_batches = lambda: cached_eval_batches(phase_val)  # noqa: E731
        optimizer = torch.optim.Adam(param_groups(raw, phase), weight_decay=t.weight_decay)
        model, optimizer = accelerator.prepare(raw, optimizer)
        # Not prepared: Accelerate would step it once per process (patience runs out N times faster).
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=t.plateau_mode, factor=t.plateau_factor, patience=t.plateau_patience)
        resume = None
        # The saved optimizer belongs to the phase of the epoch the checkpoint was taken in.
        if saved is not None and phase_at(t.phases, optimizer_epoch(progress)) == p_idx:
            resume = restore_state(saved, optimizer, scheduler, rank)
        saved = None
        accelerator.print(f"phase {p_idx + 1}/{len(t.phases)} '{phase.name}': epochs {first_epoch}-{last_epoch}, "
                          f"{count_trainable(raw):,} trainable parameters")
        for epoch in range(max(first_epoch, progress.epoch + 1), last_epoch + 1):
            if stop_early(progress.history, first_epoch, t.best_metric, mode, t.early_stop_patience):
                accelerator.print(f"phase {p_idx + 1} '{phase.name}' stops early after epoch {epoch - 1}: "
                                  f"val/{t.best_metric} has not improved for {t.early_stop_patience} epochs")
                break
            t0 = time.time()
            train_m, partial = train_epoch(cfg, accelerator, model, optimizer, loss_fn, loader,
                                           batches_per_epoch, epoch, progress, watch, resume, inputs)
            resume = None
            if partial is not None:  # preempted at an agreed step
                save_state(accelerator, run_dir, raw, optimizer, scheduler, progress, cfg, tag="latest",
                           partial=partial)
                if accelerator.is_main_process:
                    watch.mark_preempted({"epoch": epoch, "step": progress.step_in_epoch})
                accelerator.print(f"preempted in epoch {epoch} at step {progress.step_in_epoch}: checkpoint saved")
                return False, raw
            val_m = evaluate_split(accelerator.unwrap_model(model), cfg.data, val_split, accelerator, loss_fn,
                                   batches=val_batches() if val_batches else None, index=index)
            scheduler.step(val_m[t.plateau_metric])  # same reduced value on every rank
            row = {"epoch": epoch, "phase": p_idx + 1, "epoch_time_s": time.time() - t0,
                   "images_per_s": batches_per_epoch * cfg.data.batch_size * world / (time.time() - t0),
                   **scalar_metrics(train_m, "train/"), **scalar_metrics(val_m, "val/"),
                   **{f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups}}
            progress.epoch, progress.step_in_epoch = epoch, 0
            progress.history.append(row)
            is_best = improved(val_m[t.best_metric], progress.best, mode)
            if is_best:
                progress.best = val_m[t.best_metric]
            save_state(accelerator, run_dir, raw, optimizer, scheduler, progress, cfg, tag="latest", best=is_best)
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            accelerator.print(summary_line(epoch, phase.name, train_m, val_m, total))
        first_epoch = last_epoch + 1
    finish(cfg, accelerator, raw, tracker, progress.history, progress.epoch, val_split, index)
    return True, raw


def train_epoch(cfg, accelerator, model, optimizer, loss_fn, loader, n_batches, epoch, progress, watch,
                resume=None, inputs=None):
    """One epoch of `n_batches` steps (the same on every rank).

    Returns (metrics, None), or (None, partial) when preempted: this rank's predictions so far,
    saved so that the resumed epoch reports the same metrics. Resuming mid-epoch,
    `progress.step_in_epoch` batches are skipped (the stream is a function of the epoch, so they
    are the ones already trained on) and `resume` (this rank's RNG state and partial
    predictions at the preemption) is restored before the first new step. `inputs`: a
    `device_input.DeviceInput` for loaders that yield JPEG bytes (data.decode_on = device): it
    decodes and augments a batch or two ahead, seeded by (epoch, step), so skipped batches need
    no decoding.
    """
    t = cfg.train
    model.train()
    # Epoch-seeded RNG for dropout; the stream seeds its shuffling and augmentation from
    # (seed, epoch, rank, worker) itself. So a resumed run replays an epoch exactly.
    seed_everything(t.seed * 1000 + epoch * 10 + accelerator.process_index)
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    skip, progress.step_in_epoch = progress.step_in_epoch, 0
    probs, labels, loss_sum = [], [], 0.0
    if resume and resume.get("partial"):
        probs, labels = [resume["partial"]["probs"]], [resume["partial"]["labels"]]
        loss_sum = resume["partial"]["loss_sum"]
    bar = tqdm(total=n_batches, desc=f"epoch {epoch}", disable=not bars_enabled(accelerator.is_main_process),
               leave=False, dynamic_ncols=True, file=sys.stderr)
    batches = inputs.batches(loader, epoch, n_batches, skip) if inputs is not None else loader
    for step, batch in enumerate(batches):
        if step >= n_batches:
            break
        if step < skip:  # resuming mid-epoch: these batches were trained before the preemption
            bar.update(1)
            continue
        if step == skip and resume is not None:
            restore_rng(resume)
        if watch.requested():
            progress.step_in_epoch = step
            return None, {"probs": _cat(probs), "labels": _cat(labels), "loss_sum": loss_sum}
        y = batch["label"].to(accelerator.device, non_blocking=True)
        with accelerator.accumulate(model):
            logits = logits_of(model, batch, accelerator.device)
            loss = loss_fn(logits.float(), y, batch["source"], batch["view"])  # per-source (and view) weights
            accelerator.backward(loss)
            if accelerator.sync_gradients and t.clip_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.item() * len(y)
        probs.append(torch.softmax(logits.detach().float(), 1)[:, 1].cpu())
        labels.append(y.cpu())
        if step % t.log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update(1)
    bar.close()
    # Training metrics over every (augmented) sample the epoch saw, on all ranks: gathered, then
    # computed once. Each rank sees different samples, so nothing is averaged per rank.
    parts = dist.gather_objects((_cat(probs).numpy(), _cat(labels).numpy(), loss_sum))
    p = np.concatenate([q for q, _, _ in parts])
    y = np.concatenate([l for _, l, _ in parts])
    return compute_metrics(p, y, loss=sum(s for _, _, s in parts) / max(len(y), 1)), None


def _cat(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(xs) if xs else torch.zeros(0)


def _exit_on_signal(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Train; a UserError (ConfigError included) propagates to `run_main`, which prints it."""
    parser = argparse.ArgumentParser(prog="cxr_dist.train", description=__doc__.splitlines()[0],
                                     epilog=describe_fields(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML file (see configs/); dotted overrides follow, e.g. --train.seed 3")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    index = load_index(cfg.data.shards_dir)  # missing shards: say so before any MLflow run is opened
    if cfg.tracking.enabled:
        # On every rank, before the process group exists: all ranks stop with this message
        # instead of rank 0 returning while the others die at its first barrier.
        check_reachable(resolve_uri(cfg.tracking.uri))
    accelerator = dist.make_accelerator(cfg.train, cfg.data)
    setup_logging(accelerator.is_main_process, accelerator.process_index)
    resuming = cfg.train.resume and latest_checkpoint(cfg.train.run_dir) is not None
    tracker = make_tracker(cfg.tracking, accelerator.is_main_process, cfg.train.run_dir, resume=resuming)
    # SIGTERM (scancel, the time limit, torchrun stopping the other ranks after one failed)
    # kills without unwinding and would leave the MLflow run RUNNING; as SystemExit it ends
    # the run KILLED. (SLURM's early warning is SIGUSR1/PREEMPT, handled by dist.PreemptionWatch.)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    with tracker:
        finished, _ = train(cfg, accelerator, tracker, index)
        if not finished:  # the requeued job reopens this MLflow run
            tracker.finish("KILLED")
    # A preempted run also exits 0 (run_dir/PREEMPTED tells the batch script to requeue it).
    dist.hard_exit_if_distributed(0)
    return 0

