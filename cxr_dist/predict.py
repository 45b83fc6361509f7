"""`cxr-dist predict --checkpoint CKPT IMAGE...`: the probability of "abnormal" for each image.

Images are read exactly as `prepare` reads them into the shards (preprocess.py: any size, PNG or
JPEG, grayscale, RGB or 16-bit; the run's data.image_size, resize and intensity; the same JPEG q95
encoding, decoded as the stream decodes it), then given the evaluation transform: the model sees
exactly what `evaluate` gives it for that file's shard sample. With test-time augmentation
(`--tta N`; by default the number of views the run's own final evaluation used, `train.tta_views`),
the probability is the mean over the plain view and N-1 views augmented as in training, drawn per
(view, file name) as `evaluate --tta` draws them per shard sample. `--threshold T` adds a label:
abnormal when the probability is >= T (a run's threshold picked on validation is
`test_at_val_threshold.threshold` in its evaluation.json).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from .checkpoint import load_model_state
from .config import DataConfig, ModelConfig, from_dict, replace
from .errors import UserError, run_main
from .manifest import sample_key
from .model import build_model, inference_device
from .preprocess import decode_film, encode_film
from .transforms import eval_transform, seeded_transform, train_transform, view_seed


def load_image(path: Path, data: DataConfig) -> Image.Image:
    """A file -> the grayscale PIL image the transforms get for its shard sample: encoded as
    `prepare` encodes it (the JPEG round trip included: it changes pixels) and decoded as the
    stream decodes it. A missing or unreadable file raises DataError, a UserError (exit 2)."""
    return decode_film(encode_film(path, data.image_size, data.resize, data.intensity), data.input_size)


@torch.no_grad()
def predict(checkpoint: str, images: list[str], batch_size: int = 16, views: int | None = None,
            threshold: float | None = None) -> list[dict]:
    """One dict per image: its path, `prob_abnormal`, `views`, and `label` when `threshold` is given."""
    state, meta = load_model_state(checkpoint, tag="best")
    # Older checkpoints lack the later data fields (resize, intensity, shift_augment):
    # from_dict fills in their defaults, which are what those runs used.
    data = from_dict(DataConfig, meta["config"]["data"])
    views = views or int(meta["config"]["train"].get("tta_views", 1))  # older checkpoints: 1 view
    model = build_model(replace(from_dict(ModelConfig, meta["config"]["model"]), pretrained=False, weights=""))
    model.load_state_dict(state)
    device = inference_device()  # the GPU when there is one
    model.to(device).eval()
    # The run's own augmentation, as evaluate --tta draws it from the stream.
    plain, augment = eval_transform(data.input_size), train_transform(data.input_size, data.shift_augment)
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        pics = [(load_image(Path(p), data), sample_key(Path(p).name)) for p in chunk]
        probs = torch.zeros(len(chunk))
        for view in range(views):  # view 0 plain; view v the augmented view v-1, as in evaluate
            x = torch.stack([plain(im) if view == 0 else seeded_transform(augment, im, view_seed(0, view - 1, key))
                             for im, key in pics])
            probs += torch.softmax(model(x.to(device)).float(), 1)[:, 1].cpu()
        for path, prob in zip(chunk, (probs / views).tolist()):
            row = {"image": path, "prob_abnormal": round(prob, 6), "views": views}
            if threshold is not None:
                row["label"] = "abnormal" if prob >= threshold else "normal"
            out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cxr-dist predict", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint dir (e.g. runs/x/checkpoints/best) or a run dir (its best checkpoint)")
    ap.add_argument("--tta", type=int, metavar="N",
                    help="views per image: the plain one and N-1 augmented (default: the run's train.tta_views)")
    ap.add_argument("--threshold", type=float, metavar="T", help="also print a label: abnormal when prob >= T")
    ap.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    ap.add_argument("images", nargs="+")
    args = ap.parse_args(argv)
    if args.tta is not None and args.tta < 1:
        raise UserError(f"--tta must be at least 1 (views per image), not {args.tta}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold must be in [0, 1], not {args.threshold}")
    for row in predict(args.checkpoint, args.images, views=args.tta, threshold=args.threshold):
        label = f"{row['label']:<8}  " if "label" in row else ""
        print(json.dumps(row) if args.json else f"{row['prob_abnormal']:.4f}  {label}{row['image']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main("cxr-dist predict", main))
