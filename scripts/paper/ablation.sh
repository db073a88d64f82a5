#!/usr/bin/env bash
# Paper experiment: the ablation of pretraining and of gene2vec (K-fold CV): scbert (pretrained, gene2vec),
# scbert_nopretrain (gene2vec, random encoder), scbert_nogene2vec (pretrained without gene embedding).
#   bash scripts/paper/ablation.sh                  # bundled PBMC3k, CPU preset
#   bash scripts/paper/ablation.sh --data zheng68k.h5ad --out runs/zheng68k_ablation --published
source "$(dirname "$0")/common.sh"
OUT=runs/paper/ablation
if [ $# -eq 0 ]; then set -- --data "$REPO/data/pbmc3k_labeled.h5ad" --unlabelled "$REPO/data/immune_sample_unlabeled.h5ad"; fi
parse_args "$@"
prepare_and_pretrain ablation
run_protocol ablation "scbert scbert_nopretrain scbert_nogene2vec" --protocol cv
