"""What a run leaves behind after its last epoch: the best checkpoint evaluated, and its files.

`finish` evaluates the best weights (RUN_DIR/checkpoints/best) on val, test and, when the shards
have one, the external split (the sources never trained on), over `train.tta_views` views, and
writes into the run folder:

- `evaluation.json`: per split `evaluate.report` (image level, study level, by view, by source,
  the always-abnormal baseline) at 0.5, and `test_at_val_threshold` / `external_at_val_threshold`
  at the threshold with the best balanced accuracy on val;
- `predictions.csv`: the per-image probabilities (for error analysis and ensembles);
- `history.json`: one row of metrics per epoch;
- the figures (training curves, ROC/PR and confusion matrix of test, or val without a test split);

and logs them, the best_* metrics and the model to MLflow (through the tracker: nothing on other
ranks).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from . import dist
from .config import Config
from .evaluate import evaluate_split, predictions_csv, report
from .fileio import write_bytes_atomic, write_json_atomic
from .metrics import balanced_threshold, scalar_metrics
from .model import CXRClassifier


def finish(cfg: Config, accelerator, model: CXRClassifier, tracker, history: list[dict], epoch: int,
           val_split: str, index: dict) -> None:
    """After the last epoch: the best weights on val and test, figures, evaluation JSON, model.

    `model` (the final weights) is left as it is: the best weights go into a copy. `epoch` is the
    MLflow step of the best_* metrics (the last completed epoch). Collective (every rank evaluates
    its share); files and logging on the main process only.
    """
    run_dir = Path(cfg.train.run_dir)
    if ckpt.find_checkpoint(run_dir, "best") is None:
        # No epoch ever had a defined val/<best_metric> (e.g. NaN throughout): the last weights stand in.
        accelerator.print(f"no epoch improved val/{cfg.train.best_metric}: evaluating the latest checkpoint as best")
        if accelerator.is_main_process:
            ckpt.copy_as(run_dir, "latest", "best")
        dist.barrier()
    state, _ = ckpt.load_model_state(run_dir / "checkpoints" / "best")
    best = copy.deepcopy(model)  # the caller keeps the final weights
    best.load_state_dict(state)
    splits = {"val": val_split}
    for name in ("test", "external"):  # external: the sources never trained on (cross-source evaluation)
        if index["splits"].get(name, {}).get("total", 0):
            splits[name] = name
    preds = {name: evaluate_split(best, cfg.data, split, accelerator, with_predictions=True,
                                  views=cfg.train.tta_views, index=index)["predictions"]
             for name, split in splits.items()}
    if accelerator.is_main_process:
        evaluation = _evaluation(preds)
        write_json_atomic(run_dir / "evaluation.json", evaluation)
        # Per-image probabilities: for error analysis, and for ensembles of runs without their
        # checkpoints (bench/ensemble.py).
        write_bytes_atomic(run_dir / "predictions.csv", predictions_csv(preds).encode())
        write_json_atomic(run_dir / "history.json", history)
        _log_metrics(tracker, evaluation, epoch)
        figures = _figures(cfg, history, preds, evaluation, run_dir)
        for path in [*figures, run_dir / "evaluation.json", run_dir / "history.json", run_dir / "predictions.csv"]:
            tracker.log_artifact(path)
        tracker.log_model(best)
        accelerator.print(json.dumps({n: {k: round(v, 4) for k, v in scalar_metrics(r["image_level"]).items()}
                                      for n, r in evaluation.items()}))
    dist.barrier()


def _evaluation(preds: dict[str, dict]) -> dict:
    """The content of evaluation.json from the best checkpoint's predictions per split."""
    evaluation = {name: report(p) for name, p in preds.items()}
    if len(np.unique(preds["val"]["labels"])) == 2:
        # Accuracy and F1 at 0.5 drift with calibration; the threshold with the best balanced
        # accuracy on val, applied to test, is the honest alternative (picked without test).
        threshold = balanced_threshold(preds["val"]["probs"], preds["val"]["labels"])
        for name in ("test", "external"):
            if name in preds:
                evaluation[f"{name}_at_val_threshold"] = report(preds[name], threshold)
    return evaluation


def _log_metrics(tracker, evaluation: dict, epoch: int) -> None:
    """best_<split>/... (image level, per source and view AUROC and mean probabilities) and
    best_<split>_study/... to the tracker, at step `epoch`."""
    for name, rep in evaluation.items():
        tracker.log_metrics(scalar_metrics(rep["image_level"], f"best_{name}/"), step=epoch)
        for kind in ("by_source", "by_view"):  # e.g. best_test/source/kermany/auroc
            tracker.log_metrics({f"best_{name}/{kind[3:]}/{g}/{k}": v for g, m in rep[kind].items()
                                 for k, v in m.items() if k.startswith(("auroc", "mean_prob")) and k != "auroc_ci95"},
                                step=epoch)
        if "study_level" in rep:
            tracker.log_metrics(scalar_metrics(rep["study_level"], f"best_{name}_study/"), step=epoch)


def _figures(cfg: Config, history: list[dict], preds: dict[str, dict], evaluation: dict, run_dir: Path) -> list[Path]:
    """Training curves (phase boundaries marked), ROC/PR and confusion matrix of test (else val)."""
    from .plots import confusion_figure, roc_pr_figure, training_figure  # matplotlib: only when needed

    bounds = [float(b) + 0.5 for b in np.cumsum([p.epochs for p in cfg.train.phases])[:-1]]
    last = "test" if "test" in preds else "val"
    return [
        training_figure(history, bounds, run_dir / "training_metrics.png"),
        roc_pr_figure(preds[last]["probs"], preds[last]["labels"], run_dir / f"roc_pr_{last}.png"),
        confusion_figure(evaluation[last]["image_level"]["confusion"], run_dir / f"confusion_{last}.png"),
    ]
