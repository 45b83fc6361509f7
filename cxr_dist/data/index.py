"""The shard index (`OUT/index.json`): its format, reading it, and what it says about the splits.

`ShardIndex.load(shards_dir)` (also `load_index`) reads and checks it once per process; the
entry points (train's main, `cxr-dist evaluate`, `cxr-dist audit-text`, the benchmarks) read it
and pass it down: the loaders, the loss weights, the cache and the final evaluation all take the
index, never the folder, so a run parses it once. Nothing else reads index.json or its JSON
structure: callers ask the ShardIndex (splits, their shards and counts, the sources, the settings
the shards were prepared with). This module is small on purpose: training processes import it
without pandas or the process pool of `shards.py`, which writes the file.

Version 2 (multi-source) adds, per split, `sources: {name: {total, labels, views}}` with
`views: {view: {"normal": n, "abnormal": n}}`, a `source` on every shard entry (a shard holds one
source), and the top-level `sources` list. A version-1 index (one IU source, written before
sources existed) is still read, here and only here: all its shards belong to the source "iu" and
views are unknown.

Shards prepared with data.findings (docs/findings.md) add, still version 2 (older readers ignore
them): the top-level `findings` (the vocabulary, in order), per source `findings: {annotated,
findings_map, uncertain, blank}`, and per split and per split's source `findings: {name:
{positive, negative, masked}}`. Without them `index.findings` is ().
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..config import ConfigError, DataConfig
from ..errors import DataError
from .findings import ANY_FINDING

INDEX_FORMAT = "cxr-dist-shards"
INDEX_VERSION = 2
LEGACY_SOURCE = "iu"  # the source of every sample of a version-1 index


class FindingCounts(NamedTuple):
    """One finding's samples in a split (or one source of it): labelled 1, labelled 0, masked."""
    positive: int
    negative: int
    masked: int


class Shard(NamedTuple):
    path: str  # the tar file, under the index's root
    count: int
    source: str


@dataclass(frozen=True)
class Counts:
    """The images of one source in one split (`ShardIndex.sources_in`). `views`: {view: (n_normal,
    n_abnormal)}, empty where the index does not record views (version 1); `patients` and `uids`:
    None where it does not record them."""
    total: int
    normal: int
    abnormal: int
    patients: int | None = None
    uids: int | None = None
    views: dict[str, tuple[int, int]] = field(default_factory=dict)
    findings: dict[str, FindingCounts] = field(default_factory=dict)  # {} without a vocabulary


@dataclass(frozen=True)
class Split:
    """One split of the index: its shards in order, its counts, and its counts per source.
    `labels` (n_normal, n_abnormal) is None for a split made by `ShardIndex.with_split` (whole
    shards, whose label counts the index does not record)."""
    name: str
    total: int
    labels: tuple[int, int] | None
    shards: tuple[Shard, ...]
    sources: dict[str, Counts]
    patients: int | None = None
    uids: int | None = None
    findings: dict[str, FindingCounts] = field(default_factory=dict)  # {} without a vocabulary


@dataclass(frozen=True)
class SourceInfo:
    """One source the shards were prepared from (`[[data.sources]]`); a version-1 index has one,
    "iu". `text_fields`: the text fields its samples carry; `label_text_fields`: those its label
    was derived from (empty for shards prepared before text fields existed). `annotated_findings`:
    the findings of the vocabulary this source labels (any_finding aside, which every source labels);
    `uncertain`, `blank`: its policies; `findings_map`: its overrides (empty without a vocabulary)."""
    name: str
    format: str = "iu"
    role: str = "train"
    weight: float = 1.0
    path: str = ""
    text_fields: tuple[str, ...] = ()
    label_text_fields: tuple[str, ...] = ()
    annotated_findings: tuple[str, ...] = ()
    findings_map: tuple[str, ...] = ()
    uncertain: str = "mask"
    blank: str = "mask"


@dataclass(frozen=True)
class Preparation:
    """The `prepare` settings baked into the shards; None where an older prepare did not record one."""
    image_size: int | None = None
    resize: str | None = None
    intensity: str | None = None
    seed: int | None = None
    val_frac: float | None = None
    test_frac: float | None = None
    k_folds: int | None = None
    no_indexing: str | None = None
    samples_per_shard: int | None = None


@dataclass(frozen=True)
class ShardIndex:
    """What index.json says, parsed once: read it with `ShardIndex.load(shards_dir)`.

    `root`: the shards folder; `splits`: {name: Split} in the order of the JSON (index.json's keys
    are sorted; the index `shards.write_shards` returns keeps the order it wrote them in);
    `sources`: the sources the shards hold; `prepared`: the settings they were prepared with;
    `checksum`: the shards' content hash ("" when not recorded); `totals`, `skipped` (counts by
    reason) and `no_indexing_counts`: what `prepare` reports; `findings`: the findings vocabulary
    the samples carry targets for, in order ("any_finding" last; () for shards without one).
    """
    root: str
    version: int
    splits: dict[str, Split]
    sources: tuple[SourceInfo, ...]
    prepared: Preparation
    checksum: str = ""
    data_dir: str = ""
    totals: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    no_indexing_counts: dict = field(default_factory=dict)
    findings: tuple[str, ...] = ()

    # ------------------------------------------------------------------ reading

    @classmethod
    def load(cls, shards_dir: str | Path) -> "ShardIndex":
        """Read and check OUT/index.json (format, version, every shard file present). DataError if
        absent, unreadable, of another format or a newer version, or when a shard file is missing."""
        root = Path(shards_dir)
        path = root / "index.json"
        if not path.is_file():
            raise DataError(f"no index.json in {root}: run `cxr-dist prepare --data DIR --out {root}` first")
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{path} is not readable JSON ({e}); run `cxr-dist prepare` again") from e
        if not isinstance(raw, dict) or raw.get("format") != INDEX_FORMAT:
            raise DataError(f"{path} is not a cxr-dist shard index; run `cxr-dist prepare` again")
        if raw.get("version", 1) > INDEX_VERSION:
            raise DataError(f"{path} has index version {raw['version']}, newer than this cxr-dist reads "
                            f"({INDEX_VERSION}); update cxr-dist")
        missing = [s["file"] for sp in raw["splits"].values() for s in sp["shards"] if not (root / s["file"]).is_file()]
        if missing:
            raise DataError(f"{root} lacks shard file(s) {', '.join(missing[:5])}; run `cxr-dist prepare` again")
        return cls.from_json(raw, root)

    @classmethod
    def from_json(cls, raw: dict, root: str | Path) -> "ShardIndex":
        """The index of the parsed JSON `raw` (as `prepare` writes it) for the shards in `root`,
        without checking the files (`load` checks them). A version-1 index becomes one source "iu"."""
        root = str(root)
        version = int(raw.get("version", 1))
        splits = {name: _split(name, sp, root) for name, sp in raw.get("splits", {}).items()}
        sources = tuple(SourceInfo(name=s["name"], format=s.get("format", "iu"), role=s.get("role", "train"),
                                   weight=float(s.get("weight", 1.0)), path=s.get("path", ""),
                                   text_fields=tuple(s.get("text_fields", ())),
                                   label_text_fields=tuple(s.get("label_text_fields", ())),
                                   **_source_findings(s.get("findings") or {}))
                        for s in raw.get("sources") or ())
        if not sources:  # version 1: one IU source, the data folder
            sources = (SourceInfo(name=LEGACY_SOURCE, path=raw.get("data_dir", "")),)
        prepared = Preparation(**{f.name: raw.get(f.name) for f in dataclasses.fields(Preparation)})
        return cls(root=root, version=version, splits=splits, sources=sources, prepared=prepared,
                   checksum=raw.get("checksum", ""), data_dir=raw.get("data_dir", ""),
                   totals=dict(raw.get("totals", {})), skipped=dict(raw.get("skipped", {})),
                   no_indexing_counts=dict(raw.get("no_indexing_counts", {})),
                   findings=tuple(raw.get("findings") or ()))

    # ------------------------------------------------------------------ splits

    @property
    def split_names(self) -> list[str]:
        """The splits, in the index's order (`splits`)."""
        return list(self.splits)

    def has_split(self, name: str) -> bool:
        return name in self.splits

    def has_samples(self, name: str) -> bool:
        """Whether split `name` exists and holds at least one sample."""
        return name in self.splits and self.splits[name].total > 0

    def split(self, name: str) -> Split:
        """Split `name`; DataError naming the splits there are when it is not in the index."""
        self.check_splits([name])
        return self.splits[name]

    def check_splits(self, splits: list[str]) -> None:
        """DataError when one of `splits` is not in the index (shards of another data.k_folds)."""
        for name in splits:
            if name not in self.splits:
                raise DataError(f"split {name!r} is not in {self.root} (has: {', '.join(self.splits)}); "
                                "were the shards prepared with the same data.k_folds?")

    def shards(self, splits: list[str]) -> list[Shard]:
        """The shards of `splits`, in index order, with their sample counts and sources."""
        self.check_splits(splits)
        return [shard for name in splits for shard in self.splits[name].shards]

    def split_labels(self, name: str) -> tuple[int, int]:
        """(n_normal, n_abnormal) of split `name`."""
        labels = self.split(name).labels
        if labels is None:
            raise DataError(f"split {name!r} of {self.root} has no label counts")
        return labels

    def class_counts(self, splits: list[str]) -> tuple[int, int]:
        """(n_normal, n_abnormal) samples over the given splits."""
        counts = [self.split_labels(s) for s in splits]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def sources_in(self, name: str) -> dict[str, Counts]:
        """{source: its counts} in split `name`; a version-1 index: the one source "iu", no views."""
        return dict(self.split(name).sources)

    def views_in(self, name: str) -> set[str]:
        """The views recorded in split `name` ("" for films of unknown view); empty for a version-1 index."""
        return {view for counts in self.split(name).sources.values() for view in counts.views}

    def source_view_counts(self, splits: list[str]) -> dict[str, dict[str, tuple[int, int]]]:
        """{source: {view: (n_normal, n_abnormal)}} over `splits`. A version-1 index knows no views:
        its counts come under the view "" of the source "iu"."""
        self.check_splits(splits)
        out: dict[str, dict[str, list[int]]] = {}
        for name in splits:
            for source, counts in self.splits[name].sources.items():
                for view, (normal, abnormal) in (counts.views or {"": (counts.normal, counts.abnormal)}).items():
                    cell = out.setdefault(source, {}).setdefault(view, [0, 0])
                    cell[0] += normal
                    cell[1] += abnormal
        return {s: {v: (c[0], c[1]) for v, c in views.items()} for s, views in out.items()}

    def check_read_settings(self, data: DataConfig, where: str = "the config") -> None:
        """Refuse settings that `prepare` baked into these shards and that `data` says otherwise
        (data.image_size, data.resize, data.intensity): a run would train on one preprocessing and
        then predict and serve with another (predict reads films with the run's settings)."""
        baked = {"image_size": self.prepared.image_size, "resize": self.prepared.resize,
                 "intensity": self.prepared.intensity}
        wrong = [f"data.{k} = {getattr(data, k)!r} (the shards have {v!r})" for k, v in baked.items()
                 if v is not None and getattr(data, k) != v]
        if wrong:
            raise ConfigError(f"{where} does not match how the shards in {self.root} were prepared: {'; '.join(wrong)}. "
                              "Use the shards' settings (--data.image_size ... as prepared) or prepare again with yours")

    def finding_counts(self, name: str, source: str | None = None) -> dict[str, FindingCounts]:
        """{finding: FindingCounts} of split `name` (of one `source` of it), in vocabulary order;
        {} for shards without a findings vocabulary."""
        split = self.split(name)
        if source is None:
            return dict(split.findings)
        counts = split.sources.get(source)
        return dict(counts.findings) if counts is not None else {}

    def annotated(self, source: str) -> tuple[str, ...]:
        """The findings of the vocabulary that `source` labels, any_finding included (last); () for
        shards without a vocabulary. The others are masked in every sample of the source."""
        if not self.findings:
            return ()
        info = next((s for s in self.sources if s.name == source), None)
        if info is None:
            raise DataError(f"source {source!r} is not in {self.root} (has: {', '.join(s.name for s in self.sources)})")
        return tuple(f for f in self.findings if f in info.annotated_findings or f == ANY_FINDING)

    @property
    def has_views(self) -> bool:
        """Whether the index records each sample's view (version 2)."""
        return self.version >= 2

    def with_split(self, name: str, shards: list[Shard]) -> "ShardIndex":
        """A copy with one more split, `name`, made of `shards` (whole shards of this index, e.g. a
        sample of the training shards for a loader); its label counts are unknown."""
        split = Split(name=name, total=sum(s.count for s in shards), labels=None, shards=tuple(shards), sources={})
        return dataclasses.replace(self, splits={**self.splits, name: split})


load_index = ShardIndex.load  # the function every entry point calls


def has_shard_index(folder: str | Path) -> bool:
    """Whether `folder` holds an index.json that says it is a cxr-dist shard index (its format),
    complete or not: prepare adopts a folder of a version before its marker file by it."""
    try:
        return json.loads((Path(folder) / "index.json").read_text()).get("format") == INDEX_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _split(name: str, raw: dict, root: str) -> Split:
    """One split of the JSON: its shards under `root`, its counts; a split without per-source
    counts (version 1) is all of the source "iu", views unknown."""
    labels = raw.get("labels")
    counts = (labels["normal"], labels["abnormal"]) if labels is not None else None
    sources = {src: _counts(info) for src, info in (raw.get("sources") or {}).items()}
    if not sources:
        sources = {LEGACY_SOURCE: Counts(total=int(raw.get("total", 0)), normal=counts[0] if counts else 0,
                                         abnormal=counts[1] if counts else 0, patients=raw.get("patients"),
                                         uids=raw.get("uids"))}
    shards = tuple(Shard(str(Path(root) / s["file"]), int(s["count"]), s.get("source", LEGACY_SOURCE))
                   for s in raw.get("shards", ()))
    return Split(name=name, total=int(raw.get("total", 0)), labels=counts, shards=shards, sources=sources,
                 patients=raw.get("patients"), uids=raw.get("uids"), findings=_finding_counts(raw))


def _counts(raw: dict) -> Counts:
    labels = raw.get("labels") or {}
    return Counts(total=int(raw.get("total", 0)), normal=int(labels.get("normal", 0)),
                  abnormal=int(labels.get("abnormal", 0)), patients=raw.get("patients"), uids=raw.get("uids"),
                  views={view: (int(c["normal"]), int(c["abnormal"])) for view, c in (raw.get("views") or {}).items()},
                  findings=_finding_counts(raw))


def _finding_counts(raw: dict) -> dict[str, FindingCounts]:
    """A split's (or a split's source's) `findings` counts; {} when the index has none."""
    return {name: FindingCounts(int(c["positive"]), int(c["negative"]), int(c["masked"]))
            for name, c in (raw.get("findings") or {}).items()}


def _source_findings(raw: dict) -> dict:
    """SourceInfo's findings fields from a source's `findings` entry (absent: the defaults)."""
    if not raw:
        return {}
    return {"annotated_findings": tuple(raw.get("annotated", ())), "findings_map": tuple(raw.get("findings_map", ())),
            "uncertain": raw.get("uncertain", "mask"), "blank": raw.get("blank", "mask")}


def train_val_splits(data_cfg: DataConfig) -> tuple[list[str], str]:
    """(training split names, validation split name) for the configured fold: the splits of the
    index that a run trains on and validates on. (Here, not in split.py, so that a training
    process need not import pandas.)

    k_folds == 0 -> (["train"], "val"); k_folds == K -> every fold but data.fold, and f"fold{fold}".
    """
    if data_cfg.k_folds > 0:
        folds = [f"fold{i}" for i in range(data_cfg.k_folds)]
        val = f"fold{data_cfg.fold}"
        return [f for f in folds if f != val], val
    return ["train"], "val"
