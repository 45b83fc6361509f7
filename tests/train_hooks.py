"""Test-only wrapper: run a training module with hooks that make a test deterministic.

    accelerate launch ... -m tests.train_hooks [--hold DIR] [--hold-epoch N] [--record DIR] \\
        MODULE [MODULE ARGS...]           # MODULE: cxr_dist.train, tests.rank_probe

MODULE runs as `python -m MODULE` would run it (runpy), after these patches of this process:

--hold DIR: once the end-of-epoch checkpoint of epoch N (default 1) is complete, every rank writes
    DIR/held-rank<R> (its pid) and waits until the test creates DIR/release. A test that wants to
    signal or kill a run "in the middle of training" waits for the held files instead of racing the
    end of a tiny run: the run cannot end before the test has acted. The wait is plain Python
    (time.sleep), so signal handlers (SIGTERM -> SystemExit, SIGUSR1 -> preemption) run at once.
--sigterm-at-fork N: at this process's N-th fork (a DataLoader worker starting), the parent sends
    itself SIGTERM from an at-fork hook, so the handler's SystemExit is raised inside the hook,
    where Python prints "Exception ignored" and drops it: what a SIGTERM arriving while a worker
    forks does, 1 try in 5 under `timeout`, made certain.
--record DIR: every rank appends to DIR/rank<R>.jsonl one line per training batch it consumed
    ({"epoch", "keys"}), and one line per file-system write under the run folder
    ({"write": event, "path"}) seen by Python's audit hooks (open for writing, rename/replace,
    remove, mkdir...): a test can check how the data was split and which rank wrote what.

Nothing here is part of the product; no product module reads an environment variable for it.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
from pathlib import Path

HOLD_TIMEOUT_S = 600  # a test that died must not leave a run waiting forever


def wait_until_held(proc, hold: Path, ranks: int = 2, timeout: float = 300) -> list[int]:
    """For the test: wait until every rank of a run started with --hold is held (the checkpoint
    of the epoch complete, waiting for hold/release); their pids. Fails if the run ends first.
    `proc`: the launcher's subprocess.Popen, or a list of them (one launcher per node)."""
    procs = proc if isinstance(proc, (list, tuple)) else [proc]
    files = [hold / f"held-rank{r}" for r in range(ranks)]
    deadline = time.monotonic() + timeout
    while not all(f.exists() for f in files):
        for p in procs:
            assert p.poll() is None, f"a launcher ended (exit {p.returncode}) before the run was held"
        assert time.monotonic() < deadline, f"not held after {timeout:.0f} s"
        time.sleep(0.05)
    return [int(f.read_text()) for f in files]


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))  # set by torchrun (accelerate launch) for every worker


def install_hold(hold_dir: Path, epoch: int, loop=None, per_run: bool = False) -> None:
    """Patch `loop` (cxr_dist.train.loop) to hold after epoch `epoch`'s checkpoint. `per_run`:
    the held files and the release file are in hold_dir/<run folder name>/ (several runs at once,
    e.g. the folds of a SLURM array: tests/slurm_hooks/sitecustomize.py)."""
    if loop is None:
        import cxr_dist.train.loop as loop

    from cxr_dist.fileio import write_bytes_atomic

    original = loop.save_state
    done = []

    def save_then_hold(run, tag: str, best: bool = False, partial: dict | None = None) -> None:
        original(run, tag, best=best, partial=partial)
        if done or tag != "latest" or partial is not None or run.progress.epoch != epoch:
            return
        done.append(True)
        where = hold_dir / Path(run.cfg.train.run_dir).name if per_run else hold_dir
        write_bytes_atomic(where / f"held-rank{run.rank}", str(os.getpid()).encode())
        deadline = time.monotonic() + HOLD_TIMEOUT_S
        while not (where / "release").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"tests.train_hooks: nobody released {where} in {HOLD_TIMEOUT_S} s")
            time.sleep(0.05)

    loop.save_state = save_then_hold


def install_sigterm_at_fork(n: int) -> None:
    import signal

    forks = []

    def after_in_parent() -> None:
        forks.append(True)
        if len(forks) == n:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, inside the hook

    os.register_at_fork(after_in_parent=after_in_parent)


def install_record(record_dir: Path, run_dir: str | None) -> None:
    from cxr_dist.data import stream

    record_dir.mkdir(parents=True, exist_ok=True)
    # One descriptor opened now; the hooks write with os.write, which raises no audit event.
    fd = os.open(record_dir / f"rank{_rank()}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def emit(obj: dict) -> None:
        os.write(fd, (json.dumps(obj) + "\n").encode())

    original_iter = stream.EpochLoader.__iter__

    def recording_iter(self):
        batches = original_iter(self)  # sets self.dataset.epoch
        epoch, train = self.dataset.epoch, self.dataset.train
        for batch in batches:
            if train:
                emit({"epoch": epoch, "keys": list(batch["key"])})
            yield batch

    stream.EpochLoader.__iter__ = recording_iter
    if not run_dir:
        return
    root = os.path.realpath(run_dir)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    busy = []

    def inside(path) -> str | None:
        if isinstance(path, int):  # an open descriptor, not a path
            return None
        try:
            p = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return None
        return p if p == root or p.startswith(root + os.sep) else None

    def audit(event: str, args: tuple) -> None:
        if busy:
            return
        busy.append(True)
        try:
            paths: list = []
            if event == "open":
                path, mode, flags = (tuple(args) + (None, None, None))[:3]
                if (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                        (mode is None and isinstance(flags, int) and flags & write_flags):
                    paths = [path]
            elif event in ("os.rename", "os.link", "os.symlink"):
                paths = list(args[:2])
            elif event in ("os.remove", "os.mkdir", "os.rmdir", "os.truncate", "shutil.rmtree", "os.utime"):
                paths = [args[0]] if args else []
            for p in paths:
                hit = inside(p)
                if hit is not None:
                    emit({"write": event, "path": os.path.relpath(hit, root)})
        finally:
            busy.pop()

    sys.addaudithook(audit)


def main() -> None:
    ap = argparse.ArgumentParser(prog="tests.train_hooks")
    ap.add_argument("--hold", type=Path)
    ap.add_argument("--hold-epoch", type=int, default=1)
    ap.add_argument("--record", type=Path)
    ap.add_argument("--sigterm-at-fork", type=int, default=0)
    ap.add_argument("module")
    ap.add_argument("argv", nargs=argparse.REMAINDER)  # everything after MODULE is the module's own
    args = ap.parse_args()
    argv = args.argv
    if args.hold:
        install_hold(args.hold, args.hold_epoch)
    if args.sigterm_at_fork:
        install_sigterm_at_fork(args.sigterm_at_fork)
    if args.record:
        run_dir = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--train.run_dir"), None)
        install_record(args.record, run_dir)
    sys.argv = [args.module, *argv]
    runpy.run_module(args.module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
