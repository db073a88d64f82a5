"""Stage 0: raw or normalised cells -> log2-normalised cells on a gene vocabulary (.h5ad)."""

from __future__ import annotations

import argparse

from model.cli.args import add_bool, add_input_args, add_library_size, add_log_args, add_min_genes, parser

EXAMPLE = """
python preprocess.py --data data/pbmc3k_labeled.h5ad --out prep/pbmc3k.h5ad --n-top-genes 2000
python preprocess.py --data my_query.h5ad --out prep/query.h5ad --vocab prep/pbmc3k.h5ad
python preprocess.py --data filtered_feature_bc_matrix.h5 --out prep/x.h5ad --vocab panglao_genes.txt
"""


def build_parser() -> argparse.ArgumentParser:
    p = parser(
        "Filter cells (>= --min-genes expressed genes), normalise each cell to 10,000 counts over ALL its genes, "
        "take log2(1 + x), revise gene symbols to current NCBI symbols, then keep either the genes of a vocabulary "
        "(--vocab; missing genes become zero) or the --n-top-genes most variable genes. With --library-size vocab "
        "(the published preprocessing) the cells are aligned to the vocabulary first and filtered and normalised over "
        "its genes. Input that is already log-normalised is detected and not normalised twice.",
        EXAMPLE,
    )
    p.add_argument("--data", "--data_path", required=True, help="input: .h5ad, 10x .h5, 10x matrix folder, .mtx or .csv (cells x genes)")
    p.add_argument("--out", required=True, help="output .h5ad (refused if it exists, unless --overwrite)")
    p.add_argument("--run-dir", default=None, help="folder for the run record: config.json, log.txt, metrics.json, summary.txt, "
                   "genes_per_cell.png (default: OUT without .h5ad, plus _run)")
    p.add_argument("--vocab", default=None, help="target vocabulary: a gene list (one per line), a checkpoint, or an .h5ad whose genes to use (default: none)")
    p.add_argument("--n-top-genes", type=int, default=None, help="keep only this many highly variable genes (smaller, faster models; ignored with --vocab; default: all genes)")
    add_input_args(p.add_argument_group("input matrix"))
    add_min_genes(p)
    add_library_size(p)
    p.add_argument("--species", choices=["auto", "human", "mouse"], default="auto",
                   help="gene names: 'auto' (default) maps names that look like mouse symbols (Gapdh) to human ones by "
                   "upper-casing, with a warning; 'mouse' always does; 'human' never does")
    p.add_argument("--label-key", default=None, help="optional: an obs column that must exist (checked early; default: none)")
    add_bool(p, "--transpose", default=False, help="the input file is genes x cells")
    add_bool(p, "--overwrite", default=False, help="replace an existing output")
    add_log_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    if args.n_top_genes is not None and args.n_top_genes < 1:
        p.error("--n-top-genes must be at least 1")

    from model.cli.boundary import stage
    from model.cli.preflight import check_paths

    with stage():
        check_paths(args, "preprocess")
        from model.cli.preprocess import run

        run(args)


if __name__ == "__main__":
    main()
