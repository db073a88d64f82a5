#!/usr/bin/env bash
# Paper experiment: train on one dataset, test on another (cross-cohort pancreas, cross-organ).
#   bash scripts/paper/cross.sh                     # bundled pancreas: human -> mouse, CPU preset
#   bash scripts/paper/cross.sh -- --split-key donor --train-values human1 human2 --test-values human3 human4
#   bash scripts/paper/cross.sh --data baron.h5ad --out runs/baron_to_muraro --published -- \
#       --test-data muraro.h5ad --label-map muraro_to_baron.tsv
# With --data A and -- --test-data B, pretraining uses A (and --unlabelled files), never B.
source "$(dirname "$0")/common.sh"
OUT=runs/paper/cross
if [ $# -eq 0 ]; then set -- --data "$REPO/data/pancreas_baron_subset.h5ad" -- --split-key species --train-values human --test-values mouse; fi
parse_args "$@"
prepare_and_pretrain
run_protocol cross "scbert scbert_nopretrain" --protocol cross
