"""The state of a training run beyond the weights: progress, optimizer, scheduler, every rank's RNG.

Saved with the weights in every checkpoint (`checkpoint.save_checkpoint`, pickle-free) and read
back on resume, so that a resumed run continues exactly where the interrupted one stopped:

- `Progress`: epochs completed, the step within the epoch (non-zero only for a checkpoint taken
  mid-epoch at preemption), the best validation value so far, the history of per-epoch metrics;
- the optimizer and ReduceLROnPlateau state of the phase the checkpoint was taken in;
- per rank: its RNG state and, mid-epoch, its partial predictions of the epoch (so the resumed
  epoch reports the same training metrics).

DeepSpeed partitions the optimizer state across ranks (ZeRO-2 and 3; ZeRO-3 the parameters too):
each rank writes its partition with DeepSpeed's own sharded checkpoint (`accelerator.save_state`)
into the checkpoint's `deepspeed/` folder, and a resume on the same number of ranks loads it back
(`accelerator.load_state`), Adam's moments and fp32 master weights included. The folder is written
into the checkpoint's temporary folder before the main process installs the whole checkpoint, so
it is as atomic as the rest (model/checkpoint.py).
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..model import checkpoint as ckpt
from .. import dist
from ..config import to_dict

DEEPSPEED_DIR = "deepspeed"  # a checkpoint's folder of DeepSpeed's sharded checkpoint


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # >0 only in a checkpoint taken mid-epoch at preemption
    best: float = -math.inf  # best value of selection.best_metric on validation (non-finite: none yet)
    history: list[dict] = field(default_factory=list)  # one row of metrics per completed epoch


def load_latest(run_dir: str | Path, model) -> tuple[Progress, dict | None, Path | None]:
    """Resume from RUN_DIR/checkpoints/latest when there is one: its weights into `model`; returns
    (progress, saved train state for `restore`, the checkpoint's path). Nothing saved: a fresh start."""
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        return Progress(), None, None
    model_state, saved, meta = ckpt.load_checkpoint(latest)
    model.load_state_dict(model_state)
    saved["checkpoint"] = str(latest)  # where restore_state finds DeepSpeed's shards
    return Progress(**meta["progress"]), saved, latest


def optimizer_epoch(progress: Progress) -> int:
    """The 1-based epoch whose phase the saved optimizer belongs to: the running one when the
    checkpoint was taken mid-epoch, else the last completed one (a checkpoint taken after a phase's
    last epoch must not be loaded into the next phase's optimizer)."""
    return progress.epoch + 1 if progress.step_in_epoch else max(progress.epoch, 1)


def restore_state(saved: dict, run) -> dict | None:
    """Optimizer and scheduler state into the run's current phase (train/run.py); returns this
    rank's saved {"rng", "partial"} (None if the checkpoint came from fewer ranks: a new world size)."""
    if saved.get("optimizer") is not None:
        run.optimizer.load_state_dict(saved["optimizer"])
    ranks = saved.get("ranks", [])
    if run.accelerator.state.deepspeed_plugin is not None:
        _load_deepspeed(run, Path(saved["checkpoint"]), len(ranks))
    run.scheduler.load_state_dict(saved["scheduler"])
    return ranks[run.rank] if run.rank < len(ranks) else None


def _load_deepspeed(run, checkpoint: Path, saved_world: int) -> None:
    """DeepSpeed's sharded optimizer state (and fp32 master weights) back into the engine; every rank."""
    shards = ckpt.verified_subdir(checkpoint, DEEPSPEED_DIR)  # checked before DeepSpeed unpickles them
    if shards is None or saved_world != run.world:
        # A checkpoint of an older cxr-dist, or of another number of ranks (ZeRO's partitions are
        # per rank): the weights are restored, Adam's moments start again.
        why = "it has no DeepSpeed state" if shards is None else f"it was saved by {saved_world} ranks, not {run.world}"
        run.accelerator.print(f"resume: optimizer state not restored ({why}); Adam's moments start again")
        return
    run.accelerator.load_state(str(shards))


def save_state(run, tag: str, best: bool = False, partial: dict | None = None) -> None:
    """Checkpoint the run (train/run.py) from the main process; every rank contributes its RNG
    state (collective). `best` also makes the checkpoint `best`; `partial` is this rank's
    predictions so far when saving mid-epoch."""
    ranks = dist.gather_objects({"rng": ckpt.rng_state(), "partial": partial})
    model_state = dist.whole_state(run.model, run.accelerator)  # a collective under ZeRO-3
    tmp = None
    deepspeed = run.accelerator.state.deepspeed_plugin is not None
    if deepspeed:  # every rank writes its partition into the checkpoint's temporary folder
        tmp = ckpt.shared_tmp(run.run_dir, tag, dist.broadcast_object(uuid.uuid4().hex))
        run.accelerator.save_state(str(tmp / DEEPSPEED_DIR))
        dist.barrier()
    if run.is_main:
        # Under DeepSpeed the optimizer state is in deepspeed/ (partitioned: no rank holds all of it).
        opt_state = None if deepspeed else run.optimizer.state_dict()
        state = {"optimizer": opt_state, "scheduler": run.scheduler.state_dict(), "ranks": ranks}
        # "findings": the findings head's outputs (a product rebuilds the same head from them).
        meta = {"progress": run.progress.__dict__, "config": to_dict(run.cfg), "findings": list(run.model.findings)}
        ckpt.save_checkpoint(run.run_dir, tag, model_state, state, meta, tmp=tmp)
        if best:  # hard links: checkpoints are never modified in place
            ckpt.copy_as(run.run_dir, tag, "best")
    dist.barrier()


def restore_rng(resume: dict) -> None:
    """This rank's RNG as it was at the preemption (before the first step of the resumed epoch)."""
    ckpt.set_rng_state(resume["rng"])
