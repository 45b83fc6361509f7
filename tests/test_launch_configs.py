"""The shipped launch configs (launch/*.yaml, launch/*.json): well-formed, consistent, and the
CPU ones really start 2 synchronised processes (the silent traps of docs/cluster.md)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
YAMLS = sorted(LAUNCH.glob("*.yaml"))
EXPECTED = {"cpu_2proc.yaml", "gpu_1.yaml", "gpu_multi.yaml", "multinode.yaml", "deepspeed_zero2.yaml",
            "deepspeed_zero3.yaml"}
# Settings that must come from the training config (one place), never be fixed in ds_zero*.json.
DS_AUTO = ["train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"]

# Prints rank/world and all-reduces (rank + 1): 2 processes must both see 1 + 2 = 3.
PROBE = """
import json, os, torch
from accelerate import Accelerator, PartialState
if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
    PartialState(backend="gloo")          # what cxr_dist.dist does for DeepSpeed on the CPU
acc = Accelerator()
t = torch.tensor([acc.process_index + 1.0], device=acc.device)
total = acc.reduce(t, reduction="sum").item()
print("PROBE " + json.dumps({"rank": acc.process_index, "world": acc.num_processes,
      "type": str(acc.distributed_type), "sum": total}) + " END", flush=True)
# gloo aborts ~1 exit in 4 here ("terminate called without an active exception") in its C++
# teardown, after the work is done; skipping the teardown makes the exit status meaningful.
os._exit(0)
"""


def load(name: str) -> dict:
    return yaml.safe_load((LAUNCH / name).read_text())


def test_all_configs_shipped():
    assert EXPECTED <= {p.name for p in YAMLS}
    assert (LAUNCH / "ds_zero2.json").is_file() and (LAUNCH / "ds_zero3.json").is_file()


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_is_a_local_accelerate_config(path: Path):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = yaml.safe_load(path.read_text())
    assert cfg["compute_environment"] == "LOCAL_MACHINE"
    assert cfg["machine_rank"] == 0
    assert isinstance(cfg["num_processes"], int) and cfg["num_processes"] >= 1
    # Nothing cluster-specific is hard-coded: slurm_launch passes address and port per job.
    assert "main_process_ip" not in cfg and "main_process_port" not in cfg
    assert cfg["dynamo_config"]["dynamo_backend"] == "NO"
    if cfg["distributed_type"] == "NO":
        assert cfg["num_processes"] == 1
    if cfg["distributed_type"] == "MULTI_GPU":
        assert cfg["num_processes"] >= 2  # accelerate refuses --multi_gpu with 1 process
        assert cfg["rdzv_backend"] == "static" and cfg["same_network"] is True
    # Accelerate itself can read it.
    ClusterConfig.from_yaml_file(str(path))


def test_cpu_config_is_what_works_on_cpu():
    cfg = load("cpu_2proc.yaml")
    # MULTI_CPU would go through Accelerate's single-process launcher (one process, silently).
    assert cfg["distributed_type"] == "MULTI_GPU" and cfg["use_cpu"] is True
    assert cfg["num_processes"] == 2 and cfg["mixed_precision"] == "no"


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_json_takes_its_settings_from_the_training_config(stage):
    ds = json.loads((LAUNCH / f"ds_zero{stage}.json").read_text())
    for key in DS_AUTO:
        assert ds[key] == "auto", key
    assert ds["bf16"]["enabled"] == "auto" and ds["fp16"]["enabled"] == "auto"
    assert ds["zero_optimization"]["stage"] == stage
    if stage == 3:  # accelerator.get_state_dict / whole weights need the gather on save
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    cfg = load(f"deepspeed_zero{stage}.yaml")
    assert cfg["distributed_type"] == "DEEPSPEED"
    dsc = cfg["deepspeed_config"]
    assert (ROOT / dsc["deepspeed_config_file"]).resolve() == (LAUNCH / f"ds_zero{stage}.json").resolve()
    # With a deepspeed_config_file Accelerate refuses these (they would be ignored).
    for key in ("gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device"):
        assert key not in dsc
    assert "mixed_precision" not in cfg
    # Multi-node: one torchrun per node (srun), not DeepSpeed's own pdsh launcher.
    assert dsc["deepspeed_multinode_launcher"] == "standard"


def test_multinode_config_leaves_the_cluster_to_slurm_launch():
    cfg = load("multinode.yaml")
    assert cfg["distributed_type"] == "MULTI_GPU"
    assert cfg["num_machines"] == 1 and cfg["machine_rank"] == 0  # placeholders, overridden per node


def _launch(tmp_path: Path, config: str, extra_env: dict[str, str], *args: str) -> list[dict]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **extra_env)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / config),
           *args, str(script)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return probes(res.stdout)


def probes(stdout: str) -> list[dict]:
    """The PROBE records (two processes may write them onto one line)."""
    return [json.loads(m) for m in re.findall(r"PROBE (\{.*?\}) END", stdout)]


@pytest.mark.slow
def test_cpu_2proc_really_gives_two_synchronised_processes(tmp_path):
    out = _launch(tmp_path, "cpu_2proc.yaml", {"ACCELERATE_USE_CPU": "true"})
    assert sorted(o["rank"] for o in out) == [0, 1]
    assert all(o["world"] == 2 and o["sum"] == 3.0 for o in out)
    assert all(o["type"] == "DistributedType.MULTI_CPU" for o in out)


@pytest.mark.slow
def test_slurm_launch_sets_the_cpu_flag_itself(tmp_path):
    """Without ACCELERATE_USE_CPU each CPU worker would be rank 0 of 1; slurm_launch adds it."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    (tmp_path / "probe_mod").mkdir()
    (tmp_path / "probe_mod" / "__init__.py").write_text("")
    (tmp_path / "probe_mod" / "__main__.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0",
               PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    res = subprocess.run([sys.executable, "-m", "cxr_dist.runs.slurm_launch", "--accelerate-config",
                          "launch/cpu_2proc.yaml", "--module", "probe_mod"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = probes(res.stdout)
    assert sorted(o["rank"] for o in out) == [0, 1] and all(o["sum"] == 3.0 for o in out)
    assert "--main_process_port 19242" in res.stderr  # derived from the job id


@pytest.mark.slow
def test_deepspeed_zero2_launches_on_cpu(tmp_path):
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")  # Accelerate's DeepSpeed path imports it
    out = _launch(tmp_path, "deepspeed_zero2.yaml", {}, "--num_processes", "2")
    assert sorted(o["rank"] for o in out) == [0, 1]
    assert all(o["world"] == 2 and o["sum"] == 3.0 and o["type"] == "DistributedType.DEEPSPEED" for o in out)


@pytest.mark.slow
def test_multinode_rendezvous_with_two_simulated_nodes(tmp_path):
    """Two launchers, as `srun --ntasks-per-node=1` starts them on a 2-node job, but both on this
    machine: each derives its machine rank from its own SLURM_NODEID, they meet at the first host."""
    import socket

    (tmp_path / "probe_mod").mkdir()
    (tmp_path / "probe_mod" / "__init__.py").write_text("")
    (tmp_path / "probe_mod" / "__main__.py").write_text(PROBE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for node in (0, 1):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true", PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}",
                   SLURM_JOB_ID="555", SLURM_JOB_NUM_NODES="2", SLURM_NODEID=str(node),
                   SLURM_JOB_NODELIST="127.0.0.1,127.0.0.1", SLURM_GPUS_PER_NODE="0")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "cxr_dist.runs.slurm_launch", "--accelerate-config", "launch/multinode.yaml",
             "--procs-per-node", "1", "--main-port", str(port), "--module", "probe_mod"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
    records = [probes(out) for out, _ in outs]
    assert [[r["rank"] for r in rs] for rs in records] == [[0], [1]]  # node 0 holds global rank 0
    assert all(r["world"] == 2 and r["sum"] == 3.0 for rs in records for r in rs)
    assert "--machine_rank 1" in outs[1][1] and "--main_process_ip 127.0.0.1" in outs[1][1]
