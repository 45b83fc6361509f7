# Shared by prepare.sh, train.sh and kfold.sh (sourced, not run). Nothing here to edit.
#
# Environment a user may set when submitting (sbatch passes the environment on):
#   CXR_VENV               virtual environment to use (default .venv; if it has no bin/python,
#                          the python already on PATH is used, e.g. an activated venv/conda env)
#   CXR_ACCELERATE_CONFIG  launch/<name>.yaml, or "auto" (default): cpu_2proc / gpu_1 / gpu_multi /
#                          multinode chosen from the allocation by cxr_dist.runs.slurm_launch
#   CXR_PROCS_PER_NODE     processes per node (default: the GPUs SLURM gave the node)
#   CXR_RUN_DIR            run folder (default runs/<job name>-<job id>, stable across requeues)

# sbatch runs a copy of the script from its spool folder: locate the checkout by where the job
# was submitted from (submit from the repository root), or CXR_ROOT.
cxr_setup() {
    CXR_ROOT="${CXR_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
    cd "$CXR_ROOT" || { echo "cannot cd to $CXR_ROOT" >&2; exit 2; }
    if [ ! -d cxr_dist ] || [ ! -f pyproject.toml ]; then
        echo "$CXR_ROOT is not the cxr-dist repository root: submit from there (or set CXR_ROOT)" >&2
        exit 2
    fi
    local venv="${CXR_VENV:-.venv}"
    if [ -x "$venv/bin/python" ]; then
        export PATH="$(cd "$venv/bin" && pwd):$PATH"
        export VIRTUAL_ENV="$(cd "$venv" && pwd)"
    fi
    PY="$(command -v python || command -v python3)"
    "$PY" -c "import cxr_dist" 2>/dev/null || {
        echo "python ($PY) cannot import cxr_dist: set CXR_VENV or activate the environment" >&2
        exit 2
    }
    export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
    echo "[cxr] job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?} (restart ${SLURM_RESTART_COUNT:-0}), python $PY, $(date -Is)"
}

# cxr_override KEY ARGS...: the last value given for --KEY / --KEY=V in ARGS (empty if none).
cxr_override() {
    local key="--$1" val="" prev=""
    shift
    for a in "$@"; do
        if [ "$prev" = "$key" ]; then val="$a"; fi
        case "$a" in "$key="*) val="${a#"$key="}" ;; esac
        prev="$a"
    done
    printf '%s' "$val"
}

# cxr_train RUN_DIR TRAIN_ARGS...: one launcher per node; checkpoint + requeue on USR1.
# Exits with the training's status, or 0 after requeueing a preempted run.
cxr_train() {
    RUN_DIR="$1"
    shift
    mkdir -p "$RUN_DIR"
    # Markers of the previous run of this job: PREEMPT would stop the resumed run at once,
    # PREEMPTED would requeue a run that finished.
    rm -f "$RUN_DIR/PREEMPT" "$RUN_DIR/PREEMPTED"
    # SLURM sends USR1 to this shell only (--signal=B:USR1@s). The file reaches every rank on
    # every node; we deliberately do NOT forward USR1 to srun: the torchrun agent inside
    # `accelerate launch` does not handle USR1 and would die (killing the workers) instead.
    trap 'echo "[cxr] $(date -Is) got USR1: asking training to checkpoint ($RUN_DIR/PREEMPT)"; touch "$RUN_DIR/PREEMPT"' USR1
    trap 'echo "[cxr] $(date -Is) got TERM"; touch "$RUN_DIR/PREEMPT"' TERM
    local nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
    srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 \
        --cpus-per-task="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}" --kill-on-bad-exit=1 \
        "$PY" -m cxr_dist.runs.slurm_launch -- --train.run_dir "$RUN_DIR" "$@" &
    local pid=$! rc
    # `wait` returns early (status > 128) when a trapped signal arrives: wait again until srun ends.
    while :; do
        wait "$pid"
        rc=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    trap - USR1 TERM
    # Training says "checkpoint saved, requeue me" with run_dir/PREEMPTED and exit 0 (not a
    # special exit code: torchrun turns any non-zero worker exit into 1).
    if [ "$rc" = 0 ] && [ -f "$RUN_DIR/PREEMPTED" ]; then
        # In a job array, SLURM_JOB_ID of one task may be the array's own id (the last task to
        # start gets it), and `scontrol requeue <array id>` requeues EVERY task of the array:
        # name this task as <array id>_<task id> (as Lightning's SLURM environment does).
        local target="$SLURM_JOB_ID"
        if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
            target="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
        fi
        echo "[cxr] $(date -Is) preempted: checkpoint saved in $RUN_DIR; requeueing job $target"
        if scontrol requeue "$target"; then
            exit 0
        fi
        if [ "$target" != "$SLURM_JOB_ID" ]; then
            echo "[cxr] requeue refused: resubmit this task with --array=${SLURM_ARRAY_TASK_ID}," \
                "CXR_RUN_DIR=${RUN_DIR%-fold*} and --tracking.campaign ${CXR_CAMPAIGN:-$SLURM_ARRAY_JOB_ID}" \
                "to resume" >&2
        else
            echo "[cxr] requeue refused: resubmit with CXR_RUN_DIR=$RUN_DIR to resume" >&2
        fi
        exit 99  # preempted and not requeued: the checkpoint is there, the job is not finished
    fi
    echo "[cxr] $(date -Is) training exited with $rc"
    exit "$rc"
}
