"""Compare what two training runs left behind: `python bench/compare_histories.py RUN_A RUN_B`.

Reads history.json, evaluation.json and predictions.csv of both run folders and prints every field
that differs (path, A's value, B's value). Timing fields (`epoch_time_s`, `images_per_s`) are
shown but do not count. Exit code 0 when every other field is identical (exact equality, no
tolerance: this is for refactors that must not change behaviour), 1 otherwise, 2 when a file is
missing. `--new-fields-ok`: fields only B has (a newer version that reports more, e.g. the
per-source metrics) are listed but do not count; every field A has must still be identical.

    python bench/compare_histories.py --new-fields-ok runs/before runs/after
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

TIMING = {"epoch_time_s", "images_per_s"}
FILES = ("history.json", "evaluation.json", "predictions.csv")


def _read(path: Path):
    if path.suffix == ".csv":
        return list(csv.DictReader(path.read_text().splitlines()))
    return json.loads(path.read_text())


def diff(a, b, where: str = "") -> list[tuple[str, object, object]]:
    """(path, a, b) for every leaf where the two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(a) + [k for k in b if k not in a]:
            out += diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{where}.{k}" if where else str(k))
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [(f"{where} (length)", len(a), len(b))]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{where}[{i}]")]
    same = a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)  # NaN == NaN here
    return [] if same else [(where, a, b)]


def main(argv: list[str]) -> int:
    new_ok = "--new-fields-ok" in argv
    argv = [a for a in argv if a != "--new-fields-ok"]
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    a_dir, b_dir = map(Path, argv)
    counted = 0
    for name in FILES:
        paths = (a_dir / name, b_dir / name)
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            print(f"missing: {', '.join(missing)}", file=sys.stderr)
            return 2
        diffs = diff(*(_read(p) for p in paths))
        timing = [d for d in diffs if d[0].rsplit(".", 1)[-1] in TIMING]
        new = [d for d in diffs if new_ok and d[1] == "<absent>" and d not in timing]
        other = [d for d in diffs if d not in timing and d not in new]
        counted += len(other)
        print(f"{name}: {len(other)} differing field(s), {len(timing)} timing field(s) differ (ignored)"
              + (f", {len(new)} field(s) only in B (allowed)" if new_ok else ""))
        for where, x, y in other:
            print(f"  DIFFERS {where}: {x!r} != {y!r}")
        for where, x, y in timing:
            print(f"  timing  {where}: {x!r} vs {y!r}")
    print("identical apart from timing" if counted == 0 else f"{counted} non-timing field(s) differ")
    return 1 if counted else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
