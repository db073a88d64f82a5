"""Combinations of novelty scores on a development set (RESULTS.md, "Novel cell types"): leave-one-
type-out, 2 folds, seed 0, logistic regression (L2) as the classifier, a tenth of each known type
calibrating a 5% reject rate. Each score is turned into its conformal p-value against the
calibration cells; the p-values of two or three scores are joined by their minimum or by Fisher's
-2 sum log p. Prints mean AUROC, novel recall and known cells rejected per variant, and AUROC per
held-out type. The ``combined`` score of :mod:`model.novelty.calibration` (Fisher, Mahalanobis in the
expression PCA + energy: ``COMBINED_PARTS`` of :mod:`model.novelty.scores`) was chosen with it on the
sorted PBMCs, never on PBMC3k (``$M``: the folder of the extra data sets):

    python -m scripts.experiments.novelty_combination_variants --data $M/pbmc_sorted_2140.h5ad
"""

from __future__ import annotations

import numpy as np

from model.novelty.calibration import ScoreCombination
from scripts.benchmark.harness import development_runs
from scripts.benchmark.report import NoveltyTally
from scripts.experiments.common import each_data_file

COMBINATIONS = {"mahalanobis + energy": ("mahalanobis", "energy"), "mahalanobis + energy + softmax": ("mahalanobis", "energy", "softmax")}


def main(path: str, label_key: str = "celltype", label_map: dict[str, str] | None = None) -> None:
    tally = NoveltyTally()
    for run in development_runs(path, label_key, label_map):
        split, novel, sc, sq = run.split, run.novel, run.calibration_scores, run.test_scores
        variants = {k: (sc[k], sq[k]) for k in ("mahalanobis", "energy", "softmax", "knn")}  # mahalanobis / knn: in its expression PCA
        for name, parts in COMBINATIONS.items():
            comb = ScoreCombination.of(sc, parts)
            pc = np.stack([comb.pvalues(p, sc[p], leave_one_out=True) for p in parts])
            pq = np.stack([comb.pvalues(p, sq[p]) for p in parts])
            variants[f"min p ({name})"] = (-np.log(pc.min(0)), -np.log(pq.min(0)))
            variants[f"Fisher ({name})"] = (comb(sc, leave_one_out=True), comb(sq))
        for name, (c, q) in variants.items():
            tally.add(name, split, c, q, novel)
    print(path)
    print("\n".join(tally.lines()))


if __name__ == "__main__":
    each_data_file(main, __doc__)
