#!/usr/bin/env bash
# scBERT end to end on the bundled PBMC data, with a CPU-sized model (~7 minutes on 2 idle cores):
# split -> preprocess -> pretrain (PBMC training cells + unlabelled immune cells) -> fine-tune -> predict.
# Usage: bash scripts/demo.sh [OUT_DIR]   (default: demo_out)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_out}
mkdir -p "$OUT"
MODEL="--dim 32 --depth 2 --heads 4 --dim-head 8"

echo "== 1/5 hold out 20% of the labelled PBMCs as the query"
python -m scripts.split_h5ad --data data/pbmc3k_labeled.h5ad --label-key celltype --test-frac 0.2 \
    --out-train "$OUT/pbmc_train.h5ad" --out-test "$OUT/pbmc_query.h5ad"

echo "== 2/5 preprocess: normalise, log2, revise symbols, 2,000 most variable genes"
python preprocess.py --data "$OUT/pbmc_train.h5ad" --out "$OUT/prep_train.h5ad" --n-top-genes 2000 --overwrite
python preprocess.py --data data/immune_sample_unlabeled.h5ad --out "$OUT/prep_immune.h5ad" \
    --vocab "$OUT/prep_train.h5ad" --overwrite

echo "== 3/5 pretrain (masked expression) on PBMC training cells + unlabelled immune cells"
python pretrain.py --data "$OUT/prep_train.h5ad" "$OUT/prep_immune.h5ad" --out "$OUT/pretrain" $MODEL \
    --epochs 3 --batch-size 16 --lr 1e-3 --overwrite

echo "== 4/5 fine-tune the classifier on the labelled training cells"
python finetune.py --data "$OUT/prep_train.h5ad" --label-key celltype --pretrained "$OUT/pretrain/model.pt" \
    --out "$OUT/finetune" --overwrite

echo "== 5/5 predict the held-out cells (raw counts in, annotated h5ad out)"
python predict.py --data "$OUT/pbmc_query.h5ad" --model "$OUT/finetune/model.pt" --out "$OUT/pbmc_query_annotated.h5ad" \
    --csv "$OUT/pbmc_query_labels.csv" --label-key celltype --overwrite

echo "== done: $OUT/pretrain/summary.txt, $OUT/finetune/summary.txt, $OUT/finetune/confusion_matrix.png"
cat "$OUT/pretrain/summary.txt" "$OUT/finetune/summary.txt"
