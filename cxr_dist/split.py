"""Uid-level, label-stratified, seeded splits (train/val/test, or test + k folds).

The uid (one study) is the unit: its frontal and lateral views always land in the same split,
otherwise near-identical images would sit on both sides and inflate validation numbers.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .config import DataConfig
from .errors import DataError


def split_names(k_folds: int) -> list[str]:
    """Shard split names in a fixed order: train, val, test; or fold0..fold{k-1}, test."""
    if k_folds > 0:
        return [f"fold{i}" for i in range(k_folds)] + ["test"]
    return ["train", "val", "test"]


def train_val_splits(data_cfg: DataConfig) -> tuple[list[str], str]:
    """(training split names, validation split name) for the configured fold.

    k_folds == 0 -> (["train"], "val"); k_folds == K -> every fold but data.fold, and f"fold{fold}".
    """
    if data_cfg.k_folds > 0:
        folds = [f"fold{i}" for i in range(data_cfg.k_folds)]
        val = f"fold{data_cfg.fold}"
        return [f for f in folds if f != val], val
    return ["train"], "val"


def _sorted_uids(uids: pd.Series) -> list[str]:
    # Numeric uids sort numerically (Kaggle), others as text; never depends on row order.
    vals = sorted(set(map(str, uids)))
    return sorted(vals, key=lambda u: (0, int(u), u) if u.isdigit() else (1, 0, u))


def assign_splits(df: pd.DataFrame, val_frac: float, test_frac: float, k_folds: int, seed: int) -> pd.Series:
    """Split name for every row of ``df`` (columns ``uid``, ``label``), decided per uid.

    Per label, the uids are put in a fixed order and permuted by ``seed``; the first
    round(test_frac * n) go to ``test``. Without folds the next round(val_frac * n) go to ``val``
    and the rest to ``train``. With ``k_folds = K`` the rest is dealt round-robin to
    ``fold0..fold{K-1}`` (val_frac is not used). Same uids, labels and seed -> same assignment,
    whatever the row order.
    """
    if df.empty:
        raise DataError("cannot split an empty manifest")
    per_uid = df.groupby("uid", sort=False)["label"].max()  # a uid's views share one report, one label
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    dealt = 0  # carried across labels so that the folds' sizes differ by at most one uid
    for label in (0, 1):
        uids = _sorted_uids(per_uid.index[per_uid.to_numpy() == label].to_series())
        order = [uids[i] for i in rng.permutation(len(uids))]
        n = len(order)
        n_test = min(n, int(round(test_frac * n)))
        for u in order[:n_test]:
            assignment[u] = "test"
        rest = order[n_test:]
        if k_folds > 0:
            for i, u in enumerate(rest):
                assignment[u] = f"fold{(dealt + i) % k_folds}"
            dealt += len(rest)
        else:
            n_val = min(len(rest), int(round(val_frac * n)))
            for i, u in enumerate(rest):
                assignment[u] = "val" if i < n_val else "train"
    return df["uid"].astype(str).map(assignment).rename("split")
