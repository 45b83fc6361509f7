"""What a run leaves behind after its last epoch: the best checkpoint evaluated, and its files.

`finish` evaluates the best weights (RUN_DIR/checkpoints/best) on val, test and, when the shards
have one, the external split (the sources never trained on), over `product.tta_views` views, and
writes into the run folder:

- `evaluation.json`: per split `evaluate.report` (image level, study level, by view, by source,
  the always-abnormal baseline) of the calibrated probabilities at 0.5, `test_at_val_threshold` /
  `external_at_val_threshold` at the threshold with the best balanced accuracy on val, per split
  the out-of-distribution scores (`ood`), and `calibration` (temperature; ECE and Brier score
  before and after, on val where it was fitted and on test);
- `predictions.csv`: the per-image probabilities, calibrated and not, and OOD scores (for error
  analysis and ensembles);
- `history.json`: one row of metrics per epoch;
- the figures (training curves, ROC/PR and confusion matrix of test, or val without a test split,
  the reliability diagram) and `cam/`: Grad-CAM overlays of the first `product.cam_images` test films;
- `MODEL_CARD.md` (model_card.py);

amends the best checkpoint with what the product needs (product/readout.py): the temperature, the
threshold, the OOD statistics; and logs all of it, the best_* metrics and the servable model
(serve.py) to MLflow, registering it under `tracking.registered_model` (through the tracker:
nothing on other ranks).

The product's parts, in order: the temperature is fitted on val (calibrate.py); the threshold is
picked on the calibrated val probabilities; the OOD density is fitted on the pooled features of up
to OOD_FIT_IMAGES training images (a sample across sources: a full pass over the training split
would cost as much as the frozen-compute cache) and its flag threshold set on val (ood.py). This
module only fits them and saves them: they are applied to the predictions by product/readout.py's
`Readout`, the code every product loaded from the checkpoint applies them with.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from ..model import checkpoint as ckpt
from .. import dist
from ..model.feature_cache import FastFrozen
from ..eval.calibrate import CalibrationError, apply_temperature, calibration_report, fit_temperature
from ..config import Config, replace
from ..eval.evaluate import Scoring, evaluate_split, ood_summary, predictions_csv, report
from ..fileio import write_bytes_atomic, write_json_atomic
from ..data.index import Shard, ShardIndex, train_val_splits
from ..eval.metrics import balanced_threshold, metric_mode, scalar_metrics
from ..runs.tracking import log_evaluation
from ..model.classifier import CXRClassifier
from ..eval.ood import FeatureDensity, flag_threshold
from ..product.readout import Readout

OOD_FIT_IMAGES = 1024  # training images whose features fit the OOD density (~1 min on a 2-core CPU)
OOD_FIT_SPLIT = "ood_fit"  # the name of that sample in the index handed to the loader


def finish(cfg: Config, accelerator, model: CXRClassifier, tracker, history: list[dict], epoch: int,
           val_split: str, index: ShardIndex) -> None:
    """After the last epoch: the best weights on val and test, figures, evaluation JSON, model.

    `model` (the final weights) is left as it is: the best weights go into a copy. `epoch` is the
    MLflow step of the best_* metrics (the last completed epoch). Collective (every rank evaluates
    its share); files and logging on the main process only.
    """
    run_dir = Path(cfg.train.run_dir)
    if ckpt.find_checkpoint(run_dir, "best") is None:
        # No epoch ever had a defined val/<best_metric> (e.g. NaN throughout): the last weights stand in.
        accelerator.print(f"no epoch improved val/{cfg.selection.best_metric}: evaluating the latest checkpoint as best")
        if accelerator.is_main_process:
            ckpt.copy_as(run_dir, "latest", "best")
        dist.barrier()
    state, _ = ckpt.load_model_state(run_dir / "checkpoints" / "best")
    best = copy.deepcopy(model)  # the caller keeps the final weights
    best.load_state_dict(state)
    splits = {"val": val_split}
    for name in ("test", "external"):  # external: the sources never trained on (cross-source evaluation)
        if index.has_samples(name):
            splits[name] = name
    train_splits = train_val_splits(cfg.data)[0]
    # The frozen part through the fast CPU runtime (model.frozen_backend), as the cache was built.
    fast = FastFrozen(cfg, best, best.depth, index, train_splits[0],
                      Path(cfg.train.cache_dir or run_dir / "cache"), accelerator)
    final = Scoring(views=cfg.product.tta_views, with_predictions=True, with_features=True)
    preds = fast(lambda: {name: evaluate_split(best, cfg.loader, split, accelerator, index, final)["predictions"]
                          for name, split in splits.items()})
    fit = fast(lambda: evaluate_split(best, cfg.loader, OOD_FIT_SPLIT, accelerator, ood_fit_index(index, train_splits),
                                      Scoring(with_predictions=True, with_features=True))["predictions"])
    if accelerator.is_main_process:
        best_dir = ckpt.find_checkpoint(run_dir, "best")
        product, preds = _product(cfg, preds, fit["features"])
        # Accuracy and F1 at 0.5 drift with calibration; the threshold with the best balanced
        # accuracy on val, applied to test, is the honest alternative (picked without test).
        val = preds["val"]
        threshold = balanced_threshold(val["probs"], val["labels"]) if len(np.unique(val["labels"])) == 2 else None
        evaluation = _evaluation(preds, threshold)
        evaluation["calibration"] = product["calibration"]
        for name, p in preds.items():
            evaluation[name]["ood"] = ood_summary(p, product["ood"]["threshold"])
        # Saved where readout.Readout.from_checkpoint reads them back (every product's loader).
        meta = {"calibration": product["calibration"], "ood": product["ood"]}
        if product["findings_readout"]:
            meta["findings_readout"] = product["findings_readout"]
        if threshold is not None:
            meta["threshold"] = {"value": threshold, "picked_on": "val", "rule": "best balanced accuracy",
                                 "scale": "calibrated"}
        ckpt.amend_checkpoint(best_dir, meta, extra=product["readout"].density.tensors())
        write_json_atomic(run_dir / "evaluation.json", evaluation)
        # Per-image probabilities: for error analysis, and for ensembles of runs without their
        # checkpoints (bench/ensemble.py).
        write_bytes_atomic(run_dir / "predictions.csv", predictions_csv(preds).encode())
        write_json_atomic(run_dir / "history.json", history)
        log_evaluation(tracker, evaluation, epoch)
        figures = _figures(cfg, history, preds, evaluation, run_dir)
        card = _model_card(cfg, index, evaluation, run_dir, product)
        for path in [*figures, run_dir / "evaluation.json", run_dir / "history.json", run_dir / "predictions.csv", card]:
            tracker.log_artifact(path)
        cams = _cam_overlays(cfg, best, index, run_dir, accelerator.device)
        if cams:
            tracker.log_artifact(run_dir / "cam", "cam")
        _log_servable(cfg, tracker, best_dir, index, history)
        accelerator.print(json.dumps({n: {k: round(v, 4) for k, v in scalar_metrics(r["image_level"]).items()}
                                      for n, r in evaluation.items() if isinstance(r, dict) and "image_level" in r}))
    dist.barrier()


def ood_fit_index(index: ShardIndex, train_splits: list[str], limit: int = OOD_FIT_IMAGES) -> ShardIndex:
    """`index` plus a split OOD_FIT_SPLIT: whole training shards, taken in turn from each source
    (a shard holds one source) until `limit` images, so every training source is represented."""
    by_source: dict[str, list[Shard]] = {}
    for shard in index.shards(train_splits):
        by_source.setdefault(shard.source, []).append(shard)
    picked, total = [], 0
    while total < limit and any(by_source.values()):
        for shards in by_source.values():
            if shards and total < limit:
                picked.append(shards.pop(0))
                total += picked[-1].count
    return index.with_split(OOD_FIT_SPLIT, picked)


def _product(cfg: Config, preds: dict[str, dict], fit_features) -> tuple[dict, dict[str, dict]]:
    """Temperature (fitted on val), OOD density (training features) and flag threshold (val);
    returns them (with their Readout) and the predictions as the product gives them: through
    Readout.apply_split, the code every loaded product applies them with."""
    val = preds["val"]
    two_classes = len(np.unique(val["labels"])) == 2
    temperature = fit_temperature(val["probs"], val["labels"]) if cfg.product.calibrate and two_classes else 1.0
    density = FeatureDensity.fit(fit_features)
    ood_threshold = flag_threshold(density.score(val["features"]), cfg.product.ood_quantile)
    calibration = {"temperature": temperature, "fitted_on": "val" if temperature != 1.0 else None}
    for name in ("val", "test"):
        if name in preds and len(np.unique(preds[name]["labels"])) == 2:
            calibration[name] = calibration_report(preds[name]["probs"], preds[name]["labels"], temperature)
    ood = {"threshold": ood_threshold, "quantile": cfg.product.ood_quantile, "fit_images": int(len(fit_features)),
           "score": "Mahalanobis distance of the pooled features (Ledoit-Wolf covariance)"}
    findings = _finding_readout(cfg, val)
    readout = Readout(temperature=temperature, density=density, ood_threshold=ood_threshold,
                      **({"finding_names": tuple(findings["names"]), "finding_temperatures": tuple(findings["temperature"]),
                          "finding_thresholds": tuple(findings["threshold"])} if findings else {}))
    out = {name: readout.apply_split(p) for name, p in preds.items()}
    return {"calibration": calibration, "ood": ood, "readout": readout, "temperature": temperature,
            "findings_readout": findings}, out


def _finding_readout(cfg: Config, val: dict) -> dict | None:
    """Per finding of a findings head: a temperature fitted on val over the images that annotate
    it, and the threshold with the best balanced accuracy there (calibrated scale); T = 1 and no
    threshold where val lacks one of the classes. None for a model without findings."""
    if "finding_probs" not in val:
        return None
    temps, thresholds = [], []
    for j in range(len(val["finding_names"])):
        rows = val["finding_mask"][:, j].astype(bool)
        p, y = val["finding_probs"][rows, j], val["finding_targets"][rows, j].astype(np.int64)
        both = len(np.unique(y)) == 2
        try:
            t = fit_temperature(p, y) if cfg.product.calibrate and both else 1.0
        except CalibrationError:  # e.g. a finding separated perfectly on val: nothing to fit
            t = 1.0
        temps.append(float(t))
        thresholds.append(balanced_threshold(apply_temperature(p, t), y) if both else None)
    return {"names": list(val["finding_names"]), "temperature": temps, "threshold": thresholds,
            "fitted_on": "val", "rule": "best balanced accuracy"}


def _evaluation(preds: dict[str, dict], threshold: float | None) -> dict:
    """The content of evaluation.json from the best checkpoint's predictions per split, and the
    reports of test and external at the `threshold` picked on val (when there is one)."""
    evaluation = {name: report(p) for name, p in preds.items()}
    for name in ("test", "external"):
        if name in preds and threshold is not None:
            evaluation[f"{name}_at_val_threshold"] = report(preds[name], threshold)
    return evaluation


def _figures(cfg: Config, history: list[dict], preds: dict[str, dict], evaluation: dict, run_dir: Path) -> list[Path]:
    """Training curves (phase boundaries marked), ROC/PR and confusion matrix of test (else val)."""
    from ..eval.plots import confusion_figure, roc_pr_figure, training_figure  # matplotlib: only when needed

    bounds = [float(b) + 0.5 for b in np.cumsum([p.epochs for p in cfg.train.phases])[:-1]]
    last = "test" if "test" in preds else "val"
    figures = [
        training_figure(history, bounds, run_dir / "training_metrics.png"),
        roc_pr_figure(preds[last]["probs"], preds[last]["labels"], run_dir / f"roc_pr_{last}.png"),
        confusion_figure(evaluation[last]["image_level"]["confusion"], run_dir / f"confusion_{last}.png"),
    ]
    if last in evaluation.get("calibration", {}):
        from ..eval.plots import reliability_figure

        p = preds[last]
        figures.append(reliability_figure(p["prob_uncalibrated"], p["probs"], p["labels"],
                                          run_dir / f"reliability_{last}.png"))
    return figures


def _model_card(cfg: Config, index: ShardIndex, evaluation: dict, run_dir: Path, product: dict) -> Path:
    from ..product.model_card import write_model_card

    # evaluation.json holds calibrated probabilities (and the threshold on that scale).
    return write_model_card(cfg, index, evaluation, run_dir, temperature=product["temperature"],
                            calibration=product["calibration"], ood=product["ood"], evaluation_calibrated=True)


def _cam_overlays(cfg: Config, model: CXRClassifier, index: ShardIndex, run_dir: Path, device) -> list[Path]:
    """Grad-CAM overlays of the first `product.cam_images` films of the test split (else val), in
    shard order: the same films run after run, so runs can be compared by eye."""
    from ..product.cam import write_overlays  # restores the model's modes itself
    from ..data.stream import eval_loader

    if cfg.product.cam_images == 0 or model.uses_text:  # Grad-CAM explains the image path of image models only
        return []
    loader = replace(cfg.loader, num_workers=0, batch_size=cfg.product.cam_images)
    batch = next(iter(eval_loader(loader, _shown_split(cfg, index), 0, 1, index)), None)
    if batch is None:
        return []
    return write_overlays(model, batch["image"].to(device), list(batch["key"]), run_dir / "cam")


def _shown_split(cfg: Config, index: ShardIndex) -> str:
    """The split whose first films show the model: its CAM overlays, the served model's example."""
    return "test" if index.has_samples("test") else train_val_splits(cfg.data)[1]


def _log_servable(cfg: Config, tracker, best_dir: Path, index: ShardIndex, history: list[dict]) -> None:
    """The servable pyfunc (serve.py) with a test film as its input example, registered."""
    import tarfile

    from ..product.serve import log_servable

    with tarfile.open(index.shards([_shown_split(cfg, index)])[0].path) as tar:  # the first film of the split, as stored
        member = next((m for m in tar if m.name.endswith(".jpg")), None)
        example = tar.extractfile(member).read() if member is not None else None
    uri = log_servable(tracker, best_dir, example)
    if uri and cfg.tracking.registered_model:
        metric = cfg.selection.best_metric
        mode = metric_mode(metric, cfg.selection.best_mode)
        values = [r[f"val/{metric}"] for r in history if r.get(f"val/{metric}") is not None]
        best = (max(values) if mode == "max" else min(values)) if values else None
        tracker.register(uri, cfg.tracking.registered_model, cfg.tracking.model_alias, metric, best, mode,
                         data_key=f"{index.checksum} val={train_val_splits(cfg.data)[1]}")
