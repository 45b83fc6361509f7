"""Two-phase training: `accelerate launch -m cxr_dist.train --config configs/X.toml [--train.seed 3 ...]`.

The loop reads top to bottom: for each phase of the config, freeze/unfreeze, (re)build the
optimizer and let Accelerate wrap the model; for each epoch, train a fixed number of batches,
evaluate on the validation split, step ReduceLROnPlateau once on the reduced metric, checkpoint,
log. Only the main process writes files, prints and logs; the others get a do-nothing tracker.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from . import dist
from .config import Config, PhaseConfig, describe_fields, dump_toml, load_config, to_dict
from .errors import run_main
from .log import bars_enabled
from .log import setup as setup_logging
from .cache import CachedBatches, FeatureCache, build_cache, cache_name, cached_eval_batches, cached_on_disk, seed_views
from .evaluate import evaluate_split, logits_of, predictions_csv, report
from .config import ConfigError, train_sources
from .index import class_counts, has_views, load_index, source_view_counts
from .metrics import balanced_threshold, compute_metrics, scalar_metrics, summary_line
from .mix import SampleWeightedLoss, loss_weight_table, source_weights
from .model import CXRClassifier, build_model, count_trainable, param_groups, weights_source
from .split import train_val_splits
from .stream import train_loader
from .tracking import check_reachable, make_tracker, resolve_uri


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # >0 only in a checkpoint taken mid-epoch at preemption
    best: float = -math.inf  # best value of train.best_metric on validation (non-finite: none yet)
    history: list[dict] = field(default_factory=list)  # one row of metrics per completed epoch


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


def metric_mode(name: str, mode: str = "") -> str:
    """"max" or "min" for a validation metric: `mode` when given, else "min" for loss-like names."""
    return mode or ("min" if name.endswith("loss") else "max")


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
    for field in ("best_metric", "plateau_metric"):
        name = getattr(cfg.train, field)
        if name.startswith("source/") and name.split("/")[1] not in sources:
            raise ConfigError(f"train.{field} = {name!r} names a source that is not trained on "
                              f"(training sources: {', '.join(sources)})")


def _frozen_caches(cfg: Config, raw: CXRClassifier, index: dict, train_splits: list[str], val_split: str,
                   accelerator) -> tuple[FeatureCache, FeatureCache]:
    """This rank's train and val caches of the frozen part, loaded from train.cache_dir or built."""
    t, rank, world = cfg.train, accelerator.process_index, accelerator.num_processes
    t0, show = time.time(), bars_enabled(accelerator.is_main_process)
    raw.set_phase(max(p.unfreeze_blocks for p in t.phases))
    cache_dir = Path(t.cache_dir or Path(t.run_dir) / "cache")
    # Everything the cached tensors depend on; the frozen part does not depend on the head.
    inputs = {"data": to_dict(cfg.data), "checksum": index.get("checksum", ""), "seed": t.seed,
              "backbone": [cfg.model.backbone, cfg.model.pretrained, cfg.model.weights],
              "depth": raw.unfrozen_blocks, "rank": rank, "world": world}
    train_cache = cached_on_disk(
        cache_dir / cache_name(f"train-r{rank}", {**inputs, "splits": train_splits, "views": t.cache_views}),
        lambda: build_cache(raw, cfg.data, train_splits, rank, world, t.cache_views, seed_views(t.seed),
                            accelerator.device, augment=True, show=show, index=index), accelerator.print)
    val_cache = cached_on_disk(
        cache_dir / cache_name(f"val-r{rank}", {**inputs, "splits": [val_split]}),
        lambda: build_cache(raw, cfg.data, [val_split], rank, world, 1, 0, accelerator.device,
                            augment=False, show=show, index=index), accelerator.print)
    accelerator.print(f"frozen-compute cache: {t.cache_views} views of {len(train_cache.keys)} training images "
                      f"on this rank, {tuple(train_cache.feats.shape[2:])} each, ready in {time.time() - t0:.0f} s")
    return train_cache, val_cache


def train(cfg: Config, accelerator, tracker, index: dict | None = None) -> tuple[bool, CXRClassifier]:
    """Run (or resume) the whole schedule. Returns (finished, model); not finished = preempted.
    `index`: the shard index, when the caller has read it already."""
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
    loader, batches_per_epoch = train_loader(cfg.data, train_splits, rank, world, t.seed, index, weights)

    seed_everything(t.seed)
    raw = build_model(cfg.model)
    train_cache = val_cache = None
    if t.cache_views:
        train_cache, val_cache = _frozen_caches(cfg, raw, index, train_splits, val_split, accelerator)
    progress, saved = Progress(), None
    latest = ckpt.latest_checkpoint(run_dir) if t.resume else None
    if latest is not None:
        model_state, saved, meta = ckpt.load_checkpoint(latest)
        raw.load_state_dict(model_state)
        progress = Progress(**meta["progress"])
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
            loader = CachedBatches(train_cache.for_phase(raw), cfg.data.batch_size, batches_per_epoch, t.seed, rank,
                                   weights)
            phase_val = val_cache.for_phase(raw)
            val_batches = lambda: cached_eval_batches(phase_val)  # noqa: E731
        optimizer = torch.optim.Adam(param_groups(raw, phase), weight_decay=t.weight_decay)
        model, optimizer = accelerator.prepare(raw, optimizer)
        # Not prepared: Accelerate would step it once per process (patience runs out N times faster).
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=t.plateau_mode, factor=t.plateau_factor, patience=t.plateau_patience)
        resume = None
        # The saved optimizer belongs to the phase of the epoch the checkpoint was taken in: the
        # running one when mid-epoch, else the last completed one (a checkpoint taken after a
        # phase's last epoch must not be loaded into the next phase's optimizer).
        saved_epoch = progress.epoch + 1 if progress.step_in_epoch else max(progress.epoch, 1)
        if saved is not None and phase_at(t.phases, saved_epoch) == p_idx:
            resume = _restore(saved, optimizer, scheduler, rank)
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
                                           batches_per_epoch, epoch, progress, watch, resume)
            resume = None
            if partial is not None:  # preempted at an agreed step
                _save(accelerator, run_dir, raw, optimizer, scheduler, progress, cfg, tag="latest", partial=partial)
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
            _save(accelerator, run_dir, raw, optimizer, scheduler, progress, cfg, tag="latest", best=is_best)
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            accelerator.print(summary_line(epoch, phase.name, train_m, val_m, total))
        first_epoch = last_epoch + 1
    _finish(cfg, accelerator, raw, tracker, progress, val_split, index)
    return True, raw


def train_epoch(cfg, accelerator, model, optimizer, loss_fn, loader, n_batches, epoch, progress, watch,
                resume=None):
    """One epoch of `n_batches` steps (the same on every rank).

    Returns (metrics, None), or (None, partial) when preempted: this rank's predictions so far,
    saved so that the resumed epoch reports the same metrics. Resuming mid-epoch,
    `progress.step_in_epoch` batches are skipped (the stream is a function of the epoch, so they
    are the ones already trained on) and `resume` (this rank's RNG state and partial
    predictions at the preemption) is restored before the first new step.
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
    for step, batch in enumerate(loader):
        if step >= n_batches:
            break
        if step < skip:  # resuming mid-epoch: these batches were trained before the preemption
            bar.update(1)
            continue
        if step == skip and resume is not None:
            ckpt.set_rng_state(resume["rng"])
        if watch.requested():
            progress.step_in_epoch = step
            return None, {"probs": _cat(probs), "labels": _cat(labels), "loss_sum": loss_sum}
        y = batch["label"].to(accelerator.device, non_blocking=True)
        with accelerator.accumulate(model):
            logits = logits_of(model, batch, accelerator.device)
            loss = loss_fn(logits.float(), y)
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


def _restore(saved: dict, optimizer, scheduler, rank: int) -> dict | None:
    """Optimizer and scheduler state into this phase's objects; returns this rank's saved
    {"rng", "partial"} (None if the checkpoint came from fewer ranks: a new world size)."""
    if saved.get("optimizer") is not None:
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    ranks = saved.get("ranks", [])
    return ranks[rank] if rank < len(ranks) else None


def _save(accelerator, run_dir, raw, optimizer, scheduler, progress, cfg, tag, best=False, partial=None) -> None:
    """Checkpoint from the main process; every rank contributes its RNG state (collective)."""
    ranks = dist.gather_objects({"rng": ckpt.rng_state(), "partial": partial})
    if accelerator.is_main_process:
        # DeepSpeed partitions optimizer state across ranks; its resume restores weights, schedule
        # and RNG but restarts Adam's moments (documented in docs/training.md).
        opt_state = None if accelerator.state.deepspeed_plugin is not None else optimizer.state_dict()
        model_state = {k: v.detach().cpu() for k, v in raw.state_dict().items()}
        state = {"optimizer": opt_state, "scheduler": scheduler.state_dict(), "ranks": ranks}
        meta = {"progress": progress.__dict__, "config": to_dict(cfg)}
        ckpt.save_checkpoint(run_dir, tag, model_state, state, meta)
        if best:  # hard links: checkpoints are never modified in place
            ckpt.copy_as(run_dir, tag, "best")
    dist.barrier()


def _finish(cfg, accelerator, raw: CXRClassifier, tracker, progress: Progress, val_split: str,
            index: dict) -> None:
    """After the last epoch: the best weights on val and test, figures, evaluation JSON, model.

    Collective (every rank evaluates its share); files and logging on the main process only.
    """
    run_dir = Path(cfg.train.run_dir)
    if ckpt.find_checkpoint(run_dir, "best") is None:
        # No epoch ever had a defined val/<best_metric> (e.g. NaN throughout): the last weights stand in.
        accelerator.print(f"no epoch improved val/{cfg.train.best_metric}: evaluating the latest checkpoint as best")
        if accelerator.is_main_process:
            ckpt.copy_as(run_dir, "latest", "best")
        dist.barrier()
    state, _ = ckpt.load_model_state(run_dir / "checkpoints" / "best")
    best = copy.deepcopy(raw)  # the caller keeps the final weights
    best.load_state_dict(state)
    splits = {"val": val_split}
    for name in ("test", "external"):  # external: the sources never trained on (cross-source evaluation)
        if index["splits"].get(name, {}).get("total", 0):
            splits[name] = name
    preds = {name: evaluate_split(best, cfg.data, split, accelerator, with_predictions=True,
                                  views=cfg.train.tta_views, index=index)["predictions"]
             for name, split in splits.items()}
    if accelerator.is_main_process:
        from .plots import confusion_figure, roc_pr_figure, training_figure

        evaluation = {name: report(p) for name, p in preds.items()}
        if len(np.unique(preds["val"]["labels"])) == 2:
            # Accuracy and F1 at 0.5 drift with calibration; the threshold with the best balanced
            # accuracy on val, applied to test, is the honest alternative (picked without test).
            threshold = balanced_threshold(preds["val"]["probs"], preds["val"]["labels"])
            for name in ("test", "external"):
                if name in preds:
                    evaluation[f"{name}_at_val_threshold"] = report(preds[name], threshold)
        ckpt.write_json_atomic(run_dir / "evaluation.json", evaluation)
        # Per-image probabilities: for error analysis, and for ensembles of runs without their
        # checkpoints (bench/ensemble.py).
        ckpt.write_bytes_atomic(run_dir / "predictions.csv", predictions_csv(preds).encode())
        ckpt.write_json_atomic(run_dir / "history.json", progress.history)
        for name, rep in evaluation.items():
            tracker.log_metrics(scalar_metrics(rep["image_level"], f"best_{name}/"), step=progress.epoch)
            for kind in ("by_source", "by_view"):  # e.g. best_test/source/kermany/auroc
                tracker.log_metrics({f"best_{name}/{kind[3:]}/{g}/{k}": v for g, m in rep[kind].items()
                                     for k, v in m.items() if k.startswith(("auroc", "mean_prob")) and k != "auroc_ci95"},
                                    step=progress.epoch)
            if "study_level" in rep:
                tracker.log_metrics(scalar_metrics(rep["study_level"], f"best_{name}_study/"), step=progress.epoch)
        bounds = [float(b) + 0.5 for b in np.cumsum([p.epochs for p in cfg.train.phases])[:-1]]
        last = "test" if "test" in preds else "val"
        figures = [
            training_figure(progress.history, bounds, run_dir / "training_metrics.png"),
            roc_pr_figure(preds[last]["probs"], preds[last]["labels"], run_dir / f"roc_pr_{last}.png"),
            confusion_figure(evaluation[last]["image_level"]["confusion"], run_dir / f"confusion_{last}.png"),
        ]
        for path in [*figures, run_dir / "evaluation.json", run_dir / "history.json", run_dir / "predictions.csv"]:
            tracker.log_artifact(path)
        tracker.log_model(best)
        accelerator.print(json.dumps({n: {k: round(v, 4) for k, v in scalar_metrics(r["image_level"]).items()}
                                      for n, r in evaluation.items()}))
    dist.barrier()


def _exit_on_signal(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Train; a UserError (ConfigError included) propagates to `run_main`, which prints it."""
    parser = argparse.ArgumentParser(prog="cxr_dist.train", description=__doc__.splitlines()[0],
                                     epilog=describe_fields(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML file (see configs/); dotted overrides follow, e.g. --train.seed 3")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    load_index(cfg.data.shards_dir)  # missing shards: say so before any MLflow run is opened
    if cfg.tracking.enabled:
        # On every rank, before the process group exists: all ranks stop with this message
        # instead of rank 0 returning while the others die at its first barrier.
        check_reachable(resolve_uri(cfg.tracking.uri))
    accelerator = dist.make_accelerator(cfg.train, cfg.data)
    setup_logging(accelerator.is_main_process, accelerator.process_index)
    resuming = cfg.train.resume and ckpt.latest_checkpoint(cfg.train.run_dir) is not None
    tracker = make_tracker(cfg.tracking, accelerator.is_main_process, cfg.train.run_dir, resume=resuming)
    # SIGTERM (scancel, the time limit, torchrun stopping the other ranks after one failed)
    # kills without unwinding and would leave the MLflow run RUNNING; as SystemExit it ends
    # the run KILLED. (SLURM's early warning is SIGUSR1/PREEMPT, handled by dist.PreemptionWatch.)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    with tracker:
        finished, _ = train(cfg, accelerator, tracker)
        if not finished:  # the requeued job reopens this MLflow run
            tracker.finish("KILLED")
    # A preempted run also exits 0 (run_dir/PREEMPTED tells the batch script to requeue it).
    dist.hard_exit_if_distributed(0)
    return 0


if __name__ == "__main__":
    sys.exit(run_main("cxr_dist.train", main, setup_logging=False))
