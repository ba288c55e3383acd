#!/bin/bash
# EfficientNet-Lite0, offline ImageNet weights, fine-tuned (lesionkit/recipes/efficientnet_lite0.yaml).
#   sbatch jobs/efficientnet_lite0.sh                                   # 1 node; CPU unless the job gets GPUs:
#   sbatch --gpus-per-node=4 --cpus-per-task=32 jobs/efficientnet_lite0.sh  # 1 node, 4 GPUs (DDP, bf16, 8 loader CPUs each)
#   sbatch --nodes=2 --gpus-per-node=4 --cpus-per-task=32 jobs/efficientnet_lite0.sh  # 2 nodes x 4 GPUs
#   LK_TRAIN=/data/train LK_VAL=/data/val LK_EPOCHS=5 sbatch jobs/efficientnet_lite0.sh
# Every setting (data, recipe, epochs, GPUs, output, extra trainer flags) is an LK_* environment variable:
# see jobs/_launch.sh. GPUs are not requested here so the script also runs on CPU-only partitions;
# on a GPU cluster add them on the sbatch command line (or uncomment the --gpus-per-node line), with CPUs
# for the loader workers: the trainer gives each process cpus-per-task / GPUs of them (its plan says so).
#SBATCH --job-name=lk-efficientnet_lite0
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
##SBATCH --gpus-per-node=1
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue

LK_RECIPE=${LK_RECIPE:-efficientnet_lite0}
if [ -z "${LK_REPO:-}" ]; then  # sbatch runs a copy of this file: ask Slurm where the original lives
  script=${BASH_SOURCE[0]}
  [ -z "${SLURM_JOB_ID:-}" ] || script=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
  LK_REPO=$(cd "$(dirname "$script")/.." && pwd)
fi
source "$LK_REPO/jobs/_launch.sh"
