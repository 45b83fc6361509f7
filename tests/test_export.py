"""`cxr-dist export`: a real checkpoint (EfficientNet-Lite1 with its packaged ImageNet weights,
a calibration temperature amended in) -> ONNX through the CLI -> onnxruntime on films read as
`predict` reads them, against the same checkpoint in torch.

The references are computed here from the checkpoint (checkpoint.load_model_state + build_model),
not through cxr_dist.product.export, so a wrong fold of the temperature or a wrong input layout fails.
Two exports dominate the time: the calibrated file through the dynamo exporter (the default,
~15-40 s here) and the uncalibrated one at opset 17, which goes through the TorchScript exporter
(~5 s): one test file covers both exporters and both temperatures.
"""
from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cxr_dist.model.checkpoint import amend_checkpoint, load_model_state, save_checkpoint
from cxr_dist.cli import main as cli_main
from cxr_dist.config import Config, DataConfig, LoaderConfig, ModelConfig, from_dict, replace, section, to_dict
from cxr_dist.product.export import metadata, opset_of, check_parity
from cxr_dist.model.classifier import build_model
from cxr_dist.product.predict import load_image
from cxr_dist.data.transforms import eval_transform

REAL_IMAGES = Path("/work/shared/data/iu_xray_small/images")
T = 2.5  # far enough from 1 that an export ignoring it misses by ~0.05, 500x the tolerance
THRESHOLD = 0.4  # on the calibrated scale, as the run stores it
TOL = 1e-4
S = 64  # input_size: small for speed; stored films of 80 px so the resize path runs


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    cfg = Config(data=DataConfig(image_size=80), loader=LoaderConfig(input_size=S),
                 model=ModelConfig(backbone="tf_efficientnet_lite1", weights="lite1-package"))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    run = tmp_path_factory.mktemp("export") / "run"
    save_checkpoint(run, "best", model.state_dict(), {}, {"config": to_dict(cfg)})
    amend_checkpoint(run, {"calibration": {"temperature": T}, "threshold": {"value": THRESHOLD}})
    return run


def _cli(*args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(["export", *args])
    return rc, out.getvalue() + err.getvalue()


@pytest.fixture(scope="module")
def calibrated(run_dir: Path) -> tuple[Path, str]:
    out = run_dir.parent / "onnx" / "model.onnx"  # a folder that does not exist yet
    rc, text = _cli("--checkpoint", str(run_dir), "--format", "onnx", "--out", str(out))
    assert rc == 0, text
    return out, text


@pytest.fixture(scope="module")
def uncalibrated(run_dir: Path) -> Path:
    out = run_dir.parent / "model-uncal.onnx"
    ckpt = run_dir / "checkpoints" / "best"  # a checkpoint dir works as well as a run dir
    rc, text = _cli("--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out), "--uncalibrated",
                    "--opset", "17")
    assert rc == 0, text
    assert opset_of(onnx.load(str(out))) == 17
    return out


@pytest.fixture(scope="module")
def torch_model(run_dir: Path):
    state, meta = load_model_state(run_dir, tag="best")
    model = build_model(replace(from_dict(ModelConfig, meta["config"]["model"]), pretrained=False, weights=""))
    model.load_state_dict(state)
    return model.eval(), (section(meta["config"], DataConfig), section(meta["config"], LoaderConfig))


def _films(paths: list[Path], settings: tuple[DataConfig, LoaderConfig]) -> torch.Tensor:
    """Files -> the uint8 N x 1 x S x S batch predict gives the model."""
    plain = eval_transform(settings[1].input_size)
    return torch.stack([plain(load_image(p, *settings)) for p in paths])


@torch.no_grad()
def _compare(onnx_path: Path, torch_model, x: torch.Tensor, temperature: float) -> np.ndarray:
    model, _ = torch_model
    logits = model(x)
    p_torch = torch.softmax(logits / temperature, dim=1)[:, 1].numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    p_onnx, logits_onnx = sess.run(["prob_abnormal", "logits"], {"image": x.numpy()})
    assert p_onnx.dtype == np.float32 and p_onnx.shape == (len(x),)
    assert logits_onnx.shape == (len(x), 2)
    assert np.abs(p_onnx - p_torch).max() < TOL
    assert np.abs(logits_onnx - logits.numpy()).max() < 1e-3  # logits are O(1) here
    return p_onnx


def _parity_at_1_and_7(onnx_path: Path, torch_model, paths: list[Path], temperature: float) -> np.ndarray:
    x = _films(paths[:8], torch_model[1])
    assert x.dtype == torch.uint8 and tuple(x.shape[1:]) == (1, S, S)
    one = _compare(onnx_path, torch_model, x[:1], temperature)
    seven = _compare(onnx_path, torch_model, x[1:8], temperature)
    # The films are told apart (the comparison is not between constants).
    assert np.ptp(seven) > 1e-3
    return np.concatenate([one, seven])


def test_real_films_match_torch_at_batch_1_and_7(calibrated, uncalibrated, torch_model):
    if not REAL_IMAGES.is_dir():
        pytest.skip(f"real IU X-ray films not present at {REAL_IMAGES}")
    paths = sorted(REAL_IMAGES.iterdir())[:8]
    p_cal = _parity_at_1_and_7(calibrated[0], torch_model, paths, T)
    p_raw = _parity_at_1_and_7(uncalibrated, torch_model, paths, 1.0)
    # The temperature is in the graph: the two files differ, by far more than the tolerance.
    assert np.abs(p_cal - p_raw).max() > 100 * TOL
    # ... and exactly as temperature scaling says: logit(p_cal) = logit(p_raw) / T.
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    assert np.allclose(logit(p_cal), logit(p_raw.astype(np.float64)) / T, atol=1e-4)


def test_generated_films_match_torch(calibrated, uncalibrated, torch_model, tmp_path):
    """The same check on synthetic films (grayscale/RGB PNG, JPEG, WebP), so CI without the data runs it."""
    from tests.datagen import make_dataset

    root = make_dataset(tmp_path / "gen", n_uids=4, size=96)
    paths = sorted((root / "images" / "images_normalized").iterdir())
    assert len(paths) >= 7
    paths = (paths * 2)[:8]
    _parity_at_1_and_7(calibrated[0], torch_model, paths, T)
    _parity_at_1_and_7(uncalibrated, torch_model, paths, 1.0)


def test_dynamic_batch_and_metadata(calibrated, uncalibrated, torch_model):
    path, text = calibrated
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    (inp,) = model.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, S, S]
    assert [o.name for o in model.graph.output] == ["prob_abnormal", "logits"]
    x = torch.randint(0, 256, (13, 1, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    _compare(path, torch_model, x, T)  # a batch size never seen at export

    meta = metadata(path)
    from cxr_dist import __version__

    assert meta["cxr_dist_version"] == __version__
    assert meta["backbone"] == "tf_efficientnet_lite1"
    assert (meta["input_size"], meta["image_size"]) == (str(S), "80")
    assert (meta["resize"], meta["intensity"]) == ("letterbox", "none")
    assert float(meta["temperature"]) == T and meta["calibrated"] == "true"
    assert float(meta["threshold"]) == THRESHOLD

    raw = metadata(uncalibrated)
    assert float(raw["temperature"]) == 1.0 and raw["calibrated"] == "false"
    # The stored threshold is on the calibrated scale; the uncalibrated file's says the same cut:
    # p_raw >= t_raw exactly when p_cal >= THRESHOLD.
    t_raw = float(raw["threshold"])
    assert math.isclose(math.log(t_raw / (1 - t_raw)) / T, math.log(THRESHOLD / (1 - THRESHOLD)), abs_tol=1e-9)

    assert f"wrote {path}" in text and "ok" in text.splitlines()[-1]


def test_check_parity_reads_the_checkpoint(run_dir, calibrated, uncalibrated):
    """check_parity (what the CLI prints) compares against the checkpoint's temperature, so it
    catches a file exported with the wrong one."""
    assert check_parity(calibrated[0], run_dir, batch_sizes=(2,))["max_prob_diff"] < TOL
    wrong = check_parity(uncalibrated, run_dir, batch_sizes=(2,))  # T = 1 file judged as calibrated
    assert wrong["temperature"] == T and wrong["max_prob_diff"] > 100 * TOL


def test_user_errors_exit_2(run_dir, tmp_path):
    rc, text = _cli("--checkpoint", str(run_dir), "--format", "tflite", "--out", str(tmp_path / "m.tflite"))
    assert rc == 2 and "only 'onnx'" in text
    rc, text = _cli("--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "m.onnx"))
    assert rc == 2 and "does not exist" in text
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rc, text = _cli("--checkpoint", str(run_dir), "--out", str(blocker / "sub" / "m.onnx"))
    assert rc == 2 and "is a file" in text
    rc, text = _cli("--checkpoint", str(run_dir), "--out", str(tmp_path))
    assert rc == 2 and "is a directory" in text
    rc, text = _cli("--checkpoint", str(run_dir), "--out", str(tmp_path / "m.onnx"), "--opset", "9")
    assert rc == 2 and "--opset 9" in text
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".*tmp*"))
