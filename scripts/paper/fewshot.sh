#!/usr/bin/env bash
# Paper experiment: fewer labelled cells. Every training fold is subsampled (per type) to 10/25/50/75%.
#   bash scripts/paper/fewshot.sh                   # bundled PBMC3k
#   bash scripts/paper/fewshot.sh --data zheng68k.h5ad --out runs/zheng_fewshot --published
source "$(dirname "$0")/common.sh"
OUT=runs/paper/fewshot
if [ $# -eq 0 ]; then set -- --data "$REPO/data/pbmc3k_labeled.h5ad" --unlabelled "$REPO/data/immune_sample_unlabeled.h5ad"; fi
parse_args "$@"
prepare_and_pretrain
run_protocol fewshot "scbert scbert_nopretrain" --protocol fewshot
