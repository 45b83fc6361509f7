#!/usr/bin/env python3
"""Rebuild demo/kermany: a small, reproducible subset of Kermany's pediatric chest X-rays.

    python3 demo/make_demo.py                      # from ../shared/data/kermany_pediatric
    python3 demo/make_demo.py --src DIR --patients 80 --seed 0 --out demo/kermany

Picks PATIENTS patients per class (NORMAL, PNEUMONIA) with SEED and copies every image of each
picked patient byte for byte, under the same SUBSET/CLASS/file name as in the source
(train/ or test/), so the patient regex of configs/iu_kermany.toml still applies. The patient is
in the file name (personN for pneumonia, IM-XXXX / NORMAL2-IM-XXXX for normal images); a patient's
images all go into the demo or none do. Standard library only; same source + arguments -> the
same files. Prints the counts that demo/README.md lists.
"""
from __future__ import annotations

import argparse
import random
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATIENT_RE = re.compile(r"^(?P<patient>person\d+|NORMAL2-IM-\d+|IM-\d+)")  # configs/iu_kermany.toml
SUBSETS = ("train", "test")
CLASSES = ("NORMAL", "PNEUMONIA")


def select(src: Path, patients: int, seed: int) -> list[str]:
    """Relative paths (SUBSET/CLASS/NAME) of every image of `patients` patients per class, sorted."""
    chosen: list[str] = []
    for cls in CLASSES:
        by_patient: dict[str, list[str]] = {}
        for subset in SUBSETS:
            folder = src / subset / cls
            if not folder.is_dir():
                raise SystemExit(f"make_demo: {folder} is missing (expected the Kermany layout SUBSET/CLASS/)")
            for f in sorted(folder.iterdir()):
                m = PATIENT_RE.match(f.name)
                if m is None:
                    raise SystemExit(f"make_demo: {f} does not match the patient regex {PATIENT_RE.pattern}")
                by_patient.setdefault(m.group("patient"), []).append(f"{subset}/{cls}/{f.name}")
        if patients > len(by_patient):
            raise SystemExit(f"make_demo: {cls} has only {len(by_patient)} patients, asked for {patients}")
        rng = random.Random(f"{seed}-{cls}")  # one stream per class: N of one class never moves the other
        for p in rng.sample(sorted(by_patient), patients):
            chosen += by_patient[p]
    return sorted(chosen)


def counts(rels: list[str]) -> dict[str, int]:
    """{"train/NORMAL": n, ...} in a fixed order (every subset/class, zeros included)."""
    out = {f"{s}/{c}": 0 for s in SUBSETS for c in CLASSES}
    for r in rels:
        s, c, _ = r.split("/")
        out[f"{s}/{c}"] += 1
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=ROOT.parent / "shared/data/kermany_pediatric")
    ap.add_argument("--out", type=Path, default=ROOT / "demo/kermany")
    ap.add_argument("--patients", type=int, default=80, help="patients per class (default 80)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rels = select(args.src, args.patients, args.seed)
    if args.out.exists():  # only ever a folder this script wrote: SUBSET/CLASS/images
        stray = [p for p in args.out.rglob("*") if p.is_file() and
                 (len(p.relative_to(args.out).parts) != 3 or p.relative_to(args.out).parts[0] not in SUBSETS)]
        if stray:
            raise SystemExit(f"make_demo: {args.out} holds files this script did not write, e.g. {stray[0]}; "
                             "remove them or choose another --out")
        shutil.rmtree(args.out)
    for r in rels:
        (args.out / r).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.src / r, args.out / r)
    size = sum((args.out / r).stat().st_size for r in rels)
    print(f"wrote {len(rels)} images of {2 * args.patients} patients ({size / 1e6:.2f} MB) to {args.out} "
          f"(patients per class {args.patients}, seed {args.seed})")
    print("| folder | images |\n| --- | --- |")
    for k, n in counts(rels).items():
        print(f"| {k} | {n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
