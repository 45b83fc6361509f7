#!/usr/bin/env bash
# Build the WebDataset shards as a CPU job (decode + resize in parallel, one node).
# Edit here: partition, account, time, CPUs (the #SBATCH lines; ##SBATCH lines are off).
#
#   sbatch slurm/prepare.sh --data /path/to/iu-xray --out shards [--config configs/x.toml]
#
# Workers default to the CPUs of the job (--data.prepare_workers given explicitly wins).
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

exec "$PY" -m cxr_dist.cli prepare --data.prepare_workers "${SLURM_CPUS_PER_TASK:-2}" "$@"
