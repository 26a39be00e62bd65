#!/usr/bin/env bash
# Multi-node training under SLURM: one `accelerate launch` per node, each starting one process per GPU.
#   sbatch launch/slurm_train.sh configs/boss.yaml [section.key=value ...]
# Adjust the #SBATCH lines to your cluster. The shards and the run directory (train.output_dir) must be on
# a filesystem every node sees. SIGTERM (pre-emption, scancel, time limit) makes spkdist checkpoint and
# exit 0; resubmit with train.resume=latest to continue.
#SBATCH --job-name=spkdist
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --signal=TERM@120
#SBATCH --output=%x-%j.out
set -euo pipefail

config=${1:?usage: sbatch launch/slurm_train.sh CONFIG [section.key=value ...]}
shift
gpus_per_node=${SLURM_GPUS_ON_NODE:-8}
main_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=4

# srun starts this block once per node; SLURM_NODEID gives each its machine rank.
srun --kill-on-bad-exit=1 bash -c "accelerate launch \
    --multi_gpu --mixed_precision bf16 \
    --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * gpus_per_node)) \
    --machine_rank \$SLURM_NODEID --main_process_ip $main_node --main_process_port 29500 \
    --rdzv_conf timeout=600 \
    launch/train.py --config $config $*"
