"""Which genes does a trained scBERT model attend to, per cell type? Attention, markers, gene sets."""

from __future__ import annotations

import argparse

from model.cli.args import (
    add_batch_size,
    add_bool,
    add_device,
    add_input_args,
    add_log_args,
    add_precision,
    add_published_args,
    parser,
    positive_float,
    positive_int,
    str2bool,
)

EXAMPLE = """
python attn_analysis.py --data prep_train.h5ad --model runs/finetune/model.pt --label-key celltype --out runs/attention
python attn_analysis.py --data cells.h5ad --model model.pt --label-key celltype --out attn --markers immune --gmt hallmark c2 --umap
"""


def build_parser() -> argparse.ArgumentParser:
    p = parser(
        "Rank genes by the attention they receive in a trained scBERT model, per cell type. For each cell the attention "
        "every gene receives (column sums of the Performer's attention matrix, averaged over heads, divided by the number "
        "of positions) is computed exactly without building the genes x genes matrix, then averaged over the cells of "
        "each type (--label-key). Writes attention_top_genes.csv, attention_by_celltype.csv (all genes), "
        "attention_heatmap.png, marker_overlap.csv (top genes that are known markers of the type, hypergeometric test "
        "against the model's genes), enrichment.csv (over-representation in gene sets, BH-adjusted per cell type and "
        "gene-set file), summary.txt, metrics.json and, with --umap, umap.png.",
        EXAMPLE,
    )
    p.add_argument("--data", required=True, help="cells with labels: .h5ad (raw counts or the output of preprocess.py), or any format predict.py reads")
    p.add_argument("--model", required=True, help="trained checkpoint (model.pt of finetune.py; a pretrained one works without --umap)")
    add_published_args(p)
    p.add_argument("--label-key", required=True, help="obs column naming each cell's type (usually the true labels; the scbert_celltype column written by predict.py works too)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--top-k", type=positive_int, default=50, help="top genes per cell type that are listed and tested (default: 50)")
    p.add_argument("--layer", default="all", help="attention layers whose scores are averaged: 'all' (default, as the published analysis), "
                   "or one layer: 0 = first, -1 = last")
    p.add_argument("--max-cells-per-type", type=int, default=100, help="cells per type scored, drawn at random with --seed; 0 = all cells (default: 100)")
    add_input_args(p.add_argument_group("input matrix (--layer above is the attention layer)"), layer_flags=("--data-layer",))
    g = p.add_argument_group("known markers and gene sets")
    g.add_argument("--markers", default="panglaodb",
                   help="marker table: 'panglaodb' (bundled PanglaoDB 2020-03-27, default), 'immune' (bundled pegasus human immune "
                        "markers), 'none', or a file: PanglaoDB-style .tsv[.gz]/.csv (cell type + gene columns), pegasus .json, or .gmt")
    g.add_argument("--species", default="Hs", help="PanglaoDB rows to use: Hs (human, default) or Mm (mouse)")
    g.add_argument("--celltype-map", default=None,
                   help="JSON {\"our label\": [\"marker table type\", ...]} linking labels to marker-table cell types; its entries "
                        "replace those of the bundled data/genesets/celltype_aliases.json. Unlisted labels are matched by name")
    g.add_argument("--gmt", nargs="+", default=["hallmark"],
                   help="gene-set files (.gmt[.gz]) for enrichment: 'hallmark' (bundled MSigDB hallmark, default), 'c2' (bundled "
                        "MSigDB C2 canonical pathways), file paths, or 'none'")
    g.add_argument("--min-set-size", type=positive_int, default=5, help="test only gene sets with at least this many model genes (default: 5)")
    g.add_argument("--max-set-size", type=positive_int, default=500, help="... and at most this many (default: 500)")
    p.add_argument("--backed", type=str2bool, nargs="?", const=True, default=None, metavar="BOOL",
                   help="read only the scored cells from the .h5ad (labels first, then the --max-cells-per-type drawn cells), not the "
                   "whole matrix, so that memory does not grow with the file (same scores; not with --umap). Default: auto = for every "
                   ".h5ad input unless --umap")
    g = p.add_argument_group("output and run")
    g.add_argument("--heatmap-genes", type=positive_int, default=10, help="top genes per cell type shown in the heatmap (default: 10)")
    add_bool(g, "--umap", default=False, help="also plot a UMAP of the model's cell embeddings of all cells, coloured by label and prediction (needs a fine-tuned model)")
    add_batch_size(g, 16, "cells per forward pass, at most: lowered to fit --max-memory")
    g.add_argument("--max-memory", type=positive_float, default=0.5, metavar="GB",
                   help="working memory of one batch of the attention pass, in GB: at the published 16,906 genes a cell takes ~0.4 GB, "
                   "so batches hold one cell and the whole run stays under ~1.5 GB (default: 0.5)")
    g.add_argument("--seed", type=int, default=0, help="random seed for the cell subsample and the UMAP (default: 0)")
    add_device(g)
    add_precision(g, stage="attention")
    add_bool(g, "--overwrite", default=False, help="replace the outputs of an earlier run in --out")
    add_log_args(g)
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    if args.max_cells_per_type < 0:
        p.error("--max-cells-per-type must be >= 0 (0 = all cells)")
    if args.max_set_size < args.min_set_size:
        p.error("--max-set-size must be at least --min-set-size")

    from model.cli.boundary import stage
    from model.cli.preflight import check_paths

    with stage():
        check_paths(args, "attention")
        from model.cli.attention import run

        run(args)


if __name__ == "__main__":
    main()
