"""Build and run the `accelerate launch` command for THIS node of a SLURM allocation.

One launcher task per node (``srun --ntasks-per-node=1 python -m cxr_dist.runs.slurm_launch ...``);
each evaluates SLURM's variables on its own node, so every node knows its own machine rank
(the classic bug is computing the rank once in the batch shell: every node then believes it is
machine 0 and the rendezvous hangs).

    python -m cxr_dist.runs.slurm_launch --accelerate-config launch/multinode.yaml \
        -- --config configs/x.toml --train.run_dir runs/x

This module and the sbatch scripts in slurm/ are the only places that read ``SLURM_*``.
``build_launch_command`` is a pure function of the environment so that a 2-node allocation can
be unit-tested on a laptop.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, run_main

# Rendezvous ports: below Linux's ephemeral range (32768+), above well-known services.
PORT_BASE = 15000
PORT_SPAN = 15000

LAUNCH_DIR = Path("launch")


class LaunchError(UserError, ValueError):
    """The allocation or the options cannot produce a valid launch (message says why)."""


@dataclass(frozen=True)
class NodePlan:
    """What this node's launcher passes to `accelerate launch`."""

    num_machines: int
    machine_rank: int
    main_address: str
    main_port: int
    procs_per_node: int

    @property
    def num_processes(self) -> int:
        return self.num_machines * self.procs_per_node


# ----------------------------------------------------------------------------- nodelists


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact host list -> host names, like `scontrol show hostnames`.

    ``"node[01-03,07],gpu5"`` -> ``["node01", "node02", "node03", "node07", "gpu5"]``; zero
    padding is kept; several bracket groups in one name (``"r[1-2]n[1-2]"``) are expanded too.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        if item:
            hosts.extend(_expand_one(item))
    return hosts


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if not m:
        return [item]
    head, tail = item[: m.start()], item[m.end() :]
    out: list[str] = []
    for rng in m.group(1).split(","):
        if "-" in rng:
            lo, hi = rng.split("-", 1)
            width = len(lo)
            for n in range(int(lo), int(hi) + 1):
                out.extend(_expand_one(f"{head}{n:0{width}d}{tail}"))
        else:
            out.extend(_expand_one(f"{head}{rng}{tail}"))
    return out


def scontrol_hostnames(nodelist: str) -> list[str] | None:
    """`scontrol show hostnames NODELIST`, or None when scontrol is unavailable or fails."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    hosts = out.split()
    return hosts or None


# ----------------------------------------------------------------------------- the plan


def _count_gpus(spec: str) -> int:
    """SLURM GPU counts look like "4", "a100:4", "gpu:a100:4" or "a100:2,v100:1"."""
    total = 0
    for part in spec.split(","):
        m = re.search(r"(\d+)\s*$", part.split("(")[0])
        if m:
            total += int(m.group(1))
    return total


def gpus_on_node(env: Mapping[str, str]) -> int:
    """GPUs SLURM gave this node (0 when none or unknown)."""
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        if env.get(key, "").strip():
            n = _count_gpus(env[key])
            if n:
                return n
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible not in ("-1", "NoDevFiles"):
        return len([d for d in visible.split(",") if d.strip()])
    return 0


def derive_port(env: Mapping[str, str]) -> int:
    """Same on every node of a job, different for concurrent jobs (array tasks included)."""
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "0"
    digits = re.sub(r"\D", "", job) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def plan_node(
    env: Mapping[str, str],
    *,
    procs_per_node: int | None = None,
    main_port: int | None = None,
    hostnames: Sequence[str] | None = None,
    default_procs: int = 1,
) -> NodePlan:
    """Read the allocation from SLURM's variables (as seen on this node)."""
    nnodes_text = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or "1"
    num_machines = int(nnodes_text)
    machine_rank = int(env.get("SLURM_NODEID", "0"))
    if not 0 <= machine_rank < num_machines:
        raise LaunchError(f"SLURM_NODEID={machine_rank} is outside 0..{num_machines - 1}")
    if num_machines > 1:
        if hostnames is None:
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
            if not nodelist:
                raise LaunchError("multi-node allocation without SLURM_JOB_NODELIST")
            hostnames = expand_nodelist(nodelist)
        if len(hostnames) != num_machines:
            raise LaunchError(f"{len(hostnames)} hosts in the node list but {num_machines} nodes")
        main_address = hostnames[0]
    else:
        main_address = "127.0.0.1"
    if procs_per_node is None:
        procs_per_node = gpus_on_node(env) or default_procs
    if procs_per_node < 1:
        raise LaunchError(f"processes per node must be >= 1, got {procs_per_node}")
    port = derive_port(env) if main_port is None else main_port
    return NodePlan(num_machines, machine_rank, main_address, port, procs_per_node)


# ----------------------------------------------------------------------------- accelerate


def read_accelerate_config(path: str | Path) -> dict:
    """The YAML launch config as a dict (raises LaunchError when missing or malformed)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise LaunchError(f"accelerate config {p} does not exist (see launch/)")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict) or "distributed_type" not in data:
        raise LaunchError(f"{p}: not an Accelerate config (no distributed_type)")
    return data


def choose_accelerate_config(num_machines: int, gpus_per_node: int) -> str:
    """The shipped config that fits an allocation (what `--accelerate-config auto` picks)."""
    if gpus_per_node == 0:
        if num_machines > 1:
            raise LaunchError("multi-node CPU training is not supported; allocate GPUs or one node")
        return str(LAUNCH_DIR / "cpu_2proc.yaml")
    if num_machines > 1:
        return str(LAUNCH_DIR / "multinode.yaml")
    return str(LAUNCH_DIR / ("gpu_multi.yaml" if gpus_per_node > 1 else "gpu_1.yaml"))


def config_default_procs(config: Mapping) -> int:
    """Processes per node that a YAML asks for when SLURM gave no GPUs (CPU configs)."""
    machines = max(int(config.get("num_machines", 1) or 1), 1)
    return max(int(config.get("num_processes", 1) or 1) // machines, 1)


def build_launch_command(
    env: Mapping[str, str],
    accelerate_config: str,
    train_args: Sequence[str],
    *,
    module: str = "cxr_dist.train",
    procs_per_node: int | None = None,
    main_port: int | None = None,
    hostnames: Sequence[str] | None = None,
    config: Mapping | None = None,
    python: str | None = None,
) -> list[str]:
    """The `accelerate launch` argv for this node. Pure: reads only its arguments.

    ``config`` is the parsed YAML (read from ``accelerate_config`` when None); it decides the
    default processes per node on CPU and whether a multi-node launch is possible at all.
    """
    if config is None:
        config = read_accelerate_config(accelerate_config)
    plan = plan_node(
        env, procs_per_node=procs_per_node, main_port=main_port, hostnames=hostnames,
        default_procs=config_default_procs(config),
    )
    dtype = str(config.get("distributed_type", "NO")).upper()
    if dtype == "NO" and plan.num_processes > 1:
        raise LaunchError(
            f"{accelerate_config} is a single-process config (distributed_type NO) but the "
            f"allocation asks for {plan.num_processes} processes; use gpu_multi/multinode.yaml"
        )
    if dtype == "MULTI_GPU" and plan.num_processes < 2:
        # Accelerate refuses --multi_gpu with one process; say which config fits instead.
        raise LaunchError(f"{accelerate_config} needs at least 2 processes in all; for one process "
                          f"use launch/gpu_1.yaml (or --procs-per-node 2 on a CPU node)")
    cmd = [python or sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(accelerate_config),
           "--num_machines", str(plan.num_machines),
           "--num_processes", str(plan.num_processes),
           "--main_process_port", str(plan.main_port)]
    if plan.num_machines > 1:
        cmd += ["--machine_rank", str(plan.machine_rank),
                "--main_process_ip", plan.main_address]
    cmd += ["-m", module, *train_args]
    return cmd


def launch_env(config: Mapping, env: Mapping[str, str]) -> dict[str, str]:
    """Variables the launched processes need beyond the inherited environment.

    Accelerate's multi-process launcher does not pass the YAML's ``use_cpu`` on to the workers
    (verified, accelerate 1.15): without ACCELERATE_USE_CPU each CPU worker is rank 0 of 1.
    """
    extra: dict[str, str] = {}
    if config.get("use_cpu"):
        extra["ACCELERATE_USE_CPU"] = "true"
    if str(config.get("distributed_type", "")).upper() == "DEEPSPEED" and gpus_on_node(env) == 0:
        extra.setdefault("DS_ACCELERATOR", "cpu")
    return extra


# ----------------------------------------------------------------------------- entry point


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        i = argv.index("--")
        own, train_args = argv[:i], argv[i + 1 :]
    else:
        own, train_args = argv, []
    p = argparse.ArgumentParser(
        prog="python -m cxr_dist.runs.slurm_launch",
        description="Run `accelerate launch` for this node of a SLURM job (one task per node).",
        epilog="Everything after `--` goes to the training module, e.g. -- --config configs/x.toml",
    )
    p.add_argument("--accelerate-config", default=os.environ.get("CXR_ACCELERATE_CONFIG", "auto"),
                   help="a YAML in launch/, or 'auto': cpu_2proc / gpu_1 / gpu_multi / multinode "
                        "from the allocation (env CXR_ACCELERATE_CONFIG)")
    p.add_argument("--procs-per-node", type=int,
                   default=int(os.environ["CXR_PROCS_PER_NODE"]) if os.environ.get("CXR_PROCS_PER_NODE") else None,
                   help="processes per node (default: GPUs SLURM gave the node, else the YAML's "
                        "num_processes; env CXR_PROCS_PER_NODE)")
    p.add_argument("--main-port", type=int,
                   default=int(os.environ["CXR_MAIN_PORT"]) if os.environ.get("CXR_MAIN_PORT") else None,
                   help=f"rendezvous port (default {PORT_BASE} + job id mod {PORT_SPAN}; env CXR_MAIN_PORT)")
    p.add_argument("--module", default="cxr_dist.train", help="python module to launch")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    return p.parse_args(own), train_args


def main(argv: list[str] | None = None) -> int:
    args, train_args = _parse(list(sys.argv[1:] if argv is None else argv))
    env = dict(os.environ)
    # A LaunchError propagates to run_main: "slurm_launch: <why>", exit code 2.
    hostnames = None
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or "1")
    if nodes > 1:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        hostnames = scontrol_hostnames(nodelist) if nodelist else None
    cfg_path = args.accelerate_config
    if cfg_path == "auto":
        cfg_path = choose_accelerate_config(nodes, gpus_on_node(env))
    config = read_accelerate_config(cfg_path)
    cmd = build_launch_command(
        env, cfg_path, train_args, module=args.module, procs_per_node=args.procs_per_node,
        main_port=args.main_port, hostnames=hostnames, config=config,
    )
    extra = launch_env(config, env)
    shown = " ".join(f"{k}={v}" for k, v in extra.items())
    node = env.get("SLURMD_NODENAME", "?")
    print(f"[slurm_launch node={node} rank={env.get('SLURM_NODEID', '0')}] {shown} {shlex.join(cmd)}",
          file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    env.update(extra)
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)
    return 0  # pragma: no cover  (exec does not return)


if __name__ == "__main__":
    sys.exit(run_main("slurm_launch", main))
