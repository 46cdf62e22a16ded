#!/bin/bash
# The tiny default on a Slurm allocation: 2 CPU processes (gloo), TP=2, through the same launcher
# as the cluster scripts (plan, srun, resume, save and requeue before the time limit).
#   sbatch slurm/tiny_cpu.sh [section.key=value ...]
#   RECIPE=recipes/tiny-cpu/wm_amt.yaml sbatch slurm/tiny_cpu.sh
# RECIPE defaults to recipes/tiny-cpu/lm.yaml; slurm/launch.sh lists the other variables.
# Partition and account are site-specific: sbatch -p PARTITION -A ACCOUNT slurm/...
#SBATCH --job-name=tiny_cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --mem=8G
#SBATCH --time=00:30:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@60
exec "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh" "${RECIPE:-recipes/tiny-cpu/lm.yaml}" \
    parallel.tensor_model_parallel_size=2 "$@"
