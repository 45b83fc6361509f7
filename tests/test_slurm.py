"""SLURM: the per-node launch logic (pure, no cluster) and real jobs on a real scheduler.

The cluster tests need `sinfo` to answer (start one with `.ci/slurm_cluster.sh start` and
`source /tmp/cxr-slurm/env.sh`). Without a cluster they are skipped, except under CI=true, where
a missing cluster is a failure: CI must not silently skip the scheduler tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import sys
from pathlib import Path

import pytest

from cxr_dist.runs.slurm_launch import (
    LaunchError, build_launch_command, choose_accelerate_config, derive_port, expand_nodelist,
    gpus_on_node, launch_env, plan_node,
)

ROOT = Path(__file__).resolve().parents[1]
MULTI_GPU = {"distributed_type": "MULTI_GPU", "num_processes": 2, "num_machines": 1}


def node_env(node_id: int, **extra: str) -> dict[str, str]:
    """What SLURM gives each launcher task of `srun --ntasks-per-node=1` on a 2-node, 4-GPU job."""
    env = {
        "SLURM_JOB_ID": "123456", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NODELIST": "gpu[07-08]",
        "SLURM_NODEID": str(node_id), "SLURMD_NODENAME": f"gpu0{7 + node_id}",
        "SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "a100:4", "CUDA_VISIBLE_DEVICES": "0,1,2,3",
    }
    env.update(extra)
    return env


def opt(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


# ----------------------------------------------------------------------------- (d) launch logic


def test_two_nodes_agree_on_everything_but_their_rank():
    train_args = ["--config", "configs/x.toml", "--train.run_dir", "runs/a"]
    cmds = [build_launch_command(node_env(n), "launch/multinode.yaml", train_args, config=MULTI_GPU,
                                 python="py") for n in (0, 1)]
    for n, cmd in enumerate(cmds):
        assert cmd[:3] == ["py", "-m", "accelerate.commands.launch"]
        assert opt(cmd, "--config_file") == "launch/multinode.yaml"
        assert opt(cmd, "--machine_rank") == str(n)
        assert opt(cmd, "--num_machines") == "2"
        assert opt(cmd, "--num_processes") == "8"  # 2 nodes x 4 GPUs
        assert opt(cmd, "--main_process_ip") == "gpu07"
        assert cmd[-len(train_args) - 2:] == ["-m", "cxr_dist.train", *train_args]
    assert opt(cmds[0], "--main_process_port") == opt(cmds[1], "--main_process_port")


def test_port_differs_between_jobs_and_is_overridable():
    a, b = derive_port({"SLURM_JOB_ID": "1000"}), derive_port({"SLURM_JOB_ID": "1001"})
    assert a != b and 15000 <= a < 30000 and 15000 <= b < 30000
    cmd = build_launch_command(node_env(1), "m.yaml", [], config=MULTI_GPU, main_port=29999)
    assert opt(cmd, "--main_process_port") == "29999"


def test_hostnames_from_scontrol_win_over_the_parser():
    cmd = build_launch_command(node_env(1), "m.yaml", [], config=MULTI_GPU, hostnames=["a.x", "b.x"])
    assert opt(cmd, "--main_process_ip") == "a.x"
    with pytest.raises(LaunchError):  # 3 hosts for 2 nodes: a broken allocation, say so
        build_launch_command(node_env(0), "m.yaml", [], config=MULTI_GPU, hostnames=["a", "b", "c"])


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu5", ["gpu5"]),
    ("a[1-2],b[09-10],c", ["a1", "a2", "b09", "b10", "c"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("env, n", [
    ({"SLURM_GPUS_ON_NODE": "4"}, 4),
    ({"SLURM_GPUS_PER_NODE": "gpu:a100:2"}, 2),
    ({"SLURM_GPUS_PER_NODE": "a100:2,v100:1"}, 3),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, 3),
    ({"SLURM_GPUS_PER_NODE": "0"}, 0),
    ({}, 0),
])
def test_gpus_on_node(env, n):
    assert gpus_on_node(env) == n


def test_single_node_cpu_job_uses_the_yaml_process_count_and_localhost():
    env = {"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_GPUS_PER_NODE": "0"}
    cpu = {"distributed_type": "MULTI_GPU", "use_cpu": True, "num_processes": 2, "num_machines": 1}
    cmd = build_launch_command(env, "launch/cpu_2proc.yaml", ["--x", "1"], config=cpu)
    assert opt(cmd, "--num_processes") == "2" and opt(cmd, "--num_machines") == "1"
    assert "--machine_rank" not in cmd and "--main_process_ip" not in cmd
    assert launch_env(cpu, env) == {"ACCELERATE_USE_CPU": "true"}
    assert opt(build_launch_command(env, "c.yaml", [], config=cpu, procs_per_node=3), "--num_processes") == "3"
    with pytest.raises(LaunchError):  # accelerate refuses --multi_gpu with 1 process
        build_launch_command(env, "c.yaml", [], config=cpu, procs_per_node=1)


def test_single_process_config_refuses_a_multi_process_allocation():
    with pytest.raises(LaunchError, match="single-process"):
        build_launch_command(node_env(0), "launch/gpu_1.yaml", [], config={"distributed_type": "NO"})


def test_multi_process_config_refuses_a_single_process():
    env = {"SLURM_JOB_ID": "5", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": "1"}
    with pytest.raises(LaunchError, match="gpu_1.yaml"):
        build_launch_command(env, "launch/gpu_multi.yaml", [], config=MULTI_GPU)


def test_bad_node_id_is_an_error():
    with pytest.raises(LaunchError):
        plan_node(node_env(2))


@pytest.mark.parametrize("nodes, gpus, name", [
    (1, 0, "cpu_2proc.yaml"), (1, 1, "gpu_1.yaml"), (1, 8, "gpu_multi.yaml"), (4, 8, "multinode.yaml"),
])
def test_auto_config_choice(nodes, gpus, name):
    path = choose_accelerate_config(nodes, gpus)
    assert Path(path).name == name and (ROOT / path).is_file()


def test_deepspeed_on_cpu_gets_the_cpu_accelerator():
    assert launch_env({"distributed_type": "DEEPSPEED"}, {}) == {"DS_ACCELERATOR": "cpu"}
    assert launch_env({"distributed_type": "DEEPSPEED"}, {"SLURM_GPUS_ON_NODE": "4"}) == {}


def test_dry_run_prints_the_command_for_this_node():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(node_env(1, SLURM_JOB_NODELIST="localhost,127.0.0.1"))
    res = subprocess.run([sys.executable, "-m", "cxr_dist.runs.slurm_launch", "--accelerate-config",
                          "launch/multinode.yaml", "--dry-run", "--", "--config", "configs/tiny.toml"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "--machine_rank 1" in res.stderr and "--num_processes 8" in res.stderr
    assert "--main_process_ip localhost" in res.stderr
    assert res.stderr.rstrip().endswith("-m cxr_dist.train --config configs/tiny.toml")


# ----------------------------------------------------------------------------- real jobs
# Each job: 2 CPU processes (launch/cpu_2proc.yaml, picked by slurm_launch for a GPU-less job),
# configs/tiny.toml with 3 + 1 epochs and small batches. The preemption tests hold the training
# after epoch 1's checkpoint (held_env) and signal it then: the signal lands in the middle of
# training whatever the machine's speed.

from tests.slurm_fixture import ROOT as _ROOT, job_env, log_text, require_cluster, sbatch, wait_job  # noqa: E402

TINY = _ROOT / "configs" / "tiny.toml"
EPOCHS = 4
EXPERIMENT = "cxr-dist-tiny"  # configs/tiny.toml


def train_args(shards: Path, run_dir: Path, db: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY), "--data.shards_dir", str(shards), "--train.run_dir", str(run_dir),
            "--tracking.uri", f"sqlite:///{db}", "--train.phases.0.epochs", str(EPOCHS - 1),
            "--loader.batch_size", "4", *extra]


def mlflow_runs(db: Path, experiment: str = EXPERIMENT) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment} in {db}"
    return client.search_runs([exp.experiment_id])


def metric_steps(db: Path, run_id: str, key: str = "val/loss") -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(tracking_uri=f"sqlite:///{db}").get_metric_history(run_id, key))


def history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "history.json").read_text())


def assert_finished(run_dir: Path, db: Path, logs: str) -> object:
    """Both phases trained, a complete final checkpoint, one FINISHED MLflow run with every epoch."""
    meta = json.loads((run_dir / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["progress"]["epoch"] == EPOCHS, logs
    assert (run_dir / "checkpoints" / "latest" / "COMPLETE").exists()
    assert [row["epoch"] for row in history(run_dir)] == list(range(1, EPOCHS + 1)), logs
    assert [row["phase"] for row in history(run_dir)] == [1] * (EPOCHS - 1) + [2]
    assert not (run_dir / "PREEMPTED").exists()
    runs = mlflow_runs(db)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    assert runs[0].info.status == "FINISHED"
    assert metric_steps(db, runs[0].info.run_id) == list(range(1, EPOCHS + 1))
    assert runs[0].data.params.get("world_size") == "2", runs[0].data.params.get("world_size")
    return runs[0]


@pytest.fixture(scope="module")
def cluster():
    require_cluster()


@pytest.fixture(scope="module")
def uninterrupted(cluster, tiny_shards, tmp_path_factory):
    """(a) an uninterrupted run through slurm/train.sh: the reference for the preempted one."""
    tmp = tmp_path_factory.mktemp("slurm-a")
    run_dir, db = tmp / "run", tmp / "mlflow.db"
    job = sbatch("train.sh", train_args(tiny_shards, run_dir, db), tmp / "logs")
    rec = wait_job(job, timeout=300)[0]
    logs = log_text(tmp / "logs")
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", logs
    return run_dir, db, logs


@pytest.mark.slurm
@pytest.mark.slow
def test_train_job_runs_both_phases_with_two_processes(uninterrupted):
    run_dir, db, logs = uninterrupted
    assert "ACCELERATE_USE_CPU=true" in logs and "--num_processes 2" in logs
    assert_finished(run_dir, db, logs)


def held_env(hold: Path, **extra: str) -> dict[str, str]:
    """A job environment whose training holds after epoch 1's checkpoint, per run folder, until
    the test releases it (tests/slurm_hooks/sitecustomize.py: test-only, on this PYTHONPATH)."""
    return job_env(CXR_TEST_HOLD=str(hold), PYTHONPATH=str(ROOT / "tests" / "slurm_hooks"), **extra)


def held(where: Path, ranks: int = 2) -> bool:
    return all((where / f"held-rank{r}").exists() for r in range(ranks))


def wait_for_file(path: Path, logs: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"no {path} after {timeout:.0f} s:\n{log_text(logs)}"
        time.sleep(0.1)


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes(uninterrupted, tiny_shards, tmp_path):
    run_dir, db, hold, logs = tmp_path / "run", tmp_path / "mlflow.db", tmp_path / "hold", tmp_path / "logs"
    job = sbatch("train.sh", train_args(tiny_shards, run_dir, db), logs, env=held_env(hold))
    try:
        # Deterministic: both ranks are held after epoch 1's checkpoint until released, so the
        # signal lands in the middle of training (waiting for the checkpoint to appear raced the
        # rest of the run).
        deadline = time.time() + 240
        while not held(hold / run_dir.name):
            assert job_records_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), log_text(logs)
            assert time.time() < deadline, "not held after epoch 1 within 240 s:\n" + log_text(logs)
            time.sleep(0.2)
        # What SLURM does before a preemption / the time limit with --signal=B:USR1@N.
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
        wait_for_file(run_dir / "PREEMPT", logs)  # the batch script's trap ran
        (hold / run_dir.name / "release").touch()
        rec = wait_job(job, timeout=360, min_restarts=1)[0]
    finally:
        subprocess.run(["scancel", job], timeout=30)
    logs = log_text(tmp_path / "logs")
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", logs
    assert rec["Restarts"] == "1", rec
    assert "got USR1" in logs and "requeueing job" in logs and "resuming from" in logs, logs
    run = assert_finished(run_dir, db, logs)
    # Same schedule as the uninterrupted run: the same epochs, once each, in the same phases.
    ref_dir, ref_db, _ = uninterrupted
    assert [(r["epoch"], r["phase"]) for r in history(run_dir)] == [(r["epoch"], r["phase"]) for r in history(ref_dir)]
    # ... and, since a resumed run replays its epochs exactly, the same numbers (measured: equal
    # to 6 decimals; the tolerance only absorbs float summation order).
    for got, ref in zip(history(run_dir), history(ref_dir)):
        for key in ("train/loss", "val/loss"):
            assert got[key] == pytest.approx(ref[key], rel=1e-3), (got["epoch"], key)
    assert run.info.run_id == (run_dir / "mlflow_run_id.txt").read_text().strip()


def job_records_state(job: str) -> str:
    from tests.slurm_fixture import job_records

    recs = job_records(job)
    return recs[0].get("JobState", "") if recs else ""


@pytest.fixture(scope="module")
def kfold_shards(cluster, tiny_data, tmp_path_factory) -> Path:
    """Shards with 2 folds, written by slurm/prepare.sh as a job."""
    tmp = tmp_path_factory.mktemp("kfold-shards")
    out = tmp / "shards"
    job = sbatch("prepare.sh", ["--config", str(TINY), "--data", str(tiny_data), "--out", str(out),
                                "--data.k_folds", "2"], tmp / "logs")
    rec = wait_job(job, timeout=300)[0]
    assert rec["JobState"] == "COMPLETED", log_text(tmp / "logs")
    assert json.loads((out / "index.json").read_text())["k_folds"] == 2
    return out


@pytest.mark.slurm
@pytest.mark.slow
def test_kfold_array_trains_every_fold_and_folds_summarises_them(kfold_shards, tmp_path):
    db = tmp_path / "mlflow.db"
    args = ["--config", str(TINY), "--data.shards_dir", str(kfold_shards), "--data.k_folds", "2",
            "--tracking.uri", f"sqlite:///{db}", "--tracking.experiment", "kfold-test",
            "--train.phases.0.epochs", "1"]
    env = job_env(CXR_RUN_DIR=str(tmp_path / "runs" / "cv"))
    job = sbatch("kfold.sh", args, tmp_path / "logs", sbatch_opts=["--array=0-1"], env=env)
    records = wait_job(job, timeout=420)
    logs = log_text(tmp_path / "logs")
    assert len(records) == 2 and all(r["JobState"] == "COMPLETED" for r in records), logs
    for fold in (0, 1):
        run_dir = tmp_path / "runs" / f"cv-fold{fold}"
        assert (run_dir / "checkpoints" / "latest" / "COMPLETE").exists(), logs
    runs = mlflow_runs(db, "kfold-test")  # two folds and their campaign's parent
    assert sorted(r.data.tags.get("fold", "parent") for r in runs) == ["0", "1", "parent"]
    assert all(r.info.status == "FINISHED" and r.data.tags["campaign"] == job for r in runs)
    res = subprocess.run([str(Path(sys.executable).parent / "cxr-dist"), "folds", "--experiment", "kfold-test",
                          "--tracking-uri", f"sqlite:///{db}", "--json"],
                         cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads(res.stdout)
    assert summary["folds"] == ["0", "1"] and summary["campaign"] == job and summary["nested"]
    assert summary["metrics"] and all(s["n"] == 2 for s in summary["metrics"].values())


def _task_log(log_dir: Path, job: str, task: int) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(log_dir.glob(f"*-{job}_{task}.out")))


@pytest.mark.slurm
@pytest.mark.slow
def test_preempting_one_kfold_task_requeues_only_that_task(kfold_shards, mlflow_server, tmp_path):
    """Issue 15 (1): USR1 to ONE task of a running 2-fold array. Only that task checkpoints,
    requeues and resumes; the other fold runs through once. The task preempted is the one whose
    SLURM_JOB_ID is the array's own id (the last task to start), the case where
    `scontrol requeue $SLURM_JOB_ID` requeued the whole array. Both folds run at the same time
    (1 CPU each), against a real MLflow server: one campaign, one parent run, two nested runs."""
    from mlflow import MlflowClient

    from cxr_dist.runs.compare import fold_summary
    from tests.slurm_fixture import TERMINAL, job_records

    logs, experiment = tmp_path / "logs", "kfold-preempt"
    args = ["--config", str(TINY), "--data.shards_dir", str(kfold_shards), "--data.k_folds", "2",
            "--tracking.uri", mlflow_server, "--tracking.experiment", experiment, "--loader.batch_size", "4"]
    hold = tmp_path / "hold"  # both folds hold after epoch 1's checkpoint until released: no race
    env = held_env(hold, CXR_RUN_DIR=str(tmp_path / "runs" / "cv"))
    job = sbatch("kfold.sh", args, logs, env=env,
                 sbatch_opts=["--array=0-1", "--cpus-per-task=1", f"--output={logs}/%x-%A_%a.out"])
    try:
        deadline, target = time.time() + 300, None
        while time.time() < deadline:
            recs = {r.get("ArrayTaskId"): r for r in job_records(job)}
            running = [t for t, r in recs.items() if r.get("JobState") == "RUNNING"]
            mine = [t for t, r in recs.items() if r.get("JobId") == job]
            if len(running) == 2 and mine and held(hold / f"cv-fold{int(mine[0])}"):
                target = int(mine[0])
                break
            assert all(r.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING") for r in recs.values()), \
                (recs, log_text(logs))
            time.sleep(0.2)
        else:
            raise AssertionError(f"not held after epoch 1 with both folds running after 300 s:\n{log_text(logs)}")
        other = 1 - target
        subprocess.run(["scancel", "--signal=USR1", "--batch", f"{job}_{target}"], check=True, timeout=30)
        wait_for_file(tmp_path / "runs" / f"cv-fold{target}" / "PREEMPT", logs)  # its batch script's trap ran
        for fold in (0, 1):
            (hold / f"cv-fold{fold}").mkdir(parents=True, exist_ok=True)
            (hold / f"cv-fold{fold}" / "release").touch()
        deadline = time.time() + 420
        while time.time() < deadline:
            recs = {int(r["ArrayTaskId"]): r for r in job_records(job) if r.get("ArrayTaskId", "").isdigit()}
            if len(recs) == 2 and all(r.get("JobState") in TERMINAL for r in recs.values()) \
                    and int(recs[target].get("Restarts", "0")) >= 1:
                break
            time.sleep(1)
        else:
            raise AssertionError(f"array {job} did not finish: {recs}\n{log_text(logs)}")
    finally:
        subprocess.run(["scancel", job], timeout=30)
    all_logs = log_text(logs)
    # The old `scontrol requeue $SLURM_JOB_ID` (= the array id here) restarted the other fold too.
    assert (recs[target]["Restarts"], recs[other]["Restarts"]) == ("1", "0"), all_logs
    for task in (0, 1):
        assert recs[task]["JobState"] == "COMPLETED" and recs[task]["ExitCode"] == "0:0", all_logs

    target_log, other_log = _task_log(logs, job, target), _task_log(logs, job, other)
    assert f"requeueing job {job}_{target}" in target_log and "resuming from" in target_log, target_log
    assert [line.split("(restart ")[1][0] for line in target_log.splitlines() if line.startswith("[cxr] job ")] \
        == ["0", "1"], target_log
    assert other_log.count("[cxr] job ") == 1 and "(restart 0)" in other_log, other_log  # started once
    assert "got USR1" not in other_log and "requeueing" not in other_log, other_log
    for fold in (0, 1):
        run_dir = tmp_path / "runs" / f"cv-fold{fold}"
        assert (run_dir / "checkpoints" / "latest" / "COMPLETE").exists(), all_logs
        assert [r["epoch"] for r in history(run_dir)] == [1, 2, 3], (fold, all_logs)  # each epoch once

    # Issue 15 (2): one campaign (the array job id), one parent, both folds nested, one run per
    # fold (the preempted one resumed its own run), and `folds` summarises exactly those.
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get("cxr.campaign_parent") == "confirmed"]
    folds = [r for r in runs if "fold" in r.data.tags]
    assert len(runs) == 3 and len(parents) == 1 and len(folds) == 2, [r.data.tags for r in runs]
    assert parents[0].data.tags["campaign"] == job
    for r in folds:
        assert r.info.status == "FINISHED" and r.data.tags["campaign"] == job
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        run_dir = Path(r.data.tags["run_dir"])
        assert (run_dir / "mlflow_run_id.txt").read_text().strip() == r.info.run_id
    summary = fold_summary(client, experiment)
    assert summary["campaign"] == job and summary["folds"] == ["0", "1"] and summary["missing"] == {}


@pytest.mark.slurm
@pytest.mark.slow
def test_prepare_array_writes_the_single_process_bytes(cluster, tmp_path):
    """Issue 16.4: `sbatch --array=0-2 slurm/prepare.sh`: three tasks decode their shares (two at
    a time, 1 CPU each), the first submits the merge job (afterok on the array), and the folder
    holds the same bytes as a single-process prepare of the same arguments: every tar,
    index.json and skipped.jsonl, and no parts left behind. ~60 rows, one of them undecodable."""
    import re

    from cxr_dist.config import DataConfig
    from cxr_dist.data.shards import write_shards
    from tests.datagen import make_dataset

    data = make_dataset(tmp_path / "data", n_uids=30, size=48, broken=True)
    out = tmp_path / "array"
    args = ["--data", str(data), "--out", str(out), "--data.image_size", "40", "--loader.input_size", "32",
            "--data.samples_per_shard", "7", "--data.max_skip_frac", "0.2"]
    job = sbatch("prepare.sh", args, tmp_path / "logs", sbatch_opts=["--array=0-2", "--cpus-per-task=1"])
    records = wait_job(job, timeout=300)
    logs = log_text(tmp_path / "logs")
    assert len(records) == 3 and all(r["JobState"] == "COMPLETED" for r in records), logs
    merge_job = re.search(r"submitted merge job (\d+) \(after array (\d+), 3 tasks\)", logs)
    assert merge_job and merge_job.group(2) == job, logs
    merge = wait_job(merge_job.group(1), timeout=300)[0]
    logs = log_text(tmp_path / "logs")
    assert merge["JobState"] == "COMPLETED" and merge["ExitCode"] == "0:0", logs
    assert sorted(re.findall(r"prepare task (\d) of 3", logs)) == ["0", "1", "2"], logs

    single = tmp_path / "single"
    write_shards(DataConfig(data_dir=str(data), image_size=40, samples_per_shard=7,
                            max_skip_frac=0.2, prepare_workers=1), single)
    want = {p.name: p.read_bytes() for p in single.iterdir()}
    got = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(got) == sorted(want), logs
    assert sum(n.endswith(".tar") for n in want) >= 6
    for name, blob in want.items():
        assert got[name] == blob, name
