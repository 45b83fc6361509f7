"""Temperature scaling, ECE, Brier score and the reliability figure (cxr_dist/eval/calibrate.py, plots.py).

The models are real: a scikit-learn logistic regression fitted on generated two-class data, made
over- or under-confident by scaling its logits, and data drawn from a known logistic model, where
the right temperature is known in advance.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import expit, softmax
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from cxr_dist.eval.calibrate import (APPLY_EPS, CalibrationError, apply_temperature, brier, calibration_report, ece,
                                fit_temperature, reliability_bins, temperature_of)
from cxr_dist.errors import CheckpointError, UserError


def _two_blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping Gaussian classes in 5 dimensions (a logistic model is right for them)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 5)) + 0.6 * y[:, None]
    return x, y


@pytest.fixture(scope="module")
def logistic() -> dict:
    """A logistic regression fitted on one sample; its logits on a validation and a test sample."""
    x_tr, y_tr = _two_blobs(4000, 0)
    model = LogisticRegression().fit(x_tr, y_tr)
    x_val, y_val = _two_blobs(3000, 1)
    x_te, y_te = _two_blobs(3000, 2)
    return {"val": (model.decision_function(x_val), y_val), "test": (model.decision_function(x_te), y_te)}


def test_over_confident_model_gets_t_above_one_and_lower_ece(logistic):
    """Logits x 4.5: the fitted T is near 4.5, and on held-out data ECE falls a lot, AUROC stays."""
    (z_val, y_val), (z_te, y_te) = logistic["val"], logistic["test"]
    p_val, p_te = expit(4.5 * z_val), expit(4.5 * z_te)
    t = fit_temperature(p_val, y_val)
    assert 3.5 < t < 5.5
    after = apply_temperature(p_te, t)
    before_ece, after_ece = ece(p_te, y_te), ece(after, y_te)
    assert before_ece > 0.1  # the scaling really made it over-confident
    assert after_ece < before_ece / 3
    assert brier(after, y_te) < brier(p_te, y_te)
    assert roc_auc_score(y_te, after) == roc_auc_score(y_te, p_te)


def test_under_confident_model_gets_t_below_one(logistic):
    z_val, y_val = logistic["val"]
    p_val = expit(0.3 * z_val)
    t = fit_temperature(p_val, y_val)
    assert 0.2 < t < 0.45
    assert ece(apply_temperature(p_val, t), y_val) < ece(p_val, y_val)


def test_known_temperature_is_recovered_and_calibrated_data_keeps_t_near_one():
    """Labels drawn from sigmoid(z): probabilities sigmoid(4 z) need T = 4, sigmoid(z) needs T = 1."""
    rng = np.random.default_rng(3)
    z = rng.normal(0, 2, 20000)
    y = (rng.random(z.size) < expit(z)).astype(int)
    assert fit_temperature(expit(4 * z), y) == pytest.approx(4.0, rel=0.06)
    assert fit_temperature(expit(z), y) == pytest.approx(1.0, abs=0.05)
    # Uniform probabilities with labels drawn from them: calibrated by construction.
    p = rng.uniform(0.02, 0.98, 20000)
    assert fit_temperature(p, (rng.random(p.size) < p).astype(int)) == pytest.approx(1.0, abs=0.05)


def test_fit_is_deterministic_and_minimises_the_nll(logistic):
    z, y = logistic["val"]
    p = expit(2.0 * z)
    t = fit_temperature(p, y)
    assert fit_temperature(p, y) == t

    def nll(temp: float) -> float:
        q = np.clip(apply_temperature(p, temp), 1e-12, 1 - 1e-12)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))

    assert nll(t) <= min(nll(t * 0.97), nll(t * 1.03), nll(1.0))


def test_temperature_on_probabilities_equals_softmax_of_scaled_logits():
    """The identity the whole module relies on (and export's folding of T into the logits)."""
    logits = np.random.default_rng(4).normal(0, 3, size=(500, 2))
    p = softmax(logits, axis=1)[:, 1]
    for t in (0.5, 1.0, 2.7):
        np.testing.assert_allclose(apply_temperature(p, t), softmax(logits / t, axis=1)[:, 1], rtol=1e-9, atol=1e-12)


def test_apply_keeps_order_and_identity():
    p = np.array([0.0, 1e-9, 0.3, 0.5, 0.7, 1 - 6e-8, 1.0])  # 1 - 6e-8: float32's largest value below 1
    assert np.array_equal(apply_temperature(p, 1.0), np.clip(p, APPLY_EPS, 1 - APPLY_EPS))
    q = apply_temperature(p, 3.0)  # softening: strictly increasing, nothing at exactly 0 or 1
    assert (np.diff(q) > 0).all() and ((q > 0) & (q < 1)).all() and q[3] == pytest.approx(0.5)
    # Sharpening pushes the extremes past float64's resolution next to 1: ties there, never a swap.
    q = apply_temperature(p, 0.3)
    assert (np.diff(q) >= 0).all() and (np.diff(q[:5]) > 0).all() and q[3] == pytest.approx(0.5)
    assert apply_temperature(p.reshape(7, 1), 2.0).shape == (7, 1)


def test_ece_of_hand_computed_cases():
    # 10 bins. Confidences .95 .95 .75 .65, correct 1 0 1 1:
    # bin (.9, 1]: 2 predictions, accuracy .5 vs .95; (.7, .8]: 1 vs .75; (.6, .7]: 1 vs .65.
    assert ece([0.95, 0.95, 0.25, 0.65], [1, 0, 0, 1], bins=10) == pytest.approx(
        2 / 4 * 0.45 + 1 / 4 * 0.25 + 1 / 4 * 0.35)
    # One bin: |mean accuracy - mean confidence| = |2/3 - (.9 + .6 + .7) / 3|.
    assert ece([0.9, 0.6, 0.3], [1, 0, 0], bins=1) == pytest.approx(abs(2 / 3 - 2.2 / 3))
    # Calibrated by hand: p = .7 with 7 of 10 abnormal; p = .2 (confidence .8 in normal) with 1 of 5.
    assert ece([0.7] * 10, [1] * 7 + [0] * 3) == pytest.approx(0.0, abs=1e-12)
    assert ece([0.2] * 5, [0, 0, 0, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    # Fully wrong and fully confident: ECE 1.
    assert ece([1.0, 0.0], [0, 1]) == pytest.approx(1.0)


def test_reliability_bins_and_brier():
    r = reliability_bins([0.95, 0.95, 0.25, 0.65], [1, 0, 0, 1], bins=10)
    assert r["count"].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 0, 2]
    assert r["accuracy"][9] == 0.5 and r["confidence"][9] == pytest.approx(0.95)
    assert math.isnan(r["accuracy"][0])
    assert brier([0.9, 0.2], [1, 0]) == pytest.approx((0.01 + 0.04) / 2)


def test_calibration_report_is_plain_json_numbers(logistic):
    z, y = logistic["test"]
    p = expit(4.5 * z)
    rep = calibration_report(p, y, 4.5)
    assert set(rep) == {"temperature", "n", "ece_before", "ece_after", "brier_before", "brier_after"}
    assert type(rep["n"]) is int and rep["n"] == len(y)
    assert all(type(rep[k]) is float for k in rep if k != "n")
    assert rep["ece_after"] < rep["ece_before"] and rep["brier_after"] < rep["brier_before"]
    assert rep["ece_before"] == ece(p, y)


@pytest.mark.parametrize("probs, labels, message", [
    ([], [], "no predictions"),
    ([0.2, 0.9, 0.7], [1, 1, 1], "both classes"),
    ([0.2, 0.9], [0, 1, 1], "differ in length"),
    ([0.2, 0.9], [0, 2], "labels must be"),
    ([0.2, math.nan], [0, 1], "NaN or infinity"),
    ([0.2, 1.5], [0, 1], r"probabilities in \[0, 1\]"),
])
def test_fit_refuses_bad_input(probs, labels, message):
    with pytest.raises(ValueError, match=message) as err:
        fit_temperature(probs, labels)
    assert isinstance(err.value, CalibrationError) and isinstance(err.value, UserError)


def test_bad_temperatures_and_meta():
    for t in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="positive"):
            apply_temperature([0.5], t)
    assert temperature_of({}) == 1.0  # checkpoints from before calibration
    assert temperature_of({"calibration": None}) == 1.0
    assert temperature_of({"calibration": {"temperature": 2.5, "ece_before": 0.1}}) == 2.5
    for bad in (0, -2, "hot", None):
        with pytest.raises(CheckpointError, match="temperature"):
            temperature_of({"calibration": {"temperature": bad}})


def test_reliability_figure_is_written_atomically_as_png(logistic, tmp_path):
    from cxr_dist.eval.plots import reliability_figure

    z, y = logistic["test"]
    before = expit(4.5 * z)
    out = reliability_figure(before, apply_temperature(before, 4.5), y, tmp_path / "figs" / "reliability.png")
    assert out == tmp_path / "figs" / "reliability.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert [p.name for p in out.parent.iterdir()] == ["reliability.png"]  # no temporary file left behind
