"""`cxr-dist` command line: one sub-command per job, each a thin wrapper over a module's main().

    cxr-dist prepare  --data DIR --out OUT [--config C] [--data.seed 3 ...]
    cxr-dist train    [--config C] [overrides]      (single process; use `accelerate launch -m cxr_dist.train` for many)
    cxr-dist evaluate --checkpoint CKPT [CKPT...] (--data DIR | --shards OUT --split test) [--tta N]
    cxr-dist predict  --checkpoint CKPT IMAGE...
    cxr-dist export   --checkpoint CKPT --format onnx --out model.onnx
    cxr-dist audit-text --shards OUT               (the label leak of each report field)
    cxr-dist fuse     IMAGE_RUN TEXT_RUN --out DIR  (one late-fusion checkpoint, the weight picked on val)
    cxr-dist compare  [--experiment NAME]
    cxr-dist folds    --experiment NAME             (mean and spread of k-fold runs)
    cxr-dist --version

Heavy imports (torch, mlflow) happen inside the sub-commands so that `--help` is instant.
"""
from __future__ import annotations

import importlib
import sys

from .errors import run_main

# sub-command -> (module, one-line help). Each module has `main(argv: list[str]) -> int`.
COMMANDS = {
    "prepare": ("cxr_dist.data.prepare", "an IU folder, or a config's sources -> splits by patient -> WebDataset shards"),
    "train": ("cxr_dist.train.loop", "train the two-phase classifier (wrap in `accelerate launch` for DDP)"),
    "evaluate": ("cxr_dist.product.evaluate_cli", "metrics of a checkpoint on a split of shards or on a folder (iu, nih, folder, csv)"),
    "predict": ("cxr_dist.product.predict", "probability of 'abnormal' (or of each finding) for each image"),
    "export": ("cxr_dist.product.export", "a checkpoint -> ONNX (calibrated probabilities, dynamic batch)"),
    "audit-text": ("cxr_dist.eval.text_audit", "how much of the label each text field gives away (TF-IDF probe)"),
    "fuse": ("cxr_dist.runs.fuse", "an image run + a text run -> one late-fusion checkpoint (weight picked on val)"),
    "compare": ("cxr_dist.runs.compare", "table of MLflow runs (differing params, best metrics); --paired: one run's gain"),
    "folds": ("cxr_dist.runs.compare", "summary (mean, spread) of the k-fold runs of an experiment"),
}


def version() -> str:
    """The installed distribution's version; the package's own when it is not installed (a source tree)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("cxr-dist")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def _usage() -> str:
    lines = ["usage: cxr-dist COMMAND [options]   (cxr-dist COMMAND --help for details)",
             "       cxr-dist --version", "", "commands:"]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:<{width}} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`cxr-dist train --help` lists every config field (dotted name, type, default, meaning)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"cxr-dist {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"cxr-dist: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    entry = getattr(module, "folds_main" if name == "folds" else "main")
    # Training configures logging itself, once its accelerator knows which process is the main one.
    return run_main(f"cxr-dist {name}", entry, rest, setup_logging=name != "train")


if __name__ == "__main__":
    sys.exit(main())
