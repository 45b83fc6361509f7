"""The parts of a trained product that sit after the network: the network's raw outputs -> the
product's outputs. One implementation, used by `Product` (inference.py: predict, the served model,
`cxr-dist evaluate`, export's threshold) and by the end of training (train/end_of_run.py, which
fits the parts and applies them to its own predictions through this same code).

    readout = Readout(temperature=1.3, threshold=0.42, density=density, ood_threshold=74.6)
    readout.apply(probs, features)   # -> prob_abnormal, prob_uncalibrated, abnormal, ood_score, ood_flag
    readout.apply_split(preds)       # a split's predictions (eval/evaluate.py's dict) as the product gives them

The parts and where a checkpoint keeps them (end_of_run.py writes them, `Readout.from_checkpoint`
reads them back):

- the temperature T fitted on validation (calibrate.py), meta.json "calibration"."temperature":
  the probability is sigmoid(logit(p) / T), which for one view is exactly softmax(logits / T);
  T = 1 when absent (a checkpoint from before calibration) or when loaded uncalibrated;
- the decision threshold, meta.json "threshold"."value", picked on validation on the calibrated
  scale (mapped back to the network's own scale when loaded uncalibrated); None = no label;
- the out-of-distribution density (ood.FeatureDensity, extra.safetensors) and its flag threshold,
  meta.json "ood"."threshold"; None for a checkpoint from before OOD scores;
- for a model with a findings head, per finding a temperature (fitted on validation over the images
  that annotate the finding) and a threshold (best balanced accuracy on validation, calibrated
  scale; None where validation lacks a class), meta.json "findings_readout": {"names",
  "temperature", "threshold"}.

No heavy imports at module level (the command modules import this while parsing `--help`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Readout:
    temperature: float = 1.0  # 1.0 = uncalibrated
    threshold: float | None = None  # on the scale of prob_abnormal; None = no label
    density: Any = None  # ood.FeatureDensity, or None: no OOD score
    ood_threshold: float | None = None  # ood_score above it: ood_flag
    finding_names: tuple[str, ...] = ()  # the findings head's outputs, in order
    finding_temperatures: tuple[float, ...] = ()  # per finding; () = all 1
    finding_thresholds: tuple[float | None, ...] = ()  # per finding, calibrated scale; () = none

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, meta: dict[str, Any], *, calibrated: bool = True,
                        threshold: float | None = None, tag: str = "best") -> "Readout":
        """The parts stored in a checkpoint (its `meta`, and the density in its extra tensors).
        `calibrated=False`: T = 1 and the stored threshold mapped to the network's own scale;
        `threshold`: replaces the stored one (on the scale of the probabilities given)."""
        from ..eval.calibrate import temperature_of, uncalibrated_threshold
        from ..eval.ood import FeatureDensity
        from ..model.checkpoint import load_extra

        ood = meta.get("ood") or {}
        density = FeatureDensity.from_tensors(load_extra(checkpoint, tag=tag)) if ood else None
        fr = meta.get("findings_readout") or {}
        temps = tuple(float(t) for t in fr.get("temperature", ())) if calibrated else ()
        # Thresholds are stored on the calibrated scale: uncalibrated, map each back with its T.
        f_thresholds = tuple(None if th is None else float(th if calibrated else uncalibrated_threshold(th, t))
                             for th, t in zip(fr.get("threshold", ()), fr.get("temperature", ())))
        if threshold is None:
            threshold = (meta.get("threshold") or {}).get("value")
            if threshold is not None and not calibrated:  # stored on the calibrated scale: map it back
                threshold = uncalibrated_threshold(threshold, temperature_of(meta))
        return cls(temperature=temperature_of(meta) if calibrated else 1.0,
                   threshold=None if threshold is None else float(threshold),
                   density=density, ood_threshold=ood.get("threshold"),
                   finding_names=tuple(fr.get("names", meta.get("findings", ()))), finding_temperatures=temps,
                   finding_thresholds=f_thresholds)

    def apply(self, probs, features=None, finding_probs=None) -> dict[str, np.ndarray]:
        """The network's P(abnormal) (one per input: the mean over its views) and, optionally, its
        pooled features (the plain view's, N x D) -> arrays of the product's outputs:
        `prob_abnormal` (calibrated with T, float64), `prob_uncalibrated` (`probs` as given),
        `abnormal` (bool, prob_abnormal >= threshold; only with a threshold), `ood_score` and
        `ood_flag` (only with a density and features; the flag only with its threshold); with
        `finding_probs` (N x F, the findings head's sigmoids) `finding_probs` calibrated per finding
        and `finding_positive` (N x F bool; False where a finding has no threshold)."""
        from ..eval.calibrate import apply_temperature

        out = {"prob_abnormal": apply_temperature(probs, self.temperature), "prob_uncalibrated": probs}
        if finding_probs is not None:
            fp = np.asarray(finding_probs, dtype=np.float64)
            temps = self.finding_temperatures or (1.0,) * fp.shape[1]
            out["finding_probs"] = (np.stack([apply_temperature(fp[:, j], t) for j, t in enumerate(temps)], 1)
                                    if fp.size else fp)
            thresholds = self.finding_thresholds or (None,) * fp.shape[1]
            out["finding_positive"] = np.stack([out["finding_probs"][:, j] >= th if th is not None
                                                else np.zeros(len(fp), bool) for j, th in enumerate(thresholds)], 1) \
                if fp.size else fp.astype(bool)
        if self.threshold is not None:
            out["abnormal"] = out["prob_abnormal"] >= self.threshold
        if self.density is not None and features is not None:
            out["ood_score"] = self.density.score(features)
            if self.ood_threshold is not None:
                out["ood_flag"] = out["ood_score"] > self.ood_threshold
        return out

    def apply_split(self, preds: dict) -> dict:
        """A split's predictions (eval/evaluate.py: keys, uids, labels, probs and maybe features) as
        the product gives them: `probs` calibrated (the network's own in `prob_uncalibrated`) and,
        with a density and `features`, `ood_score` / `ood_flag`. The features are dropped (large,
        and said once by the score); no label: reports pick their own threshold."""
        got = self.apply(preds["probs"], preds.get("features"), preds.get("finding_probs"))
        out = {k: v for k, v in preds.items() if k != "features"}
        if "finding_probs" in got:
            out["finding_probs"] = got["finding_probs"]
        out["prob_uncalibrated"] = got["prob_uncalibrated"]
        out["probs"] = got["prob_abnormal"]
        out.update({k: got[k] for k in ("ood_score", "ood_flag") if k in got})
        return out
