"""What pretrain.py does with its parsed flags."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from data.corpus import read_corpus
from data.io import write_json
from model import distributed
from model.checkpoint import choose_library_size, load_vocab
from model.cli.args import (
    cell_source,
    check_gene_num,
    execution_options,
    gene2vec_spec,
    model_size,
    preprocessing_record,
    train_config,
    training_checks,
)
from model.cli.run import start_training_run, user_errors, write_summary
from model.plots import plot_history
from model.runtime import set_seed
from model.train.config import TrainConfig
from model.train.pretraining import PretrainingSettings, run_pretraining
from model.train.state import list_states

log = logging.getLogger("scbert")


def warn_if_nothing_to_resume(args: argparse.Namespace, cfg: TrainConfig) -> None:
    if cfg.resume_from and not Path(cfg.resume_from).is_file() and not list_states(cfg.resume_from) and distributed.current().is_main:
        log.warning("WARNING: --resume %s: no saved training state in %s; starting from the beginning", args.resume, cfg.resume_from)


def run(args: argparse.Namespace) -> None:
    out, device = start_training_run(args)
    main = distributed.current().is_main
    with user_errors():
        set_seed(args.seed)
        spec = gene2vec_spec(args)
        vocab = load_vocab(args.vocab) if args.vocab else None
        library_size, why = choose_library_size(args.library_size, data=args.data, vocab=args.vocab, genes=vocab)
        log.info("library sizes over %s (%s)", "the vocabulary genes" if library_size == "vocab" else "all input genes", why)
        corpus = read_corpus(args.data, vocab, args.min_genes or None, backed=args.backed,
                             gene2vec_cells=args.gene2vec_cells if spec == "train" and main else None, seed=args.seed, library_size=library_size,
                             source=cell_source(args))
        check_gene_num(args, len(corpus.genes))
        size = model_size(args, device, say=main)
        n_val = max(1, int(round(args.val_frac * corpus.n_cells)))
        training_checks(args, size.config(len(corpus.genes), head="mlm"), device, "all", corpus.n_cells - n_val, n_val)
        settings = PretrainingSettings(size=size, gene2vec=spec, gene2vec_genes=args.gene2vec_genes, mask_prob=args.mask_prob,
                                       replace_prob=args.replace_prob, val_frac=args.val_frac, mask_rounding=args.mask_rounding,
                                       accuracy=args.masked_accuracy, visible_weight=args.visible_loss, recipe=args.recipe,
                                       train=train_config(args, progress=not args.quiet and main), options=execution_options(args),
                                       preprocessing=preprocessing_record(args, library_size))
        warn_if_nothing_to_resume(args, settings.train)
        result = run_pretraining(corpus, settings, device, out, data=[str(d) for d in args.data], progress=not args.quiet)
        if main:
            write_json(out / "metrics.json", result.metrics)
            plot_history(result.history, ["train_loss", "val_loss", "val_masked_accuracy"], out / "training_curves.png", "pretraining",
                         chosen_epoch=result.best.get("epoch"), baselines={"val_masked_accuracy": "baseline_accuracy"})
            if args.export_gene2vec and result.model.config.gene_embedding == "gene2vec":
                from data.gene2vec import save_word2vec_text

                save_word2vec_text(out / "gene2vec.txt", result.genes, result.model.gene_vectors().numpy())
    if main:
        write_summary(out, [*result.summary_lines(), f"model: {out / 'model.pt'}"])
    distributed.shutdown()
