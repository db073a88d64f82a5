#!/usr/bin/env bash
# Paper experiment: stratified K-fold cross-validation within one dataset (Zheng68K, pancreas, liver...),
# scBERT (pretrained and not) against the baselines on identical folds.
#   bash scripts/paper/cv.sh                        # bundled PBMC3k, CPU preset
#   bash scripts/paper/cv.sh --data zheng68k.h5ad --label-key celltype --out runs/zheng68k --published
source "$(dirname "$0")/common.sh"
OUT=runs/paper/cv
if [ $# -eq 0 ]; then set -- --data "$REPO/data/pbmc3k_labeled.h5ad" --unlabelled "$REPO/data/immune_sample_unlabeled.h5ad"; fi
parse_args "$@"
prepare_and_pretrain
run_protocol cv "scbert scbert_nopretrain" --protocol cv
