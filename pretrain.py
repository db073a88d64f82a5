"""Stage 1: masked-expression pretraining on unlabelled cells."""

from __future__ import annotations

import argparse

from model.cli.args import (
    add_bool,
    add_common,
    add_model_args,
    add_training_args,
    apply_recipe,
    fraction,
    nonnegative_float,
    parser,
    positive_int,
    recipe_help,
)

EXAMPLE = """
python pretrain.py --data prep/pbmc3k.h5ad prep/immune.h5ad --out runs/pretrain \\
    --dim 64 --depth 2 --heads 4 --dim-head 16 --epochs 5 --batch-size 16
python pretrain.py --data panglao.h5ad --out runs/panglao --gene2vec gene2vec_16906.npy \\
    --gene2vec-genes panglao_genes.txt --vocab panglao_genes.txt      # published size and assets
torchrun --nproc_per_node=4 pretrain.py --data shards/ --backed --out runs/atlas --save-every 500   # 4 GPUs, on disk
python pretrain.py --data shards/ --backed --out runs/atlas --resume runs/atlas                   # go on after a crash
"""


def build_parser() -> argparse.ArgumentParser:
    p = parser(
        "Pretrain scBERT by masked-expression reconstruction: in every cell, 15%% of the expressed (non-zero) "
        "genes are masked (90%% replaced by the mask token, the rest kept) and the model predicts their expression "
        "bins. Writes OUT/model.pt (best held-out masked accuracy), OUT/metrics.json (held-out masked accuracy and the "
        "accuracy of predicting each cell's most common bin), OUT/training_curves.png, OUT/log.txt and OUT/config.json.",
        EXAMPLE,
    )
    p.add_argument("--data", "--data_path", nargs="+", required=True, help="one or more .h5ad files (preprocess.py output, or raw counts: normalised on the fly); together one corpus")
    p.add_argument("--out", "--ckpt_dir", required=True, help="output folder")
    p.add_argument("--vocab", default=None, help="gene vocabulary (gene list, checkpoint or .h5ad); default: the first file's genes")
    add_model_args(p)
    g = add_training_args(p, "pretrain", "passes over the corpus")
    g.add_argument("--mask-prob", "--mask_prob", type=fraction, default=0.15, help="fraction of non-zero genes masked per cell (default: 0.15)")
    g.add_argument("--mask-rounding", choices=["round", "ceil"], default=None,
                   help=recipe_help("pretrain", "mask_rounding", "masked genes per cell: round(mask-prob x expressed genes) or ceil (at least 1)"))
    g.add_argument("--masked-accuracy", choices=["all_tokens", "expression_bins"], default=None,
                   help=recipe_help("pretrain", "masked_accuracy", "held-out masked accuracy: the most likely of all 7 tokens, or of the "
                                    "expression bins 1..bin-num (a masked gene is always expressed)"))
    g.add_argument("--replace-prob", "--replace_prob", type=float, default=0.9, help="of the masked, fraction replaced by the mask token (default: 0.9)")
    g.add_argument("--visible-loss", type=nonnegative_float, default=0.0,
                   help="weight of a second loss: every visible (not masked) gene reproduces its own bin, so that the encodings keep "
                   "each cell's own values besides what its context predicts (default: 0, masked genes only, as published)")
    g.add_argument("--val-frac", type=fraction, default=0.05, help="cells held out to score masked accuracy (default: 0.05)")
    g.add_argument("--valid_every", type=int, default=1, help=argparse.SUPPRESS)
    g.add_argument("--export-gene2vec", action="store_true", help="also write OUT/gene2vec.txt (word2vec text format)")
    d = p.add_argument_group("corpora larger than memory")
    add_bool(d, "--backed", default=False,
             help="read cells from disk a batch at a time instead of loading the matrix: --data are .h5ad files written by "
             "preprocess.py, or folders of such shards; memory then stays flat as the corpus grows")
    d.add_argument("--gene2vec-cells", type=positive_int, default=50_000,
                   help="with --backed and --gene2vec train: cells sampled (seeded) to compute gene co-expression (default: 50000)")
    add_common(p)
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = apply_recipe(p.parse_args(argv), "pretrain")

    from model.cli.boundary import stage, training_interrupted
    from model.cli.preflight import check_paths

    with stage(lambda: training_interrupted(args.out)):
        check_paths(args, "pretrain")
        from model.cli.pretrain import run

        run(args)


if __name__ == "__main__":
    main()
