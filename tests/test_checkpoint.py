"""Checkpoints: exact resume, RNG, atomicity under crashes, corrupt and foreign files, key types."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_dist.model import checkpoint as ckpt
from cxr_dist.model.checkpoint import (
    FORMAT,
    copy_as,
    flatten,
    latest_checkpoint,
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unflatten,
    write_json_atomic,
)
from cxr_dist.errors import CheckpointError


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                               torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))


def _steps(model, opt, sched, n: int) -> None:
    """Train steps that consume every RNG a real loop uses (torch dropout/data, numpy, python)."""
    model.train()
    for _ in range(n):
        x = torch.randn(6, 4) + float(np.random.rand()) + random.random()
        y = torch.randint(0, 2, (6,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()


def _setup():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _save(run_dir, tag="latest", step=0, model=None, opt=None, sched=None):
    model = model or _model()
    train_state = {"optimizer": opt.state_dict() if opt else {}, "scheduler": sched.state_dict() if sched else {},
                   "rng": rng_state()}
    meta = {"epoch": step, "phase": 0, "global_step": step, "metrics": {"auroc": float("nan")},
            "config": {"train": {"lr": 1e-3}}}
    return save_checkpoint(run_dir, tag, model.state_dict(), train_state, meta)


def test_resume_continues_identically(tmp_path):
    torch.manual_seed(1); np.random.seed(1); random.seed(1)
    model, opt, sched = _setup()
    _steps(model, opt, sched, 5)
    path = _save(tmp_path, step=5, model=model, opt=opt, sched=sched)
    _steps(model, opt, sched, 7)  # the uninterrupted run
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(99); np.random.seed(99); random.seed(99)  # a fresh process would differ
    model2, opt2, sched2 = _setup()
    model_state, train_state, meta = load_checkpoint(tmp_path)  # run dir -> latest
    model2.load_state_dict(model_state)
    opt2.load_state_dict(train_state["optimizer"])
    sched2.load_state_dict(train_state["scheduler"])
    set_rng_state(train_state["rng"])
    _steps(model2, opt2, sched2, 7)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert meta["format"] == FORMAT and meta["global_step"] == 5 and np.isnan(meta["metrics"]["auroc"])
    assert meta["config"] == {"train": {"lr": 1e-3}} and "torch" in meta["versions"]
    assert path == tmp_path / "checkpoints" / "latest"
    for p in (path, path / "model.safetensors"):  # other accepted forms of the path
        assert load_model_state(p)[1]["global_step"] == 5


def test_rng_round_trip(tmp_path):
    random.seed(5); np.random.seed(5); torch.manual_seed(5)
    np.random.randn()  # leaves a cached gaussian in numpy's legacy state
    save_checkpoint(tmp_path, "latest", {}, {"rng": rng_state()}, {})
    draw = lambda: (random.random(), np.random.randn(), torch.rand(3).tolist())  # noqa: E731
    expected = draw()
    draw()
    set_rng_state(load_checkpoint(tmp_path)[1]["rng"])
    assert draw() == expected


def test_flatten_preserves_types_and_key_types():
    obj = {0: torch.arange(3), "0": "str key", 1.5: None, (1, "a"): [True, 2, 3.0, "tensor"],
           "a.b": torch.ones(1), "a": {"b": torch.zeros(1)}, "t": (1, (2.5, None)),
           "inf": float("inf"), "np": np.int64(7)}
    tensors, skel = flatten(obj)
    back = unflatten(tensors, json.loads(json.dumps(skel)))
    assert set(back) == {0, "0", 1.5, (1, "a"), "a.b", "a", "t", "inf", "np"}
    assert torch.equal(back[0], obj[0]) and back["0"] == "str key" and back[1.5] is None
    assert back[(1, "a")] == [True, 2, 3.0, "tensor"] and isinstance(back[(1, "a")][2], float)
    assert back["t"] == (1, (2.5, None)) and back["inf"] == float("inf") and back["np"] == 7
    assert torch.equal(back["a.b"], torch.ones(1)) and torch.equal(back["a"]["b"], torch.zeros(1))
    with pytest.raises(TypeError, match="'x.y'"):
        flatten({"x": {"y": object()}})


def test_int_keys_survive_checkpoint(tmp_path):
    save_checkpoint(tmp_path, "latest", {}, {"state": {0: {"step": torch.tensor(3.0)}, 10: {}}}, {})
    state = load_checkpoint(tmp_path)[1]["state"]
    assert list(state) == [0, 10] and state[0]["step"].item() == 3.0


def test_shared_and_odd_tensors(tmp_path):
    w = torch.randn(4, 4)
    sd = {"a": w, "tied": w, "view": w[:2], "t": w.t(), "empty": torch.zeros(0), "e2": torch.zeros(0, 3),
          "bf16": torch.randn(2, dtype=torch.bfloat16), "flag": torch.tensor(True),
          "grad": torch.ones(2, requires_grad=True)}
    save_checkpoint(tmp_path, "latest", sd, {}, {})
    back, _ = load_model_state(tmp_path)
    for k, v in sd.items():
        assert torch.equal(back[k], v.detach()) and back[k].dtype == v.dtype, k


def _crash_in_child(run_dir: Path, patch: str, nth: int) -> None:
    """Run a save in a forked child that dies (os._exit, no cleanup) at the nth call of `patch`."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            calls = [0]
            target = os if patch == "replace" else ckpt
            name = "replace" if patch == "replace" else "_write_bytes"
            real = getattr(target, name)

            def dying(*a, **k):
                calls[0] += 1
                if calls[0] == nth:
                    os._exit(17)
                return real(*a, **k)

            setattr(target, name, dying)
            _save(run_dir, step=2)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 17


@pytest.mark.parametrize("patch,nth,expect_step", [
    ("write", 2, 1),    # died writing the second file: old checkpoint survives
    ("write", 5, 1),    # died writing COMPLETE itself
    ("replace", 1, 1),  # died before moving the old one away
    ("replace", 2, 2),  # died between the two renames: the complete new one is found in .tmp-*
])
def test_crash_leaves_a_complete_checkpoint(tmp_path, patch, nth, expect_step):
    _save(tmp_path, step=1)
    _crash_in_child(tmp_path, patch, nth)
    found = latest_checkpoint(tmp_path)
    assert found is not None and (found / "COMPLETE").is_file()
    assert load_checkpoint(tmp_path)[2]["global_step"] == expect_step
    # The next save cleans up and is the one found afterwards.
    _save(tmp_path, step=3)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest"] and load_model_state(tmp_path)[1]["global_step"] == 3


def test_crash_on_first_save_leaves_nothing_loadable(tmp_path):
    _crash_in_child(tmp_path, "write", 3)
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="no complete 'latest' checkpoint"):
        load_checkpoint(tmp_path)


def test_failed_rename_restores_previous(tmp_path, monkeypatch):
    _save(tmp_path, step=1)
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, step=2)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["latest"]
    assert load_checkpoint(tmp_path)[2]["global_step"] == 1


def test_copy_as_best(tmp_path):
    _save(tmp_path, step=1)
    best = copy_as(tmp_path, "latest", "best")
    _save(tmp_path, step=2)  # overwriting latest must not touch best (hard links are safe)
    assert load_model_state(best)[1]["global_step"] == 1
    assert load_model_state(tmp_path, tag="best")[1]["global_step"] == 1
    assert load_model_state(tmp_path)[1]["global_step"] == 2
    with pytest.raises(CheckpointError):
        copy_as(tmp_path, "nope", "best")
    with pytest.raises(ValueError):
        _save(tmp_path, tag=".hidden")


def test_corrupt_files_raise_clear_errors(tmp_path):
    path = _save(tmp_path, step=1)
    model_file = path / "model.safetensors"
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    model_file.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="checksum"):
        load_model_state(path)
    model_file.write_bytes(data)
    (path / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt metadata"):
        load_checkpoint(path)
    (path / "meta.json").write_text(json.dumps({"format": "cxr-dist-checkpoint/9"}))
    with pytest.raises(CheckpointError, match="format 'cxr-dist-checkpoint/9'"):
        load_checkpoint(path)
    (path / "meta.json").write_text(json.dumps({"epoch": 1}))
    with pytest.raises(CheckpointError, match="not a cxr-dist checkpoint"):
        load_checkpoint(path)
    (path / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither"):
        load_checkpoint(tmp_path / "empty")


class _Evil:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_is_rejected_and_never_unpickled(tmp_path):
    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps({"weight": _Evil(marker)})
    pt = tmp_path / "model.pt"
    pt.write_bytes(payload)
    with pytest.raises(CheckpointError, match="never loaded"):
        load_checkpoint(pt)
    # A pickle disguised as model.safetensors inside an otherwise valid checkpoint.
    path = _save(tmp_path / "run", step=1)
    (path / "model.safetensors").write_bytes(payload)
    complete = json.loads((path / "COMPLETE").read_text())
    complete["files"]["model.safetensors"] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (path / "COMPLETE").write_text(json.dumps(complete))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_model_state(path)
    assert not marker.exists()


def test_write_json_atomic(tmp_path):
    p = tmp_path / "sub" / "metrics.json"
    write_json_atomic(p, {"a": 1, "np": np.float32(0.5)})
    write_json_atomic(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    assert [q.name for q in p.parent.iterdir()] == ["metrics.json"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_and_rng(tmp_path):
    torch.cuda.manual_seed_all(3)
    w = torch.randn(3, device="cuda")  # initialises CUDA so rng_state() records it
    state = rng_state()  # after every draw but the one that checks the restore
    assert "cuda" in state
    save_checkpoint(tmp_path, "latest", {"w": w}, {"rng": state}, {})
    expected = torch.rand(4, device="cuda").cpu()
    model_state, train_state, _ = load_checkpoint(tmp_path)
    assert model_state["w"].device.type == "cpu"
    set_rng_state(train_state["rng"])
    assert torch.equal(torch.rand(4, device="cuda").cpu(), expected)


def test_files_other_processes_wrote_are_recorded_and_checked(tmp_path):
    """DeepSpeed's shards (train/state.py): each rank writes into the shared temporary folder, the
    main process's save records and installs them with the rest; they are handed to DeepSpeed only
    if they are byte for byte the files recorded; `best` never carries them."""
    tmp = ckpt.shared_tmp(tmp_path, "latest", "a1b2")
    for rank in (0, 1):  # what each rank's accelerator.save_state writes
        shard = tmp / "deepspeed" / "pytorch_model" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        shard.parent.mkdir(parents=True, exist_ok=True)
        shard.write_bytes(bytes([rank]) * 100)
    model = _model()
    save_checkpoint(tmp_path, "latest", model.state_dict(), {}, {"epoch": 1}, tmp=tmp)
    latest = tmp_path / "checkpoints" / "latest"
    assert not tmp.exists() and latest.is_dir()
    recorded = json.loads((latest / "COMPLETE").read_text())["files"]
    assert recorded["deepspeed/pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt"]["bytes"] == 100
    assert ckpt.verified_subdir(tmp_path, "deepspeed") == latest / "deepspeed"
    assert ckpt.verified_subdir(tmp_path, "nothing-here") is None

    best = copy_as(tmp_path, "latest", "best")
    assert not (best / "deepspeed").exists()
    assert all(not n.startswith("deepspeed/") for n in json.loads((best / "COMPLETE").read_text())["files"])
    ckpt.amend_checkpoint(best, {"threshold": 0.5})  # reads every recorded file: none is missing
    assert load_model_state(best)[1]["threshold"] == 0.5

    shard = latest / "deepspeed" / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(bytes([7]) * 100)  # same size, other bytes
    with pytest.raises(CheckpointError, match="differs"):
        ckpt.verified_subdir(tmp_path, "deepspeed")
    shard.write_bytes(bytes([0]) * 100)
    (latest / "deepspeed" / "planted.pkl").write_bytes(b"x")  # a file nobody recorded
    with pytest.raises(CheckpointError, match="not recorded"):
        ckpt.verified_subdir(tmp_path, "deepspeed")
