"""Metrics: hand-computed examples, agreement with scikit-learn, dedupe, study pooling, edge cases."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from sklearn import metrics as skm

from cxr_dist.eval.metrics import (
    _weighted_auroc,
    always_abnormal,
    auroc_interval,
    balanced_threshold,
    compute_metrics,
    curves,
    dedupe,
    scalar_metrics,
    study_level,
    summary_line,
)

# 4 abnormal, 4 normal. At 0.5: tp=3 (0.9, 0.8, 0.6), fn=1 (0.3), fp=1 (0.7), tn=3 (0.1, 0.2, 0.4).
PROBS = [0.9, 0.8, 0.6, 0.3, 0.7, 0.1, 0.2, 0.4]
LABELS = [1, 1, 1, 1, 0, 0, 0, 0]


def test_hand_computed_example():
    m = compute_metrics(PROBS, LABELS, loss=0.25)
    assert m["confusion"] == [[3, 1], [1, 3]]
    assert m["n"] == 8 and m["n_pos"] == 4
    assert m["loss"] == 0.25
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(3 / 4)
    assert m["balanced_accuracy"] == pytest.approx(3 / 4)
    # Pairs (pos, neg) ranked correctly: 0.9, 0.8 beat all 4 negatives; 0.6 beats 3; 0.3 beats 2.
    assert m["auroc"] == pytest.approx((4 + 4 + 3 + 2) / 16)
    # AP = mean over positives of precision at their rank: 1/1, 2/2, 3/4 (0.7 ranks above 0.6), 4/6.
    assert m["auprc"] == pytest.approx((1 + 1 + 3 / 4 + 4 / 6) / 4)
    json.dumps(m)  # plain python types only


def test_loss_absent_when_not_given():
    assert "loss" not in compute_metrics(PROBS, LABELS)


@pytest.mark.parametrize("threshold", [0.05, 0.35, 0.5, 0.65, 0.95])
def test_agrees_with_sklearn(threshold):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.3 * y + rng.random(200) * 0.7, 0, 1)
    m = compute_metrics(p, y, threshold=threshold)
    pred = (p >= threshold).astype(int)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred, zero_division=0))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred, zero_division=0))
    assert m["specificity"] == pytest.approx(skm.recall_score(1 - y, 1 - pred, zero_division=0))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, zero_division=0))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["auprc"] == pytest.approx(skm.average_precision_score(y, p))
    assert m["confusion"] == skm.confusion_matrix(y, pred, labels=[0, 1]).tolist()


def test_threshold_is_inclusive():
    assert compute_metrics([0.5], [1])["recall"] == 1.0


def test_dedupe_of_shuffled_duplicates_equals_true_set():
    rng = np.random.default_rng(1)
    keys = [f"img{i:03d}" for i in range(50)]
    y = rng.integers(0, 2, 50)
    p = rng.random(50)
    truth = compute_metrics(p, y)
    # Simulate 4 ranks with padding: every sample once, some twice or three times, shuffled.
    extra = rng.integers(0, 50, 30)
    idx = np.concatenate([np.arange(50), extra])
    rng.shuffle(idx)
    k2, p2, y2 = dedupe([keys[i] for i in idx], p[idx], y[idx])
    assert k2 == sorted(keys)
    assert compute_metrics(p2, y2) == truth
    # Rank order does not matter.
    rng.shuffle(idx)
    assert dedupe([keys[i] for i in idx], p[idx], y[idx])[0] == k2


def test_dedupe_keeps_first_and_rejects_label_conflicts():
    k, p, y = dedupe(["b", "a", "b"], [0.2, 0.5, 0.9], [1, 0, 1])
    assert k == ["a", "b"] and p.tolist() == [0.5, 0.2] and y.tolist() == [0, 1]
    with pytest.raises(ValueError, match="different labels"):
        dedupe(["a", "a"], [0.1, 0.1], [0, 1])
    with pytest.raises(ValueError, match="length"):
        dedupe(["a"], [0.1, 0.2], [0, 1])


def test_study_level_mean_pooling():
    uids = ["s2", "s1", "s2", "s3", "s1"]
    probs = [0.9, 0.2, 0.5, 0.4, 0.4]
    labels = [1, 0, 1, 1, 0]
    u, p, y = study_level(uids, probs, labels)
    assert u == ["s1", "s2", "s3"]
    assert p.tolist() == pytest.approx([0.3, 0.7, 0.4])
    assert y.tolist() == [0, 1, 1]
    m = compute_metrics(p, y)
    assert m["n"] == 3 and m["confusion"] == [[1, 0], [1, 1]]
    with pytest.raises(ValueError, match="different labels"):
        study_level(["s1", "s1"], [0.1, 0.2], [0, 1])


def test_single_class_is_nan_not_crash():
    only_pos = compute_metrics([0.2, 0.8, 0.9], [1, 1, 1])
    assert math.isnan(only_pos["auroc"])
    assert only_pos["auprc"] == pytest.approx(1.0)
    assert only_pos["specificity"] == 0.0 and only_pos["recall"] == pytest.approx(2 / 3)
    assert only_pos["balanced_accuracy"] == pytest.approx(2 / 3)
    only_neg = compute_metrics([0.2, 0.1], [0, 0])
    assert math.isnan(only_neg["auroc"]) and math.isnan(only_neg["auprc"])
    assert only_neg["precision"] == 0.0 and only_neg["recall"] == 0.0 and only_neg["f1"] == 0.0
    assert only_neg["accuracy"] == 1.0 and only_neg["specificity"] == 1.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least one"):
        compute_metrics([], [])
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        compute_metrics([0.5], [2])
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics([float("nan")], [1])


def test_always_abnormal_baseline():
    m = always_abnormal(LABELS + [0, 0])  # prevalence 0.4
    assert m["auroc"] == pytest.approx(0.5)
    assert m["recall"] == 1.0 and m["specificity"] == 0.0
    assert m["accuracy"] == pytest.approx(0.4) and m["precision"] == pytest.approx(0.4)
    assert m["auprc"] == pytest.approx(0.4)
    assert m["balanced_accuracy"] == pytest.approx(0.5)


def test_curves_are_json_safe_lists():
    c = curves(PROBS, LABELS)
    fpr, tpr, thr = c["roc"]["fpr"], c["roc"]["tpr"], c["roc"]["thresholds"]
    assert len(fpr) == len(tpr) == len(thr) and fpr[0] == 0.0 and tpr[-1] == 1.0
    assert all(math.isfinite(t) for t in thr) and thr[0] > max(PROBS)
    assert skm.auc(fpr, tpr) == pytest.approx(compute_metrics(PROBS, LABELS)["auroc"])
    assert len(c["pr"]["precision"]) == len(c["pr"]["recall"])
    json.dumps(c, allow_nan=False)
    assert curves([0.1, 0.2], [1, 1])["roc"]["fpr"] == []


def test_summary_line_and_scalars():
    train = compute_metrics(PROBS, LABELS, loss=0.61)
    val = compute_metrics([0.2, 0.9], [1, 1], loss=0.5)
    line = summary_line(3, "head", train, val, total_epochs=40)
    assert line.startswith("epoch 3/40 [head] train loss 0.610 acc 0.750 f1 0.750 | val loss 0.500")
    assert "auroc nan" in line and "\n" not in line
    assert summary_line(1, "finetune", {}, {}) == "epoch 1 [finetune] train | val"
    s = scalar_metrics(val, "val/")
    assert set(s) == {f"val/{k}" for k in ("loss", "accuracy", "precision", "recall", "specificity",
                                         "f1", "balanced_accuracy", "auroc", "auprc", "n", "n_pos")}
    assert all(isinstance(v, float) for v in s.values())
    with_interval = scalar_metrics({**val, "auroc_ci95": [0.7, 0.8]}, "best_test/")
    assert with_interval["best_test/auroc_ci95_low"] == 0.7 and with_interval["best_test/auroc_ci95_high"] == 0.8


def test_dedupe_accepts_python_random_order():
    pairs = [(f"k{i}", i % 2) for i in range(10)] * 2
    random.Random(3).shuffle(pairs)
    k, p, y = dedupe([a for a, _ in pairs], [0.5] * 20, [b for _, b in pairs])
    assert len(k) == 10 and y.sum() == 5


def test_balanced_threshold_maximises_balanced_accuracy():
    # At 0.5 balanced accuracy is 3/4 (hand-computed example). Calling 0.3 and up abnormal gets
    # every abnormal and 2 of 4 normal (0.7, 0.4 wrong): 3/4 too; 0.6 and up: 3/4 and 3/4 again.
    # Shift one normal below the abnormal 0.3: from 0.3 up, recall 1 and specificity 3/4 = 7/8.
    probs = [0.9, 0.8, 0.6, 0.3, 0.7, 0.1, 0.2, 0.25]
    t = balanced_threshold(probs, LABELS)
    assert t == 0.3
    assert compute_metrics(probs, LABELS, t)["balanced_accuracy"] == pytest.approx(7 / 8)
    # No candidate beats the best one found, 0.5 included.
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    t = balanced_threshold(p, y)
    best = compute_metrics(p, y, t)["balanced_accuracy"]
    assert all(compute_metrics(p, y, c)["balanced_accuracy"] <= best + 1e-12 for c in [0.5, *p])
    # Ties go to the candidate closest to 0.5: a perfect separation with a wide gap.
    assert balanced_threshold([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 0.8
    with pytest.raises(ValueError):
        balanced_threshold([0.1, 0.2], [1, 1])


def test_weighted_auroc_agrees_with_sklearn_including_ties():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.random(300) * 0.6 + 0.3 * y, 1)  # coarse: many tied scores across classes
    w = rng.integers(0, 4, size=(4, 300)).astype(float)
    expected = [skm.roc_auc_score(y, p, sample_weight=row) for row in w]
    np.testing.assert_allclose(_weighted_auroc(p, y, w), expected, rtol=1e-12)


def test_auroc_interval_brackets_the_auroc_and_shrinks_with_more_data():
    rng = np.random.default_rng(4)

    def sample(n):
        y = rng.integers(0, 2, n)
        return np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1), y

    p, y = sample(200)
    low, high = auroc_interval(p, y)
    assert low < skm.roc_auc_score(y, p) < high
    assert auroc_interval(p, y) == [low, high]  # seeded: the same every time
    assert auroc_interval(p, y, seed=1) != [low, high]
    big_low, big_high = auroc_interval(*sample(5000))
    assert big_high - big_low < (high - low) / 3  # ~1/sqrt(n): 25x the data, ~1/5 the width
    assert auroc_interval(p, y, level=0.5)[1] - auroc_interval(p, y, level=0.5)[0] < high - low


def test_auroc_interval_draws_whole_studies():
    """Two identical views per study carry no more information than one: drawing studies gives
    the interval of the single views; treating the views as independent would be too narrow."""
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 150)
    p = np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1)
    uids = [f"s{i}" for i in range(150)]
    single = auroc_interval(p, y, uids)
    doubled = auroc_interval(np.repeat(p, 2), np.repeat(y, 2), np.repeat(uids, 2))
    np.testing.assert_allclose(doubled, single, rtol=1e-12)
    naive = auroc_interval(np.repeat(p, 2), np.repeat(y, 2))
    assert naive[1] - naive[0] < 0.85 * (single[1] - single[0])


def test_auroc_interval_edge_cases():
    assert all(math.isnan(v) for v in auroc_interval([0.2, 0.7], [1, 1]))
    with pytest.raises(ValueError, match="groups"):
        auroc_interval(PROBS, LABELS, ["a"])


def test_paired_interval_of_the_auroc_gain():
    """baseline=: the interval of AUROC(probs) - AUROC(baseline) on the same draws. A model
    against itself gains exactly 0; a slightly better, correlated model gets an interval around
    its gain that is narrower than the model's own interval."""
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, 400)
    base = rng.normal(0.3 * y, 0.3)
    better = base + rng.normal(0.1 * y, 0.1)  # base plus a little more signal
    assert auroc_interval(base, y, baseline=base) == [0.0, 0.0]
    low, high = auroc_interval(better, y, baseline=base)
    point = skm.roc_auc_score(y, better) - skm.roc_auc_score(y, base)
    assert low < point < high and 0 < low
    alone = auroc_interval(better, y)
    assert high - low < 0.6 * (alone[1] - alone[0])
    swapped = auroc_interval(base, y, baseline=better)  # the same draws, the sign flipped
    np.testing.assert_allclose(swapped, [-high, -low], atol=1e-12)
