"""Stage 3: annotate new cells with a fine-tuned model."""

from __future__ import annotations

import argparse

from model.cli.args import (
    add_batch_size,
    add_bool,
    add_device,
    add_input_args,
    add_log_args,
    add_memory_limit,
    add_precision,
    add_published_args,
    add_speed_args,
    fraction,
    fraction_or_auto,
    parser,
    positive_int,
    str2bool,
    threshold_value,
)
from model.majority_voting import OVER_CLUSTERING_BASES, VOTING_RULES
from model.novelty import DEFAULT_SCORE, SCORE_MEANINGS, SCORES

EXAMPLE = """
python predict.py --data query.h5ad --model runs/finetune/model.pt --out query_annotated.h5ad --csv query_labels.csv
"""


def build_parser() -> argparse.ArgumentParser:
    p = parser(
        "Annotate cells (raw counts or log-normalised; every cell kept, in order) with a fine-tuned scBERT model. "
        "The query is aligned to the model's genes (missing genes count as not expressed). Writes a copy of the input "
        "with obs['scbert_celltype'] ('Unassigned' where the novelty score passes its threshold: by default the one "
        "calibrated at fine-tuning to reject 5%% of known cells; --threshold 0.5 --novelty softmax is the published rule), "
        "obs['scbert_celltype_raw'] (the top type), obs['scbert_confidence'], obs['scbert_novelty'], "
        "obsm['scbert_probabilities'] (columns: uns['scbert_classes']) and obsm['X_scbert'] "
        "(cell embeddings: the classifier's penultimate features, see --embedding), and a run record in OUT_run/ (config.json, "
        "log.txt, metrics.json, summary.txt, predictions.png; confusion_matrix.png with --label-key). Gene names are "
        "revised (Ensembl ids mapped; mouse symbols upper-cased, with a warning); NaN or negative values are refused.",
        EXAMPLE,
    )
    p.add_argument("--data", "--data_path", required=True, help="query cells: .h5ad, 10x .h5, 10x folder, .mtx or .csv")
    p.add_argument("--model", "--model_path", required=True, help="fine-tuned checkpoint (model.pt from finetune.py)")
    p.add_argument("--out", required=True, help="output .h5ad (refused if it exists, unless --overwrite)")
    p.add_argument("--run-dir", default=None, help="folder for the run record (default: OUT without .h5ad, plus _run)")
    add_published_args(p)
    add_input_args(p.add_argument_group("input matrix"))
    p.add_argument("--embedding", choices=["head", "mean", "expressed"], default="head",
                   help="what obsm['X_scbert'] holds: head = the classifier's penultimate features (default; cell types separate "
                   "there: RESULTS.md), mean / expressed = the final encodings averaged over all / over expressed genes")
    p.add_argument("--csv", default=None, help="also write a table: cell, label, confidence, one probability column per type (default: none)")
    g = p.add_argument_group("novel cell types (Unassigned)")
    g.add_argument("--novelty", choices=["auto", *SCORES], default="auto",
                   help="the score that makes a cell Unassigned (higher: more novel): "
                   + "; ".join(f"{name} = {meaning}" for name, meaning in SCORE_MEANINGS.items())
                   + f". The default of models fine-tuned now is {DEFAULT_SCORE}. The whole-query scores (query_density, "
                   "query_combined) are opt-in and ASSUME the query comes from the training data's batch, holds no copies of the "
                   "training cells and is of a size like the validation cells' (a cell's label then depends on the other cells "
                   "of the file; the query must be read whole, at least ~100 cells; a run with them warns). Default: auto = the "
                   "model's default score with --threshold auto; softmax with a number")
    g.add_argument("--threshold", "--unassign_thres", type=threshold_value, default="auto",
                   help="auto = the threshold calibrated at fine-tuning (models fine-tuned before: the published 0.5), or a number: for "
                   "softmax the top probability below which a cell is Unassigned (0-1; 0.5 as published), for the others the score "
                   "above which it is (default: auto)")
    g.add_argument("--reject-rate", type=fraction, default=None,
                   help="with --threshold auto: recalibrate for this fraction of known cells rejected (default: the model's, 0.05)")
    add_bool(g, "--majority-voting", default=False,
             help="also give each cell a label voted within its over-cluster (obs['scbert_majority_voting']; see --voting)")
    g.add_argument("--over-clustering", default=None,
                   help="obs column of the over-clustering for --majority-voting (default: Leiden clusters, resolution growing with "
                   "the number of cells, of --over-clustering-basis)")
    g.add_argument("--over-clustering-basis", choices=OVER_CLUSTERING_BASES, default="expression",
                   help="what the automatic over-clustering clusters: the cells' expression PCA (default, as CellTypist) or the "
                   "scBERT embedding")
    g.add_argument("--voting", choices=VOTING_RULES, default="cautious",
                   help="cautious (default): only a cell whose top probability is below 0.5 takes its cluster's label, and only when "
                   "80%% of the cluster's cells have it (on sorted PBMCs it cost 0.0005 accuracy, soft 0.005-0.015, hard 0.11-0.13; "
                   "RESULTS.md); soft: each cell's probabilities are averaged half and half with its cluster's mean, so confident "
                   "cells keep their label; hard: each cell takes its cluster's most common label (CellTypist)")
    add_bool(g, "--novel_type", "--novel-type", default=True, help="published flag: false never reports Unassigned")
    p.add_argument("--label-key", default=None, help="obs column with known labels: prints accuracy and macro-F1, plots a confusion matrix, "
                   "and adds the column to the --csv table (default: none)")
    p.add_argument("--label-map", default=None, metavar="FILE",
                   help="with --label-key: a text file of two columns (tab or comma), a label of the query and the model's class it "
                   "means, for queries that name types otherwise ('CD4+ T cells' -> 'Naive CD4 T'; '-' leaves those cells out of "
                   "the scores); labels it does not name are kept as they are (default: none)")
    add_batch_size(p, "auto", "cells per forward pass; auto = 16 on a GPU, on a CPU what keeps a batch in the caches (2 cells at "
                   "4,000 genes and the published width, 1 at 16,906, 16 for small models)")
    g = p.add_argument_group("large queries and torchrun")
    g.add_argument("--backed", type=str2bool, nargs="?", const=True, default=None, metavar="BOOL",
                   help="read the .h5ad a chunk of cells at a time and write the output as it goes, with memory that does not grow with "
                   "the number of cells (same outputs as in memory; not with --majority-voting). Default: auto = when the file would "
                   "not fit in the free memory, and always under torchrun, where the processes annotate disjoint chunks and the first "
                   "writes the output")
    g.add_argument("--chunk-size", type=positive_int, default=10_000, help="cells per chunk with --backed (default: 10000)")
    add_device(p)
    add_precision(p, default="auto", stage="predict")
    add_memory_limit(p)
    p.add_argument("--fp32-recheck", type=fraction_or_auto, default="auto", metavar="MARGIN",
                   help="after a bf16/fp16 pass, score again in float32 the cells whose top two probabilities are within MARGIN of "
                   "each other or whose novelty score is within MARGIN of its cutoff (relative to the cutoff, except softmax), so that "
                   "labels match a float32 run; 0 = off; auto = 4 x the largest change the precision made to this model's outputs on "
                   "its validation cells, measured at fine-tuning (at least 0.005; 0.05 for models fine-tuned before that) (default: auto)")
    add_speed_args(p)
    p.add_argument("--plots", choices=["auto", "true", "false"], default="auto",
                   help="draw predictions.png (and confusion_matrix.png with --label-key) in the run record; auto = for queries of at "
                   "least 100 cells, where they say something and their second of drawing is small beside the model (default: auto)")
    add_bool(p, "--overwrite", default=False, help="replace existing outputs")
    add_log_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    if args.reject_rate is not None and args.reject_rate <= 0:
        p.error("--reject-rate must be above 0")
    if args.label_map and not args.label_key:
        p.error("--label-map renames the labels of --label-key: give the column too (--label-key COLUMN)")

    from model.cli.boundary import stage
    from model.cli.preflight import check_paths

    with stage():
        check_paths(args, "predict")
        from model.cli.predict import run

        run(args)


if __name__ == "__main__":
    main()
    from model.cli.run import exit_now

    exit_now()
