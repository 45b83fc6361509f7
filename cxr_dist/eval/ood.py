"""Is an input a chest film like the ones the model was trained on?

Two checks, both before anyone reads a probability:

1. **Constant images are refused** (`check_not_constant`): a blank white or black image, or one
   that is almost so, is no film at all, yet the model gives it a confident probability (a blank
   white image got 0.77 "abnormal" before this check). The test is on the film as read (8-bit,
   before any intensity normalisation, which would stretch sensor noise to the full range): the
   spread between its 1st and 99th percentile grey level must reach `MIN_SPREAD` levels of 255.
   Real films span 150-250 levels; a flat field with JPEG noise spans 0-3.

2. **An out-of-distribution score** comes with every prediction (`FeatureDensity`): the
   Mahalanobis distance of the image's pooled backbone features (the 1280-d input of the MLP head)
   from those of the training split, with a Ledoit-Wolf shrunk covariance (1280 dimensions from
   ~1,000 images: the plain sample covariance would be singular). The flag threshold is the
   `product.ood_quantile` quantile of the validation split's scores: by construction ~1% of
   in-distribution films are flagged, and whatever lies further out than that is. The density's
   tensors travel in the checkpoint (extra.safetensors), its threshold in meta.json ("ood").

The score says "unlike the training films", not "wrong": a film of another hospital may score high
and still be read correctly; docs/product.md reports how the Kermany films (chest films of children)
and non-chest photographs score.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..errors import DataError

MIN_SPREAD = 8.0  # grey levels between the 1st and 99th percentile below which an image is refused
OOD_KEYS = ("ood.mean", "ood.precision")  # tensor names in the checkpoint's extra.safetensors


def check_not_constant(img: Image.Image, name: str) -> None:
    """Raise DataError when the 8-bit grayscale `img` is constant or nearly so (not a film)."""
    arr = np.asarray(img.convert("L"), dtype=np.float32)
    low, high = np.percentile(arr, [1, 99])
    if high - low < MIN_SPREAD:
        raise DataError(f"{name}: the image is (nearly) constant: its grey levels span {high - low:.1f} of 255 "
                        f"between the 1st and 99th percentile (a film spans > {MIN_SPREAD:.0f}); not a chest film")


@torch.no_grad()
def features_and_logits(model: torch.nn.Module, x: torch.Tensor,
                        text: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass of a CXRClassifier -> (what its head reads, logits). Equal to model(x):
    the frozen and trainable parts together are the whole backbone, then the head. For an image
    model the features are the pooled 1280-d image feature; an image+text model's head reads the
    text embedding beside it (`text`: the model's text input, see CXRClassifier), a text model's
    only the text embedding (then the image is not run)."""
    h = None
    if getattr(model, "uses_image", True):
        bb = model.backbone
        h = bb.forward_head(bb.forward_features(model.normalize(x)), pre_logits=True)
    if getattr(model, "uses_text", False):
        z = model.head_input(h, text, x.shape[0])
        return z, model.logits(z, text, x.shape[0])  # late fusion adds the text head's logits
    return h, model.head(h)


class FeatureDensity:
    """A Gaussian fitted to training features; `score` is the Mahalanobis distance from it."""

    def __init__(self, mean: torch.Tensor, precision: torch.Tensor) -> None:
        self.mean = mean.double()
        self.precision = precision.double()

    @classmethod
    def fit(cls, features: np.ndarray) -> "FeatureDensity":
        from sklearn.covariance import LedoitWolf

        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or len(features) < 10:
            raise ValueError(f"fitting the OOD density needs at least 10 feature vectors, got shape {features.shape}")
        lw = LedoitWolf().fit(features)
        return cls(torch.from_numpy(lw.location_), torch.from_numpy(lw.get_precision()))

    def score(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Mahalanobis distance of each row from the training mean (>= 0)."""
        d = torch.as_tensor(np.asarray(features), dtype=torch.float64) - self.mean
        return torch.sqrt(torch.clamp(((d @ self.precision) * d).sum(1), min=0)).numpy()

    def tensors(self) -> dict[str, torch.Tensor]:
        """For checkpoint.amend_checkpoint(..., extra=...); float32 halves the file (6.5 MB at 1280-d)."""
        return {OOD_KEYS[0]: self.mean.float(), OOD_KEYS[1]: self.precision.float()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "FeatureDensity | None":
        """The density stored in a checkpoint, or None (a checkpoint from before this existed)."""
        if not all(k in tensors for k in OOD_KEYS):
            return None
        return cls(tensors[OOD_KEYS[0]], tensors[OOD_KEYS[1]])


def flag_threshold(val_scores: np.ndarray, quantile: float) -> float:
    """The score above which a prediction is flagged: `quantile` of the validation scores."""
    if len(val_scores) == 0:
        raise ValueError("no validation scores to set the OOD threshold on")
    return float(np.quantile(np.asarray(val_scores, dtype=np.float64), quantile))
