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
#   DATA_DIR         the data root: the recipes' task sets read ${DATA_DIR} (task files, the
#                    corpus index; recipes/cluster.yaml), and data.world=$DATA_DIR/world
#   TOKENIZER_DIR    sets data.tokenizer.path (the base model's Hugging Face directory)
#   INIT_FROM        sets checkpoint.init_from (the previous stage's run, or a converted model)
#   LOG_DIR          where the training tasks log, one file per job (<job name>-<job id>.log,
#                    appended to across requeues; default: $RUN_DIR/logs)
#   GPUS_PER_NODE    tasks per node (default: $SLURM_NTASKS_PER_NODE, else 8)
#   FORESIGHT        the command (default: foresight on PATH or in the container, else
#                    $PROJECT_DIR/.venv/bin/foresight)
#   CONTAINER_IMAGE  run the tasks in this image (pyxis/enroot); CONTAINER_MOUNTS adds mounts
#                    (PROJECT_DIR, RUN_DIR, LOG_DIR and, when set, DATA_DIR, TOKENIZER_DIR and
#                    INIT_FROM are mounted at the same paths)
#   MASTER_PORT      rendezvous port (default: 20000 + job id mod 20000); the address is always
#                    the allocation's first node
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
    if [[ -n ${CONTAINER_IMAGE:-} ]] || command -v foresight > /dev/null; then FORESIGHT=foresight
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
# (not taken from the environment: sbatch exports the submitting shell's, which may be stale)
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

container=()
if [[ -n ${CONTAINER_IMAGE:-} ]]; then
    mounts=$PROJECT_DIR:$PROJECT_DIR,$RUN_DIR:$RUN_DIR,$LOG_DIR:$LOG_DIR
    for path in "${DATA_DIR:-}" "${TOKENIZER_DIR:-}" "${INIT_FROM:-}"; do
        [[ -n $path ]] && mounts+=",$path:$path"
    done
    [[ -n ${CONTAINER_MOUNTS:-} ]] && mounts+=",$CONTAINER_MOUNTS"
    container=(--container-image="$CONTAINER_IMAGE" --container-mounts="$mounts"
               --container-workdir="$PROJECT_DIR")
fi

echo "job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0}): $RECIPE on $NODES node(s) x" \
     "$GPUS_PER_NODE task(s), run directory $RUN_DIR, rendezvous $MASTER_ADDR:$MASTER_PORT"

# 1. The plan: refuse a layout that cannot run before any training process starts.
# srun does not inherit --cpus-per-task from sbatch (Slurm 22.05+): pass it on
cpus=--cpus-per-task=${SLURM_CPUS_PER_TASK:-1}
srun --nodes=1 --ntasks=1 "$cpus" ${container[@]+"${container[@]}"} \
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

srun --kill-on-bad-exit=1 --ntasks-per-node="$GPUS_PER_NODE" "$cpus" \
    ${container[@]+"${container[@]}"} \
    --output="$LOG_DIR/%x-%j.log" --open-mode=append \
    "$FORESIGHT" train "$RECIPE" ${overrides[@]+"${overrides[@]}"} \
    ${train_options[@]+"${train_options[@]}"} \
    --run-dir "$RUN_DIR" --resume &
srun_pid=$!
# wait returns >128 when the trapped signal interrupts it while the step still runs; once
# srun has exited, a last wait returns its real status (bash keeps it)
while kill -0 "$srun_pid" 2> /dev/null; do
    wait "$srun_pid" || true
done
wait "$srun_pid" && status=0 || status=$?
echo "training tasks exited with status $status"
if [[ $stopping == 1 && $status == 0 && -n ${SLURM_JOB_ID:-} ]]; then
    echo "requeueing job $SLURM_JOB_ID to continue from the checkpoint just saved"
    scontrol requeue "$SLURM_JOB_ID"
    # Slurm now ends this run of the job itself ("cancelled due to job requeue"); exiting first
    # races with that and can leave the job FAILED instead of queued again, so wait for it.
    sleep 300 &
    wait $! || true
fi
exit "$status"
