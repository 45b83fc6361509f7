"""Patient-level, label-stratified, seeded splits (train/val/test, or test + k folds), per source.

The patient is the unit: all their films (the frontal and lateral views of a study, the follow-ups
of an NIH patient) land in the same split, otherwise near-identical images would sit on both sides
and inflate validation numbers. IU X-ray has no patient id, so there the unit is the study (uid).
Each source is split on its own with the same seed, so adding a source does not move the others'
patients (IU's test split is the same with or without Kermany: paired comparisons stay possible).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..config import DataConfig
from ..errors import DataError


def split_names(k_folds: int) -> list[str]:
    """Shard split names in a fixed order: train, val, test; or fold0..fold{k-1}, test."""
    if k_folds > 0:
        return [f"fold{i}" for i in range(k_folds)] + ["test"]
    return ["train", "val", "test"]


def _sorted_uids(uids: pd.Series) -> list[str]:
    # Numeric uids sort numerically (Kaggle), others as text; never depends on row order.
    vals = sorted(set(map(str, uids)))
    return sorted(vals, key=lambda u: (0, int(u), u) if u.isdigit() else (1, 0, u))


def split_by_source(df: pd.DataFrame, data_cfg: DataConfig) -> pd.Series:
    """Split name for every row of a multi-source table (columns source, role, patient, label):
    each "train" source split by patient with assign_splits; "external" sources -> "external"."""
    out = pd.Series("external", index=df.index, name="split")
    for _, part in df[df["role"] == "train"].groupby("source", sort=False):
        out[part.index] = assign_splits(part, data_cfg.val_frac, data_cfg.test_frac, data_cfg.k_folds,
                                        data_cfg.seed, unit="patient")
    return out


def assign_splits(df: pd.DataFrame, val_frac: float, test_frac: float, k_folds: int, seed: int,
                  unit: str = "uid") -> pd.Series:
    """Split name for every row of ``df`` (columns ``unit``, ``label``), decided per unit (uid or patient).

    Per label, the uids are put in a fixed order and permuted by ``seed``; the first
    round(test_frac * n) go to ``test``. Without folds the next round(val_frac * n) go to ``val``
    and the rest to ``train``. With ``k_folds = K`` the rest is dealt round-robin to
    ``fold0..fold{K-1}`` (val_frac is not used). Same uids, labels and seed -> same assignment,
    whatever the row order.
    """
    if df.empty:
        raise DataError("cannot split an empty manifest")
    # A uid's views share one report, one label; a patient is abnormal if any film is.
    per_uid = df.groupby(unit, sort=False)["label"].max()
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
    return df[unit].astype(str).map(assignment).rename("split")
