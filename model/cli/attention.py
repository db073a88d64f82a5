"""What attn_analysis.py does with its parsed flags."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from data.io import InputError, read_cells, write_json
from data.labels import label_column
from model.annotation import AnnotationKeys, annotate
from model.attention.analysis import (
    BUNDLED_GMT,
    BUNDLED_MARKERS,
    AttentionSettings,
    analyse_attention,
    resolve_gene_set_file,
    subsample_per_type,
)
from model.checkpoint import load_checkpoint
from model.cli.args import cell_source, execution_options, published_names, resolve_precision_flag
from model.cli.run import start_run, user_errors, write_summary
from model.inference import InferenceOptions
from model.plots import plot_umap
from model.runtime import resolve_device

log = logging.getLogger("scbert")


def _existing(path: str | None) -> Path | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise InputError(f"{path} does not exist: give an existing file (or a bundled name: markers panglaodb/immune, gmt hallmark/c2)")
    return Path(path)


def _backed_by_default(path: Path, umap: bool) -> bool:
    """--backed auto: an HDF5 .h5ad without --umap (anything else is read whole, where the reader
    explains what is wrong with a file that is not one)."""
    import h5py

    return not umap and path.suffix.lower() == ".h5ad" and path.is_file() and path.stat().st_size > 0 and h5py.is_hdf5(path)


def run(args: argparse.Namespace) -> None:
    t0 = time.time()
    out = start_run(args.out, args, protected=("attention_top_genes.csv",))
    with user_errors():
        gmt = [resolve_gene_set_file(spec, BUNDLED_GMT) for spec in args.gmt if spec.strip().lower() != "none"]
        settings = AttentionSettings(
            layer=args.layer, max_cells_per_type=args.max_cells_per_type, top_k=args.top_k,
            markers=resolve_gene_set_file(args.markers, BUNDLED_MARKERS), species=args.species,
            celltype_map=_existing(args.celltype_map), gmt=[p for p in gmt if p],
            min_set_size=args.min_set_size, max_set_size=args.max_set_size, batch_size=args.batch_size, max_memory_gb=args.max_memory,
            seed=args.seed)
        ckpt = load_checkpoint(args.model, **published_names(args))
        if args.umap and not ckpt.is_classifier:
            raise InputError(f"--umap colours cells by the model's predictions, but {args.model} is a pretrained (not fine-tuned) model; drop --umap or use a fine-tuned model")
        if args.backed and args.umap:
            raise InputError("--umap embeds every cell, which --backed avoids reading: drop one of them")
        backed = args.backed if args.backed is not None else _backed_by_default(Path(args.data), args.umap)
        if backed:
            from data.chunks import ChunkedH5ad, read_obs_column

            column = read_obs_column(args.data, args.label_key)
            if column.empty:
                raise InputError(f"{args.data} holds 0 cells: nothing to work on")
        else:
            raw = read_cells(args.data, source=cell_source(args))
            column = label_column(raw, args.label_key, args.data)
        known = column.notna().to_numpy()
        if not known.any():
            raise InputError(f"column {args.label_key!r} of {args.data} is empty: no cell has a label")
        if not known.all():
            log.warning("%d cells have no %s label and are left out", int((~known).sum()), args.label_key)
        labels = column[known].astype(str).to_numpy()
        device = resolve_device(args.device)
        resolve_precision_flag(args, device)
        options = execution_options(args)
        if backed:  # draw the scored cells first, then read only them
            sel = subsample_per_type(labels, args.max_cells_per_type, args.seed)
            with ChunkedH5ad(args.data, cell_source(args)) as reader:
                labelled = reader.take(np.flatnonzero(known)[sel])
            log.info("read the %d scored cells of %d from %s", len(sel), len(labels), args.data)
            analysis = analyse_attention(ckpt, labelled, labels[sel], dataclasses.replace(settings, max_cells_per_type=0), device, options,
                                         progress=not args.quiet, what=str(args.data), n_cells_total=len(labels))
        else:
            labelled = raw[known].copy()
            analysis = analyse_attention(ckpt, labelled, labels, settings, device, options, progress=not args.quiet, what=str(args.data))
        analysis.write(out, args.heatmap_genes)
        metrics = {"data": str(args.data), "model": str(args.model), "label_key": args.label_key, **analysis.metrics}
        if args.umap:
            log.info("embedding all %d cells for the UMAP", labelled.n_obs)
            keys = AnnotationKeys()
            result = annotate(labelled, ckpt, options=InferenceOptions(args.batch_size, device, progress=not args.quiet, execution=options))
            plot_umap(result.to_adata(labelled.copy()), args.label_key, out / "umap.png", args.seed, keys.celltype, keys.embedding)
            metrics["umap_accuracy_vs_label"] = float((result.labels == labels).mean())
    metrics["seconds_attention"] = round(analysis.seconds, 1)
    metrics["seconds"] = round(time.time() - t0, 1)
    write_json(out / "metrics.json", metrics)
    lines = analysis.summary_lines(args.max_cells_per_type)
    lines[0] += f"; {metrics['seconds']} s in all ({metrics['seconds_attention']} s attention)"
    write_summary(out, [*lines, f"outputs in {out}"])

