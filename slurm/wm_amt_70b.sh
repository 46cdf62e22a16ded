#!/bin/bash
# WM-AMT (world-model agentic mid-training) at Llama 3 70B: recipes/70b/wm_amt.yaml on 8 node(s) of 8 H100s (the recipe's
# launch section; `foresight plan recipes/70b/wm_amt.yaml` shows its memory per GPU).
#   sbatch slurm/wm_amt_70b.sh [section.key=value ...]        (from the repository root)
# Writes runs/wm_amt_70b; resubmitting or a requeue continues it. slurm/launch.sh lists the
# variables (CONTAINER_IMAGE, DATA_DIR, TOKENIZER_DIR, INIT_FROM, RUN_DIR, ...).
# Partition and account are site-specific: sbatch -p PARTITION -A ACCOUNT slurm/...
#SBATCH --job-name=wm_amt_70b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12     # 96 per node: fits 96-vCPU and 112-core H100 nodes
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@1800   # a 70B step plus a ~1 TB save
exec "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh" recipes/70b/wm_amt.yaml "$@"
