"""`cxr-dist predict --checkpoint CKPT FILE_OR_FOLDER...`: for each film, the calibrated probability
of "abnormal", the label at the run's validation-picked threshold and an out-of-distribution score.

Films (PNG, JPEG, WebP, DICOM; any size or bit depth) are read exactly as `prepare` read the training
films and checked for being films at all (inference.read_film: a constant image is refused); the
model, calibration, threshold and OOD statistics all come from the checkpoint (inference.Product).

    cxr-dist predict --checkpoint runs/x chest.dcm other.png          # table: prob, label, OOD flag, file
    cxr-dist predict --checkpoint runs/x --json *.png                  # one JSON object per line
    cxr-dist predict --checkpoint runs/x scans/                        # every image file under scans/
    cxr-dist predict --checkpoint runs/x --cam cams/ chest.png         # + a Grad-CAM overlay PNG per film

`--uncalibrated` gives the network's own softmax probability (and maps the threshold back to that
scale); `--threshold T` replaces the run's threshold; `--tta N` the run's test-time views
(`product.tta_views`).

A folder stands for the image files under it (any depth, by extension: .png .jpg .jpeg .webp
.dcm, case-insensitive; hidden files skipped), in sorted path order; a DICOM file without the .dcm
extension must be named on its own. A file that is missing, unreadable or not a film (a constant
image) gets no probability: each one is reported on stderr as `cxr-dist predict: PATH: reason`,
every other film is still predicted and printed, and the exit code is 2 when any input failed.
A bad checkpoint or option stops the command before any film is read (exit 2).

Only argparse and the standard library are imported at module level, so that `--help` is instant;
torch and the model come with the first prediction.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import EXIT_USER_ERROR, UserError, run_main

PROG = "cxr-dist predict"
DESCRIPTION = ("For each film (PNG, JPEG, WebP, DICOM; files or folders of them): the calibrated probability "
               "of 'abnormal', the label at the run's threshold and an out-of-distribution score. A film that "
               "cannot be read is reported on stderr (PATH: reason) and the others are still predicted; "
               "the exit code is then 2.")


def load_image(path: Path, data, loader):
    """A file -> the grayscale PIL image the transforms get for its shard sample (inference.read_film)."""
    from .inference import read_film

    return read_film(Path(path), str(path), data, loader)


def expand_inputs(inputs: list[str]) -> list[tuple[str, str | None]]:
    """The command's arguments -> (path, None) for each file to read, in order; a folder -> its
    image files (any depth, by extension, hidden files skipped), sorted; a folder without any ->
    (folder, reason). Missing and unreadable files are left for read_film to report."""
    from ..data.sources.common import IMAGE_EXTENSIONS, is_image

    out: list[tuple[str, str | None]] = []
    for arg in inputs:
        folder = Path(arg)
        if not folder.is_dir():
            out.append((arg, None))
            continue
        found = sorted(p for p in folder.rglob("*") if p.is_file() and is_image(p.name)
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        if not found:
            out.append((arg, f"a folder without image files ({' '.join(IMAGE_EXTENSIONS)}, at any depth)"))
        out += [(str(p), None) for p in found]
    return out


@dataclass(frozen=True)
class Request:
    """What predict does besides predicting. `cam_dir`: write a Grad-CAM overlay per film there
    (names unique across the whole command), explaining `cam_target` ("abnormal", or a finding of
    the model's findings head). For a model that reads text: `texts` maps an input path to its
    text (read_texts_csv), `text` is every other film's (a {field: text} dict or a plain string
    for the first field)."""
    batch_size: int = 16
    cam_dir: str | None = None
    cam_target: str = "abnormal"
    texts: dict[str, str | dict] | None = None
    text: str | dict | None = None


def predict_rows(product, images: list[str], request: Request = Request()) -> Iterator[dict]:
    """One dict per input film of a loaded `product` (inference.Product), in order, as each batch
    is done: `image` (its path) and either `error` (why it got no prediction) or prob_abnormal,
    prob_uncalibrated, views, and label / ood_score / ood_flag when the checkpoint (or the product's
    threshold) provides them, per finding `findings` / `findings_positive` for a findings model,
    and `cam` (the overlay's path). A model that reads text: a row says whether it read a text
    (`text`) and whether it was cut at model.max_tokens (`text_truncated`)."""
    from .inference import FilmError

    batch_size, cam_dir, cam_target, texts, text = (request.batch_size, request.cam_dir, request.cam_target,
                                                    request.texts, request.text)
    if cam_target != "abnormal" and cam_target not in product.model.findings:
        raise UserError(f"--cam-target {cam_target!r}: the model's targets are abnormal"
                        + "".join(f", {f}" for f in product.model.findings))
    items = expand_inputs(images)
    cam_names: set[str] = set()  # overlay names taken so far: no file overwrites another
    for start in range(0, len(items), batch_size):
        rows, films = [], []
        for path, problem in items[start:start + batch_size]:
            if problem is None:
                try:
                    films.append(product.read(Path(path), path, (texts or {}).get(path, text)))
                except FilmError as e:
                    problem = e.reason
            rows.append({"image": path, "error": problem} if problem else {"image": path})
        results = product.predict(films)
        if cam_dir and films and not product.model.uses_text:  # Grad-CAM: image models only
            import torch

            from ..data.transforms import eval_transform
            from .cam import write_overlays  # matplotlib: only when asked

            plain = eval_transform(product.loader.input_size)  # the view Grad-CAM explains
            x = torch.stack([plain(f.image) for f in films]).to(product.device)
            stems = [Path(f.name).stem for f in films]
            target = 1 if cam_target == "abnormal" else cam_target
            for result, cam in zip(results, write_overlays(product.model, x, stems, cam_dir, target, taken=cam_names)):
                result["cam"] = str(cam)
        good = iter(results)
        for row in rows:
            yield row if "error" in row else {**row, **next(good)}


def predict(checkpoint: str, images: list[str], request: Request = Request(), **load) -> list[dict]:
    """predict_rows of the checkpoint's product as a list (a row with `error` for each input that
    could not be read); `load`: Product.load's options (calibrated, views, threshold)."""
    from .inference import Product

    return list(predict_rows(Product.load(checkpoint, **load), images, request))


def parse_text(values: list[str] | None) -> str | dict | None:
    """`--text` values -> a film's text: FIELD=TEXT pairs -> {field: text}; one plain TEXT -> that
    string (the model's first text field)."""
    if not values:
        return None
    pairs = [v.split("=", 1) for v in values]
    if len(values) == 1 and (len(pairs[0]) == 1 or not pairs[0][0].isidentifier()):
        return values[0]
    bad = [v for v, p in zip(values, pairs) if len(p) == 1 or not p[0].isidentifier()]
    if bad:
        raise UserError(f"--text {bad[0]!r}: with several --text, each is FIELD=TEXT (e.g. --text indication=Cough.)")
    return {k: v for k, v in pairs}


def read_texts_csv(path: str) -> tuple[list[str], dict[str, dict]]:
    """A CSV with a column `image` (a file path, relative to the CSV's folder or absolute) and one
    column per text field (e.g. indication, comparison), or a column `text` (the first field) ->
    (the image paths in order, {path: text}). Cells may be empty (no text); bytes that are not
    UTF-8 become U+FFFD."""
    import csv

    file = Path(path)
    if not file.is_file():
        raise UserError(f"--csv {path}: no such file")
    with open(file, newline="", encoding="utf-8", errors="replace") as f:
        rows = list(csv.DictReader(f))
    if not rows or "image" not in rows[0]:
        raise UserError(f"--csv {path}: needs a header with a column 'image' (and text columns such as indication)")
    images, texts = [], {}
    for row in rows:
        image = (row.pop("image") or "").strip()
        if not image:
            continue
        image = str(Path(image) if Path(image).is_absolute() else file.parent / image)
        images.append(image)
        extra = {k: v for k, v in row.items() if k is not None}
        texts[image] = extra["text"] if set(extra) == {"text"} else extra
    return images, texts


def printable(text: str, stream=None) -> str:
    """`text` (a file name) as `stream` (default stdout) can always print it: bytes of a name that
    are not UTF-8 (surrogate escapes) as \\xNN, characters the stream's encoding lacks as \\uNNNN."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    encoding = getattr(stream or sys.stdout, "encoding", None) or "utf-8"
    try:
        return text.encode(encoding, "backslashreplace").decode(encoding)
    except LookupError:
        return text.encode("ascii", "backslashreplace").decode("ascii")


def table_line(row: dict) -> str:
    """One result as a line of the table: probability, label, OOD score and flag, file."""
    label = f"{row['label']:<8}  " if "label" in row else ""
    ood = f"ood {row['ood_score']:7.1f}{' FLAG' if row['ood_flag'] else '     '}  " if "ood_score" in row else ""
    text = ""
    if "text" in row:  # a model that reads text: did it get one (cut at model.max_tokens?)
        text = f"{'text, cut' if row.get('text_truncated') else 'text' if row['text'] else 'no text':<9}  "
    found = f"findings: {', '.join(row['findings_positive']) or 'none'}  " if "findings_positive" in row else ""
    return f"{row['prob_abnormal']:.4f}  {label}{ood}{text}{found}{printable(row['image'])}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    ap.add_argument("--checkpoint", required=True, help="checkpoint dir (e.g. runs/x/checkpoints/best) or a run dir (its best checkpoint)")
    ap.add_argument("--tta", type=int, metavar="N",
                    help="views per image: the plain one and N-1 augmented (default: the run's product.tta_views)")
    ap.add_argument("--threshold", type=float, metavar="T",
                    help="label abnormal when prob >= T (default: the run's threshold picked on validation)")
    ap.add_argument("--uncalibrated", action="store_true", help="the network's own probability, no temperature")
    ap.add_argument("--cam", metavar="DIR", help="also write a Grad-CAM heat-map overlay PNG per image into DIR")
    ap.add_argument("--cam-target", default="abnormal", metavar="NAME",
                    help="what the Grad-CAM overlays explain: abnormal (default) or a finding of a model with a "
                         "findings head (e.g. cardiomegaly)")
    ap.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    ap.add_argument("--text", action="append", metavar="FIELD=TEXT",
                    help="for a model that reads text (model.kind text or image+text): the text of every film, "
                         "e.g. --text 'indication=Positive TB test.' --text comparison=None. (a plain TEXT is the "
                         "first of the run's loader.text_fields); without it the model predicts from the film alone")
    ap.add_argument("--csv", metavar="FILE",
                    help="films and their texts: a CSV with a column image (paths relative to the CSV) and one "
                         "column per text field (or a column text)")
    ap.add_argument("images", nargs="*", metavar="IMAGE",
                    help="image files (PNG, JPEG, WebP, DICOM) or folders (their image files, sorted)")
    args = ap.parse_args(argv)
    texts = None
    if args.csv:
        listed, texts = read_texts_csv(args.csv)
        args.images = [*args.images, *listed]
    if not args.images:
        ap.error("give image files or folders, or --csv FILE")
    if args.tta is not None and args.tta < 1:
        raise UserError(f"--tta must be at least 1 (views per image), not {args.tta}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold must be in [0, 1], not {args.threshold}")
    failed = 0
    from .inference import Product

    product = Product.load(args.checkpoint, calibrated=not args.uncalibrated, views=args.tta, threshold=args.threshold)
    request = Request(cam_dir=args.cam, cam_target=args.cam_target, texts=texts, text=parse_text(args.text))
    for row in predict_rows(product, args.images, request):
        if "error" in row:
            failed += 1
            print(f"{PROG}: {printable(row['image'], sys.stderr)}: {row['error']}", file=sys.stderr, flush=True)
        else:
            print(json.dumps(row) if args.json else table_line(row), flush=True)
    return EXIT_USER_ERROR if failed else 0


if __name__ == "__main__":
    sys.exit(run_main(PROG, main))
