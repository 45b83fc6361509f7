"""Is a model better than another on the same test images? The paired bootstrap of the AUROC gain.

    .venv/bin/python bench/paired_auroc.py BASELINE OTHER [OTHER...]   (run dirs or predictions CSVs)
    .venv/bin/python bench/paired_auroc.py A B --source iu                    (one source's images)
    .venv/bin/python bench/paired_auroc.py A B --source kermany --split external --other-split test --common

The same as `cxr-dist compare --paired ...` (cxr_dist/runs/paired.py, where the method is described),
kept under this name for the commands in docs/results.md.
"""
from __future__ import annotations

import sys

from cxr_dist.errors import run_main
from cxr_dist.runs.compare import main as compare_main


def main(argv: list[str] | None = None) -> int:
    return compare_main(["--paired", *(sys.argv[1:] if argv is None else argv)])

if __name__ == "__main__":
    sys.exit(run_main("paired_auroc.py", main))
