"""The command line as a user meets it: one error path, logging and bars, discoverable config, --version."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

import pytest

from cxr_dist import cli
from cxr_dist.config import Config, ConfigError, describe_fields, to_dict
from cxr_dist.errors import CheckpointError, DataError, UserError
from cxr_dist.runs.slurm_launch import LaunchError
from tests.conftest import ROOT, VENV_BIN, _env, run_cmd, tiny_overrides


def _python_m(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, "-m", module, *args], cwd=cwd, timeout=120)


def test_every_user_error_has_one_root():
    for cls in (ConfigError, LaunchError, DataError, CheckpointError):
        assert issubclass(cls, UserError), cls
    assert issubclass(ConfigError, ValueError) and issubclass(LaunchError, ValueError)  # older callers


# (module, arguments with a user error, program name in the message, words of the message)
USER_ERRORS = [
    ("cxr_dist.data.prepare", ["--config", "{tmp}/none.toml", "--data", "{tmp}", "--out", "{tmp}/out"],
     "cxr-dist prepare", "does not exist"),
    ("cxr_dist.train", ["--config", "{tmp}/none.toml"], "cxr_dist.train", "does not exist"),
    ("cxr_dist.product.evaluate_cli", ["--checkpoint", "{tmp}/none", "--shards", "{tmp}", "--threshold", "2"],
     "cxr-dist evaluate", "--threshold"),
    # the command's former module, still called by bench/gpu_experiments.sh: it forwards
    ("cxr_dist.eval.evaluate", ["--checkpoint", "{tmp}/none", "--shards", "{tmp}", "--threshold", "2"],
     "cxr-dist evaluate", "--threshold"),
    ("cxr_dist.product.predict", ["--checkpoint", "{tmp}/none", "{tmp}/x.png"], "cxr-dist predict", "does not exist"),
    ("cxr_dist.runs.compare", ["--tracking-uri", "sqlite:///{tmp}/none.db"], "cxr-dist compare", "no MLflow store"),
    ("cxr_dist.runs.slurm_launch", ["--accelerate-config", "{tmp}/none.yaml", "--dry-run"], "slurm_launch",
     "does not exist"),
]


@pytest.mark.parametrize("module,args,prog,words", USER_ERRORS, ids=[m for m, *_ in USER_ERRORS])
def test_python_m_user_error_is_one_line_exit_2(tmp_path, module, args, prog, words):
    res = _python_m(module, *[a.format(tmp=tmp_path) for a in args], cwd=tmp_path)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: ") and words in lines[0], res.stderr


@pytest.mark.parametrize("command,args,words", [
    ("train", ["--config", "{tmp}/none.toml"], "does not exist"),
    ("train", ["--loader.batch_size", "many"], "loader.batch_size"),
    ("evaluate", ["--checkpoint", "{tmp}/none", "--shards", "{tmp}", "--tta", "0"], "--tta"),
])
def test_cxr_dist_user_error_is_one_line_exit_2(tmp_path, command, args, words):
    res = run_cmd([str(VENV_BIN / "cxr-dist"), command, *[a.format(tmp=tmp_path) for a in args]], cwd=tmp_path,
                  timeout=120)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"cxr-dist {command}: ") and words in lines[0], res.stderr


def test_a_bug_keeps_its_traceback(tmp_path):
    """Only user errors are turned into a message: anything else is a bug and must stay visible."""
    code = ("import sys; from cxr_dist.errors import run_main\n"
            "def main(argv): raise RuntimeError('a bug')\n"
            "sys.exit(run_main('prog', main))")
    res = run_cmd([sys.executable, "-c", code], cwd=tmp_path)
    assert res.returncode == 1 and "Traceback" in res.stderr and "RuntimeError: a bug" in res.stderr


# ----------------------------------------------------------------------------- logging and bars

LOG_PROBE = """
import logging, sys
from tqdm import tqdm
from cxr_dist import log
log.setup(is_main=sys.argv[1] == "main", rank=int(sys.argv[2]))
logging.getLogger("cxr_dist.probe").info("info from cxr-dist")
logging.getLogger("cxr_dist.probe").warning("warning from cxr-dist")
logging.getLogger("somelib").info("info from another library")
logging.getLogger("somelib").warning("warning from another library")
for _ in tqdm(range(50), desc="probe-bar", disable=not log.bars_enabled(sys.argv[1] == "main"), file=sys.stderr):
    pass
print("done")
"""


@pytest.mark.parametrize("role,rank", [("main", 0), ("other", 1)])
def test_logging_to_a_file_shows_messages_and_no_bar(tmp_path, role, rank):
    err = tmp_path / "stderr.log"
    with err.open("w") as f:  # stderr is a file, as in a SLURM job's log
        res = subprocess.run([sys.executable, "-c", LOG_PROBE, role, str(rank)], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=f, text=True, env=_env(), timeout=60)
    text = err.read_text()
    assert res.returncode == 0 and res.stdout.strip() == "done", text
    assert "probe-bar" not in text and "\r" not in text
    assert "warning from cxr-dist" in text and "warning from another library" in text
    assert "info from another library" not in text
    if role == "main":
        assert "INFO cxr_dist.probe: info from cxr-dist" in text and "[rank" not in text
    else:
        assert "info from cxr-dist" not in text and "[rank 1]" in text


def test_bars_need_a_terminal_and_the_main_process(monkeypatch):
    from cxr_dist import log

    class Tty:
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    assert log.bars_enabled(True) and not log.bars_enabled(False)
    monkeypatch.setattr(sys, "stderr", open(__file__))  # a file: no bar
    try:
        assert not log.bars_enabled(True)
    finally:
        sys.stderr.close()


@pytest.mark.slow
def test_training_into_a_log_file_prints_summaries_and_log_lines_but_no_bar(tiny_shards, tmp_path):
    """One real (single-process) training run with stderr in a file, as under sbatch."""
    err = tmp_path / "stderr.log"
    args = tiny_overrides(tiny_shards, tmp_path / "run", "--train.phases.0.epochs", "1", "--train.phases.1.epochs", "1")
    with err.open("w") as f:
        res = subprocess.run([sys.executable, "-m", "cxr_dist.train", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=f, text=True, env=_env(), timeout=600)
    text = err.read_text()
    assert res.returncode == 0, res.stdout[-3000:] + text[-3000:]
    assert "epoch 1/2 [head]" in res.stdout and "epoch 2/2 [finetune]" in res.stdout  # the per-epoch lines
    assert "INFO cxr_dist.runs.tracking: MLflow run" in text  # logging is configured on the main process
    assert "\r" not in text and "it/s" not in text and "s/it" not in text  # no progress bar


# ----------------------------------------------------------------------------- discoverable config


def _plain(value: object) -> object:
    """A default as the plain data TOML parses into: tuples -> lists, dataclasses -> dicts."""
    if dataclasses.is_dataclass(value):
        return to_dict(value)
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


def _fields(cls: type, prefix: str, default: object) -> list[tuple[str, object]]:
    """(dotted name, plain default) for every leaf field; items of a list of tables as name[].field."""
    out = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, name, value = hints[f.name], prefix + f.name, getattr(default, f.name)
        if dataclasses.is_dataclass(tp):
            out += _fields(tp, name + ".", value)
            continue
        out.append((name, _plain(value)))
        item = get_args(tp)[0] if get_origin(tp) is tuple else None
        if item is not None and dataclasses.is_dataclass(item):
            out += _fields(item, name + "[].", item())
    return out


def _check_help(text: str) -> None:
    lines = text.splitlines()
    fields = _fields(Config, "", Config())
    assert len(fields) > 60
    for name, default in fields:
        found = [line for line in lines if line.startswith(f"  {name}: ")]
        assert len(found) == 1, f"{name} is not in the help"
        shown = found[0].split(" = ", 1)[1]
        assert tomllib.loads(f"v = {shown}")["v"] == default, (name, shown, default)
    flat = " ".join(text.split())
    # A comment beside a field, one above a field (joined), and a field without any comment.
    assert "data.image_size: int = 256 longest side of the images stored in the shards" in flat
    assert "train.phases[].epochs: int = 15 how many epochs this phase lasts" in flat
    assert 'model.weights: str = "" Overrides `pretrained` when set: "lite1-package" loads' in flat
    assert "model.dropout: float = 0.5 model.num_classes: int = 2" in flat


def test_describe_fields_lists_every_field_with_default_and_comment():
    _check_help(describe_fields())


def test_cxr_dist_train_help_lists_the_config(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out
    _check_help(out)


def test_python_m_train_help_lists_the_config(tmp_path):
    res = _python_m("cxr_dist.train", "--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    _check_help(res.stdout)


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"cxr-dist {dist_version('cxr-dist')}"
    res = run_cmd([str(VENV_BIN / "cxr-dist"), "--version"], cwd=ROOT)
    assert res.returncode == 0 and res.stdout.strip() == f"cxr-dist {dist_version('cxr-dist')}"


def test_usage_lists_every_command_in_one_column():
    usage = cli._usage().splitlines()
    lines = usage[usage.index("commands:") + 1: usage.index("commands:") + 1 + len(cli.COMMANDS)]
    assert [line.split()[0] for line in lines] == list(cli.COMMANDS)
    # each description starts in the same column, after the longest name ("audit-text") and a space
    starts = {len(line) - len(line[2:].split(" ", 1)[1].lstrip()) for line in lines}
    assert starts == {2 + max(map(len, cli.COMMANDS)) + 1}
