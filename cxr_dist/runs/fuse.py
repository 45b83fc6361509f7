"""`cxr-dist fuse`: a finished image run and a finished text run -> one late-fusion checkpoint.

    cxr-dist fuse out/runs/image out/runs/text --out out/runs/fused        # the weight picked on val
    cxr-dist compare --paired out/runs/image out/runs/fused                # the gain, paired
    cxr-dist predict --checkpoint out/runs/fused film.png --text "indication=Cough."

The best honest way of adding the indication measured here (docs/results.md, "Late fusion") is
two separately trained runs whose logits are weighed: for each film

    p = sigmoid(w logit p_image + (1 - w) logit p_text)

with p_image and p_text the runs' calibrated probabilities and w the weight on a 0.05 grid with the
best study-level AUROC on **val** (test is never looked at). Trained jointly, one model's text head
overfits and no weight is learned (`model.fusion = "late"` alone). This command makes the two runs
that one model after training, with no retraining: a `model.kind = "image+text"`, `fusion = "late"`
checkpoint whose image head is the image run's and whose text head (with the text encoder, its
normalisation and the no-text vector) is the text run's, each head's last layer scaled by
w / T_image and (1 - w) / T_text (the runs' temperatures). A 2-class head's logit difference is the
logit of its probability, and scaling a linear layer scales it: the checkpoint's probability is the
formula above, exactly (up to the 6 decimals of predictions.csv; for runs scored with
`product.tta_views` > 1 the rule mixes means over views, and the checkpoint is close to it, not
equal). So `predict`, `evaluate`, the served model and the model card work on it as on any
late-fusion model (`export` refuses it, as any model that reads text), and a film without text
keeps the image run's ranking (the text head answers one constant).

The fused run folder gets what a training run leaves: checkpoints/best (with a temperature fitted
on val for the fused probabilities, the threshold picked on val, and the image run's
out-of-distribution statistics: a late-fusion model's features are the image head's input),
config.toml, predictions.csv and evaluation.json (computed from the runs' predictions: `cxr-dist
evaluate` on the checkpoint reproduces them), MODEL_CARD.md and fusion.json (members, weight and
the val curve it was picked on).

Where the image run logged to MLflow (its `[tracking]`, or `--tracking-uri`), the fused run is
logged there as a run of its own, beside the runs it was made from: the config as params, the tags
training sets (model.kind, fusion, text_fields, label_leakage) plus `fused_from`, the best_*
metrics, the folder's files and the servable model (`mlflow models serve -m runs:/<run id>/model`).
It is not registered under `tracking.registered_model`: moving the alias stays a training run's
decision. `--no-tracking` logs nothing.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from ..config import Config, dump_toml, from_dict, replace, to_dict, upgrade, validate
from ..errors import CheckpointError, UserError, run_main
from ..fileio import write_bytes_atomic, write_json_atomic
from .tracking import check_reachable, log_evaluation, make_tracker, resolve_uri, run_tags

log = logging.getLogger(__name__)

# eval/, model/ and product/ (torch, scipy, scikit-learn) are imported inside the functions:
# `--help` stays instant.

PROG = "cxr-dist fuse"
WEIGHTS = np.round(np.linspace(0.0, 1.0, 21), 2)  # the grid of the image run's weight, searched on val only
EPS = 1e-6  # predictions.csv has 6 decimals: a written 0 or 1 becomes a logit of about -+13.8
# The text run's modules that the fused model takes (its head becomes `text_head`); the rest is the image run's.
TEXT_PARTS = ("text_encoder.", "text_norm.", "no_text")
LAST = "4"  # the MLP head's last Linear (classifier.mlp_head), whose logits are scaled


# ----------------------------------------------------------------------------- the rule


def fuse(a: dict, b: dict, w: float) -> dict:
    """Late fusion of two prediction sets of the same images: sigmoid(w logit a + (1 - w) logit b)."""
    from ..eval.calibrate import logit
    from ..eval.evaluate import same_images

    same_images([a, b])
    z = w * logit(a["probs"], EPS) + (1 - w) * logit(b["probs"], EPS)
    return {**a, "probs": 1.0 / (1.0 + np.exp(-z))}


def study_auroc(preds: dict) -> float:
    from ..eval.metrics import compute_metrics, study_level

    _, probs, labels = study_level(preds["uids"], preds["probs"], preds["labels"])
    return compute_metrics(probs, labels)["auroc"]


def pick_weight(a: dict, b: dict) -> tuple[float, dict[float, float]]:
    """The weight of `a` with the best study-level AUROC of the fusion on these (val) predictions,
    and the AUROC of every weight on the grid. Ties go to the weight nearest 0.5 (the mean)."""
    scores = {float(w): study_auroc(fuse(a, b, w)) for w in WEIGHTS}
    best = max(scores, key=lambda w: (round(scores[w], 12), -abs(w - 0.5)))
    return best, scores


# ----------------------------------------------------------------------------- the checkpoint


def _member(path: str, kind: str) -> tuple[dict, dict, Config]:
    """(model state, meta, config) of a run's best checkpoint, checked to be a model of `kind`."""
    from ..model.checkpoint import load_model_state

    state, meta = load_model_state(path, tag="best")
    cfg = from_dict(Config, upgrade(meta.get("config", {}), warn=False))
    role = "first (image)" if kind == "image" else "second (text)"
    if cfg.model.kind != kind:
        raise UserError(f"{path}: the {role} run must have model.kind = {kind!r}, it has {cfg.model.kind!r}")
    if meta.get("findings"):
        raise UserError(f"{path} has a findings head ({', '.join(meta['findings'])}): fuse combines the abnormal "
                        "heads of runs without one")
    if cfg.model.num_classes != 2:
        raise UserError(f"{path}: fuse needs 2-class heads (model.num_classes = {cfg.model.num_classes})")
    return state, meta, cfg


def fused_config(image: Config, text: Config, out: Path) -> Config:
    """The image run's config, made a late-fusion image+text model that reads what the text run read."""
    if image.model.hidden != text.model.hidden:
        raise UserError(f"the runs' heads differ in size (model.hidden {image.model.hidden} and "
                        f"{text.model.hidden}): a late-fusion model has one hidden size")
    t = text.model
    model = replace(image.model, kind="image+text", fusion="late", report_supervision=0.0,
                    **{f: getattr(t, f) for f in ("text_encoder", "text_pooling", "max_tokens", "modality_dropout",
                                                  "text_missing", "text_lora_rank", "text_lora_alpha",
                                                  "text_lora_targets")})
    loader = replace(image.loader, text_fields=text.loader.text_fields,
                     allow_label_leakage=text.loader.allow_label_leakage)
    cfg = replace(image, model=model, loader=loader, train=replace(image.train, run_dir=str(out)),
                  tracking=replace(image.tracking, run_name=out.name))
    validate(cfg)
    return cfg


def fused_state(keys: list[str], image: dict, text: dict, w_image: float, w_text: float) -> dict:
    """The fused model's state dict (its `keys`): the text run's encoder, normalisation, no-text
    vector and head (as `text_head`), the image run's everything else; each head's last Linear
    scaled by its weight, so that the logits add up to the weighed sum."""
    out = {}
    for k in keys:
        if k.startswith("text_head."):
            src, name = text, "head." + k.removeprefix("text_head.")
        else:
            src, name = (text if k.startswith(TEXT_PARTS) else image), k
        if name not in src:
            raise CheckpointError(f"the {'text' if src is text else 'image'} run's checkpoint has no {name!r}: "
                                  "not a model of the kind fuse expects")
        out[k] = src[name].clone()
    for head, weight in (("head", w_image), ("text_head", w_text)):
        for p in ("weight", "bias"):
            out[f"{head}.{LAST}.{p}"] = out[f"{head}.{LAST}.{p}"] * weight
    return out


def build(image_run: str, text_run: str, out: str | Path, weight: float | None = None,
          tracking: str | None = None) -> dict:
    """Write the fused run folder `out` (module docstring), log it to MLflow (`tracking`: None = as
    the image run did, "" = not at all, else this tracking URI) and return its fusion.json record
    with the evaluation (and the MLflow run id, or None)."""
    from ..eval.calibrate import apply_temperature, calibration_report, fit_temperature, temperature_of
    from ..eval.evaluate import predictions_csv, read_predictions, report, same_images
    from ..eval.metrics import balanced_threshold
    from ..model.checkpoint import amend_checkpoint, find_checkpoint, load_extra, save_checkpoint
    from ..model.classifier import build_model
    from ..product.model_card import write_model_card

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} is not empty: fuse writes a new run folder (it never overwrites one)")
    image_state, image_meta, image_cfg = _member(image_run, "image")
    text_state, text_meta, text_cfg = _member(text_run, "text")
    a, b = read_predictions(image_run), read_predictions(text_run)
    splits = [s for s in a if s in b]
    if "val" not in splits:
        raise UserError("both runs need val predictions (their predictions.csv): the weight is picked on val")
    for s in splits:
        same_images([a[s], b[s]])  # the same shards and split: same images, same labels
    scores: dict[float, float] = {}
    if weight is None:
        weight, scores = pick_weight(a["val"], b["val"])
    elif not 0.0 <= weight <= 1.0:
        raise UserError(f"--weight must be in [0, 1] (the image run's share), not {weight}")
    t_image, t_text = temperature_of(image_meta), temperature_of(text_meta)
    cfg = fused_config(image_cfg, text_cfg, out)
    if cfg.loader.allow_label_leakage:  # fused, the leak stays the leak: said as training says it
        log.warning("LABEL LEAKAGE: the text run %s reads %s with loader.allow_label_leakage = true, so the fused "
                    "model does too: its scores measure the leak, not the film", text_run,
                    ", ".join(cfg.loader.text_fields))
    if tracking is not None:
        cfg = replace(cfg, tracking=replace(cfg.tracking, enabled=bool(tracking), uri=tracking or cfg.tracking.uri))
    if cfg.tracking.enabled:  # an unreachable server: said before anything is written
        check_reachable(resolve_uri(cfg.tracking.uri))

    # The network's own probabilities are the weighed fusion of the runs' calibrated ones; the
    # fused model gets its own temperature and threshold, fitted on val as training fits them.
    raw = {s: fuse(a[s], b[s], weight) for s in splits}
    val = raw["val"]
    two = len(np.unique(val["labels"])) == 2
    temperature = fit_temperature(val["probs"], val["labels"]) if cfg.product.calibrate and two else 1.0
    preds = {s: {**p, "prob_uncalibrated": p["probs"], "probs": apply_temperature(p["probs"], temperature)}
             for s, p in raw.items()}
    threshold = balanced_threshold(preds["val"]["probs"], preds["val"]["labels"]) if two else None
    calibration = {"temperature": temperature, "fitted_on": "val" if temperature != 1.0 else None}
    for s in ("val", "test"):
        if s in raw and len(np.unique(raw[s]["labels"])) == 2:
            calibration[s] = calibration_report(raw[s]["probs"], raw[s]["labels"], temperature)
    record = {"members": {"image": str(Path(image_run).resolve()), "text": str(Path(text_run).resolve())},
              "weight_of_image": float(weight), "picked_on": "val" if scores else "given (--weight)",
              "rule": "sigmoid(w logit p_image + (1 - w) logit p_text), the members' calibrated probabilities",
              "member_temperatures": {"image": t_image, "text": t_text},
              "val_study_auroc_by_weight": scores}

    model = build_model(replace(cfg.model, pretrained=False, weights=""))  # every weight comes from the runs
    state = fused_state(list(model.state_dict()), image_state, text_state, weight / t_image, (1 - weight) / t_text)
    model.load_state_dict(state, strict=True)
    meta = {"config": to_dict(cfg), "findings": [], "fusion": record, "calibration": calibration,
            "ood": image_meta.get("ood")}
    if threshold is not None:
        meta["threshold"] = {"value": threshold, "picked_on": "val", "rule": "best balanced accuracy",
                             "scale": "calibrated"}
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, "best", model.state_dict(), {}, meta)
    density = load_extra(image_run)  # the image head's input is the fused model's feature: same statistics
    if density:
        amend_checkpoint(find_checkpoint(out, "best"), {}, extra=density)

    write_bytes_atomic(out / "config.toml", dump_toml(cfg).encode())
    write_bytes_atomic(out / "predictions.csv", predictions_csv(preds).encode())
    evaluation = {s: report(p) for s, p in preds.items()}
    for s in ("test", "external"):
        if s in preds and threshold is not None:
            evaluation[f"{s}_at_val_threshold"] = report(preds[s], threshold)
    evaluation["calibration"] = calibration
    write_json_atomic(out / "evaluation.json", evaluation)
    write_json_atomic(out / "fusion.json", record)
    index = _index(cfg)
    write_model_card(cfg, index, evaluation, out, temperature=temperature, calibration=calibration,
                     ood=image_meta.get("ood"), evaluation_calibrated=True, fusion=record)
    run_id = log_fused_run(cfg, out, evaluation, record, index)
    members = {s: {"image": report(a[s]), "text": report(b[s])} for s in splits}  # for the command's table
    return {**record, "evaluation": evaluation, "members_evaluation": members, "mlflow_run_id": run_id}


def log_fused_run(cfg: Config, out: Path, evaluation: dict, record: dict, index) -> str | None:
    """The fused run in MLflow (module docstring); its run id, or None when tracking is off.
    `index`: the image run's shard index (`_index`), for the served model's example film."""
    from ..model.checkpoint import find_checkpoint
    from ..product.serve import log_servable

    if not cfg.tracking.enabled:
        return None
    # The guard refuses a field the label was derived from unless allow_label_leakage: then it is the leak.
    leaks = list(cfg.loader.text_fields) if cfg.loader.allow_label_leakage else []
    tracker = make_tracker(cfg.tracking, True, out, resume=False)
    with tracker:
        tracker.set_tags({**run_tags(cfg, leaks), "fused_from": f"{record['members']['image']} + "
                                                                f"{record['members']['text']}"})
        tracker.log_params({**to_dict(cfg), "fusion": {k: v for k, v in record.items()
                                                       if k != "val_study_auroc_by_weight"}})
        log_evaluation(tracker, evaluation, 0)
        for name in ("config.toml", "evaluation.json", "predictions.csv", "fusion.json", "MODEL_CARD.md"):
            tracker.log_artifact(out / name)
        log_servable(tracker, find_checkpoint(out, "best"), _example_film(index))
        return tracker.run_id


def _index(cfg: Config):
    """The image run's shard index (for the model card's counts), or None when its shards are gone."""
    from ..data.index import load_index

    try:
        return load_index(cfg.data.shards_dir)
    except (UserError, OSError):
        return None


def _example_film(index) -> bytes | None:
    """The served model's input example: the first test film as the shards store it (as training
    logs it); None when the image run's shards are not where its config says (`index` None)."""
    import tarfile

    if index is None:
        return None
    try:
        with tarfile.open(index.shards(["test"])[0].path) as tar:
            member = next((m for m in tar if m.name.endswith(".jpg")), None)
            return tar.extractfile(member).read() if member is not None else None
    except (UserError, OSError, IndexError, tarfile.TarError):
        return None


# ----------------------------------------------------------------------------- the command


def _auroc(rep: dict, level: str) -> str:
    m = rep.get(level)
    return "n/a" if not m else f"{m['auroc']:.4f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("image_run", help="a finished image-only run (model.kind = image): its folder")
    ap.add_argument("text_run", help="a finished text-only run (model.kind = text) on the same shards and split")
    ap.add_argument("--out", required=True, help="the fused run folder to write (new or empty)")
    ap.add_argument("--weight", type=float, help="the image run's weight w in [0, 1] (default: picked on val)")
    track = ap.add_mutually_exclusive_group()
    track.add_argument("--tracking-uri", help="log the fused run to this MLflow tracking URI (default: where the "
                                              "image run logged, if it did)")
    track.add_argument("--no-tracking", action="store_true", help="log nothing to MLflow")
    args = ap.parse_args(argv)
    tracking = "" if args.no_tracking else args.tracking_uri
    result = build(args.image_run, args.text_run, args.out, args.weight, tracking)
    w = result["weight_of_image"]
    how = "picked on val" if result["val_study_auroc_by_weight"] else "given"
    print(f"weight of the image run: {w:.2f} ({how}); of the text run: {1 - w:.2f}")
    print("| split | image run (image / study AUROC) | text run | fused |")
    print("|---|---|---|---|")
    for split, members in result["members_evaluation"].items():
        reps = (members["image"], members["text"], result["evaluation"][split])
        print(f"| {split} | " + " | ".join(f"{_auroc(r, 'image_level')} / {_auroc(r, 'study_level')}"
                                            for r in reps) + " |")
    print(f"wrote {Path(args.out) / 'checkpoints' / 'best'} and the run's files "
          f"(`cxr-dist compare --paired {args.image_run} {args.out}` scores the gain)")
    if result["mlflow_run_id"]:
        print(f"logged to MLflow as run {result['mlflow_run_id']} (serve: mlflow models serve -m "
              f"runs:/{result['mlflow_run_id']}/model --env-manager local)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(PROG, main))
