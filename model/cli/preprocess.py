"""What preprocess.py does with its parsed flags."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from data.io import check_writable, read_cells, record_dir, write_h5ad_atomic, write_json
from data.labels import label_column
from data.preprocess import expressed_per_cell, prepare
from model.checkpoint import choose_library_size, load_vocab
from model.cli.args import cell_source
from model.cli.run import setup_logging, start_run, user_errors, write_summary
from model.plots import plot_genes_per_cell

log = logging.getLogger("scbert")


def run(args: argparse.Namespace) -> None:
    setup_logging(args.quiet, level=args.log_level)
    with user_errors():
        out = check_writable(args.out, args.overwrite)
    run_dir = start_run(args.run_dir or record_dir(out), args, protected=("summary.txt",))
    with user_errors():
        genes = load_vocab(args.vocab) if args.vocab else None
        raw = read_cells(args.data, transpose=args.transpose, source=cell_source(args))
        if args.label_key:
            label_column(raw, args.label_key, args.data)
        library_size, why = choose_library_size(args.library_size, data=[args.data], vocab=args.vocab, genes=genes)
        log.info("library sizes over %s (%s)", "the vocabulary genes" if library_size == "vocab" else "all input genes", why)
        n_expr = expressed_per_cell(raw.X)
        adata, rep = prepare(raw, genes=genes, n_top_genes=None if genes else args.n_top_genes, min_genes=args.min_genes or None,
                             what=str(args.data), species=args.species, library_size=library_size)
        for line in rep.lines(with_warnings=False):
            log.info(line)
        write_h5ad_atomic(adata, out)
    write_json(run_dir / "metrics.json", rep.to_dict())
    plot_genes_per_cell(n_expr, args.min_genes, run_dir / "genes_per_cell.png", f"{Path(args.data).name}: {raw.n_obs} cells")
    lines = [*rep.lines(), f"wrote {out} ({adata.n_obs} cells x {adata.n_vars} genes); run record in {run_dir}"]
    write_summary(run_dir, lines, echo=lines[-1:])  # the report's lines were logged as they came
