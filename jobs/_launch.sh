# Shared Slurm launcher, sourced by jobs/resnet.sh, jobs/customnet.sh, jobs/efficientnet_lite0.sh.
#
# Runs ONE srun task per node; each task runs `accelerate launch` with this node's rank, and accelerate
# starts one training process per GPU (or LK_PROCS_PER_NODE processes on CPU nodes). Every setting is an
# environment variable, so the same job script runs a 2-minute smoke job or a full run:
#
#   LK_RECIPE          recipe name or YAML path (set by the job script)
#   LK_TRAIN, LK_VAL   shard folders (space-separated for several)   [shards/isic2017/{train,val}]
#   LK_OUTPUT          run folder; keep it across requeues            [runs/<job name>-<job id>]
#   LK_EPOCHS          override the recipe's epochs                   [recipe]
#   LK_EXTRA_ARGS      more trainer flags, e.g. "--batch-size 128 --no-wandb --max-steps-per-epoch 2"
#   LK_GPUS_PER_NODE   GPUs per node; 0 = CPU (cpu.yaml / cpu_ddp.yaml + ACCELERATE_USE_CPU=1 + --cpu)
#                      [the GPUs Slurm gave the job: SLURM_GPUS_ON_NODE, else 0]
#   LK_PROCS_PER_NODE  training processes per node                    [GPUs per node, or 1 on CPU]
#   LK_ACCELERATE_CONFIG  accelerate YAML                             [chosen from nodes/GPUs/processes]
#   LK_PORT            rendezvous port on the first node              [a free port]
#   LK_REPO            the lesionkit checkout                         [from the job script's path]
#   LK_ACCELERATE      the accelerate executable                      [$LK_REPO/.venv/bin/accelerate]
#   LK_TRAIN_SCRIPT    the training entry point                       [$LK_REPO/lesionkit/train.py]
#   LK_MAX_REQUEUES    give up after this many self-requeues          [20]
#   LK_DRY_RUN=1       print the launch command and the trainer's plan for this allocation, and exit
#
# Planning: the trainer prints its plan once (processes, device, batch, LR, loader workers, shards per rank)
# and caps each process's loader workers at the recipe's value, SLURM_CPUS_PER_TASK / processes on the node,
# and its share of the shards: give a GPU job about 8 CPUs per GPU (`--cpus-per-task=32` with 4 GPUs).
# GPUs asked for (LK_GPUS_PER_NODE, SLURM_GPUS_ON_NODE) but unusable by torch stop the job with the reason.
#
# Pre-emption: `#SBATCH --signal=B:USR1@120` sends SIGUSR1 to this batch shell 2 minutes before the time
# limit (and `scancel --signal=USR1 --batch JOBID` does so by hand). We forward it through srun to every
# node, where only the training processes act on it (the accelerate launcher ignores it). The
# trainer finishes its step, saves OUT/last, writes OUT/status.json {"status": "preempted"} and exits;
# this script then runs `scontrol requeue`. The next start passes --resume (always passed) and continues
# from OUT/last, with the same W&B run id. SIGTERM (scancel, pre-emption by a higher-priority job) also
# makes the trainer checkpoint, but is never answered by a self-requeue: a cancelled job stays cancelled,
# and partitions with PreemptMode=REQUEUE requeue the job themselves.
set -uo pipefail

lk_log() { echo "[lesionkit-job $(date +%H:%M:%S)] $*"; }
lk_die() { echo "[lesionkit-job] error: $*" >&2; exit 2; }

lk_free_port() {  # a port nothing on this host listens on
  local p
  for _ in $(seq 100); do
    p=$((20000 + RANDOM % 20000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
  done
  lk_die "no free TCP port found; set LK_PORT"
}

: "${LK_RECIPE:?the job script must set LK_RECIPE}"
: "${LK_REPO:?the job script must set LK_REPO}"
LK_TRAIN=${LK_TRAIN:-$LK_REPO/shards/isic2017/train}
LK_VAL=${LK_VAL:-$LK_REPO/shards/isic2017/val}
LK_OUTPUT=${LK_OUTPUT:-$LK_REPO/runs/${SLURM_JOB_NAME:-lk-$LK_RECIPE}-${SLURM_JOB_ID:-local}}
LK_EPOCHS=${LK_EPOCHS:-}
LK_EXTRA_ARGS=${LK_EXTRA_ARGS:-}
LK_TRAIN_SCRIPT=${LK_TRAIN_SCRIPT:-$LK_REPO/lesionkit/train.py}
LK_MAX_REQUEUES=${LK_MAX_REQUEUES:-20}
if [ -z "${LK_ACCELERATE:-}" ]; then
  if [ -x "$LK_REPO/.venv/bin/accelerate" ]; then LK_ACCELERATE=$LK_REPO/.venv/bin/accelerate
  else LK_ACCELERATE=$(command -v accelerate) || lk_die "no accelerate executable; set LK_ACCELERATE"; fi
fi
LK_GPUS_PER_NODE=${LK_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
[[ "$LK_GPUS_PER_NODE" =~ ^[0-9]+$ ]] || lk_die "LK_GPUS_PER_NODE must be a number, got '$LK_GPUS_PER_NODE'"
export LK_GPUS_PER_NODE  # the trainer's device check: GPUs asked for must be usable
if [ "$LK_GPUS_PER_NODE" -gt 0 ]; then LK_PROCS_PER_NODE=${LK_PROCS_PER_NODE:-$LK_GPUS_PER_NODE}
else LK_PROCS_PER_NODE=${LK_PROCS_PER_NODE:-1}; fi
[[ "$LK_PROCS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || lk_die "LK_PROCS_PER_NODE must be >= 1, got '$LK_PROCS_PER_NODE'"
NNODES=${SLURM_NNODES:-1}
NPROCS=$((NNODES * LK_PROCS_PER_NODE))

if [ -z "${LK_ACCELERATE_CONFIG:-}" ]; then
  if [ "$LK_GPUS_PER_NODE" -eq 0 ]; then
    if [ "$NPROCS" -eq 1 ]; then cfg=cpu.yaml; else cfg=cpu_ddp.yaml; fi
  elif [ "$NNODES" -gt 1 ]; then cfg=multi_node.yaml
  elif [ "$NPROCS" -gt 1 ]; then cfg=multi_gpu.yaml
  else cfg=single_gpu.yaml; fi
  LK_ACCELERATE_CONFIG=$LK_REPO/accelerate_configs/$cfg
fi
for f in "$LK_ACCELERATE" "$LK_TRAIN_SCRIPT" "$LK_ACCELERATE_CONFIG"; do
  [ -e "$f" ] || lk_die "$f does not exist (see the LK_* settings in jobs/_launch.sh)"
done

# Logs appear as they are written; one CPU thread pool per process, sized to its share of the task.
export PYTHONUNBUFFERED=1
threads=$(( ${SLURM_CPUS_PER_TASK:-1} / LK_PROCS_PER_NODE )); [ "$threads" -ge 1 ] || threads=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}
train_args=(--config "$LK_RECIPE" --output-dir "$LK_OUTPUT" --resume)
# shellcheck disable=SC2206  # word splitting is wanted: several shard folders, several extra flags
train_args+=(--train $LK_TRAIN --val $LK_VAL)
[ -z "$LK_EPOCHS" ] || train_args+=(--epochs "$LK_EPOCHS")
if [ "$LK_GPUS_PER_NODE" -eq 0 ]; then
  export ACCELERATE_USE_CPU=1  # without it a multi-process CPU launch is N unsynchronised processes
  train_args+=(--cpu)
fi
# shellcheck disable=SC2206
train_args+=($LK_EXTRA_ARGS)

LK_PORT=${LK_PORT:-$(lk_free_port)}
launch_args=(--config_file "$LK_ACCELERATE_CONFIG" --num_processes "$NPROCS" --num_machines "$NNODES"
             --main_process_port "$LK_PORT")
if [ "$NNODES" -gt 1 ]; then
  head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  [ -n "$head_node" ] || lk_die "cannot read the first host of '${SLURM_JOB_NODELIST:-}' (scontrol show hostnames)"
  launch_args+=(--main_process_ip "$head_node" --rdzv_backend c10d)
fi

# What runs on each node ($1 = accelerate, then its arguments, the script and the script's arguments).
# SLURM_NODEID is expanded there, on the node; the first node hosts the c10d store (is_host: explicit, as
# the hostname heuristic misfires on multi-homed nodes). Slurm delivers a step's signals to every process
# of the step (proctrack/cgroup or linuxproc), so the trainers get SIGUSR1 directly; this shell and the
# accelerate launcher ignore it (the trainer installs its own handler), and on SIGTERM this shell keeps
# waiting so the trainers can finish their checkpoint before the step ends.
node_script='
rank=${SLURM_NODEID:-0}
rdzv=(); [ "${SLURM_NNODES:-1}" -gt 1 ] && rdzv=(--rdzv_conf "is_host=$(( rank == 0 ))")
trap "" USR1
trap : TERM
"$1" launch --machine_rank "$rank" "${rdzv[@]}" "${@:2}" &
launcher=$!
while true; do
  wait "$launcher"; rc=$?
  if [ "$rc" -le 128 ] || ! kill -0 "$launcher" 2>/dev/null; then exit "$rc"; fi
done'
node_cmd=(bash -c "$node_script" lk-node "$LK_ACCELERATE" "${launch_args[@]}" "$LK_TRAIN_SCRIPT" "${train_args[@]}")

if [ -n "${SLURM_JOB_ID:-}" ]; then
  step=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
  [ -z "${SLURM_CPUS_PER_TASK:-}" ] || step+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  [ -z "${SLURM_GPUS_ON_NODE:-}" ] || step+=(--gres="gpu:$SLURM_GPUS_ON_NODE")  # the GPUs Slurm gave the job
else
  step=()  # outside Slurm: run the node command here, as node 0 of 1 (signal the trainer itself to stop it)
fi

lk_log "job ${SLURM_JOB_ID:-local} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-$(hostname)}:" \
       "$NNODES node(s) x $LK_PROCS_PER_NODE process(es), GPUs/node $LK_GPUS_PER_NODE," \
       "config $(basename "$LK_ACCELERATE_CONFIG"), output $LK_OUTPUT"
lk_log "node command: $LK_ACCELERATE launch --machine_rank \$SLURM_NODEID ${launch_args[*]} $LK_TRAIN_SCRIPT ${train_args[*]}"
if [ "${LK_DRY_RUN:-0}" = 1 ]; then
  # the trainer's own plan, as each process will compute it (a dry run plans for GPUs this host may lack)
  WORLD_SIZE=$NPROCS LOCAL_WORLD_SIZE=$LK_PROCS_PER_NODE RANK=0 \
    "$(dirname "$LK_ACCELERATE")/python" "$LK_TRAIN_SCRIPT" "${train_args[@]}" --dry-run
  exit $?
fi

signalled=""
step_pid=""
started=$(date +%s)
trap 'signalled=USR1; lk_log "SIGUSR1: asking the trainer to checkpoint and stop"; kill -USR1 "$step_pid" 2>/dev/null' USR1
trap 'signalled=TERM; lk_log "SIGTERM: the trainer checkpoints and stops"; kill -TERM "$step_pid" 2>/dev/null' TERM
"${step[@]}" "${node_cmd[@]}" &
step_pid=$!
while true; do
  wait "$step_pid"; rc=$?
  if [ "$rc" -le 128 ] || ! kill -0 "$step_pid" 2>/dev/null; then break; fi
done

status=$LK_OUTPUT/status.json
if [ "$signalled" != TERM ] && [ -f "$status" ] && [ "$(stat -c %Y "$status")" -ge "$started" ] \
   && grep -Eq '"status": *"preempted"' "$status"; then
  if [ -z "${SLURM_JOB_ID:-}" ]; then lk_log "checkpointed in $LK_OUTPUT/last; run again to resume"; exit 0; fi
  if [ "${SLURM_RESTART_COUNT:-0}" -ge "$LK_MAX_REQUEUES" ]; then
    lk_die "checkpointed, but not requeueing: already restarted ${SLURM_RESTART_COUNT} times (LK_MAX_REQUEUES)"
  fi
  lk_log "checkpointed in $LK_OUTPUT/last; requeueing job $SLURM_JOB_ID (it resumes from there)"
  trap - USR1 TERM
  scontrol requeue "$SLURM_JOB_ID" || lk_die "scontrol requeue $SLURM_JOB_ID failed; resubmit to resume"
  sleep 30  # requeue ends this script; don't report an exit code first
  exit 0
fi
if [ "$rc" -ne 0 ]; then
  lk_log "training failed with exit code $rc (the trainer's error is above); output in $LK_OUTPUT"
else
  lk_log "training finished; output in $LK_OUTPUT"
fi
exit "$rc"
