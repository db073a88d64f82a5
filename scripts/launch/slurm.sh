#!/usr/bin/env bash
# Multi-node pretraining under SLURM: srun starts one torchrun per node, and torchrun one process
# per GPU; the nodes meet at the first node of the allocation (c10d rendezvous). The job can be
# requeued or resubmitted unchanged: --resume goes on from the last saved state.
#
#   CORPUS=/shared/prep_shards OUT=/shared/runs/atlas sbatch scripts/launch/slurm.sh
#
# OUT and CORPUS must be on a file system every node sees. Only rank 0 writes OUT.
#SBATCH --job-name=scbert-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

CORPUS=${CORPUS:?set CORPUS to a preprocessed .h5ad or a folder of them}
OUT=${OUT:?set OUT to a run folder on shared storage}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}
REPO=${REPO:-$SLURM_SUBMIT_DIR}

srun --kill-on-bad-exit=1 bash -c "cd '$REPO' && torchrun \
    --nnodes=$SLURM_NNODES --nproc_per_node=$GPUS_PER_NODE \
    --rdzv_id=$SLURM_JOB_ID --rdzv_backend=c10d --rdzv_endpoint=$HEAD:$PORT \
    pretrain.py --data '$CORPUS' --backed --out '$OUT' --resume '$OUT' \
        --device cuda --precision bf16 --batch-size ${BATCH:-8} --grad-acc ${GRAD_ACC:-1} \
        --num-workers 8 --save-every 1000 --keep-last 3 --epochs ${EPOCHS:-10} --quiet"
