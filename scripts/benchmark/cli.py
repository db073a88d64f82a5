"""Accuracy benchmark: scBERT against baselines on identical splits (protocols cv, cross, novel, imbalance, fewshot).

Writes OUT/results.json (every run, its split fingerprint and predictions), OUT/results.md (mean ± sd
accuracy and macro-F1 per method), OUT/per_class_f1.csv and OUT/confusion_<variant>_<method>.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from data.io import InputError, write_json, write_text
from data.labels import read_label_map
from data.preprocess import read_prepared
from finetune import add_rare_type_args
from model.checkpoint import CheckpointError, load_checkpoint, load_vocab
from model.cli.args import add_bool, add_device, add_min_genes, parser, positive_float, positive_int, str2bool
from model.cli.run import fail, setup_logging, start_run
from model.majority_voting import OVER_CLUSTERING_BASES
from model.runtime import set_threads
from scripts.benchmark.harness import ProtocolSettings, encoder_exposure, load_labelled, parse_subsample, protocol_splits, run_benchmark
from scripts.benchmark.methods import ALL_METHODS, BASELINES, PRESETS, method_factories
from scripts.benchmark.report import markdown_table, write_report

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
                     "weight_decay": args.weight_decay, "select": args.select, "min_steps": args.min_steps, "select_metric": args.select_metric,
                     "logit_adjust": args.logit_adjust, "sampling": args.sampling, "head_lr": args.head_lr,
                     "fixed_budget_below": args.fixed_budget_below}
        if args.epochs is not None and args.min_steps is None:  # as finetune.py: an explicit --epochs is the budget
            overrides["min_steps"] = 0
        preset = PRESETS[args.preset]
        dropout = preset.get("dropout", 0.0) if args.dropout is None else args.dropout
        head_init = preset["head_init"] if args.head_init is None else args.head_init
        keep_rare = preset["keep_rare"] if args.keep_rare is None else args.keep_rare
        redraw = preset["redraw_features"] if args.redraw_features is None else args.redraw_features
        # one of --train-all / --head-only given sets the other off; neither: the preset's layers
        given = args.train_all is not None or args.head_only is not None
        train_all = bool(args.train_all) if given else preset["train_all"]
        head_only = bool(args.head_only) if given else preset["head_only"]
        corpus = None
        if args.pretrain_per_split and args.pretrain_corpus:
            corpus = read_prepared(args.pretrain_corpus, genes, args.min_genes or None, library_size=library_size)[0].X
            log.info("pretraining corpus: %d unlabelled cells, added to each run's training cells", corpus.shape[0])
        methods = method_factories(args.methods, pre, pre_nog2v, args.preset, overrides, train_all, args.device,
                                   head_only=head_only, head_init=head_init, dropout=dropout, class_weights=args.class_weights,
                                   keep_rare=keep_rare, redraw_features=redraw,
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
            "scbert_finetuning": {"train_all": train_all, "head_only": head_only, "head_init": head_init,
                                  "class_weights": args.class_weights, "dropout": dropout, "keep_rare": keep_rare, "redraw_features": redraw,
                                  "train": {**preset["train"], **{k: v for k, v in overrides.items() if v is not None}}},
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


EXAMPLE = """
# 5-fold CV, 3 seeds, baselines and scBERT (pretrained and not) on the bundled PBMCs
python -m scripts.benchmark --data data/pbmc3k_labeled.h5ad --label-key celltype --protocol cv --out runs/cv \\
    --pretrained runs/pretrain/model.pt --methods logreg_l1 logreg_l2 knn_pca scbert scbert_nopretrain
# train on human pancreas, test on mouse (one file, split by a column)
python -m scripts.benchmark --data data/pancreas_baron_subset.h5ad --label-key celltype --protocol cross \\
    --split-key species --train-values human --test-values mouse --out runs/cross
# hold out a type; imbalance; few-shot
python -m scripts.benchmark ... --protocol novel                 # leave-one-type-out, every novelty score
python -m scripts.benchmark ... --protocol novel --hold-out "NK" --threshold 0.5
python -m scripts.benchmark ... --protocol imbalance --subsample "CD14+ Mono=10" "B=10"
python -m scripts.benchmark ... --protocol fewshot --fractions 0.1 0.25 0.5 0.75
# combine runs made separately (e.g. scBERT variants in parallel processes) into one table
python -m scripts.benchmark --merge runs/cv_baselines runs/cv_scbert --out runs/cv_all
"""


def build_parser():
    p = parser(__doc__.splitlines()[0] + " Every method sees the same preprocessed matrix and the same splits.", EXAMPLE)
    p.add_argument("--data", nargs="+", help="labelled cells (.h5ad or any format preprocess.py reads); several files are concatenated")
    p.add_argument("--label-key", default="celltype", help="obs column with the cell types (default: celltype)")
    p.add_argument("--protocol", choices=["cv", "cross", "novel", "imbalance", "fewshot"], default="cv")
    p.add_argument("--out", default=None, help="output folder (required unless --write-genes)")
    p.add_argument("--methods", nargs="+", default=list(BASELINES), choices=list(ALL_METHODS), metavar="METHOD",
                   help=f"methods to run (default: the baselines). Choices: {', '.join(ALL_METHODS)}")
    p.add_argument("--folds", type=positive_int, default=5, help="K of the stratified K-fold (cv, novel, imbalance, fewshot; default: 5)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds: each repeats the folds and the methods' randomness (default: 0)")
    g = p.add_argument_group("genes (every method gets the same matrix)")
    g.add_argument("--n-genes", type=int, default=2000, help="keep the N genes with the highest variance of log expression (default: 2000; "
                   "ignored with --pretrained or --vocab, which fix the genes)")
    add_min_genes(g)
    g.add_argument("--vocab", default=None, help="gene list file, checkpoint or .h5ad whose genes to use")
    g = p.add_argument_group("scBERT")
    g.add_argument("--pretrained", default=None, help="pretrained checkpoint (pretrain.py) for scbert; scbert_nopretrain then uses its architecture and gene2vec")
    g.add_argument("--pretrained-nogene2vec", default=None, help="checkpoint pretrained with --gene2vec none, for scbert_nogene2vec")
    add_bool(g, "--pretrain-per-split", default=False,
             help="pretrain a new encoder for every run, on --pretrain-corpus plus that run's training cells (gene2vec too): no test "
             "cell is ever seen by pretraining. Needs fixed genes (--vocab or --n-genes); replaces --pretrained for scbert and scbert_nogene2vec")
    g.add_argument("--pretrain-corpus", nargs="+", default=[], help="with --pretrain-per-split: unlabelled cells added to each run's training "
                   "cells (put on the benchmark's genes; default: none)")
    g.add_argument("--pretrain-epochs", type=positive_int, default=10, help="with --pretrain-per-split: pretraining epochs (default: 10)")
    g.add_argument("--pretrain-batch-size", type=positive_int, default=16, help="with --pretrain-per-split: pretraining batch size (default: 16)")
    g.add_argument("--pretrain-lr", type=float, default=1e-3, help="with --pretrain-per-split: pretraining learning rate (default: 1e-3)")
    g.add_argument("--preset", choices=list(PRESETS), default="cpu", help="fine-tuning recipe (and from-scratch model size): cpu = "
                   "finetune.py's default recipe (model.train.recipes); dec3 = the benchmark's recipe of 3 December (for the ablation); "
                   "published = the published recipe at the published model size")
    g.add_argument("--epochs", type=positive_int, default=None, help="override the preset's fine-tuning epochs")
    g.add_argument("--batch-size", type=positive_int, default=None, help="override the preset's batch size")
    g.add_argument("--lr", type=float, default=None, help="override the preset's learning rate")
    g.add_argument("--patience", type=int, default=None, help="override the preset's early-stopping patience (0: never stop early)")
    g.add_argument("--train-all", type=str2bool, nargs="?", const=True, default=None, metavar="BOOL",
                   help="fine-tune every layer of the pretrained model (default: the preset's)")
    g.add_argument("--head-only", type=str2bool, nargs="?", const=True, default=None, metavar="BOOL", help="fine-tune only the classifier head of the pretrained model (scbert, "
             "scbert_nogene2vec; scbert_nopretrain always trains its whole encoder)")
    g.add_argument("--head-init", choices=["expression", "random"], default=None,
                   help="start of the head's conv1: expression read-out or random (as published) (default: the preset's)")
    add_bool(g, "--class-weights", default=False, help="weight scBERT's loss by inverse class frequency of the training part (balanced)")
    g.add_argument("--dropout", type=float, default=None, help="classifier-head dropout (default: the preset's)")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: none)")
    g.add_argument("--select", choices=["best", "last"], default=None,
                   help="fine-tuned weights kept: best inner-validation epoch or last epoch (default: the preset's)")
    add_rare_type_args(g)
    add_device(g, "cpu")
    g = p.add_argument_group("protocols")
    g.add_argument("--test-data", nargs="+", default=None, help="cross: the test dataset(s), put on the training data's genes")
    g.add_argument("--split-key", default=None, help="cross within one file: obs column naming the dataset of each cell (e.g. species, donor)")
    g.add_argument("--train-values", nargs="+", default=[], help="cross: values of --split-key to train on")
    g.add_argument("--test-values", nargs="+", default=[], help="cross: values of --split-key to test on")
    g.add_argument("--label-map", default=None, help="two columns (label in the data, label to use) when datasets name types differently; "
                   "a label to use of '-' leaves those cells out (e.g. unassigned cells, or a type the other dataset lacks)")
    g.add_argument("--hold-out", nargs="+", default=None,
                   help="novel: cell types left out of training (default: leave-one-type-out, each type with >= 20 cells in turn)")
    g.add_argument("--threshold", type=float, default=0.5,
                   help="novel: the published rule, a row of its own: Unassigned below this top probability (default: 0.5, as published)")
    add_bool(g, "--majority-voting", default=False,
             help="also score each method's predictions after voting within Leiden over-clusters of the test cells, as "
             "'<method> [majority voting]' (hard vote, CellTypist's) and '<method> [soft voting]' (not with novel)")
    g.add_argument("--over-clustering-basis", choices=OVER_CLUSTERING_BASES, default="expression",
                   help="what --majority-voting over-clusters: the test cells' expression PCA, the same clusters for every method "
                   "(default, as CellTypist), or each method's own embedding (scBERT: its cell embedding; logistic regression: its PCA)")
    g.add_argument("--over-clustering-resolution", type=positive_float, default=None,
                   help="Leiden resolution of the over-clustering (default: CellTypist's, 5 below 5,000 test cells, growing with their number)")
    g.add_argument("--reject-rate", type=float, default=0.05,
                   help="novel: each novelty score's threshold rejects this fraction of calibration cells of known types (default: 0.05)")
    g.add_argument("--extra-reject-rates", type=float, nargs="+", default=[],
                   help="novel: more rows per score, thresholded at these rates too (rows 'method [score @ 1%%]'; the best score is "
                   "chosen among the --reject-rate rows)")
    g.add_argument("--subsample", nargs="+", default=None, help="imbalance: TYPE=N, training cells of TYPE subsampled to N")
    g.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75], help="fewshot: fractions of each training fold")
    g = p.add_argument_group("run")
    g.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default: 1; run several benchmarks side by side instead)")
    g.add_argument("--write-genes", default=None, metavar="FILE",
                   help="instead of running: write the genes the benchmark would use (--n-genes or --vocab) to FILE, one per line (to pretrain on)")
    g.add_argument("--merge", nargs="+", default=None, help="instead of running: combine these output folders' results.json into --out")
    add_bool(g, "--overwrite", default=False, help="replace an existing results.json in --out")
    add_bool(g, "--quiet", default=False, help="only warnings and errors, no progress bar")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    if not args.merge and not args.data:
        p.error("--data is required (or --merge FOLDER ...)")
    if not args.out and not args.write_genes:
        p.error("--out is required")
    if args.train_all and args.head_only:
        p.error("--train-all and --head-only exclude each other: choose one")
    setup_logging(args.quiet)
    run(args)
