"""A trained model as a product: one checkpoint -> for each film, the calibrated probability of
"abnormal", the label at the run's threshold, and how far the film lies from the training films.

`cxr-dist predict`, the served MLflow model (serve.py) and `cxr-dist export` all start here, so a
file gets the same answer on every path (tests/test_serve.py checks predict against a real
`mlflow models serve` to 1e-4). What the checkpoint carries besides the weights (amended into it at
the end of training, final.py):

- meta.json "calibration": the temperature T fitted on validation (calibrate.py); the probability
  is sigmoid(logit(p) / T), which for one view is exactly softmax(logits / T). T = 1 when absent
  (a checkpoint from before calibration) or with `calibrated=False`.
- meta.json "threshold": the decision threshold picked on validation (best balanced accuracy),
  on the calibrated scale. Without one, no label is given.
- meta.json "ood" + extra.safetensors: the out-of-distribution density and flag threshold (ood.py).

A film is read exactly as `prepare` read the training films into the shards and as the stream
decoded them (preprocess.py: the run's image size, resize, intensity, JPEG q95, decode), then
checked for being a film at all (ood.check_not_constant), then given the evaluation transform; with
test-time augmentation (`views` > 1) the probability is the mean over the plain view and views - 1
augmented as in training, seeded per (view, file name) as `evaluate --tta` seeds them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..eval.calibrate import apply_temperature, temperature_of, uncalibrated_threshold
from ..model.checkpoint import load_extra, load_model_state
from ..config import DataConfig, ModelConfig, from_dict, replace
from ..data.sources.common import sample_key
from ..model.classifier import CXRClassifier, build_model, inference_device
from ..eval.ood import FeatureDensity, check_not_constant, features_and_logits
from ..data.preprocess import decode_film, film_jpeg, load_film
from ..data.transforms import eval_transform, seeded_transform, train_transform, view_seed


@dataclass
class Product:
    model: CXRClassifier  # eval mode, on `device`
    data: DataConfig  # the run's data settings: how films are read
    views: int  # test-time views per film (1 = the plain view)
    temperature: float  # 1.0 = uncalibrated
    threshold: float | None  # on the calibrated scale; None = no label
    density: FeatureDensity | None  # None: an older checkpoint without OOD statistics
    ood_threshold: float | None
    meta: dict
    device: torch.device

    @torch.no_grad()
    def predict(self, films: list[tuple[Image.Image, str]]) -> list[dict]:
        """(film as read_film returns it, its file name) pairs -> one result dict per film:
        prob_abnormal (calibrated unless the product was loaded uncalibrated), prob_uncalibrated,
        views, and when known label, ood_score, ood_flag."""
        plain = eval_transform(self.data.input_size)
        augment = train_transform(self.data.input_size, self.data.shift_augment)
        keys = [sample_key(name) for _, name in films]
        probs = torch.zeros(len(films), dtype=torch.float64)
        feats = None
        for view in range(self.views):  # view 0 plain; view v the augmented view v-1, as in evaluate --tta
            x = torch.stack([plain(im) if view == 0 else seeded_transform(augment, im, view_seed(0, view - 1, key))
                             for (im, _), key in zip(films, keys)])
            h, logits = features_and_logits(self.model, x.to(self.device))
            probs += torch.softmax(logits.float(), 1)[:, 1].double().cpu()
            if view == 0:
                feats = h.float().cpu().numpy()
        raw = (probs / self.views).numpy()
        cal = apply_temperature(raw, self.temperature)
        scores = self.density.score(feats) if self.density is not None else None
        out = []
        for i in range(len(films)):
            row = {"prob_abnormal": round(float(cal[i]), 6), "prob_uncalibrated": round(float(raw[i]), 6),
                   "views": self.views}
            if self.threshold is not None:
                row["label"] = "abnormal" if cal[i] >= self.threshold else "normal"
            if scores is not None:
                row["ood_score"] = round(float(scores[i]), 4)
                row["ood_flag"] = bool(scores[i] > self.ood_threshold)
            out.append(row)
        return out


def load_product(checkpoint: str | Path, *, calibrated: bool = True, views: int | None = None,
                 threshold: float | None = None, device: torch.device | None = None) -> Product:
    """The best checkpoint of a run (or a checkpoint dir) as a Product. `views`: default the run's
    train.tta_views; `threshold`: default the one picked on validation (meta "threshold")."""
    state, meta = load_model_state(checkpoint, tag="best")
    # Older checkpoints lack the later data fields: from_dict fills in the defaults those runs used.
    data = from_dict(DataConfig, meta["config"]["data"])
    model = build_model(replace(from_dict(ModelConfig, meta["config"]["model"]), pretrained=False, weights=""))
    model.load_state_dict(state)
    device = device or inference_device()
    model.to(device).eval()
    ood = meta.get("ood") or {}
    density = FeatureDensity.from_tensors(load_extra(checkpoint, tag="best")) if ood else None
    temperature = temperature_of(meta) if calibrated else 1.0
    if threshold is None:
        threshold = (meta.get("threshold") or {}).get("value")
        if threshold is not None and not calibrated:  # stored on the calibrated scale: map it back
            threshold = uncalibrated_threshold(threshold, temperature_of(meta))
    return Product(model=model, data=data, views=views or int(meta["config"]["train"].get("tta_views", 1)),
                   temperature=temperature, threshold=threshold, density=density,
                   ood_threshold=ood.get("threshold"), meta=meta, device=device)


def read_film(src: str | Path | bytes, name: str, data: DataConfig) -> Image.Image:
    """A film (path or encoded bytes: PNG, JPEG, DICOM...) -> the grayscale PIL image the transforms
    get for its shard sample: read as `prepare` reads it, the JPEG q95 round trip included (it
    changes pixels), decoded as the stream decodes it. Raises DataError (a UserError, exit 2) for a
    missing or unreadable file and for a (nearly) constant image."""
    film = load_film(src, data.image_size, data.resize, "none")
    check_not_constant(film, name)  # before the intensity mapping, which stretches noise to full range
    if data.intensity != "none":
        film = load_film(src, data.image_size, data.resize, data.intensity)
    return decode_film(film_jpeg(film), data.input_size)  # = decode_film(encode_film(src, ...))
