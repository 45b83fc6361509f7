"""Training on a mix of sources: how often each source is drawn, and how much each sample weighs.

Two separate levers, both from the config and the shard index:

- **Sampling** (`source_weights`): `[[data.sources]] weight` is a source's share of the training
  batches (the stream and the frozen-compute cache draw a source per sample by weight), so a
  112k-image collection does not drown a 7k-image one. Equal weights give equal shares.
- **Loss weights** (`SampleWeightedLoss`): inverse-frequency class weights computed *within each
  source* (the prevalence of "abnormal" differs between collections: 64% in IU, 74% in Kermany),
  and with `loader.balance_views` within each source's view x label cells, so that a view that is
  mostly abnormal in one source (portable AP films) cannot stand in for the label.

With one source and no view balancing the loss is exactly the classic class-weighted cross-entropy
(`F.cross_entropy(weight=...)`), so single-source runs compute what they always did.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DataConfig, sources_of

Cell = tuple[str, str, int]  # (source, view, label); view "*" = any view
ANY_VIEW = "*"


def source_weights(data: DataConfig) -> dict[str, float]:
    """{source name: sampling weight} of the configured sources."""
    return {s.name: s.weight for s in sources_of(data)}


def class_weights(counts: tuple[int, int]) -> torch.Tensor:
    """Inverse-frequency weights (n / (2 n_c)), as Keras' class_weight='balanced'."""
    n = sum(counts)
    return torch.tensor([n / (2 * max(c, 1)) for c in counts], dtype=torch.float32)


def loss_weight_table(counts: dict[str, dict[str, tuple[int, int]]], balance_views: bool) -> dict[Cell, float]:
    """Per-sample loss weights from the training split's {source: {view: (n_normal, n_abnormal)}}.

    Within a source of n images, a cell (label, or view x label with `balance_views`) holding
    n_c images weighs n / (cells * n_c): every cell contributes equally and the source's mean
    weight is 1. The label-only weight of each source is always present (view "*") for samples
    whose view has no cell of its own (e.g. a view seen only in validation).
    """
    table: dict[Cell, float] = {}
    for source, views in counts.items():
        per_label = [sum(v[y] for v in views.values()) for y in (0, 1)]
        n = sum(per_label)
        for y in (0, 1):
            table[(source, ANY_VIEW, y)] = n / (2 * max(per_label[y], 1))
        if balance_views:
            cells = {(view, y): c[y] for view, c in views.items() for y in (0, 1) if c[y]}
            for (view, y), n_c in cells.items():
                table[(source, view, y)] = n / (len(cells) * n_c)
    return table


class SampleWeightedLoss(nn.Module):
    """Cross-entropy with a weight per sample looked up by (source, view, label): the weighted mean
    sum(w_i * l_i) / sum(w_i), the same normalisation as cross-entropy with class weights.
    `table=None`: unweighted. A source the table does not know (never trained on) weighs 1."""

    def __init__(self, table: dict[Cell, float] | None) -> None:
        super().__init__()
        self.table = table
        sources = {s for s, _, _ in table or {}}
        label_only = table is not None and len(sources) == 1 and all(v == ANY_VIEW for _, v, _ in table)
        # One source, label-only weights: the classic weighted cross-entropy, bit for bit.
        self.register_buffer("by_label", torch.tensor([table[(next(iter(sources)), ANY_VIEW, y)] for y in (0, 1)])
                             if label_only else None, persistent=False)
        self.source = next(iter(sources)) if label_only else None

    def weight(self, source: str, view: str, label: int) -> float:
        t = self.table or {}
        return t.get((source, view, label), t.get((source, ANY_VIEW, label), 1.0))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, sources: list[str] | None = None,
                views: list[str] | None = None) -> torch.Tensor:
        if self.table is None:
            return F.cross_entropy(logits, labels)
        n = len(labels)
        sources = sources or [self.source or ""] * n
        if self.by_label is not None and all(s == self.source for s in sources):
            return F.cross_entropy(logits, labels, weight=self.by_label)
        views = views or [""] * n
        w = torch.tensor([self.weight(s, v, int(y)) for s, v, y in zip(sources, views, labels.tolist())],
                         dtype=logits.dtype, device=logits.device)
        return (w * F.cross_entropy(logits, labels, reduction="none")).sum() / w.sum()
