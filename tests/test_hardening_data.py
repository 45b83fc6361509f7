"""prepare's hardening: the same film under two names (duplicate_image, or a refusal when the copies
carry different labels), blank films (constant_image, the rule of predict), and an output folder
that prepare did not make (the .cxr-dist-shards marker)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from cxr_dist.config import DataConfig, SourceConfig
from cxr_dist.data import preprocess
from cxr_dist.data.shards import MARKER, merge_parts, write_part, write_shards
from cxr_dist.errors import DataError
from tests.conftest import VENV_BIN, _env
from tests.datagen import KERMANY_REGEX, make_dataset, make_folder_dataset

BASE = dict(image_size=40, samples_per_shard=7, prepare_workers=1, max_skip_frac=0.2)
IMAGES = Path("images") / "images_normalized"
NORMAL_A, NORMAL_B = "10_IM-0010-1001.dcm.png", "13_IM-0013-1001.dcm.png"  # uids 10 and 13: normal, grayscale
ABNORMAL = "1_IM-0001-1001.dcm.png"  # uid 1: abnormal
NORMAL_C = "20_IM-0020-1001.dcm.png"


def _iu(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "iu", n_uids=30, size=48)


def _copy_pixels(root: Path, src: str, dst: str, dst_root: Path | None = None) -> None:
    """dst gets src's pixels in a file whose bytes differ (another PNG compression level)."""
    with Image.open(root / IMAGES / src) as im:
        pixels = im.copy()
    target = (dst_root or root / IMAGES) / dst
    target.parent.mkdir(parents=True, exist_ok=True)
    before = (root / IMAGES / src).read_bytes()
    pixels.save(target, format="PNG", compress_level=1)
    assert target.read_bytes() != before  # not byte-identical: the decoded pixels are what is compared


def _skipped(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]


def _filenames(out: Path) -> list[str]:
    files = sorted(str(p) for p in out.glob("*.tar"))
    return [json.loads(s["json"])["filename"] for s in wds.WebDataset(files, shardshuffle=False, empty_check=False)]


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


# ----------------------------------------------------------------------------- duplicates


def test_the_same_film_under_two_names_is_kept_once(tmp_path):
    data = _iu(tmp_path)
    _copy_pixels(data, NORMAL_A, NORMAL_B)
    out = tmp_path / "out"
    index = write_shards(DataConfig(data_dir=str(data), **BASE), out)
    names = _filenames(out)
    assert NORMAL_A in names and NORMAL_B not in names
    dup = [s for s in _skipped(out) if s["reason"] == "duplicate_image"]
    assert len(dup) == 1 and dup[0]["filename"] == NORMAL_B and dup[0]["kept"] == NORMAL_A
    assert NORMAL_A in dup[0]["detail"] and dup[0]["uid"] == "13"
    assert index.skipped["duplicate_image"] == 1
    assert index.totals["error_skipped"] == 1  # counted toward data.max_skip_frac


def test_duplicates_across_sources_keep_the_first_source(tmp_path):
    iu = _iu(tmp_path)
    kermany = make_folder_dataset(tmp_path / "kermany", n_patients=8, size=48)
    # An IU normal film also in the folder source's NORMAL class (another patient, another name).
    _copy_pixels(iu, NORMAL_A, "train/NORMAL/IM-0999-0001.png", dst_root=kermany)
    cfg = DataConfig(sources=(SourceConfig(name="iu", format="iu", path=str(iu)),
                              SourceConfig(name="kermany", format="folder", path=str(kermany),
                                           patient_regex=KERMANY_REGEX)), **BASE)
    out = tmp_path / "out"
    write_shards(cfg, out)
    dup = [s for s in _skipped(out) if s["reason"] == "duplicate_image"]
    assert [(s["source"], s["filename"], s["kept"]) for s in dup] == [("kermany", "train/NORMAL/IM-0999-0001.png",
                                                                       NORMAL_A)]
    assert NORMAL_A in _filenames(out)


def test_copies_with_different_labels_are_refused(tmp_path):
    data = _iu(tmp_path)
    _copy_pixels(data, NORMAL_A, ABNORMAL)  # one film, labelled normal (uid 10) and abnormal (uid 1)
    out = tmp_path / "out"
    with pytest.raises(DataError, match="different labels") as e:
        write_shards(DataConfig(data_dir=str(data), **BASE), out)
    assert NORMAL_A in str(e.value) and ABNORMAL in str(e.value)
    assert "label 0" in str(e.value) and "label 1" in str(e.value)
    assert not (out / "index.json").exists()
    # The command: a message and exit 2, no traceback.
    r = subprocess.run([str(VENV_BIN / "cxr-dist"), "prepare", "--data", str(data), "--out", str(tmp_path / "o2"),
                        "--data.image_size", "40", "--loader.input_size", "32", "--data.max_skip_frac", "0.2"],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "different labels" in r.stderr and "Traceback" not in r.stderr


def test_array_prepare_with_duplicates_and_blank_films_equals_the_single_prepare(tmp_path):
    data = _iu(tmp_path)
    _copy_pixels(data, NORMAL_A, NORMAL_B)  # rows 8 apart in the table: different tasks' shares
    Image.fromarray(np.full((48, 40), 200, np.uint8)).save(data / IMAGES / NORMAL_C)
    cfg = DataConfig(data_dir=str(data), **BASE)
    single = write_shards(cfg, tmp_path / "single")
    for tasks in (2, 3):
        out = tmp_path / f"array{tasks}"
        for t in range(tasks):
            write_part(cfg, out, t, tasks)
        merged = merge_parts(cfg, out, tasks)
        assert (merged.checksum, merged.totals, merged.skipped) == (single.checksum, single.totals, single.skipped)
        assert _files(out) == _files(tmp_path / "single")  # index.json included
    assert single.skipped == {"constant_image": 1, "duplicate_image": 1, "no_indexing": 4}


# ----------------------------------------------------------------------------- blank films


def test_a_blank_film_is_skipped_as_predict_refuses_it(tmp_path):
    data = _iu(tmp_path)
    flat = np.full((48, 40), 128, np.uint8)
    flat[0, 0] = 255  # a dead pixel does not make a film
    Image.fromarray(flat).save(data / IMAGES / NORMAL_C)
    out = tmp_path / "out"
    index = write_shards(DataConfig(data_dir=str(data), **BASE), out)
    blank = [s for s in _skipped(out) if s["reason"] == "constant_image"]
    assert [s["filename"] for s in blank] == [NORMAL_C] and "constant" in blank[0]["detail"]
    assert NORMAL_C not in _filenames(out) and index.skipped["constant_image"] == 1


def test_prepare_and_predict_share_the_constant_rule(tmp_path):
    from cxr_dist.eval import ood

    assert preprocess.MIN_SPREAD == ood.MIN_SPREAD
    rng = np.random.default_rng(0)
    films = {"flat": np.full((40, 30), 90, np.uint8),
             "noisy flat": np.clip(90 + rng.normal(0, 1, (40, 30)), 0, 255).astype(np.uint8),
             "film": np.clip(60 + 3 * np.arange(40)[:, None] + rng.normal(0, 6, (40, 30)), 0, 255).astype(np.uint8)}
    for name, arr in films.items():
        img = Image.fromarray(arr)
        refused = []
        for check in (preprocess.check_not_constant, ood.check_not_constant):
            try:
                check(img, name)
                refused.append(False)
            except DataError:
                refused.append(True)
        assert refused[0] == refused[1] == (name != "film"), name


# ----------------------------------------------------------------------------- the output folder


@pytest.mark.parametrize("mine", ["index.json", "skipped.jsonl", "train-00007.tar"])
def test_a_folder_prepare_did_not_make_is_never_touched(tmp_path, mine):
    data = _iu(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / mine).write_text("the user's own file")
    with pytest.raises(DataError, match=rf"did not make it.*{MARKER}.*{mine}"):
        write_shards(DataConfig(data_dir=str(data), **BASE), out)
    with pytest.raises(DataError, match=rf"did not make it.*{mine}"):
        write_part(DataConfig(data_dir=str(data), **BASE), out, 0, 2)
    assert [p.name for p in out.iterdir()] == [mine] and (out / mine).read_text() == "the user's own file"


def test_prepare_marks_its_folders_and_adopts_an_older_prepares(tmp_path):
    data = _iu(tmp_path)
    cfg = DataConfig(data_dir=str(data), **BASE)
    out = tmp_path / "new" / "out"
    write_shards(cfg, out)
    assert (out / MARKER).is_file()
    write_shards(cfg, out)  # its own folder: rerun
    (out / MARKER).unlink()  # a folder of a version before the marker: its index.json says so
    write_shards(cfg, out)
    assert (out / MARKER).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    write_part(cfg, empty, 0, 1)  # an existing empty folder is fine, and marked first
    assert (empty / MARKER).is_file()
    # Without the marker and without an index.json of ours: shards alone do not make a folder ours.
    shutil.rmtree(empty)
    shutil.copytree(out, empty)
    (empty / MARKER).unlink()
    (empty / "index.json").unlink()
    with pytest.raises(DataError, match="did not make it"):
        write_shards(cfg, empty)


def test_a_folder_another_task_is_claiming_is_ours(tmp_path):
    """An array's tasks start at once on one folder: one may look while another is writing the marker
    (only atomic_write's temp name is there yet). CI caught that race; this is it, without timing."""
    data = _iu(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / f".{MARKER}.tmp-0123abcd").write_bytes(b"cxr-dist prepare made")
    write_part(DataConfig(data_dir=str(data), **BASE), out, 0, 2)
    assert (out / MARKER).is_file()


# ----------------------------------------------------------------------------- the repository


def test_mlflow_artifacts_of_run_sh_are_ignored():
    """./run.sh logs to sqlite:///mlflow.db, whose artifacts MLflow keeps in ./mlartifacts/:
    `git status` showed it untracked."""
    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("mlartifacts/1/0123abcd/artifacts/model/MLmodel", "mlflow.db"):
        r = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=root)
        assert r.returncode == 0, f"{path} is not ignored"
