"""What finetune.py does with its parsed flags."""

from __future__ import annotations

import argparse
import logging
from typing import Any

import numpy as np

from data.corpus import read_labelled_on_disk
from data.io import InputError, write_json
from data.labels import check_labels, label_column
from data.preprocess import read_prepared
from model import distributed
from model.checkpoint import choose_library_size, load_checkpoint, load_vocab
from model.cli.args import (
    cell_source,
    check_gene_num,
    execution_options,
    gene2vec_spec,
    model_size,
    preprocessing_record,
    published_names,
    train_config,
    training_checks,
)
from model.cli.pretrain import warn_if_nothing_to_resume
from model.cli.run import start_training_run, user_errors, write_summary
from model.plots import plot_confusion, plot_history
from model.runtime import set_seed
from model.train.finetuning import FinetuningSettings, rows_of, run_finetuning

log = logging.getLogger("scbert")


def before_training(args: argparse.Namespace, pre: Any, genes: list[str], classes: list[str], n_cells: int, device: Any) -> Any:
    """What a fine-tuning run says and checks before its first step: a fine-tuned model given as
    --pretrained, the model size (from scratch), the memory of a step and the time of an epoch.
    Returns the model size of a run from scratch."""
    size = None if pre else model_size(args, device, say=True)
    if pre is not None and pre.is_classifier:
        log.info("--pretrained %s is a fine-tuned classifier (of %s): its encoder is the start and a new classifier head is "
                 "trained for the %d cell types of --data; its own head and classes are not kept", pre.source,
                 ", ".join(pre.classes or []), len(classes))
    config = (pre.config if pre else size.config(len(genes))).replace(head="classifier", n_classes=len(classes),
                                                                                  classifier_members=args.ensemble)
    kept = "head" if args.head_only else "published" if pre and not args.train_all else "all"
    n_val = int(round(n_cells / args.cv)) if args.cv else int(np.ceil(args.val_frac * n_cells))
    training_checks(args, config, device, kept, n_cells - n_val, n_val)
    return size if size is not None else model_size(args)


def run(args: argparse.Namespace) -> None:
    out, device = start_training_run(args)
    main = distributed.current().is_main
    with user_errors():
        set_seed(args.seed)
        pre = load_checkpoint(args.pretrained, **published_names(args)) if args.pretrained else None
        genes = pre.genes if pre else (load_vocab(args.vocab) if args.vocab else None)
        if pre and args.vocab and load_vocab(args.vocab) != pre.genes:
            raise InputError(f"--vocab {args.vocab} is not the vocabulary of --pretrained {args.pretrained}: a pretrained model "
                             f"reads its own genes; drop --vocab")
        library_size, why = choose_library_size(args.library_size, pretrained=pre, data=[args.data], vocab=args.vocab, genes=genes)
        log.info("library sizes over %s (%s)", "the vocabulary genes" if library_size == "vocab" else "all input genes", why)
        if args.backed:
            X, column = read_labelled_on_disk(args.data, genes, args.label_key, library_size, cell_source(args))
            genes = X.genes
            log.info("fine-tuning on %d cells read from disk, a batch at a time", X.shape[0])
        else:
            adata, genes = read_prepared([args.data], genes, args.min_genes or None, library_size=library_size, source=cell_source(args))
            X, column = adata.X, label_column(adata, args.label_key, args.data)
        check_gene_num(args, len(genes))
        known = column.notna().to_numpy()
        if not known.any():
            raise InputError(f"column {args.label_key!r} of {args.data} is empty: no cell has a label")
        if not known.all():
            if main:
                log.warning("%d cells have no %s label and are left out", int((~known).sum()), args.label_key)
            X = rows_of(X, np.flatnonzero(known))
        y = column[known].astype(str).to_numpy()
        classes, counts = check_labels(y, args.label_key, args.cv, args.val_frac)
        log.info("fine-tuning on %d cells, %d cell types: %s", len(y), len(classes), counts)
        size = before_training(args, pre, genes, classes, len(y), device)
        settings = FinetuningSettings(
            size=size, gene2vec=gene2vec_spec(args), gene2vec_genes=args.gene2vec_genes, cv=args.cv, val_frac=args.val_frac,
            dropout=args.dropout, class_weights=args.class_weights, train_all=args.train_all, head_only=args.head_only,
            head_init=args.head_init, keep_rare=args.keep_rare, redraw_features=args.redraw_features, ensemble=args.ensemble,
            options=execution_options(args), preprocessing=preprocessing_record(args, library_size),
            reject_rate=args.reject_rate, precision_check_cells=args.precision_check_cells, recipe=args.recipe, train=train_config(args, progress=not args.quiet and main, patience=args.patience,
                                                   patience_rule=args.patience_rule, label_smoothing=args.label_smoothing, select=args.select,
                                                   min_steps=args.min_steps, select_metric=args.select_metric, logit_adjust=args.logit_adjust,
                                                   sampling=args.sampling, head_lr=args.head_lr, fixed_budget_below=args.fixed_budget_below))
        if not args.cv:
            warn_if_nothing_to_resume(args, settings.train)
        result = run_finetuning(X, y, classes, genes, settings, device, pre, out,
                                record=settings.record([str(args.data)], args.label_key, args.pretrained), progress=not args.quiet)
        if main:
            for k, fold in enumerate(result.folds):
                folder = out / f"fold{k + 1}" if args.cv else out
                folder.mkdir(exist_ok=True)
                m = fold.metrics
                plot_confusion(fold.y_true, fold.y_pred, folder / "confusion_matrix.png",
                               f"{fold.name}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}")
                plot_history(fold.history, ["train_loss", "val_loss", "val_accuracy", "val_macro_f1"], folder / "training_curves.png", fold.name,
                             chosen_epoch=m.get("head_epochs", m.get("best_epoch")))
            write_json(out / "metrics.json", result.metrics)
    if main:
        write_summary(out, [*result.summary_lines(), f"model: {out / 'model.pt'}"])
    distributed.shutdown()
