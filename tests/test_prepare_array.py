"""Array prepare (issue 16.4): N tasks each decode a share of the films into a part, a merge writes
the shards. The output must be the single-process prepare's, byte for byte, whatever N and
whatever order the tasks ran in; the merge refuses missing or foreign parts.
(The same through a real `sbatch --array`: tests/test_slurm.py.)"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cxr_dist.data import prepare
from cxr_dist.config import ConfigError, DataConfig, SourceConfig
from cxr_dist.errors import DataError
from cxr_dist.data.index import ShardIndex
from cxr_dist.data.shards import PARTS_DIR, merge_parts, part_path, write_part, write_shards
from tests.conftest import VENV_BIN, _env
from tests.datagen import KERMANY_REGEX, make_dataset, make_folder_dataset

BASE = dict(image_size=40, samples_per_shard=7, prepare_workers=1, max_skip_frac=0.2)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("array-data")
    # broken: a missing file, a file that fails to decode (found only while decoding, in one
    # task's share, and it changes the split) and a row without report.
    return {"iu": make_dataset(root / "iu", n_uids=30, size=48, broken=True),
            "kermany": make_folder_dataset(root / "kermany", n_patients=14, size=48),
            "ext": make_folder_dataset(root / "ext", n_patients=6, size=48, seed=7, subsets=False)}


def iu_cfg(data, **kw) -> DataConfig:
    return DataConfig(data_dir=str(data["iu"]), **{**BASE, **kw})


def multi_cfg(data, **kw) -> DataConfig:
    sources = (SourceConfig(name="iu", format="iu", path=str(data["iu"])),
               SourceConfig(name="kermany", format="folder", path=str(data["kermany"]), patient_regex=KERMANY_REGEX),
               SourceConfig(name="ext", format="folder", path=str(data["ext"]), patient_regex=KERMANY_REGEX,
                            role="external"))
    return DataConfig(sources=sources, **{**BASE, **kw})


def files(out: Path) -> dict[str, bytes]:
    """Every file of a shards folder (hidden ones too: no parts may be left behind)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def array_prepare(cfg: DataConfig, out: Path, order: list[int]) -> ShardIndex:
    for t in order:
        write_part(cfg, out, t, len(order))
    return merge_parts(cfg, out, len(order))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Single-process prepares, the references."""
    root = tmp_path_factory.mktemp("array-ref")
    write_shards(iu_cfg(data), root / "iu")
    write_shards(multi_cfg(data, k_folds=3), root / "multi")
    return {"iu": files(root / "iu"), "multi": files(root / "multi")}


@pytest.mark.parametrize("order", [[0], [2, 0, 1], [3, 1, 0, 2]], ids=["1-task", "3-tasks", "4-tasks"])
def test_array_prepare_is_byte_identical_to_single_process(data, reference, tmp_path, order):
    index = array_prepare(iu_cfg(data), tmp_path / "out", order)
    got = files(tmp_path / "out")
    assert sorted(got) == sorted(reference["iu"])  # no .prepare-parts left
    for name, blob in reference["iu"].items():
        assert got[name] == blob, name
    assert index.skipped["corrupt_image"] == 1 and index.totals["error_skipped"] == 3
    assert sum(1 for n in got if n.endswith(".tar")) >= 6  # several shards per split: real interleaving


def test_several_sources_external_and_folds(data, reference, tmp_path):
    array_prepare(multi_cfg(data, k_folds=3), tmp_path / "out", [1, 0])
    assert files(tmp_path / "out") == reference["multi"]
    assert any(n.startswith("external-") for n in reference["multi"])
    assert any(n.startswith("fold2-") for n in reference["multi"])


def test_cli_tasks_running_at_once_then_merge(data, reference, tmp_path):
    """The command line the SLURM array runs, 3 tasks as concurrent processes on one folder."""
    out = tmp_path / "out"
    common = [str(VENV_BIN / "cxr-dist"), "prepare", "--data", str(data["iu"]), "--out", str(out),
              "--data.image_size", "40", "--loader.input_size", "32", "--data.samples_per_shard", "7",
              "--data.max_skip_frac", "0.2", "--data.prepare_workers", "1"]
    procs = [subprocess.Popen([*common, "--task", str(t), "--tasks", "3"], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for t in range(3)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert not (out / "index.json").exists()  # not complete before the merge
    res = subprocess.run([*common, "--merge", "--tasks", "3"], env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert files(out) == reference["iu"]


def test_merge_refuses_a_missing_task(data, tmp_path):
    cfg, out = iu_cfg(data), tmp_path / "out"
    for t in (0, 2):
        write_part(cfg, out, t, 3)
    with pytest.raises(DataError, match=r"task\(s\) 1\b"):
        merge_parts(cfg, out, 3)
    assert not (out / "index.json").exists() and not list(out.glob("*.tar"))
    write_part(cfg, out, 1, 3)  # the missing task run late: the merge completes
    merge_parts(cfg, out, 3)
    assert (out / "index.json").is_file() and not (out / PARTS_DIR).exists()


def test_merge_refuses_parts_of_another_seed_config_or_task_count(data, tmp_path):
    out = tmp_path / "out"
    write_part(iu_cfg(data, seed=1), out, 0, 2)
    write_part(iu_cfg(data, seed=2), out, 1, 2)
    with pytest.raises(DataError, match="another prepare"):
        merge_parts(iu_cfg(data, seed=2), out, 2)
    write_part(iu_cfg(data, seed=2, image_size=36), out, 0, 2)  # another image size: other JPEGs
    with pytest.raises(DataError, match="another prepare"):
        merge_parts(iu_cfg(data, seed=2), out, 2)
    with pytest.raises(DataError, match="have no part"):  # parts of 2 tasks do not make 3
        merge_parts(iu_cfg(data, seed=2), out, 3)

@pytest.mark.parametrize("cut", [700, 0.5, -10240 - 600], ids=["in-meta", "middle", "last-film"])
def test_merge_refuses_a_part_cut_short(data, tmp_path, cut):
    """A part file cut short (copied by hand, a full disk): refused, never read as short films."""
    cfg, out = iu_cfg(data), tmp_path / "out"
    for t in range(2):
        write_part(cfg, out, t, 2)
    path = part_path(out, 1, 2)
    blob = path.read_bytes()
    path.write_bytes(blob[:int(len(blob) * cut) if isinstance(cut, float) else cut])
    with pytest.raises(DataError, match=r"run task 1 again|lack \d+ row"):
        merge_parts(cfg, out, 2)
    assert not (out / "index.json").exists()


def test_max_skip_frac_is_checked_on_the_whole(data, tmp_path):
    """Each task sees only its share of the errors; the merge refuses as write_shards does."""
    cfg, out = iu_cfg(data, max_skip_frac=0.01), tmp_path / "out"
    with pytest.raises(DataError, match="max_skip_frac") as single:
        write_shards(cfg, tmp_path / "single")
    for t in range(3):
        write_part(cfg, out, t, 3)  # each task succeeds
    with pytest.raises(DataError, match="max_skip_frac") as merged:
        merge_parts(cfg, out, 3)
    assert str(merged.value) == str(single.value)


def test_single_process_prepare_removes_stale_parts(data, reference, tmp_path):
    out = tmp_path / "out"
    write_part(iu_cfg(data), out, 0, 2)  # an array prepare that never merged
    write_shards(iu_cfg(data), out)
    assert files(out) == reference["iu"]


@pytest.mark.parametrize("args, message", [
    (["--task", "3", "--tasks", "3"], "--task must be 0..2"),
    (["--task", "0"], "need --tasks"),
    (["--merge"], "need --tasks"),
    (["--tasks", "2"], "--task T"),
    (["--merge", "--task", "1", "--tasks", "2"], "not --task"),
    (["--task", "x", "--tasks", "2"], "whole number"),
])
def test_cli_refuses_inconsistent_array_flags(args, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        prepare.main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), *args])
