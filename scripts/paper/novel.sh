#!/usr/bin/env bash
# Paper experiment: novel cell types. Types given to --hold-out never appear in training; reports the
# known-type accuracy, the fraction of held-out cells left Unassigned (top score < --threshold) and the
# AUROC of the top score for known vs novel cells (paper, MacParland liver: 0.329 novel, 0.942 known).
#   bash scripts/paper/novel.sh                     # bundled PBMC3k, NK cells held out
#   bash scripts/paper/novel.sh --data macparland.h5ad --out runs/liver_novel --published -- \
#       --hold-out "Mature B cells" "Plasma cells" "Erythroid cells" "NK-like cells"
source "$(dirname "$0")/common.sh"
OUT=runs/paper/novel
if [ $# -eq 0 ]; then set -- --data "$REPO/data/pbmc3k_labeled.h5ad" --unlabelled "$REPO/data/immune_sample_unlabeled.h5ad" -- --hold-out NK; fi
parse_args "$@"
prepare_and_pretrain
run_protocol novel "scbert" --protocol novel
