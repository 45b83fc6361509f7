"""How much normal/abnormal signal do the frozen ImageNet features carry? A linear-probe diagnostic.

    .venv/bin/python bench/probe.py [--shards out/shards] [--data ../shared/data/iu_xray_small]
                                    [--input-size 240] [--out out/probe]

One unaugmented forward pass of the frozen backbone (the offline Lite1 weights, as in
configs/iu_xray_cached.toml) over train, val and test, keeping the globally pooled output of every
stage (stage 1..7) and the 1280-d pre-logits feature the MLP head sees. Then, for several feature
sets, a logistic regression (standardised features, class-balanced, C chosen on val AUROC) trained
on train and scored on test, at image and study level (mean over a study's views).

It answers three questions of issue 6 with numbers:
  - is the head's test AUROC limited by training (the head overfits, learning rates) or by the
    features? (a linear probe, and the model's own MLP head over an lr x weight-decay grid)
  - does anything the frozen network computes, not just its last layer, carry more signal?
  - which findings are seen (AUROC of normal vs each `Problems` term on test)?
Features are saved to OUT/features_{input_size}.npz, so a rerun with other classifiers is instant.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from cxr_dist.config import LoaderConfig, ModelConfig
from cxr_dist.data.index import ShardIndex, load_index
from cxr_dist.data.sources.iu import build_manifest
from cxr_dist.eval.metrics import study_level
from cxr_dist.model.classifier import build_model
from cxr_dist.data.stream import eval_loader

ROOT = Path(__file__).resolve().parents[1]
# Problems terms of small, focal or skeletal findings (hard to see on a 256 px chest film).
FOCAL = {"Calcified Granuloma", "Granulomatous Disease", "Granuloma", "Nodule", "Calcinosis", "Density",
         "Thoracic Vertebrae", "Spine", "Osteophyte", "Spondylosis", "Deformity", "Scoliosis", "Kyphosis"}
SPLITS = ("train", "val", "test")


@torch.no_grad()
def extract(index: ShardIndex, input_size: int, batch_size: int) -> dict[str, np.ndarray]:
    """Pooled stage outputs + pre-logits of every image of every split, one forward pass each."""
    model = build_model(ModelConfig(backbone="tf_efficientnet_lite1", weights="lite1-package")).eval()
    bb = model.backbone
    data = LoaderConfig(input_size=input_size, batch_size=batch_size, num_workers=2)
    out: dict[str, list] = {"stages": [], "prelogits": [], "label": [], "key": [], "uid": [], "split": []}
    for split in SPLITS:
        start, n = time.perf_counter(), 0
        for batch in eval_loader(data, split, rank=0, world=1, index=index):
            x = bb.bn1(bb.conv_stem(model.normalize(batch["image"])))
            pooled = []
            for stage in bb.blocks:
                x = stage(x)
                pooled.append(x.mean((2, 3)))
            out["stages"].append(torch.cat(pooled, 1).numpy())
            out["prelogits"].append(bb.forward_head(bb.bn2(bb.conv_head(x)), pre_logits=True).numpy())
            out["label"].append(batch["label"].numpy())
            out["key"] += batch["key"]
            out["uid"] += batch["uid"]
            out["split"] += [split] * len(batch["key"])
            n += len(batch["key"])
        print(f"  features of {split}: {n} images, {n / (time.perf_counter() - start):.1f} img/s", flush=True)
    return {k: (np.concatenate(v) if k in ("stages", "prelogits", "label") else np.array(v)) for k, v in out.items()}


def fit_probe(x: np.ndarray, y: np.ndarray, split: np.ndarray, uid: np.ndarray) -> dict:
    """Logistic regression on train, C picked by val AUROC; AUROC on val and test (image, study)."""
    scaler = StandardScaler().fit(x[split == "train"])
    xs = scaler.transform(x)
    best = None
    for c in np.logspace(-4, 0, 9):
        clf = LogisticRegression(C=c, class_weight="balanced", max_iter=3000).fit(xs[split == "train"], y[split == "train"])
        p = clf.predict_proba(xs)[:, 1]
        val = roc_auc_score(y[split == "val"], p[split == "val"])
        if best is None or val > best[0]:
            best = (val, c, p)
    _, c, p = best
    res = {"C": float(c)}
    for s in ("train", "val", "test"):
        m = split == s
        res[f"{s}_auroc"] = roc_auc_score(y[m], p[m])
        _, sp, sy = study_level(uid[m].tolist(), p[m], y[m])
        res[f"{s}_study_auroc"] = roc_auc_score(sy, sp)
    res["probs"] = p
    return res


def head_sweep(x: np.ndarray, y: np.ndarray, split: np.ndarray, epochs: int = 15) -> list[tuple]:
    """The MLP head of the model (CXRClassifier.head) trained on the frozen pre-logits with Adam and
    class-weighted CE, batch 32, over a grid of lr x weight decay: val/test AUROC per epoch."""
    from torch import nn

    from cxr_dist.data.mixing import class_weights

    xt = torch.tensor(x)
    yt = torch.tensor(y)
    tr, va, te = (split == "train"), (split == "val"), (split == "test")
    loss_fn = nn.CrossEntropyLoss(weight=class_weights((int((y[tr] == 0).sum()), int((y[tr] == 1).sum()))))
    rows = []
    for lr in (1e-3, 1e-4, 3e-5):
        for wd in (0.0, 1e-4, 1e-3, 1e-2):
            torch.manual_seed(0)
            model = build_model(ModelConfig(pretrained=False))  # only its head is used
            head = model.head
            opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=wd)
            x_tr, y_tr, hist = xt[tr], yt[tr], []
            for _ in range(epochs):
                head.train()
                perm = torch.randperm(len(x_tr))
                for i in range(0, len(x_tr) - 31, 32):
                    idx = perm[i : i + 32]
                    opt.zero_grad()
                    loss_fn(head(x_tr[idx]), y_tr[idx]).backward()
                    opt.step()
                head.eval()
                with torch.no_grad():
                    p = torch.softmax(head(xt), 1)[:, 1].numpy()
                hist.append((roc_auc_score(y[va], p[va]), roc_auc_score(y[te], p[te])))
            best = max(range(epochs), key=lambda i: hist[i][0])
            rows.append((lr, wd, hist[0][0], hist[-1][0], best + 1, hist[best][0], hist[best][1], hist[-1][1]))
    return rows


def per_finding(probs: np.ndarray, y: np.ndarray, keys: np.ndarray, problems: dict[str, str], min_n: int) -> list:
    """Test AUROC of normal images vs the images whose Problems list a term, for common terms."""
    terms: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        if y[i] == 1:
            for t in {t.strip() for t in problems[k].split(";") if t.strip()}:
                terms.setdefault(t, []).append(i)
    normal = np.flatnonzero(y == 0)
    rows = []
    for t, idx in sorted(terms.items(), key=lambda kv: -len(kv[1])):
        if len(idx) < min_n:
            continue
        sel = np.concatenate([normal, idx])
        rows.append((t, len(idx), roc_auc_score(y[sel], probs[sel])))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=Path, default=ROOT / "out/shards")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/iu_xray_small")
    ap.add_argument("--input-size", type=int, default=240)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "out/probe")
    ap.add_argument("--min-finding", type=int, default=15, help="smallest test count of a Problems term to report")
    args = ap.parse_args()
    torch.set_num_threads(2)
    index = load_index(args.shards)  # and a clear message when the shards are missing
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / f"features_{args.input_size}.npz"
    if cache.is_file():
        f = dict(np.load(cache))
        print(f"features from {cache}")
    else:
        print(f"extracting frozen features at {args.input_size} px (torch threads: {torch.get_num_threads()})")
        f = extract(index, args.input_size, args.batch_size)
        tmp = cache.with_name(cache.stem + ".tmp.npz")
        np.savez(tmp, **f)
        tmp.replace(cache)
    y, split, uid = f["label"], f["split"], f["uid"]
    stages = f["stages"]
    widths = [16, 24, 40, 80, 112, 192, 320]  # Lite1 stage widths: stage k = columns of stages
    edges = np.cumsum([0] + widths)
    assert edges[-1] == stages.shape[1], (edges, stages.shape)
    sets = {
        "pre-logits 1280 (what the head sees)": f["prelogits"],
        "stage 7 pooled (320)": stages[:, edges[6]:edges[7]],
        "stage 6 pooled (192)": stages[:, edges[5]:edges[6]],
        "stage 5 pooled (112)": stages[:, edges[4]:edges[5]],
        "stages 4-7 + pre-logits": np.concatenate([stages[:, edges[3]:], f["prelogits"]], 1),
        "all stages + pre-logits": np.concatenate([stages, f["prelogits"]], 1),
    }
    print(f"\ninput {args.input_size} px; train/val/test images: "
          + " / ".join(str(int((split == s).sum())) for s in SPLITS))
    print("| features | dims | C | train AUROC | val AUROC | test AUROC | test study AUROC |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for name, x in sets.items():
        r = fit_probe(x, y, split, uid)
        results[name] = r
        print(f"| {name} | {x.shape[1]} | {r['C']:.0e} | {r['train_auroc']:.3f} | {r['val_auroc']:.3f} | "
              f"{r['test_auroc']:.3f} | {r['test_study_auroc']:.3f} |", flush=True)

    print("\nThe model's MLP head on the pre-logits (Adam, class-weighted CE, batch 32, 15 epochs, no augmentation)")
    print("| lr | weight decay | val AUROC epoch 1 | val AUROC epoch 15 | best epoch (val) | val AUROC there "
          "| test AUROC there | test AUROC epoch 15 |")
    print("|---|---|---|---|---|---|---|---|")
    sweep = head_sweep(f["prelogits"], y, split)
    for lr, wd, v1, v15, be, vb, tb, t15 in sweep:
        print(f"| {lr:g} | {wd:g} | {v1:.3f} | {v15:.3f} | {be} | {vb:.3f} | {tb:.3f} | {t15:.3f} |", flush=True)

    best_name = max(results, key=lambda n: results[n]["val_auroc"])
    manifest, _ = build_manifest(args.data)
    problems = dict(zip(manifest["key"], manifest["problems"].astype(str)))
    test = split == "test"
    rows = per_finding(results[best_name]["probs"][test], y[test], f["key"][test], problems, args.min_finding)
    print(f"\nTest AUROC of normal vs each finding (Problems term, >= {args.min_finding} test images), "
          f"probe: {best_name}")
    print("| Problems term | test images | AUROC vs normal |")
    print("|---|---|---|")
    for t, n, a in rows:
        print(f"| {t} | {n} | {a:.3f} |")
    # Small, focal or skeletal findings only (granulomas, nodules, calcifications, spine) against
    # the rest of the abnormal class: how much of the gap to 0.80 is the label's mix of findings?
    probs, yt = results[best_name]["probs"][test], y[test]
    focal_only = np.array([yt[i] == 1 and {t.strip() for t in problems[k].split(";")} <= FOCAL
                           for i, k in enumerate(f["key"][test])])
    other = (yt == 1) & ~focal_only
    normal = yt == 0
    print(f"\nTest images: {int(normal.sum())} normal, {int(focal_only.sum())} abnormal with only focal/skeletal "
          f"findings ({focal_only.sum() / (yt == 1).sum():.0%} of abnormal), {int(other.sum())} other abnormal")
    for name, sel in (("normal vs focal/skeletal-only abnormal", focal_only), ("normal vs other abnormal", other)):
        m = normal | sel
        print(f"  AUROC {name}: {roc_auc_score(yt[m], probs[m]):.3f}")
    summary = {n: {k: v for k, v in r.items() if k != "probs"} for n, r in results.items()}
    (args.out / f"probe_{args.input_size}.json").write_text(json.dumps(
        {"sets": summary, "head_sweep": sweep, "per_finding": rows, "best": best_name}, indent=2))


if __name__ == "__main__":
    main()
