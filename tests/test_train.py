"""Real multi-process training through `accelerate launch` (2 CPU processes, gloo).

No GPU here: the CPU launch settings of launch/cpu_2proc.yaml give real DDP with gloo, so the
distributed code paths (gradient all-reduce, gathering, agreement on preemption) are the real ones.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cxr_dist.config import ModelConfig
from cxr_dist.model.classifier import build_model
from cxr_dist.train.loop import seed_everything
from tests.conftest import QUICK_END, ROOT, VENV_BIN, _env, accelerate_launch, run_cmd, tiny_overrides
from tests.train_hooks import wait_until_held

pytestmark = pytest.mark.slow


def probe(tmp: Path, shards: Path, name: str, *extra: str, config="cpu_2proc.yaml", env=None):
    run_dir = tmp / name
    res = accelerate_launch(["-m", "tests.rank_probe", str(tmp / f"{name}-params"),
                             *tiny_overrides(shards, run_dir, *extra)], cwd=tmp, config=config, env=env)
    return res, run_dir, tmp / f"{name}-params"


def params_of(params_dir: Path, rank: int) -> dict[str, torch.Tensor]:
    return load_file(str(params_dir / f"rank{rank}.safetensors"))


@pytest.fixture(scope="module")
def ddp_run(tiny_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    res, run_dir, params = probe(tmp, tiny_shards, "uninterrupted")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return tmp, res, run_dir, params


def assert_same_state(a: dict, b: dict, skip_running_stats: bool = False) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if skip_running_stats and ("running_" in k or "num_batches" in k):
            continue
        assert torch.equal(a[k], b[k]), k


def test_two_processes_train_both_phases(ddp_run):
    tmp, res, run_dir, _ = ddp_run
    assert "rank 0/2" in res.stdout and "rank 1/2" in res.stdout
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["phase"] for r in history] == [1, 1, 2]
    assert "328,962 trainable" in res.stdout + res.stderr and "2,304,722 trainable" in res.stdout + res.stderr
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert {"val", "test"} <= evaluation.keys() and "always_abnormal" in evaluation["test"]
    # Picked on the val predictions of both ranks, gathered: one of those probabilities.
    assert 0.0 < evaluation["test_at_val_threshold"]["threshold"] < 1.0
    # Only the main process prints the epoch summaries: one line per epoch, not one per rank.
    assert (res.stdout + res.stderr).count("epoch 3/3 [finetune]") == 1


def test_ranks_hold_identical_parameters_after_phase_two(ddp_run):
    """The DDP trap: parameters unfrozen after wrapping drift apart per rank unless re-wrapped."""
    _, _, _, params = ddp_run
    r0, r1 = params_of(params, 0), params_of(params, 1)
    # BatchNorm running stats of *trained* layers are per-rank by design (local batches);
    # every parameter and every frozen buffer must match exactly.
    assert_same_state(r0, r1, skip_running_stats=True)
    frozen_bn = [k for k in r0 if k.startswith("backbone.bn1.running") or k.startswith("backbone.blocks.0.")]
    assert frozen_bn and all(torch.equal(r0[k], r1[k]) for k in frozen_bn)

    seed_everything(42)
    init = build_model(ModelConfig(pretrained=False)).state_dict()
    last = [k for k in r0 if k.startswith("backbone.blocks.6.1.") and "running" not in k and "num_b" not in k]
    assert any(not torch.equal(r0[k], init[k]) for k in last), "phase 2 did not train the last block"
    # Frozen BatchNorm statistics did not drift (random init: mean 0, var 1).
    assert torch.equal(r0["backbone.bn1.running_mean"], init["backbone.bn1.running_mean"])
    assert torch.equal(r0["backbone.blocks.6.0.bn1.running_var"], init["backbone.blocks.6.0.bn1.running_var"])


def test_kill_then_resume_matches_uninterrupted(ddp_run, tiny_shards):
    tmp, _, ref_run, ref_params = ddp_run
    # The end of the run is not under test here (QUICK_END): the reference run has it.
    run_dir = tmp / "killed"
    hold = tmp / "killed-hold"  # tests.train_hooks holds both ranks after epoch 1's checkpoint: no race
    hold.mkdir()
    args = [str(VENV_BIN / "accelerate"), "launch", "--config_file", str(ROOT / "launch/cpu_2proc.yaml"),
            "-m", "tests.train_hooks", "--hold", str(hold), "tests.rank_probe", str(tmp / "killed-params"),
            *tiny_overrides(tiny_shards, run_dir, *QUICK_END)]
    proc = subprocess.Popen(args, cwd=tmp, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    pids = wait_until_held(proc, hold)
    for pid in pids:  # a crash: no clean-up, no final checkpoint (workers have sessions of their own)
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    res, _, params = probe(tmp, tiny_shards, "killed", *QUICK_END)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "resuming from" in res.stdout + res.stderr
    assert_same_state(params_of(ref_params, 0), params_of(params, 0), skip_running_stats=True)
    ref_hist = json.loads((ref_run / "history.json").read_text())
    hist = json.loads((run_dir / "history.json").read_text())
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    for a, b in zip(ref_hist, hist):
        assert a["val/auroc"] == pytest.approx(b["val/auroc"]) and a["train/loss"] == pytest.approx(b["train/loss"])


def test_preemption_mid_epoch_saves_and_resumes_exactly(ddp_run, tiny_shards):
    """Preemption at an agreed step inside epoch 2 (injected, deterministic): a clean stop with
    the PREEMPTED marker, a mid-epoch checkpoint, and a resumed run identical to the uninterrupted one."""
    tmp, _, ref_run, ref_params = ddp_run
    # 3 steps per epoch with the tiny config (49 samples, 2 ranks x 8): check 5 = epoch 2, step 1.
    res, run_dir, _ = probe(tmp, tiny_shards, "preempted", *QUICK_END, env={"CXR_DIST_FAULT_PREEMPT_AT_CHECK": "5"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "finished=False" in res.stdout and (run_dir / "PREEMPTED").exists()
    meta = json.loads((run_dir / "checkpoints" / "latest" / "meta.json").read_text())
    assert (meta["progress"]["epoch"], meta["progress"]["step_in_epoch"]) == (1, 1)
    res, _, params = probe(tmp, tiny_shards, "preempted", *QUICK_END)  # the end of the run: see ddp_run
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert_same_state(params_of(ref_params, 0), params_of(params, 0), skip_running_stats=True)
    assert len(json.loads((run_dir / "history.json").read_text())) == 3
    assert not (run_dir / "PREEMPTED").exists()


def test_sigterm_the_handler_could_not_raise_still_stops_the_run(tiny_shards, tmp_path):
    # SIGTERM that lands while a DataLoader worker forks: the handler's SystemExit is raised inside
    # an at-fork hook, where Python drops it. The run used to train on to its end (seen under
    # `timeout` in bench/gpu_experiments.sh). Now the next step raises it again (dist.py).
    # tests.train_hooks makes the landing certain: SIGTERM from the hook at the 3rd fork (epoch
    # 2's workers, of 3 epochs). One process, as `timeout python -m cxr_dist.train` runs.
    run_dir = tmp_path / "terminated"
    res = run_cmd([str(VENV_BIN / "python"), "-m", "tests.train_hooks", "--sigterm-at-fork", "3", "cxr_dist.train",
                   *tiny_overrides(tiny_shards, run_dir, *QUICK_END)], cwd=tmp_path)
    assert "Exception ignored" in res.stderr and "SystemExit: 143" in res.stderr, res.stderr[-3000:]
    assert res.returncode == 143, res.stdout[-2000:] + res.stderr[-3000:]
    assert not (run_dir / "evaluation.json").exists()  # it stopped: no end of run
    meta = json.loads((run_dir / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["progress"]["epoch"] < 3


def test_a_process_stuck_after_sigterm_ends_by_the_alarm(tmp_path):
    # The last resort (dist.TERM_GRACE_S, here 1 s): SIGTERM's SystemExit dropped in an at-fork
    # hook, and the process never reaches a training step again: SIGALRM ends it.
    code = (
        "import os, signal, time\n"
        "from cxr_dist import dist\n"
        "dist.TERM_GRACE_S = 1\n"
        "dist.exit_on_sigterm()\n"
        "os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGTERM))\n"
        "if os.fork() == 0:\n"
        "    os._exit(0)\n"
        "print('dropped', flush=True)\n"
        "time.sleep(120)\n"
    )
    res = run_cmd([str(VENV_BIN / "python"), "-c", code], cwd=tmp_path, timeout=100)
    assert res.stdout.strip() == "dropped" and "Exception ignored" in res.stderr, res.stderr[-3000:]
    assert res.returncode == -signal.SIGALRM, res.stderr[-3000:]


@pytest.fixture(scope="module", params=["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"], ids=["zero2", "zero3"])
def ds_run(request, tiny_shards, tmp_path_factory):
    """An uninterrupted DeepSpeed run of both phases (2 CPU processes, gloo)."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers", reason="Accelerate's DeepSpeed path imports transformers")
    tmp = tmp_path_factory.mktemp(request.param.split(".")[0])
    res, run_dir, params = probe(tmp, tiny_shards, "ds", config=request.param)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return request.param, tmp, res, run_dir, params


def test_deepspeed_both_phases(ds_run):
    """ZeRO-2 and ZeRO-3 train both phases; under ZeRO-3 every rank holds a partition of each
    trained parameter, so what the ranks return, the checkpoint and the trainable counts are
    the gathered whole (dist.whole_state, count_trainable)."""
    config, _, res, run_dir, params = ds_run
    assert "rank 0/2" in res.stdout and "rank 1/2" in res.stdout
    assert "328,962 trainable" in res.stdout and "2,304,722 trainable" in res.stdout
    assert [r["phase"] for r in json.loads((run_dir / "history.json").read_text())] == [1, 1, 2]
    r0, r1 = params_of(params, 0), params_of(params, 1)
    assert_same_state(r0, r1, skip_running_stats=True)
    seed_everything(42)
    init = build_model(ModelConfig(pretrained=False)).state_dict()
    assert not torch.equal(r0["backbone.blocks.6.1.conv_pw.weight"], init["backbone.blocks.6.1.conv_pw.weight"])
    assert not torch.equal(r0["head.0.weight"], init["head.0.weight"])
    saved = load_file(str(run_dir / "checkpoints" / "latest" / "model.safetensors"))
    assert saved["head.0.weight"].shape == (256, 1280)  # not ZeRO-3's empty placeholder
    assert_same_state(saved, r0)
    assert {"val", "test"} <= json.loads((run_dir / "evaluation.json").read_text()).keys()


def test_deepspeed_resume_restores_the_optimizer_state(ds_run, tiny_shards):
    """Preempted inside epoch 2, resumed: DeepSpeed's sharded optimizer state (each rank's
    partition of Adam's moments and the fp32 weights) comes back from the checkpoint, so the
    resumed run equals the uninterrupted one bit for bit; restarting Adam's moments instead (what
    a DeepSpeed resume did before) changes 22 parameters of the tiny model's last block."""
    config, tmp, _, ref_run, ref_params = ds_run
    env = {"CXR_DIST_FAULT_PREEMPT_AT_CHECK": "5"}  # epoch 2, step 1 (3 steps per epoch)
    # The end of the run is not under test here (QUICK_END): the reference run (ds_run) has it.
    res, run_dir, _ = probe(tmp, tiny_shards, "preempted", *QUICK_END, config=config, env=env)
    assert res.returncode == 0 and (run_dir / "PREEMPTED").exists(), res.stdout[-3000:] + res.stderr[-5000:]
    latest = run_dir / "checkpoints" / "latest"
    recorded = json.loads((latest / "COMPLETE").read_text())["files"]
    for rank in (0, 1):  # each rank's partition, written into the checkpoint and recorded
        assert f"deepspeed/pytorch_model/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in recorded
    res, _, params = probe(tmp, tiny_shards, "preempted", *QUICK_END, config=config)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "resuming from" in res.stdout and "optimizer state not restored" not in res.stdout
    assert_same_state(params_of(ref_params, 0), params_of(params, 0), skip_running_stats=True)
    # The product (best) holds no DeepSpeed pickles; only latest does, for the resume.
    assert not (run_dir / "checkpoints" / "best" / "deepspeed").exists()
    assert (run_dir / "checkpoints" / "latest" / "deepspeed").is_dir()


def test_resume_after_the_last_epoch_of_a_phase(tiny_shards, tmp_path):
    """A checkpoint taken after a phase's last epoch resumes into the next phase with a fresh
    optimizer: restoring the finished phase's optimizer (other parameter groups) into the next
    phase's failed ("different number of parameter groups"). Here: a run of phase 1 only, then
    the same run dir with the two-phase schedule (one process; the logic is rank-independent)."""
    run_dir = tmp_path / "run"
    head_only = ["--train.phases", '[{name = "head", epochs = 2, unfreeze_blocks = 0, lr = 1e-3}]',
                 "--tracking.enabled", "false"]
    args = [str(VENV_BIN / "python"), "-m", "cxr_dist.train", *tiny_overrides(tiny_shards, run_dir)]
    first = subprocess.run(args + head_only, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(args + ["--tracking.enabled", "false"], cwd=tmp_path, env=_env(), capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout + second.stderr
    history = json.loads((run_dir / "history.json").read_text())
    assert [(r["epoch"], r["phase"]) for r in history] == [(1, 1), (2, 1), (3, 2)]
