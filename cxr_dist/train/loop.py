"""Two-phase training: `accelerate launch -m cxr_dist.train --config configs/X.toml [--train.seed 3 ...]`.

The loop reads top to bottom: build the run (run.py: loss, batches, model, caches, resume); for
each phase of the config, set its depth, (re)build the optimizer and let Accelerate wrap the model;
for each epoch, train a fixed number of batches, evaluate on the validation split, step
ReduceLROnPlateau once on the reduced metric, checkpoint, log. Only the main process writes files,
prints and logs; the others get a do-nothing tracker.

This module is the loop and nothing else: what a run holds is `run.py`, the train state that
checkpoints save and resume restores `state.py`, and the evaluation of the best checkpoint with
the files a run leaves behind `end_of_run.py`.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from .. import dist
from ..config import Config, ConfigError, describe_fields, dump_toml, load_config, to_dict, train_sources
from ..data.index import ShardIndex, load_index, train_val_splits
from ..data.text import check_text_fields
from ..eval.evaluate import Scoring, evaluate_split
from ..eval.metrics import compute_metrics, metric_mode, scalar_metrics, summary_line, view_name
from ..fileio import write_bytes_atomic
from ..log import progress as progress_bar
from ..log import setup as setup_logging
from ..model.checkpoint import latest_checkpoint
from ..model.classifier import count_trainable, logits_of, weights_source
from ..model.text_inputs import report_loss
from ..runs.tracking import check_reachable, make_tracker, resolve_uri, run_tags
from .end_of_run import finish
from .run import Run, phase_at, seed_everything
from .state import restore_rng, save_state

__all__ = ["main", "train", "train_epoch", "phase_at", "seed_everything", "improved", "stop_early",
           "check_metrics", "metric_mode"]


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


def check_metrics(cfg: Config, index: ShardIndex, val_split: str) -> None:
    """Fail before any work when the validation split cannot rank checkpoints: the AUROC-based
    metrics of selection.best_metric / schedule.plateau_metric are undefined on a split with one class."""
    normal, abnormal = index.split_labels(val_split)
    watched = {"selection.best_metric": cfg.selection.best_metric, "schedule.plateau_metric": cfg.schedule.plateau_metric}
    for field, name in watched.items():
        if "auroc" in name and min(normal, abnormal) == 0:
            raise ConfigError(
                f"{field} = {name!r} needs both classes in the validation split {val_split!r}, which has "
                f"{normal} normal and {abnormal} abnormal images (AUROC is undefined): "
                f"use a loss-based metric (--{field} loss) or a larger validation split")
    sources = train_sources(cfg.data)
    # What validation will report: the sources and views of the split (a version-1 index: IU, no views).
    in_val = index.sources_in(val_split)
    views = {view_name(v) for v in index.views_in(val_split)}
    for field, name in watched.items():
        kind, _, rest = name.partition("/")
        group = rest.split("/")[0]
        if kind == "source" and group not in sources:
            raise ConfigError(f"{field} = {name!r} names a source that is not trained on "
                              f"(training sources: {', '.join(sources)})")
        if (kind == "source" and group not in in_val) or (kind == "view" and index.has_views and group not in views):
            raise ConfigError(f"{field} = {name!r}: the validation split {val_split!r} has no images of that "
                              f"{kind} (sources: {', '.join(in_val)}; views: {', '.join(sorted(views)) or 'not recorded'})")


def train(cfg: Config, accelerator, tracker, index: ShardIndex) -> tuple[bool, "torch.nn.Module"]:
    """Run (or resume) the whole schedule. Returns (finished, model); not finished = preempted.
    `index`: the shard index, read once by `main` and passed on to everything that reads the shards."""
    t = cfg.train
    check_metrics(cfg, index, train_val_splits(cfg.data)[1])
    run = Run.build(cfg, accelerator, tracker, index)
    if run.is_main:
        run.watch.clear()
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(run.run_dir / "config.toml", dump_toml(cfg).encode())
    dist.barrier()
    tracker.log_params({
        **to_dict(cfg), "world_size": run.world, "mixed_precision": accelerator.mixed_precision,
        "weights_source": weights_source(cfg.model), "data_checksum": index.checksum,
        "train_counts": list(run.train_counts()), "batches_per_epoch": run.batches_per_epoch,
        "deepspeed": accelerator.state.deepspeed_plugin is not None,
    })
    tracker.log_artifact(run.run_dir / "config.toml")

    progress, mode, first_epoch = run.progress, metric_mode(cfg.selection.best_metric, cfg.selection.best_mode), 1
    for p_idx, phase in enumerate(t.phases):
        last_epoch = first_epoch + phase.epochs - 1
        if progress.epoch >= last_epoch:
            first_epoch = last_epoch + 1
            continue
        resume = run.start_phase(p_idx)
        accelerator.print(f"phase {p_idx + 1}/{len(t.phases)} '{phase.name}': epochs {first_epoch}-{last_epoch}, "
                          f"{count_trainable(run.model):,} trainable parameters")
        for epoch in range(max(first_epoch, progress.epoch + 1), last_epoch + 1):
            if stop_early(progress.history, first_epoch, cfg.selection.best_metric, mode, cfg.selection.early_stop_patience):
                accelerator.print(f"phase {p_idx + 1} '{phase.name}' stops early after epoch {epoch - 1}: "
                                  f"val/{cfg.selection.best_metric} has not improved for {cfg.selection.early_stop_patience} epochs")
                break
            t0 = time.time()
            train_m, partial = train_epoch(run, epoch, resume)
            resume = None
            if partial is not None:  # preempted at an agreed step
                save_state(run, tag="latest", partial=partial)
                if run.is_main:
                    run.watch.mark_preempted({"epoch": epoch, "step": progress.step_in_epoch})
                accelerator.print(f"preempted in epoch {epoch} at step {progress.step_in_epoch}: checkpoint saved")
                return False, run.eval_model()
            val_m = evaluate_split(run.eval_model(), cfg.loader, run.val_split, accelerator, index,
                                   Scoring(loss_fn=run.loss_fn, batches=run.val_batches() if run.val_batches else None))
            run.scheduler.step(val_m[cfg.schedule.plateau_metric])  # same reduced value on every rank
            row = {"epoch": epoch, "phase": p_idx + 1, "epoch_time_s": time.time() - t0,
                   "images_per_s": run.batches_per_epoch * cfg.loader.batch_size * run.world / (time.time() - t0),
                   **scalar_metrics(train_m, "train/"), **scalar_metrics(val_m, "val/"),
                   **{f"lr/{g['name']}": g["lr"] for g in run.optimizer.param_groups}}
            progress.epoch, progress.step_in_epoch = epoch, 0
            progress.history.append(row)
            is_best = improved(val_m[cfg.selection.best_metric], progress.best, mode)
            if is_best:
                progress.best = val_m[cfg.selection.best_metric]
            save_state(run, tag="latest", best=is_best)
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            accelerator.print(summary_line(epoch, phase.name, train_m, val_m, t.total_epochs))
        first_epoch = last_epoch + 1
    final = run.eval_model()
    finish(cfg, accelerator, final, tracker, progress.history, progress.epoch, run.val_split, index)
    return True, final


def train_epoch(run: Run, epoch: int, resume: dict | None = None) -> tuple[dict | None, dict | None]:
    """One epoch of `run.batches_per_epoch` steps (the same on every rank).

    Returns (metrics, None), or (None, partial) when preempted: this rank's predictions so far,
    saved so that the resumed epoch reports the same metrics. Resuming mid-epoch,
    `progress.step_in_epoch` batches are skipped (the stream is a function of the epoch, so they
    are the ones already trained on) and `resume` (this rank's RNG state and partial
    predictions at the preemption) is restored before the first new step. With `run.inputs`
    (loader.decode_on = device) batches of JPEG bytes are decoded and augmented a batch or two
    ahead on the device, seeded by (epoch, step), so skipped batches need no decoding.
    """
    t, accelerator, model, progress = run.cfg.train, run.accelerator, run.wrapped, run.progress
    n_batches, supervise = run.batches_per_epoch, run.cfg.model.report_supervision
    findings_w = t.findings_weight if run.findings_loss is not None else 0.0
    model.train()
    # Epoch-seeded RNG for dropout; the stream seeds its shuffling and augmentation from
    # (seed, epoch, rank, worker) itself. So a resumed run replays an epoch exactly.
    seed_everything(t.seed * 1000 + epoch * 10 + accelerator.process_index)
    if hasattr(run.loader, "set_epoch"):
        run.loader.set_epoch(epoch)
    skip, progress.step_in_epoch = progress.step_in_epoch, 0
    probs, labels, loss_sum = [], [], 0.0
    if resume and resume.get("partial"):
        probs, labels = [resume["partial"]["probs"]], [resume["partial"]["labels"]]
        loss_sum = resume["partial"]["loss_sum"]
    bar = progress_bar(n_batches, f"epoch {epoch} (batches)", accelerator.is_main_process)
    batches = run.inputs.batches(run.loader, epoch, n_batches, skip) if run.inputs is not None else run.loader
    for step, batch in enumerate(batches):
        if step >= n_batches:
            break
        if step < skip:  # resuming mid-epoch: these batches were trained before the preemption
            bar.update(1)
            continue
        # Only a mid-epoch checkpoint's RNG: after a whole epoch, the epoch seed above is what ran.
        if step == skip and resume is not None and resume.get("partial") is not None:
            restore_rng(resume)
        dist.raise_if_terminated()
        if run.watch.requested():
            progress.step_in_epoch = step
            return None, {"probs": _cat(probs), "labels": _cat(labels), "loss_sum": loss_sum}
        y = batch["label"].to(accelerator.device, non_blocking=True)
        with accelerator.accumulate(model):
            out = logits_of(model, batch, accelerator.device, return_hidden=bool(supervise),
                            return_findings=findings_w > 0)
            logits, rest = (out[0], list(out[1:])) if isinstance(out, tuple) else (out, [])
            loss = run.loss_fn(logits.float(), y, batch["source"], batch["view"])  # per-source (and view) weights
            if supervise:  # the report shapes the hidden layer; prediction never reads it
                loss = loss + supervise * report_loss(rest.pop(0), run.reports, batch["key"])
            if findings_w > 0:  # the findings head: masked BCE over what each source annotates
                targets, mask = run.model.findings_table.lookup(list(batch["key"]), accelerator.device)
                loss = loss + findings_w * run.findings_loss(rest.pop(0), targets, mask)
            accelerator.backward(loss)
            if accelerator.sync_gradients and run.cfg.optimizer.clip_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), run.cfg.optimizer.clip_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
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


def main(argv: list[str] | None = None) -> int:
    """Train; a UserError (ConfigError included) propagates to `run_main`, which prints it."""
    parser = argparse.ArgumentParser(prog="cxr_dist.train", description=__doc__.splitlines()[0],
                                     epilog=describe_fields(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML file (see configs/); dotted overrides follow, e.g. --train.seed 3")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    index = load_index(cfg.data.shards_dir)  # missing shards: say so before any MLflow run is opened
    index.check_read_settings(cfg.data)  # the preprocessing baked into the shards is the run's
    # Text fields missing from the shards, or reading the label: refused before any work.
    leaks = check_text_fields(cfg.loader, cfg.model.kind != "image", cfg.model.report_supervision > 0, index)
    if cfg.tracking.enabled:
        # On every rank, before the process group exists: all ranks stop with this message
        # instead of rank 0 returning while the others die at its first barrier.
        check_reachable(resolve_uri(cfg.tracking.uri))
    accelerator = dist.make_accelerator(cfg.train, cfg.optimizer, cfg.loader)
    setup_logging(accelerator.is_main_process, accelerator.process_index)
    resuming = cfg.train.resume and latest_checkpoint(cfg.train.run_dir) is not None
    tracker = make_tracker(cfg.tracking, accelerator.is_main_process, cfg.train.run_dir, resume=resuming)
    # SIGTERM ends the MLflow run KILLED (dist.exit_on_sigterm). SLURM's early warning is
    # SIGUSR1/PREEMPT, handled by dist.PreemptionWatch: a checkpoint and a requeue.
    dist.exit_on_sigterm()
    with tracker:
        tracker.set_tags(run_tags(cfg, leaks))
        finished, _ = train(cfg, accelerator, tracker, index)
        if not finished:  # the requeued job reopens this MLflow run
            tracker.finish("KILLED")
    # A preempted run also exits 0 (run_dir/PREEMPTED tells the batch script to requeue it).
    dist.hard_exit_if_distributed(0)
    return 0

