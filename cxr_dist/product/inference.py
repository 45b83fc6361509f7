"""A trained model as a product: one checkpoint -> for each film, the calibrated probability of
"abnormal", the label at the run's threshold, and how far the film lies from the training films.

    product = Product.load("runs/x")                          # a run dir or a checkpoint dir
    rows = product.predict([product.read("chest.png", "chest.png")])

`Product.load` is the one way a checkpoint becomes a model with its data settings and its readout
(readout.py: temperature, threshold, OOD density): `cxr-dist predict`, the served MLflow model
(serve.py), `cxr-dist export`, `cxr-dist evaluate` (evaluate_cli.py) and bench/frozen_auroc.py all
start here, so a file gets the same answer on every path (tests/test_product.py checks predict
against a real `mlflow models serve`, and `cxr-dist evaluate` against the run's own final
evaluation, to 1e-4). `Product.outputs` turns the network's raw outputs (probabilities, pooled
features) into the product's; training's end (train/end_of_run.py) applies the parts it fits
through the same `Readout`.

A film is read exactly as `prepare` read the training films into the shards and as the stream
decoded them (preprocess.py: the run's image size, resize, intensity, JPEG q95, decode), then
checked for being a film at all (ood.check_not_constant), then given the evaluation transform; with
test-time augmentation (`views` > 1) the probability is the mean over the plain view and views - 1
augmented as in training, seeded per (view, file name) as `evaluate --tta` seeds them.

The inputs of `Product.predict` are `Film`s (the image, its name and an optional text), so that an
image+text model can take a report text without a new API; image-only models ignore the text.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..config import DataConfig, LoaderConfig, ModelConfig, ProductConfig, replace, section
from ..data.index import ShardIndex
from ..data.preprocess import decode_film, film_jpeg, load_film
from ..data.sources.common import sample_key
from ..data.transforms import eval_transform, seeded_transform, train_transform, view_seed
from ..errors import DataError
from ..eval.ood import check_not_constant, features_and_logits
from ..model.checkpoint import load_model_state
from ..model.classifier import CXRClassifier, build_model, inference_device
from .readout import Readout

log = logging.getLogger(__name__)


@dataclass
class Film:
    """One input of a product: the film as `read_film` returns it, its name (a file name, or
    "row 3": it names errors and seeds the test-time views) and, for image+text and text models,
    its text: {field: text} (e.g. {"indication": "Cough."}), or a plain string taken as the first
    of the run's loader.text_fields, or None (no text: the model's no-text embedding, or a refusal
    with model.text_missing = "refuse"). Image-only models ignore it."""

    image: Image.Image
    name: str
    text: str | dict | None = None


@dataclass
class Product:
    model: CXRClassifier  # eval mode, on `device`
    data: DataConfig  # the run's data settings: how prepare read films (size, resize, intensity)
    loader: LoaderConfig  # the run's reading settings: input size, text fields
    model_config: ModelConfig  # the run's model settings (backbone, frozen_backend...)
    views: int  # test-time views per film (1 = the plain view)
    readout: Readout  # temperature, threshold, OOD density: raw outputs -> the product's
    meta: dict  # the checkpoint's meta.json
    device: torch.device

    @classmethod
    def load(cls, checkpoint: str | Path, *, calibrated: bool = True, views: int | None = None,
             threshold: float | None = None, device: torch.device | None = None) -> "Product":
        """The best checkpoint of a run (or a checkpoint dir) as a Product. `calibrated=False`: the
        network's own probabilities (T = 1, the stored threshold mapped to that scale); `views`:
        default the run's product.tta_views; `threshold`: default the one picked on validation;
        `device`: default model.inference_device() (the GPU when there is one). Raises
        CheckpointError for a missing or corrupt checkpoint."""
        state, meta = load_model_state(checkpoint, tag="best")
        # Older checkpoints lack the later fields (from_dict fills in the defaults those runs used)
        # and keep the reading settings in their data section (`section` reads either layout).
        data, loader = section(meta["config"], DataConfig), section(meta["config"], LoaderConfig)
        model_config = section(meta["config"], ModelConfig)
        # pretrained=False, weights="": the checkpoint holds every weight; nothing to download or read.
        model = build_model(replace(model_config, pretrained=False, weights=""), tuple(meta.get("findings", ())))
        model.load_state_dict(state)
        device = device or inference_device()
        model.to(device).eval()
        if model_config.kind != "image" and loader.allow_label_leakage:  # the opt-in is said again at every load
            log.warning("LABEL LEAKAGE: %s reads %s, from which its label was derived (trained with "
                        "loader.allow_label_leakage = true): its probabilities measure the leak, not the film",
                        checkpoint, ", ".join(loader.text_fields))
        readout = Readout.from_checkpoint(checkpoint, meta, calibrated=calibrated, threshold=threshold)
        return cls(model=model, data=data, loader=loader, model_config=model_config,
                   views=views or section(meta["config"], ProductConfig).tta_views, readout=readout,
                   meta=meta, device=device)

    # The readout's parts, by name (read-only).
    temperature = property(lambda self: self.readout.temperature)
    threshold = property(lambda self: self.readout.threshold)
    density = property(lambda self: self.readout.density)
    ood_threshold = property(lambda self: self.readout.ood_threshold)

    def read(self, src: str | Path | bytes, name: str, text: str | dict | None = None) -> Film:
        """A file or encoded bytes (and its text, for a model that reads text) -> a Film, read with
        the run's settings (read_film). FilmError for a film that cannot be read, a text field the
        run does not read, or no text for a model with model.text_missing = "refuse"."""
        film = Film(read_film(src, name, self.data, self.loader), name, text)
        self.text_input([film])  # the text's problems, now: the film is reported, not the batch
        return film

    def outputs(self, probs: np.ndarray, features: np.ndarray | None = None,
                finding_probs: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The network's raw outputs (P(abnormal) per input, pooled features, the findings head's
        probabilities) -> the product's (calibrated probability, label, OOD score and flag, calibrated
        probability and call per finding): Readout.apply."""
        return self.readout.apply(probs, features, finding_probs)

    def attach_text(self, index: ShardIndex, splits: list[str]) -> None:
        """For a model that reads text, evaluated on shards: the text of every sample of `splits`
        (each sample's json; empty for sources without text), embedded by the checkpoint's own
        encoder, looked up by key as in training. Nothing for an image model."""
        if not self.model.uses_text:
            return
        from ..data.text import read_texts
        from ..model.text_inputs import build_table

        texts = read_texts(index, splits, self.loader.text_fields)
        self.model.text_table = build_table(texts, self.model.text_encoder, None, "input", log=lambda _m: None)

    def text_input(self, films: list[Film]) -> tuple[dict | None, list[bool]]:
        """The model's text input for `films` (None for an image model) and, per film, whether its
        text was cut at model.max_tokens. A film without text gets the no-text embedding; with
        model.text_missing = "refuse" it is a FilmError, and so is a text field the run does not read."""
        if not self.model.uses_text:
            return None, [False] * len(films)
        from ..data.text import text_of

        texts = []
        for f in films:
            try:
                text = text_of(f.text, self.loader.text_fields)
            except ValueError as e:
                raise FilmError(f.name, str(e)) from None
            if not text and self.model_config.text_missing == "refuse":
                raise FilmError(f.name, f"this model reads text ({', '.join(self.loader.text_fields)}) and "
                                        "model.text_missing = 'refuse': give it (predict --text FIELD=TEXT)")
            texts.append(text)
        encoder = self.model.text_encoder
        cut = [bool(encoder.tokenize([t])[1]) if t else False for t in texts]
        tokens, _ = encoder.tokenize(texts)
        text = {k: v.to(self.device) for k, v in tokens.items()}
        text["has"] = torch.tensor([bool(t) for t in texts], device=self.device)
        return text, cut

    @torch.no_grad()
    def raw(self, films: list[Film], text: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The network alone: P(abnormal) per film (float64, the mean over the views), the
        features its head read for the plain view (float32, N x D: the pooled image feature, with
        the text embedding beside it for an image+text model) and, for a model with a findings
        head, its sigmoid per finding (N x F, the mean over the views; else None)."""
        has_findings = bool(self.model.findings)
        if text is None:  # predict() hands in the text input it has already built
            text, _ = self.text_input(films)
        plain = eval_transform(self.loader.input_size)
        augment = train_transform(self.loader.input_size, self.loader.shift_augment)
        keys = [sample_key(f.name) for f in films]
        probs = torch.zeros(len(films), dtype=torch.float64)
        fprobs = torch.zeros(len(films), len(self.model.findings), dtype=torch.float64)
        feats = None
        for view in range(self.views):  # view 0 plain; view v the augmented view v-1, as in evaluate --tta
            x = torch.stack([plain(f.image) if view == 0 else seeded_transform(augment, f.image, view_seed(0, view - 1, key))
                             for f, key in zip(films, keys)])
            h, logits = features_and_logits(self.model, x.to(self.device), text)
            probs += torch.softmax(logits.float(), 1)[:, 1].double().cpu()
            if has_findings:
                fprobs += torch.sigmoid(self.model.finding_logits(h).float()).double().cpu()
            if view == 0:
                feats = h.float().cpu().numpy()
        return (probs / self.views).numpy(), feats, ((fprobs / self.views).numpy() if has_findings else None)

    def predict(self, films: list[Film]) -> list[dict]:
        """Films -> one result dict per film: prob_abnormal (calibrated unless the product was
        loaded uncalibrated), prob_uncalibrated, views, and when known label, ood_score, ood_flag.
        (A (image, name) pair is taken for a Film.)"""
        films = [f if isinstance(f, Film) else Film(*f) for f in films]
        if not films:
            return []
        text, cut = self.text_input(films)
        probs, feats, fprobs = self.raw(films, text)
        got = self.outputs(probs, feats, fprobs)
        out = []
        for i in range(len(films)):
            row = {"prob_abnormal": round(float(got["prob_abnormal"][i]), 6),
                   "prob_uncalibrated": round(float(got["prob_uncalibrated"][i]), 6), "views": self.views}
            if self.model.uses_text:  # what the model read besides the film
                row["text"] = text_present(films[i].text)
                if cut[i]:
                    row["text_truncated"] = True
            if "abnormal" in got:
                row["label"] = "abnormal" if got["abnormal"][i] else "normal"
            if "ood_score" in got:
                row["ood_score"] = round(float(got["ood_score"][i]), 4)
            if "ood_flag" in got:
                row["ood_flag"] = bool(got["ood_flag"][i])
            if "finding_probs" in got:  # per finding: calibrated probability; the calls above threshold
                row["findings"] = {n: round(float(p), 6) for n, p in zip(self.model.findings, got["finding_probs"][i])}
                if self.readout.finding_thresholds:
                    row["findings_positive"] = [n for n, hit in zip(self.model.findings, got["finding_positive"][i]) if hit]
            out.append(row)
        return out


def text_present(value: str | dict | None) -> bool:
    """Whether a film came with any text."""
    from ..data.text import clean

    if isinstance(value, dict):
        return any(clean(v) for v in value.values())
    return bool(clean(value))


def load_product(checkpoint: str | Path, **kwargs) -> Product:
    """Product.load under its former name (callers not moved yet: tests/test_mlflow_training.py)."""
    return Product.load(checkpoint, **kwargs)


class CalibratedClassifier(nn.Module):
    """The classifier with the temperature folded in: uint8 images -> (prob_abnormal, logits),
    prob_abnormal = softmax(logits / T)[:, 1] (what export.py writes as ONNX); a model with a
    findings head adds finding_probs = sigmoid(finding_logits / T_f), a temperature per finding."""

    def __init__(self, model: CXRClassifier, temperature: float, finding_temperatures: tuple[float, ...] = ()) -> None:
        super().__init__()
        self.model = model
        self.temperature = float(temperature)  # a Python float: a constant in the graph
        n = len(getattr(model, "findings", ()))
        self.register_buffer("finding_t", torch.tensor(finding_temperatures or (1.0,) * n, dtype=torch.float32),
                             persistent=False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not getattr(self.model, "findings", ()):
            logits = self.model(image)
            return torch.softmax(logits / self.temperature, dim=1)[:, 1], logits
        logits, findings = self.model(image, return_findings=True)
        return (torch.softmax(logits / self.temperature, dim=1)[:, 1], logits,
                torch.sigmoid(findings / self.finding_t))


class FilmError(DataError):
    """A film that cannot be used: `name` (the file's path, or "row 3" of a request) and `reason`."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


def read_film(src: str | Path | bytes, name: str, data: DataConfig, loader: LoaderConfig) -> Image.Image:
    """A film (path or encoded bytes: PNG, JPEG, DICOM...) -> the grayscale PIL image the transforms
    get for its shard sample: read as `prepare` reads it, the JPEG q95 round trip included (it
    changes pixels), decoded as the stream decodes it. Raises FilmError (a DataError: exit 2),
    "NAME: reason", for a missing or unreadable file and for a (nearly) constant image."""
    try:
        film = load_film(src, data.image_size, data.resize, "none")
    except DataError as e:
        raise FilmError(name, _reason(str(e), src)) from e
    try:
        check_not_constant(film, "")  # before the intensity mapping, which stretches noise to full range
    except DataError as e:
        raise FilmError(name, str(e).removeprefix(": ")) from e
    if data.intensity != "none":
        film = load_film(src, data.image_size, data.resize, data.intensity)
    return decode_film(film_jpeg(film), loader.input_size)  # = decode_film(encode_film(src, ...))


def _reason(message: str, src: str | Path | bytes) -> str:
    """preprocess.py's message about `src` without the source's own name (FilmError says the name):
    "cannot read DICOM /a/b.dcm: 2 frames" -> "cannot read DICOM: 2 frames", "no such image: /a/b.png"
    -> "no such image"; and without the repr of an in-memory buffer that PIL puts in its messages."""
    own = "<bytes>" if isinstance(src, (bytes, bytearray, memoryview)) else str(src)
    if f" {own}" in message:
        message = message.replace(f" {own}", "", 1).rstrip(": ")
    return re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the data", message)
