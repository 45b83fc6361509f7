"""`cxr-dist predict --checkpoint CKPT IMAGE...`: the probability of "abnormal" for each image.

Images are read like `prepare` reads them (any size, PNG or JPEG, grayscale or RGB), stored-size
resized with the aspect ratio kept, then given the evaluation transform: the model sees exactly
what it saw on validation.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .checkpoint import load_model_state
from .config import DataConfig, ModelConfig, from_dict, replace
from .errors import UserError
from .model import build_model
from .transforms import eval_transform


def load_image(path: Path, image_size: int) -> Image.Image:
    """A file -> grayscale PIL image, longest side `image_size` (as stored in the shards)."""
    try:
        with Image.open(path) as im:
            im = im.convert("L")
            im.thumbnail((image_size, image_size), Image.BICUBIC)
            return im
    except FileNotFoundError as e:
        raise UserError(f"no such image: {path}") from e
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read image {path}: {e}") from e


@torch.no_grad()
def predict(checkpoint: str, images: list[str], batch_size: int = 16) -> list[dict]:
    state, meta = load_model_state(checkpoint, tag="best")
    data = from_dict(DataConfig, meta["config"]["data"])
    model = build_model(replace(from_dict(ModelConfig, meta["config"]["model"]), pretrained=False, weights=""))
    model.load_state_dict(state)
    model.eval()
    tf = eval_transform(data.input_size)
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        x = torch.stack([tf(load_image(Path(p), data.image_size)) for p in chunk])
        probs = torch.softmax(model(x).float(), 1)[:, 1]
        out += [{"image": p, "prob_abnormal": round(float(q), 6)} for p, q in zip(chunk, probs)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cxr-dist predict", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint dir (e.g. runs/x/checkpoints/best) or a run dir (its best checkpoint)")
    ap.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    ap.add_argument("images", nargs="+")
    args = ap.parse_args(argv)
    for row in predict(args.checkpoint, args.images):
        print(json.dumps(row) if args.json else f"{row['prob_abnormal']:.4f}  {row['image']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
