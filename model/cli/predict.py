"""What predict.py does with its parsed flags."""

from __future__ import annotations

import argparse

from data.io import InputError, atomic_path, check_writable, read_cells, record_dir, write_h5ad_atomic, write_json
from data.labels import label_column
from model.checkpoint import load_checkpoint
from model.cli.args import execution_options, published_names
from model.cli.run import setup_logging, start_run, user_errors, write_summary
from model.inference import annotate
from model.runtime import resolve_device


def run(args: argparse.Namespace) -> None:
    setup_logging(args.quiet, level=args.log_level)
    with user_errors():
        out = check_writable(args.out, args.overwrite)
        if args.csv:
            check_writable(args.csv, args.overwrite)
    run_dir = start_run(args.run_dir or record_dir(out), args, protected=("summary.txt",))
    with user_errors():
        ckpt = load_checkpoint(args.model, **published_names(args))
        adata = read_cells(args.data)
        truth = label_column(adata, args.label_key, args.data) if args.label_key else None
        threshold = None if args.novel_type is False else args.threshold
        result = annotate(adata, ckpt, threshold, args.batch_size, resolve_device(args.device), execution_options(args),
                          progress=not args.quiet, num_workers=args.num_workers, novelty=args.novelty, reject_rate=args.reject_rate)
        if args.majority_voting:
            clusters = None
            if args.over_clustering:
                if args.over_clustering not in adata.obs:
                    raise InputError(f"--over-clustering {args.over_clustering!r} is not a column of {args.data}; available columns: "
                                     f"{list(adata.obs.columns)}")
                clusters = adata.obs[args.over_clustering].astype(str).to_numpy()
            result.vote(clusters)
        metrics, lines = result.report(truth)
        result.to_plots(run_dir, truth)
        lines.insert(0, f"annotated {result.n_cells} cells in {result.seconds:.1f} s ({result.n_cells / max(result.seconds, 1e-9):.1f} cells/s)")
        metrics.update(seconds=round(result.seconds, 2), model=str(args.model), data=str(args.data), preprocessing=result.preprocessing)
        write_h5ad_atomic(result.to_adata(adata), out)
        if args.csv:
            with atomic_path(args.csv) as tmp:
                result.to_table().to_csv(tmp)
        write_json(run_dir / "metrics.json", metrics)
    lines.append(f"wrote {out}" + (f" and {args.csv}" if args.csv else "") + f"; run record in {run_dir}")
    write_summary(run_dir, lines, results=("accuracy", "note:"))
