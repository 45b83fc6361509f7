#!/usr/bin/env bash
# Train one model: one `accelerate launch` per node, all GPUs of every node.
# Edit here: partition, account, time, nodes, GPUs and CPUs per node (the #SBATCH lines; ##SBATCH
# lines are switched off). Any of them can also be given to sbatch, which wins over this file.
#
#   sbatch slurm/train.sh --config configs/x.toml [--data.shards_dir S --train.phases.0.lr 3e-4 ...]
#   sbatch --nodes=2 slurm/train.sh --config configs/x.toml          # multi-node: nothing else
#   CXR_RUN_DIR=runs/mine sbatch slurm/train.sh --config ...          # choose the run folder
#
# Submit from the repository root. Preemption / time limit: SLURM sends USR1 to this script
# 300 s before the end; training checkpoints, the job requeues itself and resumes (same run_dir,
# same MLflow run). See docs/cluster.md.
#SBATCH --job-name=cxr-train
##SBATCH --partition=gpu
##SBATCH --account=myaccount
#SBATCH --time=24:00:00
#SBATCH --nodes=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out

set -uo pipefail
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"
cxr_setup

RUN_DIR="$(cxr_override train.run_dir "$@")"
RUN_DIR="${RUN_DIR:-${CXR_RUN_DIR:-runs/${SLURM_JOB_NAME:-cxr-train}-${SLURM_JOB_ID:-local}}}"
cxr_train "$RUN_DIR" "$@"
