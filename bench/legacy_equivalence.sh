#!/usr/bin/env bash
# Does this checkout train exactly like an older one? A short real cached run, before and after.
#
#   bash bench/legacy_equivalence.sh REV [IU_DIR]     # e.g. REV = 61e9171, IU_DIR = ../shared/data/iu_xray_small
#
# Checks REV out into a temporary git worktree (its own code, this checkout's .venv), prepares the
# IU folder with each code version, trains configs/iu_xray_cached.toml on a short schedule (1 cached
# view, 2 + 1 epochs) with each, and compares what the runs left behind with
# bench/compare_histories.py --new-fields-ok: every field the old run reports must be identical
# (timing aside); fields only the new code reports (per-source metrics ...) are listed. OUT
# (default out/legacy) keeps both runs.
set -euo pipefail
cd "$(dirname "$0")/.."
REV="${1:?usage: bench/legacy_equivalence.sh REV [IU_DIR]}"
DATA="${2:-../shared/data/iu_xray_small}"
OUT="${OUT:-out/legacy}"
ROOT="$PWD"
mkdir -p "$OUT"
OLD="$(mktemp -d)/old"
git worktree add --detach "$OLD" "$REV" >/dev/null
trap 'git worktree remove --force "$OLD"' EXIT
SHORT=(--train.cache_views 1 --train.phases.0.epochs 2 --train.phases.1.epochs 1 --tracking.enabled false)
for side in before after; do
    tree="$ROOT"; [ "$side" = before ] && tree="$OLD"
    rm -rf "$ROOT/$OUT/$side"
    (cd "$tree" && PYTHONPATH="$tree" "$ROOT/.venv/bin/python" -m cxr_dist.data.prepare --config configs/iu_xray_cached.toml \
        --data "$ROOT/$DATA" --out "$ROOT/$OUT/$side/shards" >/dev/null \
     && PYTHONPATH="$tree" "$ROOT/.venv/bin/python" -m cxr_dist.train --config configs/iu_xray_cached.toml \
        --data.shards_dir "$ROOT/$OUT/$side/shards" --train.run_dir "$ROOT/$OUT/$side/run" "${SHORT[@]}" \
        > "$ROOT/$OUT/$side.log" 2>&1)
done
.venv/bin/python bench/compare_histories.py --new-fields-ok "$OUT/before/run" "$OUT/after/run"
