#!/usr/bin/env bash
# Pretrain and fine-tune on all GPUs of one machine: torchrun starts one process per GPU
# (DistributedDataParallel, NCCL). Re-running the same command after a crash goes on from the
# last saved state (--resume OUT is harmless on a fresh run).
#
#   CORPUS=prep_shards/ LABELLED=prep_labelled.h5ad OUT=runs/atlas bash scripts/launch/single_node.sh
#
# CORPUS: .h5ad files written by preprocess.py (one --vocab for all), or a folder of them; read
# from disk a batch at a time (--backed). NGPUS defaults to every visible GPU. For a CPU-only
# machine use DEVICE=cpu NGPUS=<processes> (Gloo backend).
set -euo pipefail
cd "$(dirname "$0")/../.."

CORPUS=${CORPUS:?set CORPUS to a preprocessed .h5ad or a folder of them}
LABELLED=${LABELLED:-}
OUT=${OUT:-runs/scale}
DEVICE=${DEVICE:-cuda}
NGPUS=${NGPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
BATCH=${BATCH:-8}        # cells per step of each process: the step has BATCH x NGPUS x GRAD_ACC cells
GRAD_ACC=${GRAD_ACC:-1}
PRECISION=${PRECISION:-bf16}
if [ "$DEVICE" = cpu ]; then PRECISION=fp32; fi

torchrun --standalone --nproc_per_node="$NGPUS" pretrain.py \
    --data "$CORPUS" --backed --out "$OUT/pretrain" --resume "$OUT/pretrain" \
    --device "$DEVICE" --precision "$PRECISION" --batch-size "$BATCH" --grad-acc "$GRAD_ACC" \
    --num-workers "${NUM_WORKERS:-4}" --save-every 500 --keep-last 3 --epochs "${EPOCHS:-10}" "$@"

if [ -n "$LABELLED" ]; then
    torchrun --standalone --nproc_per_node="$NGPUS" finetune.py \
        --data "$LABELLED" --label-key "${LABEL_KEY:-celltype}" --pretrained "$OUT/pretrain/model.pt" \
        --out "$OUT/finetune" --resume "$OUT/finetune" --device "$DEVICE" --precision "$PRECISION" \
        --batch-size "$BATCH" --save-every 200
fi
