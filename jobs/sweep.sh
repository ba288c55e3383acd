#!/bin/bash
# One task of a sweep's job array: `lesionkit sweep SWEEP.yaml --slurm [--throttle N] [--sbatch ARGS]` plans
# the sweep folder and submits this script as `sbatch --array=<unfinished runs>[%N]` with LK_SWEEP=folder.
# Each task reads its run from the folder's sweep.json by SLURM_ARRAY_TASK_ID (`lesionkit sweep DIR --task K`:
# its recipe, run folder and shard folders), exits at once if that run is already finished, else trains it
# through jobs/_launch.sh: the same nodes/GPUs handling, SIGUSR1 -> checkpoint -> `scontrol requeue` of this
# task only, and --resume from the run's last/ on the next start. Other LK_* settings apply as in _launch.sh.
#SBATCH --job-name=lk-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
##SBATCH --gpus-per-node=1
#SBATCH --time=12:00:00
#SBATCH --output=%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue

if [ -z "${LK_REPO:-}" ]; then  # sbatch runs a copy of this file: ask Slurm where the original lives
  script=${BASH_SOURCE[0]}  # (the array's own id lists every task: its first Command= line is this script)
  [ -z "${SLURM_JOB_ID:-}" ] || script=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n 1)
  LK_REPO=$(cd "$(dirname "$script")/.." && pwd)
fi
: "${LK_SWEEP:?set LK_SWEEP to the sweep folder (lesionkit sweep --slurm does)}"
task=${LK_SWEEP_TASK:-${SLURM_ARRAY_TASK_ID:?not an array task: submit with lesionkit sweep --slurm}}
if [ -z "${LK_PYTHON:-}" ]; then
  if [ -x "$LK_REPO/.venv/bin/python" ]; then LK_PYTHON=$LK_REPO/.venv/bin/python; else LK_PYTHON=$(command -v python3); fi
fi
settings=$(PYTHONPATH="$LK_REPO${PYTHONPATH:+:$PYTHONPATH}" "$LK_PYTHON" -m lesionkit.cli sweep "$LK_SWEEP" --task "$task") || {
  echo "[lesionkit-job] error: cannot read task $task of the sweep in $LK_SWEEP" >&2; exit 2; }
eval "$settings"
if [ "$LK_SWEEP_FINISHED" = 1 ]; then
  echo "[lesionkit-job $(date +%H:%M:%S)] sweep task $task ($LK_SWEEP_RUN) is finished in $LK_OUTPUT; nothing to do"
  exit 0
fi
echo "[lesionkit-job $(date +%H:%M:%S)] sweep task $task: run $LK_SWEEP_RUN"
source "$LK_REPO/jobs/_launch.sh"
