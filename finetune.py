"""Stage 2: fine-tune a cell-type classifier on labelled cells."""

from __future__ import annotations

import argparse

from model.cli.args import (
    add_bool,
    add_common,
    add_model_args,
    add_published_args,
    add_training_args,
    apply_recipe,
    fraction,
    nonnegative_int,
    parser,
    positive_int,
    recipe_help,
    str2bool,
)

EXAMPLE = """
python finetune.py --data prep/pbmc3k.h5ad --label-key celltype --pretrained runs/pretrain/model.pt --out runs/finetune
python finetune.py --data zheng68k.h5ad --label-key celltype --pretrained panglao.pt --out runs/z68k --cv 5
torchrun --nproc_per_node=2 finetune.py --data prep/pbmc3k.h5ad --label-key celltype --pretrained runs/pretrain/model.pt \\
    --out runs/ft2 --resume runs/ft2      # 2 GPUs; re-running the command after a crash goes on where it stopped
"""


def add_rare_type_args(g: argparse._ActionsContainer) -> None:
    """The recipe's settings for rare types and small training sets (see RESULTS.md, 7 December)."""
    g.add_argument("--min-steps", type=nonnegative_int, default=None,
                   help=recipe_help("finetune", "min_steps", "step floor: epochs are added until the run has this many optimiser steps; "
                                    "an explicit --epochs turns it off unless --min-steps is given too"))
    g.add_argument("--select-metric", choices=["accuracy", "macro_f1"], default=None,
                   help=recipe_help("finetune", "select_metric", "validation metric that chooses the kept epoch (macro-F1 ties: lower loss)"))
    g.add_argument("--logit-adjust", type=float, default=None,
                   help=recipe_help("finetune", "logit_adjust", "tau of the logit-adjusted loss: training logits + tau x log(class share); "
                                    "0 = plain cross-entropy"))
    g.add_argument("--sampling", choices=["uniform", "balanced"], default=None,
                   help=recipe_help("finetune", "sampling", "training cells drawn uniformly, or each type equally often (with replacement)"))
    g.add_argument("--head-lr", type=float, default=None,
                   help=recipe_help("finetune", "head_lr", "learning rate of the classifier head (None: --lr)"))
    g.add_argument("--fixed-budget-below", type=nonnegative_int, default=None,
                   help=recipe_help("finetune", "fixed_budget_below", "with fewer validation cells than this, train the whole budget "
                                    "and keep the last epoch"))
    g.add_argument("--keep-rare", type=nonnegative_int, default=None,
                   help=recipe_help("finetune", "keep_rare", "cell types with fewer cells keep all of them for training (none goes to "
                                    "the validation part; 0 = every type gives up its share)"))
    g.add_argument("--redraw-features", type=str2bool, nargs="?", const=True, default=None, metavar="BOOL",
                   help=recipe_help("finetune", "redraw_features", "redraw the FAVOR+ random features every 1,000 training calls, as "
                                    "performer-pytorch does (false keeps the pretrained draw)"))


def build_parser() -> argparse.ArgumentParser:
    p = parser(
        "Fine-tune scBERT to classify cell types. Cells are split into training and validation parts stratified by "
        "type (or into --cv folds; a type with fewer than --keep-rare cells stays whole in training); training runs at "
        "least --min-steps optimiser steps and stops early when the validation score (--select-metric) has not improved "
        "for --patience epochs. With --pretrained, only the classifier head is trained on the frozen encoder (--head-only false: "
        "the published policy, the final norm, the second-to-last Performer layer and the head; --train-all: everything); "
        "without it, a model of the given size is trained from scratch. Writes OUT/model.pt (best epoch), OUT/metrics.json (accuracy, macro_f1, per-class report), "
        "OUT/confusion_matrix.png, OUT/training_curves.png, OUT/summary.txt.",
        EXAMPLE,
    )
    p.add_argument("--data", "--data_path", required=True, help="labelled cells (.h5ad from preprocess.py, or raw counts: normalised on the fly)")
    p.add_argument("--label-key", "--label_key", required=True, help="obs column holding the cell types")
    p.add_argument("--pretrained", "--model_path", default=None, help="pretrained checkpoint (from pretrain.py); the data are aligned to its genes")
    p.add_argument("--out", "--ckpt_dir", required=True, help="output folder")
    add_published_args(p)
    p.add_argument("--vocab", default=None, help="gene vocabulary when training from scratch (default: the data's genes)")
    add_model_args(p)
    g = add_training_args(p, "finetune", "maximum epochs")
    g.add_argument("--cv", type=int, default=None, help="K-fold stratified cross-validation instead of one split (reports mean ± sd)")
    g.add_argument("--val-frac", type=fraction, default=None,
                   help=recipe_help("finetune", "val_frac", "validation fraction of a single split (of each fold's training part with --cv)"))
    g.add_argument("--patience", type=int, default=None,
                   help=recipe_help("finetune", "patience", "stop after this many epochs without a better validation accuracy (0 = never stop early)"))
    g.add_argument("--patience-rule", choices=["ours", "published"], default=None,
                   help=recipe_help("finetune", "patience_rule", "ours stops after --patience stale epochs, published after --patience + 1"))
    g.add_argument("--dropout", type=float, default=None, help=recipe_help("finetune", "dropout", "dropout in the classifier head"))
    add_rare_type_args(g)
    add_bool(g, "--class-weights", default=False, help="weight the loss by inverse class frequency (balanced)")
    g.add_argument("--train-all", type=str2bool, nargs="?", const=True, default=None, metavar="BOOL",
                   help=recipe_help("finetune", "train_all", "train every layer, not only the published subset"))
    g.add_argument("--head-only", type=str2bool, nargs="?", const=True, default=None, metavar="BOOL",
                   help=recipe_help("finetune", "head_only", "train only the classifier head on the frozen pretrained encoder (faster; "
                                    "see RESULTS.md)"))
    g.add_argument("--ensemble", type=positive_int, default=None,
                   help=recipe_help("finetune", "ensemble", "classifier heads on the frozen encoder, each on its own stopping split "
                                    "(the first is the one-head run; the novelty scores read it); a cell's class scores are the mean "
                                    "of their logits (1 = one head, as published)"))
    g.add_argument("--head-init", choices=["expression", "random"], default=None,
                   help=recipe_help("finetune", "head_init", "start of the head's per-gene reduction (conv1): expression = the "
                                    "least-squares read-out of each gene's expression bin from its encoding; random = as published"))
    g.add_argument("--select", choices=["best", "last"], default="best",
                   help="weights the model ends with: the best validation epoch (default) or the last epoch (with a fixed --epochs "
                   "and --patience 0: robust when the validation part is small)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing of the cross-entropy loss (default: 0)")
    g.add_argument("--reject-rate", type=fraction, default=0.05,
                   help="novelty calibration: the thresholds stored with the model reject this fraction of the validation cells, i.e. "
                   "of new cells of known types (default: 0.05); predict.py --threshold auto uses them")
    g.add_argument("--precision-check-cells", type=nonnegative_int, default=128,
                   help="after training, measure how much bf16 moves the model's outputs on this many validation cells (one float32 "
                   "and one bf16 pass), stored with the model: predict.py --precision bf16 re-checks in float32 only the cells this "
                   "close to a decision (--fp32-recheck auto); 0 = skip, and predict.py uses a fixed margin of 0.05 (default: 128)")
    d = p.add_argument_group("training data larger than memory")
    add_bool(d, "--backed", default=False,
             help="read cells from disk a batch at a time instead of loading the matrix: --data is an .h5ad written by preprocess.py "
             "(gene2vec from scratch samples 50,000 training cells)")
    add_common(p)
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = apply_recipe(p.parse_args(argv), "finetune")
    if args.cv is not None and args.cv < 2:
        p.error("--cv needs at least 2 folds")
    if args.reject_rate <= 0:
        p.error("--reject-rate must be above 0")
    if args.train_all and args.head_only:
        p.error("--train-all and --head-only exclude each other: choose one")

    from model.cli.boundary import stage, training_interrupted
    from model.cli.preflight import check_paths

    with stage(lambda: training_interrupted(args.out)):
        check_paths(args, "finetune")
        from model.cli.finetune import run

        run(args)


if __name__ == "__main__":
    main()
