"""Everything distributed lives here: the Accelerator, gathering, agreement between ranks, preemption.

No other module of the training path reads RANK, WORLD_SIZE or SLURM_* (the launch side,
`slurm_launch.py`, turns SLURM's variables into `accelerate launch` arguments). Rank and world
size are passed explicitly to the components that need them.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object

from .config import LoaderConfig, OptimizerConfig, TrainConfig

PREEMPT_FILE = "PREEMPT"  # created in run_dir by the batch script when SLURM signals preemption
# Written in run_dir by the main process once a preemption checkpoint is complete: "requeue me".
# A marker rather than an exit code: torchrun turns any non-zero exit of one rank into SIGTERM
# for the others and exit code 1 for the launcher, so the processes exit 0 after a clean stop.
PREEMPTED_FILE = "PREEMPTED"


def using_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(train: TrainConfig, optimizer: OptimizerConfig, loader: LoaderConfig) -> Accelerator:
    """An Accelerator that really is distributed on CPU-only machines too.

    Traps handled (see docs/architecture.md): without `cpu=True` a CPU-only `--multi_gpu` launch
    gives N unsynchronised rank-0 runs; with DeepSpeed, `cpu=True` silently disables DeepSpeed, so
    a gloo process group is created first instead.
    """
    kwargs: dict[str, Any] = {"gradient_accumulation_steps": optimizer.grad_accum_steps}
    if train.mixed_precision:
        kwargs["mixed_precision"] = train.mixed_precision
    if using_deepspeed():
        # ACCELERATE_USE_CPU (needed for plain CPU multi-process) leaves a half-built state
        # under DeepSpeed; the gloo group below is what makes DeepSpeed run on the CPU.
        os.environ.pop("ACCELERATE_USE_CPU", None)
        if not torch.cuda.is_available():
            PartialState(backend="gloo")
    elif not torch.cuda.is_available():
        kwargs["cpu"] = True
    accelerator = Accelerator(**kwargs)
    if accelerator.state.deepspeed_plugin is not None:
        # We do not pass our WebDataset loader to prepare() (it would be split twice), so
        # DeepSpeed's "auto" batch size and clipping are filled in from the config here.
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = loader.batch_size
        ds["train_batch_size"] = loader.batch_size * accelerator.num_processes * optimizer.grad_accum_steps
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = optimizer.clip_grad_norm
    return accelerator


def zero_stage(accelerator: Accelerator) -> int:
    """DeepSpeed's ZeRO stage of this run (0: not DeepSpeed)."""
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)) if plugin else 0


def whole_state(model: torch.nn.Module, accelerator: Accelerator, everywhere: bool = False) -> dict | None:
    """The model's whole state dict as CPU tensors: on the main process, or on every rank with
    `everywhere`; None on the others.

    Under ZeRO-3 each rank holds a partition of every trained parameter (the module's own tensors
    are empty placeholders), so the parameters are gathered first: a collective, every rank calls
    it. DeepSpeed's GatheredParameters makes them whole on every rank for the copy.
    """
    if zero_stage(accelerator) != 3:
        if not (everywhere or accelerator.is_main_process):
            return None
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}  # no copy for CPU tensors
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        if not (everywhere or accelerator.is_main_process):
            return None
        # Copies: the gathered tensors are freed when the context ends.
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def gather_objects(obj: Any) -> list[Any]:
    """One item per rank (in rank order), on every rank; [obj] when not distributed."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return [obj]
    return gather_object([obj])


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (e.g. metrics computed once on the main process)."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on at least one (a step boundary all ranks agree on)."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if tdist.get_backend() == "nccl":
        t = t.cuda()
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def hard_exit_if_distributed(code: int) -> None:
    """End a multi-process run with os._exit after flushing output.

    With gloo, ~1 exit in 4-10 aborts with "terminate called without an active exception" during
    interpreter shutdown, with or without destroy_process_group() (measured here), turning a
    finished run into a failed job. Everything is written and synced by now (checkpoints are
    fsynced, the tracker is closed), so skipping interpreter shutdown loses nothing.
    """
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


class PreemptionWatch:
    """Notices a coming preemption: SIGUSR1 to this process, or a PREEMPT file in the run folder.

    SLURM's `--signal=B:USR1@N` reaches only the batch shell; slurm/train.sh turns it into the
    file, which every rank on every node sees. `requested()` is a collective: call it at the same
    step on all ranks.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.flag_file = Path(run_dir) / PREEMPT_FILE
        self._signalled = False
        # Fault injection for tests: behave as if SIGUSR1 arrived before the N-th check of this
        # process (deterministic, unlike a signal sent from outside at some moment).
        self._inject_at = int(os.environ.get("CXR_DIST_FAULT_PREEMPT_AT_CHECK", "0"))
        self._checks = 0
        try:
            signal.signal(signal.SIGUSR1, self._on_signal)
        except ValueError:  # not the main thread (e.g. under some test runners): file only
            pass

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signalled = True

    def requested(self) -> bool:
        self._checks += 1
        if self._inject_at and self._checks == self._inject_at:
            self._signalled = True
        return any_rank(self._signalled or self.flag_file.exists())

    def clear(self) -> None:
        """Called by the main process when a (requeued) run starts."""
        self.flag_file.unlink(missing_ok=True)
        (self.flag_file.parent / PREEMPTED_FILE).unlink(missing_ok=True)

    def mark_preempted(self, info: dict) -> None:
        """Main process, after the checkpoint is complete: tell the batch script to requeue.
        Written atomically: the marker is either absent or whole when the script reads it."""
        import json

        from .fileio import write_bytes_atomic

        write_bytes_atomic(self.flag_file.parent / PREEMPTED_FILE, (json.dumps(info) + "\n").encode())


# SIGTERM: scancel, SLURM's time limit, `timeout`, torchrun stopping the other ranks after one
# failed. Unhandled, it kills without unwinding and leaves the MLflow run RUNNING; as SystemExit
# it unwinds `with tracker` and ends the run KILLED. But Python drops an exception that a signal
# handler raises where nothing can catch it (an at-fork hook, a __del__): seen here when SIGTERM
# landed while a DataLoader worker forked ("Exception ignored in: _releaseLock"), and the run
# trained on to its last epoch, 1 try in 5 under `timeout`. So the signal is also remembered:
# `raise_if_terminated()` (once per training step) raises it again, and an alarm ends the process
# (SIGALRM's default action) if it is still alive TERM_GRACE_S later, however it got stuck.
TERM_GRACE_S = 60
_terminated = 0


def exit_on_sigterm() -> None:
    """Main thread, once: SIGTERM becomes SystemExit(143) (see above)."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: Any) -> None:
    global _terminated
    if not _terminated:
        _terminated = signum
        signal.alarm(TERM_GRACE_S)
    raise SystemExit(128 + signum)


def raise_if_terminated() -> None:
    """SystemExit if SIGTERM arrived, even when the handler's own exception was dropped."""
    if _terminated:
        raise SystemExit(128 + _terminated)
