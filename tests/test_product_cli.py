"""The product's commands and the served model as a new user meets them (issue 23, items 11-14 and 17),
and the readout every product applies (issue 20, item 4).

No training: the checkpoint is the tiny config's model with random weights (checkpoint.save_checkpoint),
amended with a temperature, a threshold and an OOD density as the end of a run amends them, so every
output column is there. The commands run in this process (cli.main, the console script's function)
except where a fresh interpreter is the point (what `--help` imports).
"""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_dist import cli
from tests.conftest import ROOT, TINY, _env

T, THRESHOLD, OOD_THRESHOLD = 1.7, 0.45, 30.0


def film(seed: int, size: int = 80) -> Image.Image:
    """A film-like image: a smooth gradient with noise (not constant)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    arr = 40 + 150 * (x + y) / (2 * size) + rng.normal(0, 12, (size, size))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    import torch

    from cxr_dist.config import load_config, to_dict
    from cxr_dist.eval.ood import FeatureDensity
    from cxr_dist.model.checkpoint import amend_checkpoint, save_checkpoint
    from cxr_dist.model.classifier import build_model

    cfg = load_config(str(TINY), [])
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("product-cli") / "run"
    save_checkpoint(run, "best", build_model(cfg.model).state_dict(), {}, {"config": to_dict(cfg)})
    density = FeatureDensity.fit(np.random.default_rng(0).normal(0, 1, (40, 1280)))
    amend_checkpoint(run, {"calibration": {"temperature": T}, "threshold": {"value": THRESHOLD, "scale": "calibrated"},
                           "ood": {"threshold": OOD_THRESHOLD}}, extra=density.tensors())
    return run


@pytest.fixture(scope="module")
def films(run: Path) -> list[Path]:
    out = []
    for i in range(3):
        out.append(run.parent / "films" / f"f{i}.png")
        out[-1].parent.mkdir(exist_ok=True)
        film(i).save(out[-1])
    return out


def predict_cli(capsys, *args: str) -> tuple[int, list[str], list[str]]:
    rc = cli.main(["predict", *args])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), [line for line in err.splitlines() if line.startswith("cxr-dist predict:")]


# --- the readout: one implementation of calibration, label and OOD --------------------------------

def test_readout_applies_temperature_threshold_and_density(run: Path) -> None:
    from scipy.special import expit, logit

    from cxr_dist.eval.ood import FeatureDensity
    from cxr_dist.product.inference import Product
    from cxr_dist.product.readout import Readout

    product = Product.load(run)
    r = product.readout
    assert (r.temperature, r.threshold, r.ood_threshold) == (T, THRESHOLD, OOD_THRESHOLD)
    assert (product.temperature, product.threshold) == (T, THRESHOLD)
    probs = np.array([0.1, 0.5, 0.62, 0.9], dtype=np.float32)
    feats = np.random.default_rng(1).normal(0, 1, (4, 1280))
    got = product.outputs(probs, feats)
    np.testing.assert_allclose(got["prob_abnormal"], expit(logit(probs.astype(np.float64)) / T), rtol=1e-12)
    assert got["prob_uncalibrated"] is probs
    assert got["abnormal"].tolist() == (got["prob_abnormal"] >= THRESHOLD).tolist()
    np.testing.assert_allclose(got["ood_score"], r.density.score(feats))
    assert got["ood_flag"].tolist() == (got["ood_score"] > OOD_THRESHOLD).tolist()
    # A split's predictions: calibrated `probs`, the network's in prob_uncalibrated, features dropped.
    split = {"keys": list("abcd"), "labels": np.array([0, 0, 1, 1]), "probs": probs, "features": feats}
    applied = r.apply_split(split)
    assert "features" not in applied and applied["prob_uncalibrated"] is probs
    np.testing.assert_array_equal(applied["probs"], got["prob_abnormal"])
    np.testing.assert_array_equal(applied["ood_score"], got["ood_score"])
    # Loaded uncalibrated: T = 1 and the threshold says the same cut on the network's scale.
    raw = Product.load(run, calibrated=False).readout
    assert raw.temperature == 1.0
    assert np.isclose(logit(raw.threshold) / T, logit(THRESHOLD))
    assert Product.load(run, threshold=0.3).threshold == 0.3
    # An older checkpoint's parts: nothing but the network's probability.
    bare = Readout().apply(probs)
    assert set(bare) == {"prob_abnormal", "prob_uncalibrated"}
    assert isinstance(r.density, FeatureDensity)


def test_product_predict_takes_films_with_an_optional_text(run: Path, films: list[Path]) -> None:
    from cxr_dist.product.inference import Film, Product

    product = Product.load(run)
    read = [product.read(p, str(p)) for p in films]
    assert all(isinstance(f, Film) and f.text is None for f in read)
    rows = product.predict(read)
    assert [set(r) for r in rows] == [{"prob_abnormal", "prob_uncalibrated", "views", "label", "ood_score", "ood_flag"}] * 3
    with_text = [Film(f.image, f.name, text="No acute disease.") for f in read]
    assert product.predict(with_text) == rows  # image-only models ignore the text
    assert product.predict([(f.image, f.name) for f in read]) == rows  # (image, name) pairs still work
    assert product.predict([]) == []


# --- item 11: one bad input does not lose the others ------------------------------------------

def test_bad_files_are_each_reported_and_the_good_ones_still_predicted(run, films, tmp_path, capsys) -> None:
    blank = tmp_path / "sub" / "blank.png"
    blank.parent.mkdir()
    Image.new("L", (64, 64), 255).save(blank)
    garbage = tmp_path / "sub" / "garbage.png"
    garbage.write_bytes(b"not an image")
    missing = tmp_path / "missing.png"
    rc, out, err = predict_cli(capsys, "--checkpoint", str(run), "--json", str(films[0]), str(blank), str(missing),
                               str(garbage), str(films[1]))
    assert rc == 2
    rows = [json.loads(line) for line in out]
    assert [r["image"] for r in rows] == [str(films[0]), str(films[1])]
    assert all(0 <= r["prob_abnormal"] <= 1 for r in rows)
    assert len(err) == 3, err
    assert err[0].startswith(f"cxr-dist predict: {blank}: the image is (nearly) constant")
    assert err[1] == f"cxr-dist predict: {missing}: no such image"
    assert err[2].startswith(f"cxr-dist predict: {garbage}: cannot read image: ")
    assert "<_io" not in "\n".join(err)
    # Only good films: exit 0; the table has the same files.
    rc, out, err = predict_cli(capsys, "--checkpoint", str(run), *map(str, films))
    assert rc == 0 and not err and [line.split()[-1] for line in out] == [str(p) for p in films]


def test_a_folder_stands_for_its_image_files_in_sorted_order(run, tmp_path, capsys) -> None:
    scans = tmp_path / "scans"
    for rel in ("b/2.png", "a/1.jpeg", "c.PNG", ".hidden/3.png", "a/.4.png"):
        (scans / rel).parent.mkdir(parents=True, exist_ok=True)
        film(len(rel)).save(scans / rel, format="PNG" if rel.lower().endswith("png") else "JPEG")
    (scans / "notes.txt").write_text("not a film")
    (tmp_path / "empty").mkdir()
    rc, out, err = predict_cli(capsys, "--checkpoint", str(run), "--json", str(scans), str(tmp_path / "empty"))
    assert [json.loads(line)["image"] for line in out] == [str(scans / "a" / "1.jpeg"), str(scans / "b" / "2.png"),
                                                          str(scans / "c.PNG")]
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"cxr-dist predict: {tmp_path / 'empty'}: a folder without image files")


# --- item 12: Grad-CAM names unique across the command -----------------------------------------

def test_cam_files_of_equal_names_in_different_batches_do_not_overwrite(run, tmp_path) -> None:
    from cxr_dist.product.predict import Request, predict

    paths = []
    for i, rel in enumerate(("a/chest.png", "b/chest.png", "chest.jpeg", "c/chest.png")):
        paths.append(tmp_path / rel)
        paths[-1].parent.mkdir(exist_ok=True)
        film(i).save(paths[-1], format="PNG" if rel.endswith("png") else "JPEG")
    rows = predict(str(run), [str(p) for p in paths], Request(batch_size=1, cam_dir=str(tmp_path / "cams")))
    cams = [Path(r["cam"]).name for r in rows]
    assert cams == ["chest_cam.png", "chest-2_cam.png", "chest-3_cam.png", "chest-4_cam.png"]
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == sorted(cams)
    # Each file is its own film's overlay: the same film alone gives the same picture.
    alone = predict(str(run), [str(paths[1])], Request(cam_dir=str(tmp_path / "alone")))
    assert Path(alone[0]["cam"]).read_bytes() == (tmp_path / "cams" / "chest-2_cam.png").read_bytes()


# --- item 13: the served model names every bad row ---------------------------------------------

def test_served_model_names_every_bad_row_and_accepts_wrapped_base64(run, films) -> None:
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from cxr_dist.product.inference import Product
    from cxr_dist.product.serve import CXRPyfunc

    model = CXRPyfunc()
    model.product = Product.load(run)  # what load_context does with the artifact
    good = base64.b64encode(films[0].read_bytes()).decode()
    wrapped = "\n".join(good[i:i + 76] for i in range(0, len(good), 76)) + "\n"  # `base64 chest.png`
    blank = io.BytesIO()
    Image.new("L", (64, 64), 255).save(blank, format="PNG")
    request = pd.DataFrame({"image": [good, None, "not base64!", base64.b64encode(b"junk").decode(),
                                      base64.b64encode(blank.getvalue()).decode(), wrapped, 7, ""]})
    with pytest.raises(MlflowException) as info:
        model.predict(None, request)
    parts = info.value.message.split("\n")  # one line per bad row
    assert [p.split(":")[0] for p in parts] == ["row 1", "row 2", "row 3", "row 4", "row 6", "row 7"], parts
    assert parts[0] == "row 1: 'image' is empty (null): send the film's file, base64-encoded"
    assert parts[1].startswith("row 2: 'image' is not base64")
    assert parts[2].startswith("row 3: cannot read image: ")
    assert parts[3].startswith("row 4: the image is (nearly) constant")
    assert parts[4] == "row 6: 'image' must be a base64-encoded string, not a number"
    assert parts[5] == "row 7: 'image' is empty"
    assert "None" not in info.value.message and "<_io" not in info.value.message
    both = model.predict(None, pd.DataFrame({"image": [good, wrapped]}))
    assert both.iloc[0].to_dict() == both.iloc[1].to_dict()
    with pytest.raises(MlflowException, match="column 'image'"):
        model.predict(None, pd.DataFrame({"picture": [good]}))


# --- item 14: file names that are not UTF-8 ----------------------------------------------------

@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any bytes in a name")
def test_a_non_utf8_file_name_is_printed_escaped_on_a_strict_utf8_stdout(run, films, tmp_path, monkeypatch, capsys) -> None:
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/film\xff.png"))  # '\udcff': a surrogate-escaped byte
    odd.write_bytes(films[0].read_bytes())
    missing = Path(os.fsdecode(bytes(tmp_path) + b"/gone\xfe.png"))
    buf = io.BytesIO()
    strict = io.TextIOWrapper(buf, encoding="utf-8", errors="strict")  # PYTHONIOENCODING=utf-8:strict
    monkeypatch.setattr(sys, "stdout", strict)
    rc = cli.main(["predict", "--checkpoint", str(run), str(odd), str(missing)])
    strict.flush()
    out, err = buf.getvalue().decode("utf-8"), capsys.readouterr().err
    assert rc == 2
    assert out.rstrip().endswith(f"{tmp_path}/film\\xff.png"), out
    assert f"cxr-dist predict: {tmp_path}/gone\\xfe.png: no such image" in err
    buf.seek(0)
    buf.truncate()
    assert cli.main(["predict", "--checkpoint", str(run), "--json", str(odd)]) == 0
    strict.flush()
    assert json.loads(buf.getvalue().decode("ascii"))["image"] == str(odd)  # JSON escapes it, exactly


# --- item 17: --help is instant ----------------------------------------------------------------

HEAVY = ("torch", "mlflow", "timm", "transformers", "onnx", "pandas", "scipy")


@pytest.mark.parametrize("command", ["evaluate", "predict", "export"])
def test_help_imports_nothing_heavy(command) -> None:
    code = ("import sys, time\nt = time.perf_counter()\nfrom cxr_dist import cli\n"
            f"try:\n    cli.main([{command!r}, '--help'])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(round(time.perf_counter() - t, 3))\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-2000:]
    *help_lines, seconds, heavy = res.stdout.splitlines()
    assert heavy == "", f"`cxr-dist {command} --help` imported {heavy}"
    assert f"cxr-dist {command}" in help_lines[0]
    # Parsing --help took ~0.1-0.3 s here against 6-10 s with torch; generous for a busy machine.
    assert float(seconds) < 3.0 and wall < 10, (seconds, wall)


def test_predict_description_is_whole_sentences() -> None:
    from cxr_dist.product.predict import DESCRIPTION, main

    buf = io.StringIO()
    with pytest.raises(SystemExit), __import__("contextlib").redirect_stdout(buf):
        main(["--help"])
    assert " ".join(DESCRIPTION.split()) in " ".join(buf.getvalue().split())
    assert DESCRIPTION.rstrip().endswith(".")
