"""What scripts/accuracy_benchmark.py does with its parsed flags: run a protocol, merge results,
or write the gene list a run would use."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from data.io import InputError, write_json, write_text
from data.preprocess import read_prepared
from model.accuracy.harness import ProtocolSettings, encoder_exposure, load_labelled, parse_subsample, protocol_splits, run_benchmark
from model.accuracy.methods import PRESETS, method_factories
from model.accuracy.report import markdown_table, read_label_map, write_report
from model.checkpoint import CheckpointError, load_checkpoint, load_vocab
from model.cli.run import fail, start_run
from model.runtime import set_threads

log = logging.getLogger("scbert")


def merge(args: argparse.Namespace) -> None:
    """Combine the results.json of several output folders into --out."""
    out = Path(args.out)
    if (out / "results.json").exists() and not args.overwrite:
        fail(f"{out} already holds results.json; pass --overwrite to replace it, or choose another --out")
    try:
        results = [json.loads((Path(d) / "results.json").read_text(encoding="utf-8")) for d in args.merge]
    except (OSError, ValueError) as e:
        fail(f"cannot read the results to merge: {e}")
    records = [r for res in results for r in res["runs"]]
    info = {**results[0]["info"], "merged_from": [str(d) for d in args.merge]}
    info["encoder"] = next((r["info"]["encoder"] for r in results if r["info"].get("encoder")), None)  # the scBERT part's
    labels = results[0]["info"].get("labels")
    try:
        summary = write_report(out, records, np.asarray(labels) if labels else None, info)
    except ValueError as e:
        fail(str(e))
    print(markdown_table(summary))


def write_genes(args: argparse.Namespace) -> None:
    """Write the genes a run with these flags would use (to pretrain on), one per line."""
    try:
        genes = load_vocab(args.vocab) if args.vocab else None
        adata, _, genes = load_labelled(args.data, args.label_key, genes, args.n_genes, args.min_genes)
    except InputError as e:
        fail(str(e))
    write_text(args.write_genes, "\n".join(genes) + "\n")
    print(f"wrote {len(genes)} genes ({adata.n_obs} labelled cells) to {args.write_genes}")


def _protocol(args: argparse.Namespace) -> ProtocolSettings:
    return ProtocolSettings(protocol=args.protocol, folds=args.folds, seeds=list(args.seeds),
                            label_map=read_label_map(args.label_map) if args.label_map else {}, test_data=args.test_data,
                            split_key=args.split_key, train_values=args.train_values, test_values=args.test_values, hold_out=args.hold_out,
                            threshold=args.threshold, fractions=args.fractions,
                            subsample=parse_subsample(args.subsample or []) if args.protocol == "imbalance" else {})


def run(args: argparse.Namespace) -> None:
    if args.merge:
        return merge(args)
    if args.write_genes:
        return write_genes(args)
    out = start_run(args.out, args, protected=("results.json",))
    set_threads(args.threads)
    try:
        pre = load_checkpoint(args.pretrained) if args.pretrained else None
        pre_nog2v = load_checkpoint(args.pretrained_nogene2vec) if args.pretrained_nogene2vec else None
        if pre is not None and pre_nog2v is not None and pre.genes != pre_nog2v.genes:
            raise InputError("--pretrained and --pretrained-nogene2vec have different gene vocabularies; pretrain both on the same genes")
        genes = pre.genes if pre else (pre_nog2v.genes if pre_nog2v else (load_vocab(args.vocab) if args.vocab else None))
        library_size = (pre or pre_nog2v).preprocessing["library_size"] if (pre or pre_nog2v) else "all"
        adata, y, genes = load_labelled(args.data, args.label_key, genes, args.n_genes, args.min_genes, library_size)
        protocol = _protocol(args)
        X, y, splits = protocol_splits(protocol, adata, y, genes, args.data, args.label_key, args.min_genes, library_size)
        overrides = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "patience": args.patience,
                     "weight_decay": args.weight_decay, "select": args.select}
        dropout = PRESETS[args.preset].get("dropout", 0.0) if args.dropout is None else args.dropout
        corpus = None
        if args.pretrain_per_split and args.pretrain_corpus:
            corpus = read_prepared(args.pretrain_corpus, genes, args.min_genes or None, library_size=library_size)[0].X
            log.info("pretraining corpus: %d unlabelled cells, added to each run's training cells", corpus.shape[0])
        methods = method_factories(args.methods, pre, pre_nog2v, args.preset, overrides, args.train_all, args.device,
                                   head_only=args.head_only, head_init=args.head_init, dropout=dropout, class_weights=args.class_weights,
                                   pretrain_per_split=args.pretrain_per_split, pretrain_corpus=corpus,
                                   pretrain_train={"epochs": args.pretrain_epochs, "batch_size": args.pretrain_batch_size, "lr": args.pretrain_lr})
        scbert_runs = any(m.startswith("scbert") for m in args.methods)
        encoder = encoder_exposure(pre, list(args.data), args.pretrain_per_split, args.pretrain_corpus) if scbert_runs else None
        if encoder and encoder["includes_test_cells"]:
            log.warning("WARNING: %s", encoder["text"])
        if "celltypist" in args.methods and importlib.util.find_spec("celltypist") is None:
            raise InputError("method celltypist needs the celltypist package: pip install -e '.[bench]' (or leave it out of --methods)")
        log.info("%s: %d cells x %d genes, %d types; %d splits x %d methods", args.protocol, X.shape[0], len(genes), len(set(y)), len(splits), len(methods))
        threshold = args.threshold if args.protocol == "novel" else None
        records = run_benchmark(X, y, genes, splits, methods, threshold, progress=not args.quiet,
                                reject_rate=args.reject_rate if args.protocol == "novel" else None, extra_reject_rates=args.extra_reject_rates,
                                majority_voting=args.majority_voting,
                                over_clustering_basis=args.over_clustering_basis, over_clustering_resolution=args.over_clustering_resolution)
        info: dict[str, Any] = {
            "protocol": args.protocol, "data": [str(p) for p in args.data] + [str(p) for p in (args.test_data or [])],
            "label_key": args.label_key, "n_cells": int(X.shape[0]), "n_genes": len(genes), "seeds": protocol.seeds,
            "folds": args.folds, "threshold": threshold, "preset": args.preset,
            "reject_rate": args.reject_rate if args.protocol == "novel" else None,
            "majority_voting": {"basis": args.over_clustering_basis, "resolution": args.over_clustering_resolution}
            if args.majority_voting else None,
            "scbert_finetuning": {"train_all": args.train_all, "head_only": args.head_only, "head_init": args.head_init,
                                  "class_weights": args.class_weights, "dropout": dropout, **{k: v for k, v in overrides.items() if v is not None}},
            "pretrained": args.pretrained, "pretrained_nogene2vec": args.pretrained_nogene2vec, "methods": list(args.methods),
            "encoder": encoder, "genes_chosen_from": "the given vocabulary" if (args.vocab or pre or pre_nog2v) else
            f"the {len(genes)} genes of highest variance over all labelled cells (label-free)",
            "labels": y.tolist(),
            "splits": [{"key": s.key, "fingerprint": s.fingerprint(), "n_train": len(s.train), "n_test": len(s.test)} for s in splits]}
        write_json(out / "genes.json", genes)
        summary = write_report(out, records, y, info)
    except (InputError, CheckpointError, ValueError, ImportError) as e:
        fail(str(e))
    print(markdown_table(summary))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'per_class_f1.csv'} and confusion_*.png")
