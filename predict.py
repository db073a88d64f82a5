"""Stage 3: annotate new cells with a fine-tuned model."""

from __future__ import annotations

import argparse

from model.cli.args import add_batch_size, add_bool, add_device, add_log_args, add_precision, add_published_args, add_speed_args, parser

EXAMPLE = """
python predict.py --data query.h5ad --model runs/finetune/model.pt --out query_annotated.h5ad --csv query_labels.csv
"""


def build_parser() -> argparse.ArgumentParser:
    p = parser(
        "Annotate cells (raw counts or log-normalised; every cell kept, in order) with a fine-tuned scBERT model. "
        "The query is aligned to the model's genes (missing genes count as not expressed). Writes a copy of the input "
        "with obs['scbert_celltype'] ('Unassigned' when the top probability is below --threshold), "
        "obs['scbert_confidence'], obsm['scbert_probabilities'] (columns: uns['scbert_classes']) and obsm['X_scbert'] "
        "(cell embeddings: mean of the final encodings over all genes), and a run record in OUT_run/ (config.json, "
        "log.txt, metrics.json, summary.txt, predictions.png; confusion_matrix.png with --label-key). Gene names are "
        "revised (Ensembl ids mapped; mouse symbols upper-cased, with a warning); NaN or negative values are refused.",
        EXAMPLE,
    )
    p.add_argument("--data", "--data_path", required=True, help="query cells: .h5ad, 10x .h5, 10x folder, .mtx or .csv")
    p.add_argument("--model", "--model_path", required=True, help="fine-tuned checkpoint (model.pt from finetune.py)")
    p.add_argument("--out", required=True, help="output .h5ad (refused if it exists, unless --overwrite)")
    p.add_argument("--run-dir", default=None, help="folder for the run record (default: OUT without .h5ad, plus _run)")
    add_published_args(p)
    p.add_argument("--csv", default=None, help="also write a table: cell, label, confidence, one probability column per type (default: none)")
    p.add_argument("--threshold", "--unassign_thres", type=float, default=0.5,
                   help="minimum top probability (0-1) to assign a type; below it a cell is 'Unassigned' (default: 0.5)")
    add_bool(p, "--novel_type", "--novel-type", default=True, help="published flag: false never reports Unassigned")
    p.add_argument("--label-key", default=None, help="obs column with known labels: prints accuracy and macro-F1, plots a confusion matrix (default: none)")
    add_batch_size(p, 16)
    add_device(p)
    add_precision(p)
    add_speed_args(p)
    add_bool(p, "--overwrite", default=False, help="replace existing outputs")
    add_log_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0:
        p.error("--threshold must be between 0 and 1")

    from model.cli.predict import run

    run(args)


if __name__ == "__main__":
    main()
