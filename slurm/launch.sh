#!/bin/bash
# The one launcher every Slurm script in this directory runs (they differ only in their #SBATCH
# header and recipe):
#   exec "$SLURM_SUBMIT_DIR/slurm/launch.sh" RECIPE [section.key=value ...] [train options]
#
# 1. checks the recipe against the allocation with `foresight plan` (layout, divisibility,
#    per-GPU memory) before any training process starts;
# 2. starts one task per GPU with srun (inside the container when CONTAINER_IMAGE is set); each
#    task reads its rank, the world size and the rendezvous address from Slurm's environment;
# 3. resumes: every run passes --resume with a run directory named after the job, so a requeued
#    job (preemption, node failure, or the time limit below) continues from its last checkpoint;
# 4. on the warning signal before the time limit (#SBATCH --signal=B:USR1@SECONDS), tells every
#    task to save and stop after the current step, then requeues the job.
#
# Environment (all optional):
#   PROJECT_DIR      the repository (default: the submit directory)
#   RUNS_DIR         where run directories go (default: $PROJECT_DIR/runs)
#   RUN_DIR          this run's directory (default: $RUNS_DIR/$SLURM_JOB_NAME, the same across
#                    requeues and resubmissions, so a resubmitted job also resumes)
#   DATA_DIR         the data root; sets data.world=$DATA_DIR/world when given
#   TOKENIZER_DIR    sets data.tokenizer.path (the base model's Hugging Face directory)
#   INIT_FROM        sets checkpoint.init_from (the previous stage's run, or a converted model)
#   LOG_DIR          where the training tasks log, one file per job (<job name>-<job id>.log,
#                    appended to across requeues; default: $RUN_DIR/logs)
#   GPUS_PER_NODE    tasks per node (default: $SLURM_NTASKS_PER_NODE, else 8)
#   FORESIGHT        the command (default: foresight on PATH, else $PROJECT_DIR/.venv/bin/foresight)
#   CONTAINER_IMAGE  run the tasks in this image (pyxis/enroot); CONTAINER_MOUNTS adds mounts
#                    (PROJECT_DIR, and DATA_DIR when set, are always mounted)
#   MASTER_PORT      rendezvous port (default: 20000 + job id mod 20000)
set -euo pipefail
# (empty arrays are expanded as ${a[@]+"${a[@]}"}: bash before 4.4 calls "${a[@]}" unbound)

if [[ $# -lt 1 ]]; then
    echo "usage: launch.sh RECIPE [section.key=value ...] [train options]" >&2
    exit 2
fi
RECIPE=$1
shift

PROJECT_DIR=${PROJECT_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$PROJECT_DIR"
if [[ ! -f $RECIPE ]]; then
    echo "error: recipe $RECIPE not found in $PROJECT_DIR: submit from the repository root" \
         "(sbatch slurm/<script>.sh) or set PROJECT_DIR" >&2
    exit 2
fi
JOB_NAME=${SLURM_JOB_NAME:-foresight}
RUNS_DIR=${RUNS_DIR:-$PROJECT_DIR/runs}
RUN_DIR=${RUN_DIR:-$RUNS_DIR/$JOB_NAME}
LOG_DIR=${LOG_DIR:-$RUN_DIR/logs}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-8}}
GPUS_PER_NODE=${GPUS_PER_NODE%%(*}          # "8(x2)" -> 8
NODES=${SLURM_JOB_NUM_NODES:-1}
if [[ -z ${FORESIGHT:-} ]]; then
    if command -v foresight > /dev/null; then FORESIGHT=foresight
    else FORESIGHT=$PROJECT_DIR/.venv/bin/foresight; fi
fi
mkdir -p "$RUN_DIR" "$LOG_DIR"

# Recipe overrides from the environment, then the script's own arguments. Words with "=" that
# are not options are overrides (the planner gets them too); the rest go to `train` only.
overrides=()
[[ -n ${DATA_DIR:-} ]] && overrides+=("data.world=$DATA_DIR/world")
[[ -n ${TOKENIZER_DIR:-} ]] && overrides+=("data.tokenizer.path=$TOKENIZER_DIR")
[[ -n ${INIT_FROM:-} ]] && overrides+=("checkpoint.init_from=$INIT_FROM")
train_options=()
for arg in "$@"; do
    if [[ $arg == *=* && $arg != -* ]]; then overrides+=("$arg"); else train_options+=("$arg"); fi
done

# Rendezvous: the first node of the allocation (each task also derives it from Slurm's
# environment; exporting it keeps every task on the same address and port).
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)}
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

container=()
if [[ -n ${CONTAINER_IMAGE:-} ]]; then
    mounts=$PROJECT_DIR:$PROJECT_DIR
    [[ -n ${DATA_DIR:-} ]] && mounts+=",$DATA_DIR:$DATA_DIR"
    [[ -n ${CONTAINER_MOUNTS:-} ]] && mounts+=",$CONTAINER_MOUNTS"
    container=(--container-image="$CONTAINER_IMAGE" --container-mounts="$mounts"
               --container-workdir="$PROJECT_DIR")
fi

echo "job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0}): $RECIPE on $NODES node(s) x" \
     "$GPUS_PER_NODE task(s), run directory $RUN_DIR, rendezvous $MASTER_ADDR:$MASTER_PORT"

# 1. The plan: refuse a layout that cannot run before any training process starts.
srun --nodes=1 --ntasks=1 ${container[@]+"${container[@]}"} \
    "$FORESIGHT" plan "$RECIPE" --nodes "$NODES" --gpus-per-node "$GPUS_PER_NODE" \
    ${overrides[@]+"${overrides[@]}"}

# 2.-4. Training, one task per GPU, in the background so the time-limit signal is handled now.
stopping=0
srun_pid=
on_time_limit() {
    echo "time limit near: every task saves after its current step; the job will be requeued"
    stopping=1
    [[ -n $srun_pid ]] && kill -USR1 "$srun_pid" 2> /dev/null || true
}
trap on_time_limit USR1

srun --kill-on-bad-exit=1 --ntasks-per-node="$GPUS_PER_NODE" ${container[@]+"${container[@]}"} \
    --output="$LOG_DIR/%x-%j.log" --open-mode=append \
    "$FORESIGHT" train "$RECIPE" ${overrides[@]+"${overrides[@]}"} \
    ${train_options[@]+"${train_options[@]}"} \
    --run-dir "$RUN_DIR" --resume &
srun_pid=$!
status=0
while true; do
    wait "$srun_pid" && status=0 || status=$?
    # wait returns >128 when a trapped signal interrupted it; the step is still running then
    kill -0 "$srun_pid" 2> /dev/null || break
done
echo "training tasks exited with status $status"
if [[ $stopping == 1 && $status == 0 && -n ${SLURM_JOB_ID:-} ]]; then
    echo "requeueing job $SLURM_JOB_ID to continue from the checkpoint just saved"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
