"""Two nodes for real, on one machine (issue 23.18): two `accelerate launch` processes, as
`srun --ntasks-per-node=1` starts them on a 2-node job, `--num_machines 2 --machine_rank 0/1`,
one process each (`--multi_gpu` with ACCELERATE_USE_CPU=true: gloo on the CPU), meeting at
127.0.0.1 on a free port, training the tiny config through tests.rank_probe (each rank saves its
parameters) wrapped in tests.train_hooks (each rank records the batches it consumed and any write
of its own under the run folder; the preemption test holds both ranks after epoch 1).

What this proves, and what it does not (docs/cluster.md, "Two nodes"): the multi-node code paths
(two launchers, a static rendezvous across machine ranks, global ranks 0 and 1, the data split
by global rank, evaluation gathered across nodes, one writer, a preemption agreed across nodes and
a resume on both) are the real ones. Not covered: a network between hosts, GPUs/NCCL, a file
system shared between machines, SLURM starting the launchers (tests/test_slurm.py covers the
per-node commands).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cxr_dist.data.index import load_index
from tests.conftest import ROOT, VENV_BIN, _env, tiny_overrides
from tests.train_hooks import wait_until_held

pytestmark = pytest.mark.slow

NODES = 2
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_command(node: int, port: int, hooks: list[str], params: Path, overrides: list[str]) -> list[str]:
    """What one node runs: launch/multinode.yaml with the values slurm_launch would pass."""
    return [str(VENV_BIN / "accelerate"), "launch", "--config_file", str(ROOT / "launch" / "multinode.yaml"),
            "--multi_gpu", "--num_machines", str(NODES), "--machine_rank", str(node), "--num_processes", str(NODES),
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "tests.train_hooks", *hooks, "tests.rank_probe", str(params), *overrides]


def start_nodes(tmp: Path, name: str, shards: Path, hooks: list[str],
                *extra: str) -> tuple[list[subprocess.Popen], Path, Path]:
    """Both nodes' launchers, started together; (launchers, run_dir, params_dir)."""
    run_dir, params = tmp / name, tmp / f"{name}-params"
    port = free_port()
    procs = []
    for node in range(NODES):
        log = (tmp / f"{name}-node{node}.log").open("a")
        cmd = node_command(node, port, hooks, params, tiny_overrides(shards, run_dir, *extra))
        procs.append(subprocess.Popen(cmd, cwd=tmp, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        log.close()
    return procs, run_dir, params


def finish_nodes(procs: list[subprocess.Popen], tmp: Path, name: str) -> list[str]:
    """Wait for both launchers (killing both if one hangs); each node's output. Both must exit 0."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    logs = [(tmp / f"{name}-node{n}.log").read_text() for n in range(NODES)]
    for n, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"node {n} exited {p.returncode}:\n{log[-5000:]}"
    return logs


def records(record_dir: Path, rank: int) -> list[dict]:
    path = record_dir / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def split_keys(shards: Path, split: str) -> list[str]:
    """Every sample key of `split`, read from its tars (as the stream reads them)."""
    keys = []
    for shard in load_index(shards).shards([split]):
        with tarfile.open(shard.path) as tar:
            keys += [m.name.rsplit(".", 1)[0] for m in tar if m.name.endswith(".jpg")]
    return keys


def params_of(params_dir: Path, rank: int) -> dict[str, torch.Tensor]:
    return load_file(str(params_dir / f"rank{rank}.safetensors"))


def assert_same_parameters(a: dict, b: dict) -> None:
    """Every parameter and buffer equal, except BatchNorm running statistics of trained layers
    (per-rank by design: each rank normalises its own batches)."""
    assert a.keys() == b.keys()
    for k in a:
        if "running_" in k or "num_batches" in k:
            continue
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def two_nodes(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted 2-node training (3 epochs, both phases, evaluation)."""
    tmp = tmp_path_factory.mktemp("two-nodes")
    record = tmp / "record"
    procs, run_dir, params = start_nodes(tmp, "run", tiny_shards, ["--record", str(record)])
    logs = finish_nodes(procs, tmp, "run")
    return {"tmp": tmp, "run_dir": run_dir, "params": params, "logs": logs, "record": record}


def test_two_launchers_make_one_run_of_two_ranks(two_nodes: dict) -> None:
    logs = two_nodes["logs"]
    assert "rank 0/2 finished=True" in logs[0] and "rank 1/2 finished=True" in logs[1]
    history = json.loads((two_nodes["run_dir"] / "history.json").read_text())
    assert [r["phase"] for r in history] == [1, 1, 2]
    assert logs[0].count("epoch 3/3 [finetune]") == 1
    # One MLflow run, tracked by the main process (node 0) only.
    import sqlite3

    with sqlite3.connect(two_nodes["run_dir"].parent / "mlflow.db") as con:
        assert con.execute("SELECT status FROM runs").fetchall() == [("FINISHED",)]


def test_both_nodes_end_with_identical_parameters(two_nodes: dict) -> None:
    r0, r1 = params_of(two_nodes["params"], 0), params_of(two_nodes["params"], 1)
    assert_same_parameters(r0, r1)
    assert any(k.startswith("backbone.blocks.6.1.") for k in r0)  # phase 2's block is in there too


def test_training_data_is_split_across_the_nodes(two_nodes: dict, tiny_shards: Path) -> None:
    train = set(split_keys(tiny_shards, "train"))
    batch = 8  # configs/tiny.toml
    per_rank = load_index(tiny_shards).split("train").total // (NODES * batch) * batch
    seen = {r: {} for r in range(NODES)}
    for r in range(NODES):
        for rec in records(two_nodes["record"], r):
            if "epoch" in rec:
                seen[r].setdefault(rec["epoch"], []).extend(rec["keys"])
    assert sorted(seen[0]) == sorted(seen[1]) == [1, 2, 3]
    for epoch in (1, 2, 3):
        a, b = seen[0][epoch], seen[1][epoch]
        assert len(a) == len(b) == per_rank, epoch  # the same number of full batches on both nodes
        assert set(a) <= train and set(b) <= train
        assert not set(a) & set(b), f"epoch {epoch}: both nodes trained on {sorted(set(a) & set(b))}"
    # Together the nodes cover most of the split (each reads its own part of the shards).
    assert len(set(seen[0][1]) | set(seen[1][1])) >= len(train) // 2


def test_evaluation_counts_every_sample_once(two_nodes: dict, tiny_shards: Path) -> None:
    from cxr_dist.eval.evaluate import read_predictions

    index = load_index(tiny_shards)
    evaluation = json.loads((two_nodes["run_dir"] / "evaluation.json").read_text())
    predictions = read_predictions(two_nodes["run_dir"])
    for split in ("val", "test"):
        assert evaluation[split]["image_level"]["n"] == index.split(split).total, split
        keys = list(predictions[split]["keys"])
        assert sorted(keys) == sorted(split_keys(tiny_shards, split)), split  # each once, none missing


def test_only_the_main_process_writes_the_run_folder(two_nodes: dict) -> None:
    main = [r for r in records(two_nodes["record"], 0) if "write" in r]
    other = [r for r in records(two_nodes["record"], 1) if "write" in r]
    written = {r["path"] for r in main}
    assert {"config.toml", "evaluation.json", "history.json", "mlflow_run_id.txt"} <= written  # the probe sees writes
    assert any(p.startswith("checkpoints") for p in written)
    # cache/ (train.cache_dir's default) is not the run's record but a content-addressed cache that
    # every process may fill: each rank exports the frozen part to ONNX there for the final
    # evaluation (model.frozen_backend). Those writes must be atomic (temporary name, then rename).
    files = [r for r in other if not r["path"].startswith("cache")]
    assert files == [], f"rank 1 (node 1) wrote into the run folder: {files[:10]}"
    cache = [r for r in other if r["write"] == "open" and r["path"].startswith("cache")]
    assert all(Path(r["path"]).name.startswith(".") and ".tmp-" in r["path"] for r in cache), cache


def test_preemption_on_both_nodes_resumes_on_both(two_nodes: dict, tiny_shards: Path) -> None:
    """Both ranks held after epoch 1's checkpoint; SIGUSR1 to each node's worker (what SLURM's
    --signal does to the processes); both stop at the next step they agree on, the main process
    writes PREEMPTED, both launchers exit 0. Relaunched, both nodes resume from epoch 2 and end
    with the parameters of the uninterrupted run."""
    tmp = two_nodes["tmp"]
    hold, first, second = tmp / "hold", tmp / "record-preempted", tmp / "record-resumed"
    hold.mkdir()
    quick = ("--tracking.enabled", "false", "--product.cam_images", "0")  # the end of the run is not under test here
    procs, run_dir, params = start_nodes(tmp, "preempted", tiny_shards,
                                         ["--hold", str(hold), "--record", str(first)], *quick)
    try:
        pids = wait_until_held(procs, hold, ranks=NODES, timeout=TIMEOUT_S)
        for pid in pids:  # the workers: each has a session of its own under its launcher
            os.kill(pid, signal.SIGUSR1)
        (hold / "release").touch()
    finally:
        logs = finish_nodes(procs, tmp, "preempted")
    assert "rank 0/2 finished=False" in logs[0] and "rank 1/2 finished=False" in logs[1]
    assert json.loads((run_dir / "PREEMPTED").read_text()) == {"epoch": 2, "step": 0}
    meta = json.loads((run_dir / "checkpoints" / "latest" / "meta.json").read_text())
    assert (meta["progress"]["epoch"], meta["progress"]["step_in_epoch"]) == (1, 0)

    procs, _, params = start_nodes(tmp, "preempted", tiny_shards, ["--record", str(second)], *quick)
    logs = finish_nodes(procs, tmp, "preempted")
    assert "resuming from" in logs[0] and "rank 1/2 finished=True" in logs[1]
    for r in range(NODES):  # each node resumed: its second attempt trained epochs 2 and 3 only
        epochs = sorted({rec["epoch"] for rec in records(second, r) if "epoch" in rec})
        assert epochs == [2, 3], (r, epochs)
        assert not [rec for rec in records(first, 1) + records(second, 1)
                    if "write" in rec and not rec["path"].startswith("cache")]
    assert not (run_dir / "PREEMPTED").exists()
    assert [r["epoch"] for r in json.loads((run_dir / "history.json").read_text())] == [1, 2, 3]
    ref = two_nodes["params"]
    for r in range(NODES):
        assert_same_parameters(params_of(params, r), params_of(ref, r))
