#!/usr/bin/env bash
# scanpy's bundled pbmc68k_reduced (700 cells of Zheng68K, 765 genes, 10 bulk_labels; no download):
# baselines and scBERT by 5-fold CV. Its .raw holds ln-normalised values of already-subset genes, which
# the preprocessing takes as log values with a warning.
#   bash scripts/paper/pbmc68k_reduced.sh [--published ...]
source "$(dirname "$0")/common.sh"
OUT=runs/paper/pbmc68k_reduced
mkdir -p "$OUT"
H5AD="$OUT/pbmc68k_reduced.h5ad"
[ -f "$H5AD" ] || "${PYTHON:-python}" -c "
import scanpy as sc
a = sc.datasets.pbmc68k_reduced()
b = a.raw.to_adata()
b.obs = a.obs[['bulk_labels']].astype(str).copy()
b.write_h5ad('$H5AD')
print('wrote $H5AD', b.shape)
"
parse_args --data "$H5AD" --label-key bulk_labels --n-genes 765 --min-genes 0 --out "$OUT" "$@"
prepare_and_pretrain
run_protocol cv "scbert scbert_nopretrain" --protocol cv
