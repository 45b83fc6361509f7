"""Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") for the
2-class model, and the numbers that judge calibration: ECE, Brier score, reliability bins.

Everything works on the probability of **abnormal** ``p`` (metrics.py's convention). For a
2-class softmax, ``p = sigmoid(l1 - l0)``, so ``sigmoid(logit(p) / T)`` is exactly
``softmax(logits / T)[1]``: the temperature fitted here can be folded into the logits (export),
applied to the probabilities a checkpoint returns, or applied post hoc to probabilities averaged
over test-time views (then it is a calibration map of those averages, fitted on them).

Dividing the logit by T > 0 is strictly increasing in p, so AUROC, AUPRC and every ranking are
unchanged; only the probabilities (and accuracy at a fixed 0.5) move. T > 1 softens an
over-confident model, T < 1 sharpens an under-confident one.

Pure numpy/scipy; nothing here needs torch.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit

from ..errors import CheckpointError, DataError
from .metrics import check_predictions

ArrayLike = Sequence[float] | np.ndarray

# Fitting clips p to [FIT_EPS, 1 - FIT_EPS] (logit +-16.1): a handful of confidently wrong films
# whose float32 probability rounded to exactly 0 or 1 would otherwise carry an infinite loss.
FIT_EPS = 1e-7
# Applying clips far less (logit +-27.6): every probability a float32 model can output other than
# exactly 0 or 1 keeps its order (float32's largest value below 1 is 1 - 6e-8), so AUROC is
# unchanged, and the result matches the exported softmax(logits / T) for |logit| < 27.6.
APPLY_EPS = 1e-12
# log T is searched in [log 1e-2, log 1e2]; a fitted T at a bound means the model carries no
# usable confidence (or is worse than chance) and the search says so in its result.
LOG_T_BOUNDS = (math.log(1e-2), math.log(1e2))


class CalibrationError(DataError, ValueError):
    """Predictions that a temperature cannot be fitted on (empty, one class, not probabilities)."""


def _arrays(probs: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, y = check_predictions(probs, labels, CalibrationError, probabilities=True)
    if p.size == 0:
        raise CalibrationError("no predictions to calibrate on")
    return p, y.astype(np.float64)


def logit(p: np.ndarray, eps: float) -> np.ndarray:
    """log(p / (1 - p)), with p clipped to [eps, 1 - eps] so that 0 and 1 stay finite."""
    p = np.clip(p, eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def _nll(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean binary cross-entropy of sigmoid(z / T) against y, in the stable softplus form."""
    s = z / temperature
    return float(np.mean(np.logaddexp(0.0, s) - y * s))


def fit_temperature(probs: ArrayLike, labels: ArrayLike) -> float:
    """The temperature T > 0 that minimises the negative log-likelihood of ``labels`` under
    ``sigmoid(logit(p) / T)`` (fit it on the validation split, never on test).

    The NLL is convex in 1/T (a one-parameter logistic regression without intercept), hence
    unimodal in log T, which a bounded Brent search over log T in LOG_T_BOUNDS finds to ~1e-6;
    deterministic. p is clipped to [FIT_EPS, 1 - FIT_EPS]. Returns 1.0 when nothing beats T = 1
    (e.g. every p is 0.5). CalibrationError (a ValueError) for empty or one-class input: the
    likelihood of one class always prefers T -> 0 or infinity, which says nothing about the model.
    """
    p, y = _arrays(probs, labels)
    if y.min() == y.max():
        raise CalibrationError("a temperature needs both classes among the predictions (one class only: "
                               "every T from 0 to infinity fits it, or the best is at a bound)")
    z = logit(p, FIT_EPS)
    res = minimize_scalar(lambda log_t: _nll(z, y, math.exp(log_t)), bounds=LOG_T_BOUNDS, method="bounded",
                          options={"xatol": 1e-6})
    t = float(math.exp(res.x))
    return t if _nll(z, y, t) < _nll(z, y, 1.0) else 1.0


def apply_temperature(probs: ArrayLike, temperature: float) -> np.ndarray:
    """``sigmoid(logit(p) / T)`` element-wise, as float64 of the input's shape.

    T = 1 returns the probabilities unchanged up to clipping at APPLY_EPS. T >= 1 keeps their order
    strictly (AUROC unchanged); T < 1 never swaps two but may tie the most extreme ones, whose
    sharpened value is closer to 0 or 1 than float64 can hold. Exactly 0 and 1 map to finite
    logits (+-27.6) before scaling.
    """
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    p = np.asarray(probs, dtype=np.float64)
    if t == 1.0:
        return np.clip(p, APPLY_EPS, 1 - APPLY_EPS)
    return expit(logit(p, APPLY_EPS) / t)


def reliability_bins(probs: ArrayLike, labels: ArrayLike, bins: int = 15) -> dict[str, np.ndarray]:
    """Top-label reliability data: per equal-width confidence bin of [0, 1], the ``count``, the
    mean ``confidence`` and the ``accuracy`` (NaN for empty bins), and the bin ``edges``.

    The confidence of a prediction is the probability of the class it predicts: max(p, 1 - p),
    predicting abnormal when p >= 0.5 (so it lies in [0.5, 1] and the lower half of the bins stay
    empty for a 2-class model). Bin m holds confidences in (edges[m], edges[m+1]], as in Guo et al.
    """
    p, y = _arrays(probs, labels)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    pred = (p >= 0.5).astype(np.float64)
    conf = np.where(pred == 1, p, 1 - p)
    correct = (pred == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)  # (lo, hi]
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(idx, conf, minlength=bins) / count
        accuracy = np.bincount(idx, correct, minlength=bins) / count
    return {"edges": edges, "count": count.astype(np.int64), "confidence": confidence, "accuracy": accuracy}


def ece(probs: ArrayLike, labels: ArrayLike, bins: int = 15) -> float:
    """Expected calibration error, the top-label form of Guo et al. 2017:
    ``sum_m |B_m| / n * |accuracy(B_m) - confidence(B_m)|`` over ``bins`` equal-width confidence
    bins of [0, 1] (reliability_bins), where the confidence is the probability of the predicted
    class. 0 is perfect; over-confidence and under-confidence both count."""
    r = reliability_bins(probs, labels, bins)
    used = r["count"] > 0
    gaps = np.abs(r["accuracy"][used] - r["confidence"][used])
    return float(np.sum(r["count"][used] * gaps) / r["count"].sum())


def brier(probs: ArrayLike, labels: ArrayLike) -> float:
    """Brier score: mean squared difference between p(abnormal) and the label (0 is perfect)."""
    p, y = _arrays(probs, labels)
    return float(np.mean((p - y) ** 2))


def calibration_report(probs: ArrayLike, labels: ArrayLike, temperature: float) -> dict[str, Any]:
    """ECE and Brier score before and after ``temperature`` on these predictions, JSON-ready:
    {temperature, n, ece_before, ece_after, brier_before, brier_after}. Meant for the checkpoint's
    meta.json (``meta["calibration"]``), evaluation.json and the model card."""
    p, y = _arrays(probs, labels)
    after = apply_temperature(p, temperature)
    return {"temperature": float(temperature), "n": int(p.size),
            "ece_before": ece(p, y), "ece_after": ece(after, y),
            "brier_before": brier(p, y), "brier_after": brier(after, y)}


def temperature_of(meta: Mapping[str, Any]) -> float:
    """The temperature stored in a checkpoint's meta.json (``meta["calibration"]["temperature"]``);
    1.0 (the model's own probabilities) for checkpoints written before calibration existed or
    trained with product.calibrate = false. CheckpointError if the stored value is not a positive number."""
    value = (meta.get("calibration") or {}).get("temperature", 1.0)
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = math.nan
    if not (math.isfinite(t) and t > 0):
        raise CheckpointError(f"the checkpoint's calibration temperature {value!r} is not a positive number")
    return t


def uncalibrated_threshold(threshold: float, temperature: float) -> float:
    """A threshold on the calibrated scale -> the same cut on the network's own probabilities:
    p_cal >= t exactly when p_raw >= sigmoid(T * logit(t)) (0 and 1 stay as they are)."""
    t = float(threshold)
    if temperature == 1.0 or t in (0.0, 1.0):
        return t
    return 1.0 / (1.0 + math.exp(-temperature * math.log(t / (1.0 - t))))
