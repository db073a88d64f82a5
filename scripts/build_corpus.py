"""Build a pretraining corpus from several files of cells onto one vocabulary, with a report per file.

Each file is read (raw counts or log-normalised; .h5ad, 10x, mtx, csv, ...), its gene symbols
revised, normalised and aligned to the vocabulary: ``--vocab`` (a gene list, an .h5ad, or a
checkpoint), or by default the genes every file measures. The report says, per file, the cells read
and kept, its genes, and the vocabulary genes it does not measure: those are zeros in its cells,
which pretraining sees as not expressed and never masks or scores (only expressed genes are masked).

    python -m scripts.build_corpus --data data/pbmc3k_labeled.h5ad data/immune_sample_unlabeled.h5ad \\
        --out corpus.h5ad
    python pretrain.py --data corpus.h5ad --out runs/pretrain
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data.corpus import build_corpus
from data.io import InputError, atomic_path, check_writable, write_h5ad_atomic


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="files of cells, one per experiment")
    p.add_argument("--out", required=True, help="the corpus .h5ad (refused if it exists, unless --overwrite)")
    p.add_argument("--vocab", default=None, help="the vocabulary: a gene list (one per line), an .h5ad or a checkpoint (default: the genes "
                   "every file measures, in the first file's order)")
    p.add_argument("--min-genes", type=int, default=200, help="drop cells expressing fewer genes (default: 200; 0 keeps all)")
    p.add_argument("--report", default=None, help="per-file report, tab-separated (default: OUT without .h5ad, plus _report.tsv)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = p.parse_args(argv)
    try:
        out = check_writable(args.out, args.overwrite)
        report = Path(args.report) if args.report else out.with_name(out.stem + "_report.tsv")
        check_writable(report, args.overwrite)
        genes = None
        if args.vocab:
            from model.checkpoint import load_vocab

            genes = load_vocab(args.vocab)
        corpus, files = build_corpus(args.data, genes, min_genes=args.min_genes or None)
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    import pandas as pd

    table = pd.DataFrame([{**f.to_dict(), "unmeasured": ",".join(f.unmeasured)} for f in files])
    write_h5ad_atomic(corpus, out)
    with atomic_path(report) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    for f in files:
        print(f.line(corpus.n_vars))
    print(f"wrote {out}: {corpus.n_obs} cells x {corpus.n_vars} genes from {len(files)} files; report in {report}")


if __name__ == "__main__":
    main()
