#!/usr/bin/env bash
# Build the WebDataset shards as a CPU job: one job (decode + resize in a process pool on one
# node), or a job array over many nodes for the big collections (NIH, CheXpert, MIMIC).
# Edit here: partition, account, time, CPUs (the #SBATCH lines; ##SBATCH lines are off).
#
#   sbatch slurm/prepare.sh --data /path/to/iu-xray --out shards [--config configs/x.toml]
#   sbatch --array=0-7 slurm/prepare.sh --config my_nih.toml --out shards     # 8 tasks + merge
#   (my_nih.toml: your config with a [[data.sources]] entry of format = "nih", docs/sources.md)
#
# Workers default to the CPUs of the job (--data.prepare_workers given explicitly wins).
#
# As an array of N tasks (ids 0..N-1, or any contiguous range): task T decodes rows T, T+N, ... of
# the table into OUT/.prepare-parts/part-T-of-N.tar (`cxr-dist prepare ... --task T --tasks N`).
# The first task submits the merge, a one-task job that starts when every task has succeeded
# (--dependency=afterok:<array>; cancelled if one fails) and runs `prepare ... --merge --tasks N`:
# it writes the shards, index.json and skipped.jsonl, byte-identical to the one-job prepare of the
# same arguments, and deletes the parts. Its log sits next to the array's (name <job name>-merge).
# OUT must be on a filesystem every node sees. Rerun a failed task T of N (then the merge again):
#   CXR_PREPARE_TASKS=N sbatch --array=T slurm/prepare.sh <the same arguments>
#SBATCH --job-name=cxr-prepare
##SBATCH --partition=cpu
##SBATCH --account=myaccount
#SBATCH --time=02:00:00
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=32G
#SBATCH --output=slurm/logs/%x-%j.out

set -uo pipefail
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"
cxr_setup

PREPARE=("$PY" -m cxr_dist.cli prepare --data.prepare_workers "${SLURM_CPUS_PER_TASK:-2}")

if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
    exec "${PREPARE[@]}" "$@"
fi

# ---- one task of an array
if [ -n "${CXR_PREPARE_TASKS:-}" ]; then  # rerunning some tasks of an earlier array of N
    TASKS="$CXR_PREPARE_TASKS"
    TASK="$SLURM_ARRAY_TASK_ID"
else
    TASKS="$SLURM_ARRAY_TASK_COUNT"
    TASK=$((SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN))
    # With a step (0-10:2) or a list (0,3,7), ids minus the first are not 0..N-1: every row of the
    # table would not be decoded exactly once.
    if [ $((SLURM_ARRAY_TASK_MAX - SLURM_ARRAY_TASK_MIN + 1)) != "$TASKS" ]; then
        echo "[cxr] prepare needs a contiguous array (e.g. --array=0-7), not ids" \
            "$SLURM_ARRAY_TASK_MIN..$SLURM_ARRAY_TASK_MAX with a step or gaps" >&2
        exit 2
    fi
fi

# The first task (once: not again when requeued) submits the merge before doing its own share,
# so that the merge waits in the queue with the array. The job's SLURM_* variables are left out
# of sbatch's environment: SLURM_ARRAY_TASK_ID would make the merge look like an array task.
if [ "$SLURM_ARRAY_TASK_ID" = "$SLURM_ARRAY_TASK_MIN" ] && [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
    # The merge asks for the memory the array asked for (the #SBATCH --mem of this file would
    # win over a --mem given to the array's sbatch), and logs next to the array's logs.
    JOB_INFO="$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | tr ' ' '\n')"
    field() { printf '%s\n' "$JOB_INFO" | sed -n "s/^$1=//p" | head -n 1; }
    LOG_DIR="$(field StdOut)"
    LOG_DIR="$(dirname "${LOG_DIR:-slurm/logs/x}")"
    OPTS=(--parsable --job-name="${SLURM_JOB_NAME:-cxr-prepare}-merge" --dependency="afterok:$SLURM_ARRAY_JOB_ID"
          --kill-on-invalid-dep=yes --nodes=1 --ntasks=1 --cpus-per-task=1 --output="$LOG_DIR/%x-%j.out")
    [ -n "${SLURM_JOB_PARTITION:-}" ] && OPTS+=(--partition="$SLURM_JOB_PARTITION")
    [ -n "${SLURM_JOB_ACCOUNT:-}" ] && OPTS+=(--account="$SLURM_JOB_ACCOUNT")
    MEM_NODE="$(field MinMemoryNode)"
    MEM_CPU="$(field MinMemoryCPU)"
    if [ -n "$MEM_NODE" ]; then OPTS+=(--mem="$MEM_NODE"); elif [ -n "$MEM_CPU" ]; then OPTS+=(--mem-per-cpu="$MEM_CPU"); fi
    mapfile -t SLURM_VARS < <(compgen -e | grep '^SLURM_' | grep -v '^SLURM_CONF$')
    UNSET=()
    for v in "${SLURM_VARS[@]}"; do UNSET+=(-u "$v"); done
    if ! MERGE_JOB="$(env "${UNSET[@]}" sbatch "${OPTS[@]}" "$CXR_ROOT/slurm/prepare.sh" "$@" \
            --merge --tasks "$TASKS")"; then
        echo "[cxr] could not submit the merge job: run it after the array:" \
            "sbatch slurm/prepare.sh $* --merge --tasks $TASKS" >&2
        exit 1
    fi
    echo "[cxr] submitted merge job ${MERGE_JOB%%;*} (after array $SLURM_ARRAY_JOB_ID, $TASKS tasks)"
fi

echo "[cxr] prepare task $TASK of $TASKS"
exec "${PREPARE[@]}" "$@" --task "$TASK" --tasks "$TASKS"
