"""What predict.py does with its parsed flags."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from data.io import InputError, atomic_path, check_writable, read_anndata, record_dir, select_cells, write_h5ad_atomic, write_json
from data.labels import label_column, map_labels, read_label_map
from data.preprocess import query_lines
from model import distributed
from model.annotation import annotate
from model.checkpoint import load_checkpoint
from model.cli.args import cell_source, inference_options, novelty_settings, published_names, resolve_precision_flag
from model.cli.run import setup_logging, start_run, user_errors, write_summary
from model.estimate import cell_seconds, duration
from model.memory import available_memory, check_batch_memory
from model.runtime import inference_batch_size

log = logging.getLogger("scbert")

MIN_PLOT_CELLS = 100  # --plots auto: smaller queries get no plots (drawing them costs about a second, mostly importing matplotlib)


def use_backed(args: argparse.Namespace) -> bool:
    """--backed as given; auto: under torchrun, or for an .h5ad whose matrix would take more
    than a third of the free memory once read and preprocessed (3 x its size on disk)."""
    if args.backed is not None:
        return bool(args.backed)
    if distributed.launched_by_torchrun():
        return True
    path = Path(args.data)
    free = available_memory(None)
    if path.suffix.lower() != ".h5ad" or not path.is_file() or free is None:
        return False
    if 3 * 3 * path.stat().st_size > free:
        log.info("%s (%.1f GB) may not fit in the free memory (%.1f GB) once read: annotating it a chunk of %d cells at a time "
                 "(--backed false to read it whole)", path, path.stat().st_size / 1e9, free / 1e9, args.chunk_size)
        return True
    return False


def run(args: argparse.Namespace) -> None:
    info, device = distributed.init_distributed(args.device)
    main = info.is_main
    setup_logging(args.quiet or not main, level=args.log_level)
    with user_errors():
        out = check_writable(args.out, args.overwrite)
        if args.csv:
            check_writable(args.csv, args.overwrite)
        backed = use_backed(args)
        if info.enabled and not backed:
            raise InputError("under torchrun the processes share the cells a chunk at a time: drop --backed false")
        if backed and args.majority_voting:
            raise InputError("--majority-voting needs every cell's embedding in memory (to over-cluster them), which --backed avoids: "
                             "drop one of them (run majority voting on the written output with model.majority_voting)")
        source, novelty, names = cell_source(args), novelty_settings(args), published_names(args)
        label_map = read_label_map(args.label_map) if args.label_map else None
    run_dir = start_run(args.run_dir or record_dir(out), args, protected=("summary.txt",)) if main else None
    with user_errors():
        ckpt = load_checkpoint(args.model, **names)
        options = _inference(args, ckpt, device)
        if backed:
            result, truth = _annotate_backed(args, ckpt, out, source, novelty, options, label_map)
            if result is None:
                distributed.shutdown()
                return
        else:
            adata = read_anndata(args.data)
            truth = label_column(adata, args.label_key, args.data) if args.label_key else None
            _say_estimate(args, ckpt, device, adata.n_obs)
            result = annotate(select_cells(adata, source, str(args.data)), ckpt, novelty, options, pooling=args.embedding)
            if args.majority_voting:
                result.vote(_over_clusters(args, adata), basis=args.over_clustering_basis, voting=args.voting)
        metrics, lines = result.report(truth, label_map)
        if args.plots == "true" or (args.plots == "auto" and result.n_cells >= MIN_PLOT_CELLS):
            result.to_plots(run_dir, truth, label_map)
        elif args.plots == "auto":
            log.info("plots skipped for a query of %d cells (--plots true draws them)", result.n_cells)
        how = f", a chunk of {result.chunk_size} cells at a time over {result.n_chunks} chunks" if backed else ""
        lines[0:0] = [f"annotated {result.n_cells} cells in {result.seconds:.1f} s ({result.n_cells / max(result.seconds, 1e-9):.1f} cells/s{how}"
                      + (f", {info.world_size} processes" if info.enabled else "") + ")", *query_lines(result.preprocessing)]
        metrics.update(seconds=round(result.seconds, 2), model=str(args.model), data=str(args.data), preprocessing=result.preprocessing,
                       backed=backed, processes=info.world_size)
        if not backed:
            write_h5ad_atomic(result.to_adata(adata), out)
            if args.csv:
                with atomic_path(args.csv) as tmp:
                    result.to_table(truth=_truth_columns(truth, label_map)).to_csv(tmp)
        write_json(run_dir / "metrics.json", metrics)
    lines.append(f"wrote {out}" + (f" and {args.csv}" if args.csv else "") + f"; run record in {run_dir}")
    write_summary(run_dir, lines, results=("accuracy", "note:"))
    distributed.shutdown()


def _inference(args: argparse.Namespace, ckpt: Any, device: Any) -> Any:
    """The inference options of --batch-size, --precision (auto resolved) and the speed flags; a
    batch the memory cannot hold is refused before the first one, with the estimate."""
    resolve_precision_flag(args, device)
    batch_size = args.batch_size
    if batch_size == "auto":
        batch_size = inference_batch_size(ckpt.config.seq_len, ckpt.config.dim, device)
        log.info("%d cells per forward pass (--batch-size auto, %s)", batch_size, device.type)
    need = check_batch_memory(ckpt.config, batch_size, device, limit_gb=args.memory_limit,
                              hint=" (--batch-size auto picks a size that keeps a batch in the CPU's caches)")
    log.info("memory: %s", need.describe(batch_size))
    return inference_options(args, device, batch_size)


def _say_estimate(args: argparse.Namespace, ckpt: Any, device: Any, n_cells: int) -> None:
    log.info("annotating %d cells: the model's arithmetic takes roughly %s here, plus reading and preprocessing (the progress "
             "bar gives the remaining time as it goes)", n_cells, duration(n_cells * cell_seconds(ckpt.config, args.precision, device)))


def _truth_columns(truth: pd.Series | None, label_map: dict[str, str] | None) -> dict[str, Any] | None:
    """The known labels as columns of the --csv table: the --label-key column as it is and, with
    --label-map, as mapped to the model's classes (``<key>_mapped``)."""
    if truth is None:
        return None
    name = str(truth.name or "label")
    columns = {name: truth.to_numpy(dtype=object)}
    if label_map is not None:
        columns[f"{name}_mapped"] = map_labels(truth.reset_index(drop=True), label_map).to_numpy(dtype=object)
    return columns


def _annotate_backed(args: argparse.Namespace, ckpt: Any, out: Path, source: Any, novelty: Any, options: Any,
                     label_map: dict[str, str] | None) -> tuple[Any, Any]:
    """The query annotated a chunk at a time (and across torchrun processes), with its known labels
    (read first: a missing column is reported before the work, not after it); (None, None) on
    the processes other than rank 0."""
    from data.chunks import ChunkedH5ad
    from model.streaming import annotate_h5ad

    truth = None
    if args.label_key:
        with ChunkedH5ad(args.data, source) as reader:
            truth = reader.obs_column(args.label_key)
    result = annotate_h5ad(args.data, ckpt, out, source=source, novelty=novelty, options=options, pooling=args.embedding,
                           chunk_size=args.chunk_size, csv=args.csv,
                           truth=_truth_columns(truth, label_map))
    return (result, truth) if result is not None else (None, None)


def _over_clusters(args: argparse.Namespace, adata: Any) -> Any:
    """The cells' over-clusters from --over-clustering (None: computed by the vote)."""
    if not args.over_clustering:
        return None
    if args.over_clustering not in adata.obs:
        raise InputError(f"--over-clustering {args.over_clustering!r} is not a column of {args.data}; available columns: "
                         f"{list(adata.obs.columns)}")
    return adata.obs[args.over_clustering].astype(str).to_numpy()
