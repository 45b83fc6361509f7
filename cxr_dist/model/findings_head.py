"""What the findings head learns from (issue 22, docs/findings.md): its targets, looked up by
sample key, and its loss.

The head itself is one Linear beside the abnormal head (CXRClassifier.findings_head): one
sigmoid per finding of the shards' vocabulary, `any_finding` excepted (that is the abnormal
head, which stays the headline output: the product's probability, calibration, threshold and
OOD score are all of it, unchanged).

    head_findings(index)                  the findings a model trained on these shards predicts
    FindingsTable.build(index, splits, names)   sample key -> (targets, mask), read once from the shards
    positive_weights(index, splits, names)      n_negative / n_positive per finding (BCE's pos_weight)
    MaskedBCE(pos_weight)(logits, targets, mask)   the mean BCE over the annotated entries only

Targets come by key rather than with the batch: the frozen-compute cache's batches hold features
and labels, not the json, so one lookup serves streamed and cached batches alike (as text does).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..data.index import ShardIndex
from ..data.text import sample_metas

ANY_FINDING = "any_finding"  # the abnormal head's label (data/findings.py): never a findings-head output
MAX_POS_WEIGHT = 100.0  # a finding with 3 positives in 3,000 would otherwise weigh each one 1,000 times


def head_findings(index: ShardIndex) -> tuple[str, ...]:
    """The findings a model trained on `index` predicts: its vocabulary without any_finding; ()
    for shards without findings."""
    return tuple(f for f in index.findings if f != ANY_FINDING)


def align(values: torch.Tensor, mask: torch.Tensor, have: Sequence[str], want: Sequence[str]
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of a batch in vocabulary `have` -> the columns of `want` (a model's findings); a
    finding the batch's shards do not carry is masked."""
    out_v = torch.zeros(values.shape[0], len(want), dtype=torch.float32)
    out_m = torch.zeros(values.shape[0], len(want), dtype=torch.bool)
    for j, name in enumerate(want):
        if name in have:
            i = list(have).index(name)
            out_v[:, j], out_m[:, j] = values[:, i].float(), mask[:, i]
    return out_v, out_m


class FindingsTable:
    """Sample key -> the targets and mask of a model's findings (a plain object: never saved)."""

    def __init__(self, names: Sequence[str], rows: dict[str, tuple[list[float], list[bool]]]) -> None:
        self.names = tuple(names)
        self.row = {k: i for i, k in enumerate(rows)}
        self.targets = torch.tensor([v for v, _ in rows.values()], dtype=torch.float32).reshape(len(rows), len(names))
        self.mask = torch.tensor([m for _, m in rows.values()], dtype=torch.bool).reshape(len(rows), len(names))

    @classmethod
    def build(cls, index: ShardIndex, splits: Iterable[str], names: Sequence[str]) -> "FindingsTable":
        """Read the targets of every sample of `splits` from the shards' json (no image decoded)."""
        rows = {}
        for key, meta in sample_metas(index, splits):
            targets = meta.get("finding_targets") or {}
            rows[key] = ([float(targets.get(n, 0)) for n in names], [n in targets for n in names])
        return cls(names, rows)

    def lookup(self, keys: Sequence[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(targets, mask), B x F, for a batch's keys; a key the table lacks is all masked."""
        idx = [self.row.get(k, -1) for k in keys]
        known = torch.tensor([i >= 0 for i in idx], dtype=torch.bool)
        take = torch.tensor([max(i, 0) for i in idx], dtype=torch.long)
        targets = self.targets[take] * known[:, None] if len(self.row) else torch.zeros(len(keys), len(self.names))
        mask = (self.mask[take] & known[:, None]) if len(self.row) else torch.zeros(len(keys), len(self.names), dtype=torch.bool)
        return targets.to(device), mask.to(device)


def positive_weights(index: ShardIndex, splits: Sequence[str], names: Sequence[str]) -> torch.Tensor:
    """BCE's pos_weight per finding: n_negative / n_positive over the annotated images of `splits`
    (so a rare finding's positives count as much as its negatives), within [1, MAX_POS_WEIGHT];
    1 for a finding without positives (nothing to up-weight)."""
    counts = [index.finding_counts(s) for s in splits]  # once per split, not per finding
    out = []
    for name in names:
        pos = sum(c[name].positive for c in counts if name in c)
        neg = sum(c[name].negative for c in counts if name in c)
        out.append(min(max(neg / pos, 1.0), MAX_POS_WEIGHT) if pos else 1.0)
    return torch.tensor(out, dtype=torch.float32)


class MaskedBCE(nn.Module):
    """Binary cross-entropy per finding over the annotated entries only (a masked entry adds
    nothing, not even to the count), with a positive weight per finding; 0 for a batch in which
    nothing is annotated (e.g. only a source that labels none of the head's findings)."""

    def __init__(self, pos_weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("pos_weight", pos_weight.float(), persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        per = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none",
                                                 pos_weight=self.pos_weight.to(logits.device))
        m = mask.to(per.dtype)
        return (per * m).sum() / m.sum().clamp_min(1.0)
