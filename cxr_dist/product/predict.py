"""`cxr-dist predict --checkpoint CKPT FILE...`: for each film, the calibrated probability of
"abnormal", the label at the run's validation-picked threshold and an out-of-distribution score.

Films (PNG, JPEG, DICOM; any size or bit depth) are read exactly as `prepare` read the training
films and checked for being films at all (inference.read_film: a constant image is refused); the
model, calibration, threshold and OOD statistics all come from the checkpoint (inference.py).

    cxr-dist predict --checkpoint runs/x chest.dcm other.png          # table: prob, label, OOD flag, file
    cxr-dist predict --checkpoint runs/x --json *.png                  # one JSON object per line
    cxr-dist predict --checkpoint runs/x --cam cams/ chest.png         # + a Grad-CAM overlay PNG per film

`--uncalibrated` gives the network's own softmax probability (and maps the threshold back to that
scale); `--threshold T` replaces the run's threshold; `--tta N` the run's test-time views
(`train.tta_views`). A missing, unreadable or constant film stops the command with exit code 2
and its name: no probability is printed for a file that is not a film.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from ..config import DataConfig
from ..errors import UserError, run_main
from .inference import load_product, read_film
from ..data.transforms import eval_transform


def load_image(path: Path, data: DataConfig) -> Image.Image:
    """A file -> the grayscale PIL image the transforms get for its shard sample (inference.read_film)."""
    return read_film(Path(path), Path(path).name, data)


def predict(checkpoint: str, images: list[str], batch_size: int = 16, views: int | None = None,
            threshold: float | None = None, calibrated: bool = True, cam_dir: str | None = None) -> list[dict]:
    """One dict per image: its path, prob_abnormal, prob_uncalibrated, views, and label / ood_score /
    ood_flag when the checkpoint (or `threshold`) provides them; `cam_dir`: Grad-CAM overlays there."""
    product = load_product(checkpoint, calibrated=calibrated, views=views, threshold=threshold)
    plain = eval_transform(product.data.input_size)  # the view Grad-CAM explains
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        films = [(load_image(Path(p), product.data), Path(p).name) for p in chunk]
        rows = product.predict(films)
        if cam_dir:
            from .cam import write_overlays  # matplotlib: only when asked

            x = torch.stack([plain(im) for im, _ in films]).to(product.device)
            for row, path in zip(rows, write_overlays(product.model, x, [Path(p).stem for p in chunk], cam_dir)):
                row["cam"] = str(path)
        out += [{"image": p, **row} for p, row in zip(chunk, rows)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cxr-dist predict", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint dir (e.g. runs/x/checkpoints/best) or a run dir (its best checkpoint)")
    ap.add_argument("--tta", type=int, metavar="N",
                    help="views per image: the plain one and N-1 augmented (default: the run's train.tta_views)")
    ap.add_argument("--threshold", type=float, metavar="T",
                    help="label abnormal when prob >= T (default: the run's threshold picked on validation)")
    ap.add_argument("--uncalibrated", action="store_true", help="the network's own probability, no temperature")
    ap.add_argument("--cam", metavar="DIR", help="also write a Grad-CAM heat-map overlay PNG per image into DIR")
    ap.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    ap.add_argument("images", nargs="+")
    args = ap.parse_args(argv)
    if args.tta is not None and args.tta < 1:
        raise UserError(f"--tta must be at least 1 (views per image), not {args.tta}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold must be in [0, 1], not {args.threshold}")
    rows = predict(args.checkpoint, args.images, views=args.tta, threshold=args.threshold,
                   calibrated=not args.uncalibrated, cam_dir=args.cam)
    for row in rows:
        if args.json:
            print(json.dumps(row))
            continue
        label = f"{row['label']:<8}  " if "label" in row else ""
        ood = f"ood {row['ood_score']:7.1f}{' FLAG' if row['ood_flag'] else '     '}  " if "ood_score" in row else ""
        print(f"{row['prob_abnormal']:.4f}  {label}{ood}{row['image']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main("cxr-dist predict", main))
