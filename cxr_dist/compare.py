"""`cxr-dist compare` and `cxr-dist folds`: read the runs of an MLflow experiment back.

    cxr-dist compare [--experiment NAME] [--tracking-uri URI] [--metrics val/auroc,test/auroc] [--json]
    cxr-dist folds --experiment NAME [--tag fold] [--tracking-uri URI] [--metrics ...] [--json]

`compare` prints one row per run: name, status, the params that differ between the runs, the best
value of each validation metric over its history (max, or min for losses) and the final test
metrics (test/*, and best_test/* of the best checkpoint). `folds` summarises the runs of a k-fold
experiment (tagged `fold=i`): per metric the mean and sample standard deviation over folds, and
each fold's value.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from .errors import UserError
from .tracking import ENV_DEFAULTS, check_reachable, resolve_uri

DEFAULT_VAL_METRICS = ("val/auroc", "val/f1", "val/accuracy", "val/balanced_accuracy")


def _client(uri_arg: str) -> Any:
    """An MlflowClient for the resolved URI; fails clearly instead of creating an empty store."""
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    uri = resolve_uri(uri_arg)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        # Opening a missing SQLite file would silently create an empty store here.
        raise UserError(f"no MLflow store at {uri[len('sqlite:///'):]}; run from the folder where training "
                        "ran, or pass --tracking-uri (or set MLFLOW_TRACKING_URI)")
    check_reachable(uri)
    import mlflow

    return mlflow.MlflowClient(uri)


def _runs(client: Any, experiment: str) -> list[Any]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise UserError(f"experiment {experiment!r} does not exist at {client.tracking_uri}; "
                        f"experiments there: {', '.join(names) or '(none)'}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=5000)
    if not runs:
        raise UserError(f"experiment {experiment!r} has no runs yet")
    return list(runs)


def _is_best_over_history(key: str) -> bool:
    # Validation (and train) curves: the best epoch matters; test/* metrics are logged once.
    return key.startswith(("val/", "train/"))


def metric_value(client: Any, run: Any, key: str) -> float | None:
    """Best value over the history for val/* and train/* (min for losses, else max); final otherwise."""
    if key not in run.data.metrics:
        return None
    if not _is_best_over_history(key):
        return float(run.data.metrics[key])
    values = [m.value for m in client.get_metric_history(run.info.run_id, key)]
    if not values:
        return None
    return float(min(values) if "loss" in key.rsplit("/", 1)[-1] else max(values))


def differing_params(runs: list[Any]) -> list[str]:
    """Param names whose value is not the same in every run (absent counts as a value)."""
    keys = sorted({k for r in runs for k in r.data.params})
    return [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]


def _metric_keys(runs: list[Any], requested: str) -> list[str]:
    """The requested metrics, else the main validation metrics and the held-out test ones present
    (test/* as logged, and the best checkpoint's best_test/* headline metrics written by train.py)."""
    if requested:
        return [m.strip() for m in requested.split(",") if m.strip()]
    present = {k for r in runs for k in r.data.metrics}
    headline = {m.split("/", 1)[1] for m in DEFAULT_VAL_METRICS}
    final = [k for k in present if k.startswith("test/")
             or (k.startswith("best_test/") and k.split("/", 1)[1] in headline)]
    return [m for m in DEFAULT_VAL_METRICS if m in present] + sorted(final, key=lambda k: (k.split("/")[0], k))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    """Plain text table, columns left-aligned and padded to their widest cell."""
    cells = [header] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def compare_runs(client: Any, experiment: str, metrics: str = "") -> dict:
    """{"params": [...], "metrics": [...], "runs": [{"run_id", "name", "status", "params", "metrics"}]}."""
    runs = _runs(client, experiment)
    params = differing_params(runs)
    keys = _metric_keys(runs, metrics)
    rows = [{
        "run_id": r.info.run_id,
        "name": r.info.run_name,
        "status": r.info.status,
        "params": {k: r.data.params.get(k) for k in params},
        "metrics": {k: metric_value(client, r, k) for k in keys},
    } for r in runs]
    return {"experiment": experiment, "params": params, "metrics": keys, "runs": rows}


def main(argv: list[str] | None = None) -> int:
    """`cxr-dist compare`: table (or JSON) of an experiment's runs."""
    ap = argparse.ArgumentParser(prog="cxr-dist compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", default="cxr-dist", help="MLflow experiment name (default: cxr-dist)")
    ap.add_argument("--tracking-uri", default="",
                    help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this folder")
    ap.add_argument("--metrics", default="",
                    help=f"comma-separated; default: {','.join(DEFAULT_VAL_METRICS)} (best over epochs), "
                         "test/* and best_test/{auroc,f1,accuracy,balanced_accuracy} (final values)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    result = compare_runs(_client(args.tracking_uri), args.experiment, args.metrics)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    header = ["run", "run_id", "status"] + result["params"] + [
        f"best {k}" if _is_best_over_history(k) else k for k in result["metrics"]]
    rows = [[r["name"], r["run_id"][:8], r["status"]] + [r["params"][k] for k in result["params"]]
            + [r["metrics"][k] for k in result["metrics"]] for r in result["runs"]]
    print(f"experiment {args.experiment}: {len(rows)} run(s); params shown are those that differ")
    print(format_table(header, rows))
    return 0


def fold_summary(client: Any, experiment: str, tag: str = "fold", metrics: str = "") -> dict:
    """Per metric: each fold's value, mean and sample std (n-1) over the folds.

    A fold run more than once (a retried array task) counts once: its latest run.
    """
    runs = [r for r in _runs(client, experiment) if tag in r.data.tags]
    if not runs:
        raise UserError(f"no run of experiment {experiment!r} has a {tag!r} tag (set tracking.tags = "
                        f'["{tag}=0"] in each fold\'s config)')
    by_fold: dict[str, Any] = {}
    for r in runs:  # ascending start time: later runs replace earlier ones
        by_fold[r.data.tags[tag]] = r
    folds = sorted(by_fold, key=lambda f: (not f.lstrip("-").isdigit(), int(f) if f.lstrip("-").isdigit() else 0, f))
    keys = _metric_keys(list(by_fold.values()), metrics)
    summary: dict[str, dict] = {}
    for k in keys:
        per_fold = {f: metric_value(client, by_fold[f], k) for f in folds}
        vals = [v for v in per_fold.values() if v is not None]
        summary[k] = {
            "folds": per_fold,
            "n": len(vals),
            "mean": statistics.fmean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) > 1 else None,
        }
    return {"experiment": experiment, "tag": tag, "folds": folds,
            "runs": {f: by_fold[f].info.run_id for f in folds}, "metrics": summary}


def folds_main(argv: list[str] | None = None) -> int:
    """`cxr-dist folds`: mean and spread of each metric over the k-fold runs of an experiment."""
    ap = argparse.ArgumentParser(prog="cxr-dist folds", description="mean and std of metrics over k-fold runs")
    ap.add_argument("--experiment", required=True, help="MLflow experiment holding the fold runs")
    ap.add_argument("--tag", default="fold", help="run tag that holds the fold index (default: fold)")
    ap.add_argument("--tracking-uri", default="",
                    help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this folder")
    ap.add_argument("--metrics", default="", help="comma-separated; default: validation metrics and test/*")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    result = fold_summary(_client(args.tracking_uri), args.experiment, args.tag, args.metrics)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    folds = result["folds"]
    header = ["metric", "n", "mean", "std"] + [f"{args.tag}={f}" for f in folds]
    rows = [[(f"best {k}" if _is_best_over_history(k) else k), s["n"], s["mean"], s["std"]]
            + [s["folds"][f] for f in folds] for k, s in result["metrics"].items()]
    print(f"experiment {args.experiment}: {len(folds)} fold(s); std is the sample std (n-1) over folds")
    print(format_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
