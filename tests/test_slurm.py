"""SLURM: the per-node launch logic (pure, no cluster) and real jobs on a real scheduler.

The cluster tests need `sinfo` to answer (start one with `.ci/slurm_cluster.sh start` and
`source /tmp/cxr-slurm/env.sh`). Without a cluster they are skipped, except under CI=true, where
a missing cluster is a failure: CI must not silently skip the scheduler tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cxr_dist.slurm_launch import (
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
    assert opt(build_launch_command(env, "c.yaml", [], config=cpu, procs_per_node=1), "--num_processes") == "1"


def test_single_process_config_refuses_a_multi_process_allocation():
    with pytest.raises(LaunchError, match="single-process"):
        build_launch_command(node_env(0), "launch/gpu_1.yaml", [], config={"distributed_type": "NO"})


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
    res = subprocess.run([sys.executable, "-m", "cxr_dist.slurm_launch", "--accelerate-config",
                          "launch/multinode.yaml", "--dry-run", "--", "--config", "configs/tiny.toml"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "--machine_rank 1" in res.stderr and "--num_processes 8" in res.stderr
    assert "--main_process_ip localhost" in res.stderr
    assert res.stderr.rstrip().endswith("-m cxr_dist.train --config configs/tiny.toml")
