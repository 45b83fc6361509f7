"""Calibration and out-of-distribution scores of a trained run, measured on real data (docs/product.md).

    .venv/bin/python bench/product_report.py --run out/sources/runs/iu_only \
        --shards out/sources/shards/iu_kermany_ext --external-limit 1024 --out out/product_report.json

Does, on the run's best checkpoint and without changing it, what the end of a training run does
(train/end_of_run.py): predictions with pooled features on val, test and the external split; the temperature
fitted on val; the OOD density fitted on the same sample of training images (end_of_run.ood_fit_index)
and its flag threshold on val. Then scores what a deployed model meets: the test films (same
hospital), the external films (another population; `--external-limit` first images, in shard
order), scikit-learn's two sample photographs (not chest films) and a blank image (refused).
Prints one JSON object: calibration before/after on val and test, and per group the OOD score
quartiles and the share flagged.
"""
from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cxr_dist.eval.calibrate import calibration_report, fit_temperature
from cxr_dist.config import replace
from cxr_dist.errors import DataError
from cxr_dist.eval.evaluate import predict_split
from cxr_dist.train.end_of_run import OOD_FIT_SPLIT, ood_fit_index
from cxr_dist.data.index import load_index, train_val_splits
from cxr_dist.product.inference import Product, read_film
from cxr_dist.product.readout import Readout
from cxr_dist.eval.ood import FeatureDensity, features_and_logits, flag_threshold
from cxr_dist.data.transforms import eval_transform


def summary(scores: np.ndarray, threshold: float) -> dict:
    q = np.quantile(scores, [0.25, 0.5, 0.75])
    return {"n": int(len(scores)), "quartiles": [round(float(v), 1) for v in q],
            "flagged_frac": round(float((scores > threshold).mean()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a run dir (its best checkpoint is read, never changed)")
    ap.add_argument("--shards", required=True, help="the shards the run was trained on")
    ap.add_argument("--external-limit", type=int, default=1024, help="external images scored (0: none)")
    ap.add_argument("--quantile", type=float, default=0.99)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.monotonic()
    product = Product.load(args.run, calibrated=False, device=torch.device("cpu"))
    data = replace(product.data, shards_dir=args.shards)
    loader = replace(product.loader, num_workers=1)
    index = load_index(args.shards)
    train_splits, val_split = train_val_splits(data)
    fit_index = ood_fit_index(index, train_splits)
    fit = predict_split(product.model, loader, OOD_FIT_SPLIT, fit_index, with_features=True)
    preds = {name: predict_split(product.model, loader, split, index, with_features=True)
             for name, split in (("val", val_split), ("test", "test"))}
    if args.external_limit and index.has_samples("external"):
        # Whole shards of the external split, in order, up to the limit (as end_of_run.py samples training films).
        ext = ood_fit_index(index, ["external"], args.external_limit)
        preds["external"] = predict_split(product.model, loader, OOD_FIT_SPLIT, ext, with_features=True)
    val = preds["val"]
    temperature = fit_temperature(val["probs"], val["labels"])
    density = FeatureDensity.fit(fit["features"])
    threshold = flag_threshold(density.score(val["features"]), args.quantile)
    out = {"run": args.run, "temperature": temperature, "ood_threshold": round(threshold, 2),
           "fit_images": int(len(fit["features"])), "calibration": {}, "ood": {}}
    for name in ("val", "test"):
        p = preds[name]
        out["calibration"][name] = {k: (round(v, 4) if isinstance(v, float) else v)
                                    for k, v in calibration_report(p["probs"], p["labels"], temperature).items()}
    for name, p in preds.items():
        out["ood"][name] = summary(density.score(p["features"]), threshold)
        if name == "external":  # external AUROC with calibrated probabilities is unchanged; say its calibration
            out["calibration"]["external"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in
                                              calibration_report(p["probs"], p["labels"], temperature).items()}
    from sklearn.datasets import load_sample_images

    plain = eval_transform(loader.input_size)
    photos = []
    for i, arr in enumerate(load_sample_images().images):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG")
        photos.append(plain(read_film(buf.getvalue(), f"photo{i}.jpg", data, loader)))
    h, logits = features_and_logits(product.model, torch.stack(photos))
    # This report's own parts (fitted above, as the end of training fits them), applied as a product applies them.
    got = Readout(temperature=temperature, density=density, ood_threshold=threshold).apply(
        torch.softmax(logits, 1)[:, 1].numpy(), h.numpy())
    out["ood"]["photographs"] = {**summary(got["ood_score"], threshold),
                                 "scores": [round(float(v), 1) for v in got["ood_score"]],
                                 "prob_abnormal": [round(float(v), 3) for v in got["prob_abnormal"]]}
    blank = io.BytesIO()
    Image.new("L", (512, 512), 255).save(blank, format="PNG")
    try:
        read_film(blank.getvalue(), "blank.png", data, loader)
        out["blank_image"] = "accepted (unexpected)"
    except DataError as e:
        out["blank_image"] = f"refused: {e}"
    out["seconds"] = round(time.monotonic() - t0, 1)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
