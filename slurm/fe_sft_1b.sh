#!/bin/bash
# FE-SFT (format-eliciting SFT, from the WM-AMT run) at Llama 3.2 1B: recipes/1b/fe_sft.yaml on 1 node(s) of 8 H100s (the recipe's
# launch section; `foresight plan recipes/1b/fe_sft.yaml` shows its memory per GPU).
#   sbatch slurm/fe_sft_1b.sh [section.key=value ...]        (from the repository root)
# Writes runs/fe_sft_1b; resubmitting or a requeue continues it. slurm/launch.sh lists the
# variables (CONTAINER_IMAGE, DATA_DIR, TOKENIZER_DIR, INIT_FROM, RUN_DIR, ...).
# Partition and account are site-specific: sbatch -p PARTITION -A ACCOUNT slurm/...
#SBATCH --job-name=fe_sft_1b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12     # 96 per node: fits 96-vCPU and 112-core H100 nodes
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=08:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
exec "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh" recipes/1b/fe_sft.yaml "$@"
