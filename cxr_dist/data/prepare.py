"""`cxr-dist prepare --data DIR --out OUT [--config FILE] [--data.seed 3 ...]`

Sources (a Kaggle-layout IU X-ray folder, or the `[[data.sources]]` of a config) -> splits by
patient within each source -> WebDataset shards + index.json + skipped.jsonl.
``--data`` and ``--out`` are shorthands for ``--data.data_dir`` and ``--data.shards_dir``.

Array prepare (slurm/prepare.sh as a job array, or any N processes on any machines sharing OUT):
``--task T --tasks N`` decodes task T's share of the images into OUT/.prepare-parts/; then
``--merge --tasks N`` writes the same shards, index.json and skipped.jsonl, byte for byte, as a
single-process prepare of the same command line would.
"""
from __future__ import annotations

import sys
import time

from ..config import ConfigError, DataConfig, load_config
from ..errors import run_main
from .index import ShardIndex

USAGE = """usage: cxr-dist prepare (--data DIR | --config FILE) --out OUT [--data.FIELD VALUE ...]

  --data DIR     Kaggle-layout folder: indiana_reports.csv, indiana_projections.csv, images/
                 (dataset raddar/chest-xrays-indiana-university); or, instead,
  --config FILE  a config with [[data.sources]] (iu, nih, folder, csv; e.g. configs/iu_kermany.toml)
  --out OUT      folder for the shards: new, empty, or made by an earlier prepare (its .cxr-dist-shards
                 marker); prepare never overwrites or deletes files in a folder it did not make
                 (a config given with --data uses its [data] settings for the one IU folder)
  --data.seed 3, --data.image_size 384, --data.k_folds 5, --data.no_indexing abnormal, ...

  Array prepare (what sbatch --array=0-(N-1) slurm/prepare.sh runs), the same arguments each time:
  --task T --tasks N   decode task T's share (rows T, T+N, ...) into OUT/.prepare-parts/
  --merge --tasks N    after all N tasks: write the shards, index.json and skipped.jsonl
                       (byte-identical to a prepare without these flags)
"""


def _parse(argv: list[str]) -> tuple[str | None, list[str], dict]:
    """Pull --config and the array flags out and rewrite --data/--out into dotted overrides; the
    rest are overrides. The third value: {"task": int | None, "tasks": int | None, "merge": bool}."""
    config, overrides = None, []
    array: dict = {"task": None, "tasks": None, "merge": False}
    alias = {"--data": "--data.data_dir", "--out": "--data.shards_dir"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name == "--merge" and not eq:
            array["merge"] = True
        elif name in ("--config", "--task", "--tasks", *alias):
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{name} needs a value")
                value, i = argv[i + 1], i + 1
            if name == "--config":
                config = value
            elif name in ("--task", "--tasks"):
                try:
                    array[name[2:]] = int(value)
                except ValueError:
                    raise ConfigError(f"{name} needs a whole number, not {value!r}") from None
            else:
                # Quoted so that a path like 2024 or true stays text when parsed as TOML.
                overrides += [alias[name], '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"']
        else:
            overrides.append(arg)
        i += 1
    _check_array(array)
    return config, overrides, array


def _check_array(a: dict) -> None:
    if a["merge"] and a["task"] is not None:
        raise ConfigError("--merge combines the parts of all tasks: give --tasks N, not --task")
    if (a["merge"] or a["task"] is not None) and a["tasks"] is None:
        raise ConfigError("--task and --merge need --tasks N (the number of tasks of the array prepare)")
    if a["tasks"] is not None and not a["merge"] and a["task"] is None:
        raise ConfigError("--tasks N needs --task T (one task's share) or --merge (combine the parts)")
    if a["tasks"] is not None and a["tasks"] < 1:
        raise ConfigError(f"--tasks must be >= 1, not {a['tasks']}")
    if a["task"] is not None and not 0 <= a["task"] < a["tasks"]:
        raise ConfigError(f"--task must be 0..{a['tasks'] - 1} for --tasks {a['tasks']}, not {a['task']}")


def summary(index: ShardIndex, seconds: float) -> str:
    """A few lines for the terminal: samples per split, skipped by reason, No Indexing handling."""
    t = index.totals
    lines = [f"prepared {t['samples']} images of {t['uids']} uids from {t['rows']} rows in {seconds:.1f} s "
             f"(image_size {index.prepared.image_size}, seed {index.prepared.seed})"]
    for name in index.split_names:
        sp = index.split(name)
        normal, abnormal = index.split_labels(name)
        lines.append(f"  {name:<8} {sp.total:>6} images {sp.uids:>5} uids  normal {normal:>5}  "
                     f"abnormal {abnormal:>5}  {len(sp.shards)} shards")
        if len(sp.sources) > 1:
            for src, c in sp.sources.items():
                lines.append(f"    {src:<8} {c.total:>6} images {c.patients:>5} patients  "
                             f"normal {c.normal:>5}  abnormal {c.abnormal:>5}")
    skipped = ", ".join(f"{k} {v}" for k, v in index.skipped.items()) or "none"
    lines.append(f"  skipped: {skipped} (details in skipped.jsonl)")
    if index.findings:  # docs/findings.md
        annotated = ", ".join(f"{s.name} {len(s.annotated_findings)}" for s in index.sources)
        lines.append(f"  findings: {', '.join(index.findings)}; annotated per source: {annotated} "
                     "(+ any_finding); counts per split in index.json")
    ni = index.no_indexing_counts
    lines.append(f"  'No Indexing': {ni['images']} images of {ni['uids']} uids -> {ni['treatment']}")
    lines.append(f"  checksum {index.checksum}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Run prepare; DataError/ConfigError propagate (the CLI prints them). Returns 0 on success."""
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    config, overrides, array = _parse(list(argv))
    cfg: DataConfig = load_config(config, overrides).data
    if not cfg.data_dir and not cfg.sources:
        raise ConfigError("no dataset: pass --data DIR (an IU folder), or a config with [[data.sources]] "
                          "(e.g. configs/iu_kermany.toml)")
    from . import shards  # heavy imports only when there is work to do

    start = time.perf_counter()
    if array["task"] is not None:
        part = shards.write_part(cfg, cfg.shards_dir, array["task"], array["tasks"])
        seconds = time.perf_counter() - start
        print(f"task {part['task']} of {part['tasks']}: decoded {part['encoded']} of {part['rows']} images "
              f"({part['failed']} unreadable) in {seconds:.1f} s, {part['rows'] / max(seconds, 1e-9):.1f} images/s "
              f"with {cfg.prepare_workers} worker(s)")
        print(f"wrote {shards.part_path(cfg.shards_dir, part['task'], part['tasks'])}; "
              f"then: cxr-dist prepare ... --merge --tasks {part['tasks']}")
        return 0
    if array["merge"]:
        index = shards.merge_parts(cfg, cfg.shards_dir, array["tasks"])
    else:
        index = shards.write_shards(cfg, cfg.shards_dir)
    print(summary(index, time.perf_counter() - start))
    print(f"wrote {cfg.shards_dir}/index.json")
    return 0

if __name__ == "__main__":
    sys.exit(run_main("cxr-dist prepare", main))
