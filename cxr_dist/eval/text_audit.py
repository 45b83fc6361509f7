"""`cxr-dist audit-text --shards DIR`: how much of the label each text field gives away, before
anyone trains on it.

For each text field of the shards (IU: indication, comparison, findings, impression) and for the
input a config would read (`--fields`, joined as the model reads them), a linear model on the text
alone: TF-IDF of words and word pairs + logistic regression, fitted on the training split's studies
and scored on the validation split's (AUROC with its 95% interval, study level: a report belongs to
its study, and both views share it). A field from which the label was derived (index.json
`label_text_fields`, IU: findings and impression) scores near 1: reading it at prediction time reads
the label. The fields known before the film is read score what text can honestly add.

    cxr-dist audit-text --shards out/shards                       # a table, one row per field
    cxr-dist audit-text --shards out/shards --fields indication comparison --json
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from ..errors import UserError, run_main

if TYPE_CHECKING:  # annotations only: the data stage is imported after `--help`, inside the functions
    from ..data.index import ShardIndex

LEAK_AUROC = 0.9  # a text-only AUROC above this says: the label can be read from the text


def study_texts(index: ShardIndex, split: str, fields: tuple[str, ...]) -> tuple[list[str], list[int]]:
    """One (joined text, label) per study of `split` (the first sample of each uid)."""
    from ..data.text import joined_text, sample_metas

    seen, texts, labels = set(), [], []
    for _, meta in sample_metas(index, [split]):
        uid = str(meta.get("uid", ""))
        if uid in seen:
            continue
        seen.add(uid)
        texts.append(joined_text(meta.get("text") or {}, fields))
        labels.append(int(meta["label"]))
    return texts, labels


def audit_field(index: ShardIndex, fields: tuple[str, ...], train_split: str = "train", val_split: str = "val") -> dict:
    """Validation AUROC (study level, with a bootstrap interval) of TF-IDF + logistic regression
    on `fields` alone; "auroc" is None when the texts are empty or val has one class."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from .metrics import auroc_interval, compute_metrics

    x_train, y_train = study_texts(index, train_split, fields)
    x_val, y_val = study_texts(index, val_split, fields)
    filled = sum(1 for x in x_train if x)
    out = {"fields": list(fields), "train_studies": len(x_train), "val_studies": len(x_val),
           "train_with_text": filled, "auroc": None, "auroc_ci95": None}
    if filled < 10 or len(set(y_train)) < 2 or len(set(y_val)) < 2:
        return out
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    try:
        xt = vec.fit_transform(x_train)
    except ValueError:  # nothing left after min_df: every text empty or unique
        return out
    clf = LogisticRegression(max_iter=2000, class_weight="balanced").fit(xt, y_train)
    p = clf.predict_proba(vec.transform(x_val))[:, 1]
    out["auroc"] = float(compute_metrics(p, np.asarray(y_val))["auroc"])
    out["auroc_ci95"] = auroc_interval(p, y_val)
    return out


def audit(index: ShardIndex, fields: list[tuple[str, ...]], train_split: str = "train", val_split: str = "val") -> list[dict]:
    """`audit_field` for each group of fields, each row marked with whether some source's label was
    derived from one of its fields (`label_field`) and whether the text alone reads the label (`leak`)."""
    from ..data.text import leaky_fields

    rows = []
    for group in fields:
        row = audit_field(index, group, train_split, val_split)
        row["label_field"] = bool(leaky_fields(index, group))
        row["leak"] = row["label_field"] or (row["auroc"] is not None and row["auroc"] >= LEAK_AUROC)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'text input':<34} {'val AUROC':>9}  {'95% interval':<15} {'train texts':>11}  verdict"]
    for r in rows:
        auc = f"{r['auroc']:.3f}" if r["auroc"] is not None else "n/a"
        ci = f"{r['auroc_ci95'][0]:.3f}-{r['auroc_ci95'][1]:.3f}" if r["auroc_ci95"] else ""
        verdict = ("LEAK: the label was derived from it" if r["label_field"] else
                   "LEAK: the text alone reads the label" if r["leak"] else
                   "no text" if r["auroc"] is None else "usable input")
        lines.append(f"{' + '.join(r['fields']):<34} {auc:>9}  {ci:<15} {r['train_with_text']:>11}  {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cxr-dist audit-text", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--shards", required=True, help="a folder written by `cxr-dist prepare`")
    ap.add_argument("--fields", nargs="+", metavar="FIELD",
                    help="also audit these fields joined, as a model with loader.text_fields = FIELDS reads them")
    ap.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")
    args = ap.parse_args(argv)
    from ..data.index import load_index
    from ..data.text import source_text_fields

    index = load_index(args.shards)
    have = sorted({f for info in source_text_fields(index).values() for f in info["text_fields"]})
    if not have:
        raise UserError(f"the shards in {args.shards} carry no text fields (prepared before text fields existed, "
                        "or no source has text): run `cxr-dist prepare` again")
    unknown = [f for f in args.fields or [] if f not in have]
    if unknown:
        raise UserError(f"--fields {' '.join(unknown)}: not in the shards (they have: {', '.join(have)})")
    for split in ("train", "val"):
        if not index.has_split(split):
            raise UserError(f"the shards in {args.shards} have no {split!r} split (k-fold shards: not supported yet)")
    groups = [(f,) for f in have] + ([tuple(args.fields)] if args.fields and len(args.fields) > 1 else [])
    rows = audit(index, groups)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(run_main("cxr-dist audit-text", main))
