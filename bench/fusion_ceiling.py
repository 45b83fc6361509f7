"""How much can a text run add to an image run? The binormal ceiling of fusing two scores.

    .venv/bin/python bench/fusion_ceiling.py out/text/runs/image out/text/runs/text [--split test]

Under the binormal model with equal variances, a score's AUROC is Phi(delta / sqrt 2), with delta the
distance between the class means in units of the within-class spread. Two scores whose within-class
correlation is rho, combined by the best linear rule (which a weighed sum of logits is), reach

    delta^2 = (delta_a^2 + delta_b^2 - 2 rho delta_a delta_b) / (1 - rho^2)

So the gain that any late fusion can add is bounded by how well the text ranks alone AND by how
much of it the image already knows (rho). Per split, at study level (the probability of a study is
the mean over its views): both runs' AUROC, the within-class correlation of their logits (normal,
abnormal, and their mean), the ceiling if the two were independent (rho = 0), the ceiling at the
measured rho, and the fused AUROC that `cxr-dist fuse` reached (sigmoid(w logit a + (1 - w) logit b),
with w picked on val).
"""
from __future__ import annotations

import argparse
import math

import numpy as np
from scipy.stats import norm

from cxr_dist.eval.evaluate import read_predictions
from cxr_dist.eval.metrics import compute_metrics, study_level
from cxr_dist.runs.fuse import EPS, fuse, pick_weight


def ceiling(auroc_a: float, auroc_b: float, rho: float) -> float:
    """The binormal AUROC of the best linear combination of two scores (formula in the docstring)."""
    da, db = math.sqrt(2) * norm.ppf(auroc_a), math.sqrt(2) * norm.ppf(auroc_b)
    d2 = (da * da + db * db - 2 * rho * da * db) / (1 - rho * rho)
    return float(norm.cdf(math.sqrt(max(d2, 0.0)) / math.sqrt(2)))


def studies(preds: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    return study_level(preds["uids"], preds["probs"], preds["labels"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image_run")
    ap.add_argument("text_run")
    ap.add_argument("--split", nargs="+", default=["val", "test"])
    args = ap.parse_args()
    a, b = read_predictions(args.image_run), read_predictions(args.text_run)
    w, _ = pick_weight(a["val"], b["val"])
    print(f"weight of the image run picked on val: {w:.2f}")
    print("| split | studies | image AUROC | text AUROC | within-class rho (normal / abnormal / mean) | "
          "ceiling, rho = 0 | ceiling, measured rho | fused (cxr-dist fuse) |")
    print("|---|---|---|---|---|---|---|---|")
    for split in args.split:
        ua, pa, ya = studies(a[split])
        ub, pb, yb = studies(b[split])
        if ua != ub or not np.array_equal(ya, yb):
            raise SystemExit(f"{split}: the runs did not score the same studies")
        la, lb = (np.log(np.clip(p, EPS, 1 - EPS)) - np.log1p(-np.clip(p, EPS, 1 - EPS)) for p in (pa, pb))
        rhos = [float(np.corrcoef(la[ya == c], lb[ya == c])[0, 1]) for c in (0, 1)]
        rho = float(np.mean(rhos))
        auc_a, auc_b = compute_metrics(pa, ya)["auroc"], compute_metrics(pb, yb)["auroc"]
        _, pf, yf = studies(fuse(a[split], b[split], w))
        fused = compute_metrics(pf, yf)["auroc"]
        print(f"| {split} | {len(ua)} | {auc_a:.4f} | {auc_b:.4f} | {rhos[0]:.3f} / {rhos[1]:.3f} / {rho:.3f} | "
              f"{ceiling(auc_a, auc_b, 0.0):.4f} (+{ceiling(auc_a, auc_b, 0.0) - auc_a:.3f}) | "
              f"{ceiling(auc_a, auc_b, rho):.4f} (+{ceiling(auc_a, auc_b, rho) - auc_a:.3f}) | "
              f"{fused:.4f} (+{fused - auc_a:.3f}) |")


if __name__ == "__main__":
    main()
