#!/usr/bin/env bash
# k-fold cross-validation: one array task per fold, each a full (multi-GPU) training run.
# Edit here: partition, account, time, GPUs/CPUs per fold; --array=0-(K-1) must match
# data.k_folds of the shards (prepared with that k_folds) - or pass --array to sbatch.
#
#   sbatch slurm/kfold.sh --config configs/x.toml                     # K=5: folds 0-4
#   sbatch --array=0-2 slurm/kfold.sh --config configs/x.toml --data.k_folds 3
#   cxr-dist folds --experiment NAME                                  # afterwards: summary
#
# Each task trains with --data.fold <task id> and the MLflow tag fold=<task id>, in
# runs/<job name>-<array job id>-fold<task id> (or $CXR_RUN_DIR-fold<task id>); preempted folds
# requeue and resume on their own (only that task), like slurm/train.sh. All folds of one array
# form one campaign (--tracking.campaign <array job id>): MLflow runs nested under one parent
# run, which `cxr-dist folds` summarises. To re-run fold 2 of campaign 1234 later:
#   CXR_RUN_DIR=runs/cxr-kfold-1234 sbatch --array=2 slurm/kfold.sh ... --tracking.campaign 1234
#SBATCH --job-name=cxr-kfold
##SBATCH --partition=gpu
##SBATCH --account=myaccount
#SBATCH --array=0-4
#SBATCH --time=24:00:00
#SBATCH --nodes=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%A_%a.out

set -uo pipefail
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"
cxr_setup

FOLD="${SLURM_ARRAY_TASK_ID:?kfold.sh is an array job: submit it with sbatch (--array=0-K-1)}"
BASE="${CXR_RUN_DIR:-runs/${SLURM_JOB_NAME:-cxr-kfold}-${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}}"
# The campaign: the user's --tracking.campaign (re-running a fold of an earlier array), else the
# array job id, the same for every task and kept across requeues.
CXR_CAMPAIGN="$(cxr_override tracking.campaign "$@")"
CXR_CAMPAIGN="${CXR_CAMPAIGN#\"}"
CXR_CAMPAIGN="${CXR_CAMPAIGN%\"}"
CXR_CAMPAIGN="${CXR_CAMPAIGN:-${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}}"
echo "[cxr] fold $FOLD of campaign $CXR_CAMPAIGN"
# Fold settings go last so that they win over the config file and the user's overrides. Values
# are TOML: the campaign is quoted, or 1234 would be read as a number.
cxr_train "$BASE-fold$FOLD" "$@" --data.fold "$FOLD" --tracking.tags "[\"fold=$FOLD\"]" \
    --tracking.campaign "\"$CXR_CAMPAIGN\""
