"""Text-encoding rate of the text encoder (cxr_dist/model/text_encoder.py) over the real IU reports.

    .venv/bin/python bench/bench_text.py                      # the offline default, CPU, all reports
    .venv/bin/python bench/bench_text.py --device cuda        # the same on the GPU
    .venv/bin/python bench/bench_text.py --fields findings,impression --max-tokens 64 --encoder DIR

Input: `indiana_reports.csv` of the team's IU copy (default ../shared/data/iu_xray_small/); each
report's text is its chosen fields, each cleaned and non-empty, as "field: text" joined by
spaces (data/text.joined_text, as in the shards). Times `TextEncoder.encode` (tokenization included, batches by length, no gradients) after a
one-batch warm-up, and prints one JSON line: reports per second, reports cut at max_tokens, the mean
number of tokens, the encoder and the machine. Without the CSV it says so and exits 0.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from cxr_dist.data.text import joined_text
from cxr_dist.model.text_encoder import build_text_encoder

DEFAULT_CSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "iu_xray_small" / "indiana_reports.csv"
FIELDS = ("indication", "comparison", "findings", "impression")


def report_texts(path: Path, fields: list[str]) -> list[str]:
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in fields if rows and c not in rows[0]]
    if missing:
        raise SystemExit(f"bench_text: {path} has no column {', '.join(missing)} (has {', '.join(rows[0])})")
    return [joined_text(row, fields) for row in rows]  # as the shards join them


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="indiana_reports.csv")
    ap.add_argument("--fields", default=",".join(FIELDS), help="comma-separated report columns")
    ap.add_argument("--encoder", default="", help='model.text_encoder ("" = the offline default)')
    ap.add_argument("--pooling", default="mean")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N reports (0: all)")
    args = ap.parse_args(argv)

    if not args.csv.is_file():
        print(f"bench_text: skipped, no reports at {args.csv} (give --csv PATH)", file=sys.stderr)
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_text: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    fields = [c.strip() for c in args.fields.split(",") if c.strip()]
    texts = report_texts(args.csv, fields)
    if args.limit:
        texts = texts[: args.limit]

    start = time.perf_counter()
    enc = build_text_encoder(args.encoder, pooling=args.pooling, max_tokens=args.max_tokens)
    enc.to(args.device)
    load_s = time.perf_counter() - start
    enc.encode(texts[: args.batch_size], batch_size=args.batch_size)  # warm-up (kernels, allocator)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    vectors, n_truncated = enc.encode(texts, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    lengths = enc.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    tokens = [min(len(t), args.max_tokens) for t in lengths]

    print(json.dumps({
        "bench": "text_encode",
        "reports": len(texts),
        "reports_per_s": round(len(texts) / seconds, 1),
        "seconds": round(seconds, 2),
        "load_s": round(load_s, 2),
        "n_truncated": n_truncated,
        "mean_tokens": round(sum(tokens) / max(len(tokens), 1), 1),
        "empty_reports": sum(not t for t in texts),
        "dim": int(vectors.shape[1]),
        "encoder": enc.name,
        "pooling": args.pooling,
        "max_tokens": args.max_tokens,
        "batch_size": args.batch_size,
        "fields": fields,
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
