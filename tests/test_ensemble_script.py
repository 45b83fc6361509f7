"""bench/ensemble.py: the mean of runs' predictions, and --weigh, the late fusion of two runs
(an image run and a text run) with the weight picked on val. Predictions are generated here: the
script reads only predictions.csv files, so no model is needed."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from cxr_dist.errors import UserError
from cxr_dist.eval.evaluate import predictions_csv, read_predictions
from cxr_dist.eval.metrics import compute_metrics
from cxr_dist.runs import paired
from cxr_dist.runs.compare import main as compare_main

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ensemble", ROOT / "bench" / "ensemble.py")
ensemble = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ensemble)


def _split(rng, n_studies: int, labels: np.ndarray, signal: float, per_study: bool, constant: bool = False) -> dict:
    """Two views per study. `per_study`: one score per study (a text model: both views share the
    report); `constant`: the same probability everywhere (a text model on films without text)."""
    if constant:
        score = np.zeros(n_studies)
    else:
        score = signal * labels + rng.normal(size=n_studies)
    views = np.repeat(score, 2) + (0 if per_study or constant else rng.normal(scale=0.5, size=2 * n_studies))
    uids = [f"s{i:04d}" for i in range(n_studies)]
    return {"keys": [f"{u}_v{v}" for u in uids for v in (0, 1)], "uids": [u for u in uids for _ in (0, 1)],
            "sources": ["iu"] * (2 * n_studies), "views": ["FRONTAL", "LATERAL"] * n_studies,
            "labels": np.repeat(labels, 2), "probs": 1 / (1 + np.exp(-views))}


def write_runs(tmp_path: Path, text_signal_on_test: float = 1.0, n: int = 400) -> tuple[Path, Path]:
    """An 'image' run and a 'text' run scored on val, test and an external source without text.
    Their errors are independent, so a weighted fusion beats each."""
    rng = np.random.default_rng(0)
    labels = {s: rng.integers(0, 2, size=n) for s in ("val", "test", "external")}
    image = {s: _split(rng, n, labels[s], 1.5, per_study=False) for s in labels}
    text = {"val": _split(rng, n, labels["val"], 1.0, per_study=True),
            "test": _split(rng, n, labels["test"], text_signal_on_test, per_study=True),
            "external": _split(rng, n, labels["external"], 0.0, per_study=True, constant=True)}
    paths = []
    for name, run in (("image", image), ("text", text)):
        path = tmp_path / f"{name}.csv"
        path.write_text(predictions_csv(run))
        paths.append(path)
    return paths[0], paths[1]


def auroc(preds: dict) -> float:
    return compute_metrics(preds["probs"], preds["labels"])["auroc"]


def test_weigh_fuses_two_runs_with_the_weight_picked_on_val(tmp_path, capsys):
    image, text = write_runs(tmp_path)
    out = tmp_path / "fused"
    assert ensemble.main([str(image), str(text), "--weigh", "--write", str(out), "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert 0.0 < result["weight"] < 1.0 and result["weight_of"] == str(image)
    scores = result["val_study_auroc_by_weight"]
    assert scores[str(result["weight"])] == max(scores.values())  # the best weight on val
    assert scores[str(result["weight"])] > max(scores["0.0"], scores["1.0"])  # better than either run alone
    fused, runs = read_predictions(out), {p: read_predictions(p) for p in (image, text)}
    assert list(fused) == ["val", "test", "external"]
    # on test, which the weight never saw, the fusion still beats both runs
    assert auroc(fused["test"]) > max(auroc(r["test"]) for r in runs.values()) + 0.02
    # no text on the external source: the text run is one constant, so the fused ranking is the image run's
    ext, img_ext = fused["external"]["probs"], runs[image]["external"]["probs"]
    assert np.array_equal(np.argsort(ext, kind="stable"), np.argsort(img_ext, kind="stable"))
    assert auroc(fused["external"]) == pytest.approx(auroc(runs[image]["external"]))
    assert "weight picked on val" in capsys.readouterr().out


def test_the_weight_never_looks_at_test(tmp_path):
    # the same val predictions, and a text run that is informative on test or pure noise there:
    # the weight, and every val score it was picked from, must not change
    picked = []
    for signal in (1.0, 0.0):
        folder = tmp_path / f"signal{signal}"
        folder.mkdir()
        image, text = write_runs(folder, text_signal_on_test=signal)
        result, fused = ensemble.ensemble({"image": read_predictions(image), "text": read_predictions(text)},
                                          weigh=True)
        picked.append((result["weight"], result["val_study_auroc_by_weight"], auroc(fused["test"])))
    assert picked[0][:2] == picked[1][:2]
    assert picked[0][2] > picked[1][2] + 0.02  # while test itself did change


def test_mean_and_bad_input(tmp_path):
    image, text = write_runs(tmp_path, n=60)
    result, mean = ensemble.ensemble({str(image): read_predictions(image), str(text): read_predictions(text)})
    assert "weight" not in result and list(mean) == ["val", "test", "external"]
    expected = (read_predictions(image)["test"]["probs"] + read_predictions(text)["test"]["probs"]) / 2
    assert np.allclose(mean["test"]["probs"], expected)
    third = tmp_path / "third.csv"
    third.write_bytes(image.read_bytes())
    with pytest.raises(UserError, match="exactly two runs"):
        ensemble.main([str(image), str(text), str(third), "--weigh"])
    out = tmp_path / "fused"
    assert ensemble.main([str(image), str(text), "--write", str(out)]) == 0
    before = (out / "predictions.csv").read_bytes()
    with pytest.raises(UserError, match="already holds"):  # nothing is overwritten
        ensemble.main([str(image), str(text), "--weigh", "--write", str(out)])
    assert (out / "predictions.csv").read_bytes() == before


def test_compare_says_what_an_ensemble_reads_and_marks_a_leak(tmp_path, capsys):
    # run directories as training writes them (predictions.csv + config.toml); the second reads
    # the fields its label was derived from
    image_csv, text_csv = write_runs(tmp_path, n=60)
    configs = {"image": '[model]\nkind = "image"\n',
               "leak": '[model]\nkind = "image+text"\n[loader]\ntext_fields = ["findings", "impression"]\n'
                       'allow_label_leakage = true\n'}
    runs = {}
    for (name, cfg), csv in zip(configs.items(), (image_csv, text_csv)):
        runs[name] = tmp_path / "runs" / name
        runs[name].mkdir(parents=True)
        (runs[name] / "predictions.csv").write_bytes(csv.read_bytes())
        (runs[name] / "config.toml").write_text(cfg)
    assert paired.reads(str(runs["image"])) == "image"
    assert paired.reads(str(runs["leak"])) == "image+text (findings,impression) LEAK"
    fused = tmp_path / "fused"
    assert ensemble.main([str(runs["image"]), str(runs["leak"]), "--weigh", "--write", str(fused)]) == 0
    assert json.loads((fused / "ensemble.json").read_text())["members"] == [str(runs["image"].resolve()),
                                                                          str(runs["leak"].resolve())]
    assert paired.reads(str(fused)) == "ensemble of image + image+text (findings,impression) LEAK"
    capsys.readouterr()
    assert compare_main(["--paired", str(runs["image"]), str(fused)]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {fused} |")]
    assert len(row) == 1 and "LEAK" in row[0]
    honest = tmp_path / "honest"  # the mean of two honest runs is not marked
    assert ensemble.main([str(runs["image"]), str(image_csv), "--write", str(honest)]) == 0
    assert paired.reads(str(honest)) == "ensemble of image + ?"


def test_the_binormal_ceiling_matches_simulated_scores():
    """bench/fusion_ceiling.py: the AUROC of the best linear mix of two correlated binormal scores,
    against scores drawn from that model (the best mix of two equal-variance scores is known)."""
    spec = importlib.util.spec_from_file_location("fusion_ceiling", ROOT / "bench" / "fusion_ceiling.py")
    ceiling_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ceiling_mod)
    from scipy.stats import norm

    rng = np.random.default_rng(0)
    n, rho = 200_000, 0.3
    da, db = 1.1, 0.55  # class-mean distances in within-class standard deviations
    cov = [[1, rho], [rho, 1]]
    neg = rng.multivariate_normal([0, 0], cov, n)
    pos = rng.multivariate_normal([da, db], cov, n)
    coef = np.linalg.solve(cov, [da, db])  # Fisher's discriminant: the best linear rule
    scores = np.concatenate([neg @ coef, pos @ coef])
    labels = np.r_[np.zeros(n), np.ones(n)]
    auc = lambda d: float(norm.cdf(d / np.sqrt(2)))  # noqa: E731
    want = ceiling_mod.ceiling(auc(da), auc(db), rho)
    assert compute_metrics(scores, labels)["auroc"] == pytest.approx(want, abs=2e-3)
    assert ceiling_mod.ceiling(0.8, 0.5, 0.0) == pytest.approx(0.8)  # a text at chance adds nothing
    assert ceiling_mod.ceiling(0.8, 0.7, 0.5) < ceiling_mod.ceiling(0.8, 0.7, 0.0)  # what the image knows too
