"""Stage 0: raw or normalised cells -> log2-normalised cells on a gene vocabulary (.h5ad)."""

from __future__ import annotations

import argparse

from model.cli import add_bool, fail, parser, setup_logging

EXAMPLE = """
python preprocess.py --data data/pbmc3k_labeled.h5ad --out prep/pbmc3k.h5ad --n-top-genes 2000
python preprocess.py --data my_query.h5ad --out prep/query.h5ad --vocab prep/pbmc3k.h5ad
python preprocess.py --data filtered_feature_bc_matrix.h5 --out prep/x.h5ad --vocab panglao_genes.txt
"""


def build_parser() -> argparse.ArgumentParser:
    p = parser(
        "Filter cells (>= --min-genes expressed genes), normalise each cell to 10,000 counts over ALL its genes, "
        "take log2(1 + x), revise gene symbols to current NCBI symbols, then keep either the genes of a vocabulary "
        "(--vocab; missing genes become zero) or the --n-top-genes most variable genes. Input that is already "
        "log-normalised is detected and not normalised twice.",
        EXAMPLE,
    )
    p.add_argument("--data", "--data_path", required=True, help="input: .h5ad, 10x .h5, 10x matrix folder, .mtx or .csv (cells x genes)")
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--vocab", default=None, help="target vocabulary: a gene list (one per line), a checkpoint, or an .h5ad whose genes to use")
    p.add_argument("--n-top-genes", type=int, default=None, help="keep only this many highly variable genes (smaller, faster models; ignored with --vocab)")
    p.add_argument("--min-genes", type=int, default=200, help="drop cells expressing fewer genes (default: 200, as published; 0 keeps all)")
    p.add_argument("--label-key", default=None, help="optional: an obs column that must exist (checked early)")
    add_bool(p, "--transpose", default=False, help="the input file is genes x cells")
    add_bool(p, "--overwrite", default=False, help="replace an existing output")
    add_bool(p, "--quiet", default=False, help="only warnings and errors")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    setup_logging(args.quiet)

    import logging

    from data.io import InputError, check_writable, read_cells, write_h5ad_atomic
    from data.preprocess import prepare
    from data.vocab import load_vocab

    log = logging.getLogger("scbert")
    try:
        out = check_writable(args.out, args.overwrite)
        genes = load_vocab(args.vocab) if args.vocab else None
        raw = read_cells(args.data, transpose=args.transpose)
        if args.label_key and args.label_key not in raw.obs:
            raise InputError(f"--label-key {args.label_key!r} is not a column of {args.data}; available: {list(raw.obs.columns)}")
        adata, rep = prepare(raw, genes=genes, n_top_genes=None if genes else args.n_top_genes, min_genes=args.min_genes or None)
        for line in rep.lines():
            log.info(line)
        write_h5ad_atomic(adata, out)
    except InputError as e:
        fail(str(e))
    log.info("wrote %s (%d cells x %d genes)", out, adata.n_obs, adata.n_vars)


if __name__ == "__main__":
    main()
