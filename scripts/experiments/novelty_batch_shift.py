"""The query_* novelty scores under a batch shift (RESULTS.md, "Novel cell types"): a model of one
dataset applied to another of the same types (no novel type), and the shift check that makes the
default fall back to ``pca_mahalanobis`` (:data:`model.novelty.query.QUERY_SHIFT_SHARE`).

1. PBMC3k -> pbmc4k and back (coarse shared types, ``data/label_maps/pbmc3k_pbmc4k.tsv``): logistic
   regression (L2) on the training file (a tenth of each type held out to calibrate 5%), then, on the
   other file, the share of cells each score rejects and the shift statistic
   (:func:`model.novelty.query.query_shift`: query cells above the calibration cells' median query_density);
   and the share of the model's own training cells each score rejects (``mahalanobis``: the
   expression PCA's, fitted on them; the calibrated rate is 5%).
2. The same statistic in the leave-one-type-out runs of the development scripts (one query per held-out
   type, fold 0) on the given files after the first, where the query comes from the training cells' own
   batch.

``--data``: pbmc4k, then PBMC3k (the pair of step 1), then any further files for step 2 (``$M``: the
folder of the extra data sets):

    python -m scripts.experiments.novelty_batch_shift --data $M/pbmc4k_2170.h5ad data/pbmc3k_labeled.h5ad \\
        $M/pbmc_sorted_2140.h5ad data/pancreas_baron_subset.h5ad
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import sparse

from data.labels import holdout_per_class, read_label_map
from model.novelty.calibration import COMBINATIONS, ScoreCombination, conformal_threshold
from model.novelty.query import query_scores, query_shift
from scripts.benchmark.harness import development_runs, load_labelled
from scripts.benchmark.methods import LogisticL2

SHOWN = ("softmax", "energy", "mahalanobis", "combined", "crossfit_mahalanobis", "crossfit_combined", "query_density", "query_combined")
LABEL_MAP = Path(__file__).resolve().parents[2] / "data" / "label_maps" / "pbmc3k_pbmc4k.tsv"


def across(train_path: str, test_path: str, label_map: str = str(LABEL_MAP)) -> None:
    names = read_label_map(label_map)
    adata, y, genes = load_labelled([train_path], "celltype", None, 2000)
    other, y2, _ = load_labelled([test_path], "celltype", genes, None)
    y, y2 = np.array([names.get(v, v) for v in y]), np.array([names.get(v, v) for v in y2])
    keep, keep2 = y != "-", (y2 != "-") & (y2 != "?")
    X, y, X2, y2 = sparse.csr_matrix(adata.X[keep]), y[keep], sparse.csr_matrix(other.X[keep2]), y2[keep2]
    fit, cal = holdout_per_class(y, 0.1, 0)
    model = LogisticL2()
    model.fit(X[fit], y[fit], genes)
    sc, sq = model.novelty_scores(X[cal]), model.novelty_scores(X2)
    q, c = query_scores(model.query_density_, X2, sq, sc, X[cal], mahalanobis="mahalanobis")
    sq.update(q)
    sc.update(c)
    sf = model.novelty_scores(X[fit])  # the model's own training cells
    for name, (parts, tail) in COMBINATIONS.items():  # p-values against the calibration cells
        comb = ScoreCombination.of(sc, parts if name != "combined" else ("mahalanobis", "energy"), tail)
        sc[name], sq[name], sf[name] = comb(sc, leave_one_out=True), comb(sq), comb(sf)
    accuracy = (np.asarray(model.classes_)[model.predict_proba(X2).argmax(1)] == y2).mean()
    print(f"{Path(train_path).name} -> {Path(test_path).name}: {len(y2)} cells, accuracy {accuracy:.3f}, shift statistic "
          f"{query_shift(q['query_density'], c['query_density']):.3f}; cells rejected at 5%: "
          + ", ".join(f"{s} {(sq[s] > conformal_threshold(sc[s], 0.05)).mean():.3f}"
                      for s in SHOWN))
    print(f"  its own training cells ({len(fit)}) rejected at 5%: "
          + ", ".join(f"{s} {(sf[s] > conformal_threshold(sc[s], 0.05)).mean():.3f}" for s in SHOWN if s in sf))


def within(path: str) -> None:
    for run in development_runs(path):
        if run.split.fold != 0:  # one query per held-out type
            continue
        q, c = run.model.query_density_.score(run.X[run.split.test], run.X[run.cal])
        print(f"{Path(path).name} {run.split.variant}: novel share {run.novel.mean():.2f}, shift statistic {query_shift(q, c):.3f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, nargs="+", metavar="FILE",
                   help="pbmc4k, PBMC3k (labels in obs 'celltype'), then more labelled files for the within-batch statistic")
    p.add_argument("--label-map", default=str(LABEL_MAP),
                   help="the two files' labels onto shared names (default: data/label_maps/pbmc3k_pbmc4k.tsv; for the sorted "
                   "PBMCs: data/label_maps/pbmc3k_sorted.tsv)")
    args = p.parse_args(argv)
    if len(args.data) < 2:
        p.error("--data needs at least two files: pbmc4k and PBMC3k")
    return args


def main(argv: list[str] | None = None) -> None:
    p_args = parse_args(argv)
    files = p_args.data
    across(files[1], files[0], p_args.label_map)
    across(files[0], files[1], p_args.label_map)
    for f in files[1:]:
        within(f)


if __name__ == "__main__":
    main()
