#!/bin/bash
# The tiny default on a Slurm allocation: one CPU process per task, gloo, TP=2 over 2 tasks.
#   sbatch slurm/tiny_cpu.sh [section.key=value ...]
# Environment: RECIPE (default recipes/tiny-cpu/lm.yaml), RUN_DIR (default
# runs/<job name>-<job id>, the same after a requeue so the job resumes), FORESIGHT (the command,
# default .venv/bin/foresight). Per-size cluster scripts build on this in their own issue.
#SBATCH --job-name=foresight-tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --output=%x-%j.out
#SBATCH --requeue
#SBATCH --signal=USR1@60
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
RECIPE=${RECIPE:-recipes/tiny-cpu/lm.yaml}
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME:-foresight}-${SLURM_JOB_ID:-local}}
FORESIGHT=${FORESIGHT:-.venv/bin/foresight}
# Validate the recipe against the allocation before starting any process.
"$FORESIGHT" config "$RECIPE" parallel.tensor_model_parallel_size=2 "$@" \
    --world-size "${SLURM_NTASKS:-2}" > /dev/null
# --resume: a requeued (preempted) job continues from its last checkpoint; SIGUSR1 60 s before
# the time limit makes every task save and exit.
srun "$FORESIGHT" train "$RECIPE" parallel.tensor_model_parallel_size=2 "$@" \
    --run-dir "$RUN_DIR" --resume
