#!/usr/bin/env bash
# Paper experiment: class imbalance. Chosen types are subsampled in every training fold (paper: 10,000 vs
# 100 cells); per-class F1 is in OUT/imbalance/per_class_f1.csv.
#   bash scripts/paper/imbalance.sh                 # bundled PBMC3k: CD14+ Mono and B cut to 10 training cells
#   bash scripts/paper/imbalance.sh --data zheng68k.h5ad --out runs/zheng_imb --published -- \
#       --subsample "CD8+ Cytotoxic T=100" "CD19+ B=100"
source "$(dirname "$0")/common.sh"
OUT=runs/paper/imbalance
if [ $# -eq 0 ]; then set -- --data "$REPO/data/pbmc3k_labeled.h5ad" --unlabelled "$REPO/data/immune_sample_unlabeled.h5ad" -- --subsample "CD14+ Mono=10" "B=10"; fi
parse_args "$@"
prepare_and_pretrain
run_protocol imbalance "scbert scbert_nopretrain" --protocol imbalance
