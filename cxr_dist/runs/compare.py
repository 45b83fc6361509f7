"""`cxr-dist compare` and `cxr-dist folds`: read the runs of an MLflow experiment back.

    cxr-dist compare [--experiment NAME] [--tracking-uri URI] [--metrics val/auroc,test/auroc] [--json]
    cxr-dist folds --experiment NAME [--campaign ID] [--tag fold] [--tracking-uri URI] [--metrics ...] [--json]

`compare` prints one row per run: name, status, the params that differ between the runs, the best
value of each validation metric over its history (max, or min for losses) and the final test
metrics (test/*, and best_test/* of the best checkpoint). `folds` summarises one k-fold campaign
(runs tagged `campaign=<id>` and `fold=i`, nested under the campaign's parent run; the latest
campaign by default): per metric the mean and sample standard deviation over the FINISHED fold
runs, each fold's value, and which folds have no FINISHED run. `--experiment` defaults to
$MLFLOW_EXPERIMENT_NAME, else cxr-dist.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError, run_main
from .tracking import (
    CAMPAIGN_PARENT_TAG, CAMPAIGN_TAG, DEFAULT_EXPERIMENT, ENV_DEFAULTS, PARENT_RUN_TAG, check_reachable,
    resolve_uri,
)

DEFAULT_VAL_METRICS = ("val/auroc", "val/f1", "val/accuracy", "val/balanced_accuracy")


def _default_experiment() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip() or DEFAULT_EXPERIMENT


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


def _is_campaign_parent(run: Any) -> bool:
    return CAMPAIGN_PARENT_TAG in run.data.tags


def compare_runs(client: Any, experiment: str, metrics: str = "") -> dict:
    """{"params": [...], "metrics": [...], "runs": [{"run_id", "name", "status", "params", "metrics"}]}.

    k-fold campaign parents are left out: they hold no params or metrics, only their folds.
    """
    runs = [r for r in _runs(client, experiment) if not _is_campaign_parent(r)]
    if not runs:
        raise UserError(f"experiment {experiment!r} has no training runs yet")
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
    ap.add_argument("--experiment", default=_default_experiment(),
                    help="MLflow experiment name (default: $MLFLOW_EXPERIMENT_NAME, else cxr-dist)")
    ap.add_argument("--tracking-uri", default="",
                    help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this folder")
    ap.add_argument("--metrics", default="",
                    help=f"comma-separated; default: {','.join(DEFAULT_VAL_METRICS)} (best over epochs), "
                         "test/* and best_test/{auroc,f1,accuracy,balanced_accuracy} (final values)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--paired", nargs="+", metavar="RUN",
                    help="BASELINE OTHER...: the paired AUROC gain of each OTHER run over BASELINE on the same test "
                         "images, image and study level, 95%% interval (run dirs or predictions CSVs; runs/paired.py)")
    ap.add_argument("--split", default="test", help="with --paired: the baseline's split (default test)")
    ap.add_argument("--other-split", help="with --paired: the others' split (default: --split)")
    ap.add_argument("--source", help="with --paired: score only this source's images")
    ap.add_argument("--common", action="store_true", help="with --paired: score the images both runs have")
    args = ap.parse_args(argv)
    if args.paired:
        from .paired import paired, table

        if len(args.paired) < 2:
            raise UserError("--paired needs a baseline run and at least one run to compare with it")
        rows = paired(args.paired[0], args.paired[1:], args.split, args.other_split, args.source, args.common)
        print(json.dumps(rows, indent=2) if args.json else table(args.paired[0], rows))
        return 0
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


def _fold_key(f: str) -> tuple:
    return (not f.lstrip("-").isdigit(), int(f) if f.lstrip("-").isdigit() else 0, f)


def _campaigns(runs: list[Any], tag: str) -> dict[str, dict]:
    """{campaign id: {"parent": run or None, "folds": [fold runs, oldest first], "start": ms}}.

    Fold runs without a campaign tag (logged before campaigns existed, or by hand) form the
    campaign "" (shown as "(none)").
    """
    out: dict[str, dict] = {}
    for r in runs:  # ascending start time
        cid = r.data.tags.get(CAMPAIGN_TAG, "")
        if _is_campaign_parent(r):
            if r.data.tags.get(CAMPAIGN_PARENT_TAG) == "confirmed":
                out.setdefault(cid, {"parent": None, "folds": []})["parent"] = r
        elif tag in r.data.tags:
            out.setdefault(cid, {"parent": None, "folds": []})["folds"].append(r)
    for c in out.values():
        c["start"] = min([x.info.start_time or 0 for x in c["folds"]]
                         + ([c["parent"].info.start_time or 0] if c["parent"] else []))
    return {cid: c for cid, c in out.items() if c["folds"]}


def _expected_folds(runs: list[Any]) -> list[str] | None:
    """["0", ..., "k-1"] from the runs' data.k_folds param (the largest), else None."""
    ks = [int(v) for r in runs if (v := r.data.params.get("data.k_folds", "")).isdigit() and int(v) > 0]
    return [str(i) for i in range(max(ks))] if ks else None


def fold_summary(client: Any, experiment: str, tag: str = "fold", metrics: str = "",
                 campaign: str | None = None) -> dict:
    """Per metric: each fold's value, mean and sample std (n-1) over the folds of ONE campaign.

    The campaign is `campaign`, else the latest (by when its first run started). Only FINISHED fold
    runs count: a FAILED or KILLED attempt never replaces a finished one, and a fold run twice to
    the end counts once, with its latest FINISHED run. `missing` lists each expected fold (from
    data.k_folds) without a FINISHED run, with the status of its latest attempt ("no run" if none).
    """
    runs = _runs(client, experiment)
    campaigns = _campaigns(runs, tag)
    if not campaigns:
        raise UserError(f"no run of experiment {experiment!r} has a {tag!r} tag (train the folds with "
                        f"slurm/kfold.sh, or set tracking.campaign and tracking.tags = [\"{tag}=0\"] "
                        "in each fold's config)")
    order = sorted(campaigns, key=lambda c: (campaigns[c]["start"], c), reverse=True)  # newest first
    if campaign is None:
        # Untagged (pre-campaign) fold runs are summarised only when there is nothing else.
        chosen = next((c for c in order if c), order[0])
    elif campaign in campaigns:
        chosen = campaign
    else:
        raise UserError(f"no fold runs of campaign {campaign!r} in experiment {experiment!r}; campaigns "
                        f"there (newest first): {', '.join(c or '(none)' for c in order)}")
    fold_runs = campaigns[chosen]["folds"]
    parent = campaigns[chosen]["parent"]

    latest: dict[str, Any] = {}  # fold -> latest run of any status (to say why a fold is missing)
    by_fold: dict[str, Any] = {}  # fold -> latest FINISHED run
    for r in fold_runs:  # ascending start time: later runs replace earlier ones
        latest[r.data.tags[tag]] = r
        if r.info.status == "FINISHED":
            by_fold[r.data.tags[tag]] = r
    expected = _expected_folds(fold_runs)
    wanted = sorted(set(expected or []) | set(latest), key=_fold_key)
    missing = {f: (latest[f].info.status if f in latest else "no run") for f in wanted if f not in by_fold}
    if not by_fold:
        raise UserError(f"campaign {chosen or '(none)'!r} of experiment {experiment!r} has no FINISHED fold "
                        "run yet: " + ", ".join(f"{tag} {f}: {st}" for f, st in missing.items()))
    folds = sorted(by_fold, key=_fold_key)
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
    parent_ids = {r.data.tags.get(PARENT_RUN_TAG) for r in by_fold.values()}
    return {"experiment": experiment, "tag": tag, "campaign": chosen or None,
            "parent_run_id": parent.info.run_id if parent else None,
            "campaigns": [c or None for c in order], "expected_folds": expected,
            "folds": folds, "missing": missing,
            "runs": {f: by_fold[f].info.run_id for f in folds},
            "nested": bool(parent) and parent_ids == {parent.info.run_id},
            "metrics": summary}


def folds_main(argv: list[str] | None = None) -> int:
    """`cxr-dist folds`: mean and spread of each metric over the folds of one k-fold campaign."""
    ap = argparse.ArgumentParser(prog="cxr-dist folds",
                                 description="mean and std of metrics over the folds of a k-fold campaign")
    env_exp = os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip()
    ap.add_argument("--experiment", required=not env_exp, default=env_exp or None,
                    help="MLflow experiment holding the fold runs (default: $MLFLOW_EXPERIMENT_NAME)")
    ap.add_argument("--campaign", default=None,
                    help="campaign id (slurm/kfold.sh: the array job id); default: the latest")
    ap.add_argument("--tag", default="fold", help="run tag that holds the fold index (default: fold)")
    ap.add_argument("--tracking-uri", default="",
                    help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this folder")
    ap.add_argument("--metrics", default="", help="comma-separated; default: validation metrics and test/*")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    result = fold_summary(_client(args.tracking_uri), args.experiment, args.tag, args.metrics, args.campaign)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    folds = result["folds"]
    header = ["metric", "n", "mean", "std"] + [f"{args.tag}={f}" for f in folds]
    rows = [[(f"best {k}" if _is_best_over_history(k) else k), s["n"], s["mean"], s["std"]]
            + [s["folds"][f] for f in folds] for k, s in result["metrics"].items()]
    name = result["campaign"] or "(none)"
    parent = f", parent run {result['parent_run_id'][:8]}" if result["parent_run_id"] else ""
    of = f" of {len(result['expected_folds'])}" if result["expected_folds"] else ""
    print(f"experiment {args.experiment}, campaign {name}{parent}: {len(folds)}{of} fold(s) FINISHED; "
          "std is the sample std (n-1) over folds")
    if result["missing"]:
        print("missing (no FINISHED run): " + ", ".join(f"{args.tag}={f} ({st})" for f, st in result["missing"].items()))
    others = [c or "(none)" for c in result["campaigns"] if c != result["campaign"]]
    if others:
        print(f"other campaigns (--campaign ID): {', '.join(others)}")
    print(format_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(run_main("cxr-dist compare", main))
