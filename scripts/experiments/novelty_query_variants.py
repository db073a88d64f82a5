"""The ``query_density`` score on a development set (RESULTS.md, "Novel cell types"): leave-one-
type-out, 2 folds, seed 0, logistic regression (L2) as the classifier, a tenth of each known type
calibrating a 5% reject rate. Variants: the neighbours counted (1, 2, 3 x sqrt of the cells in the
graph), one half of the cross-fitting alone, a reference made of the cells that fitted the PCA (what
:class:`model.novelty.query.QueryDensity` avoids), and Fisher's combination with the expression-PCA
Mahalanobis score (``query_combined``) and with energy too. The defaults of :mod:`model.novelty`
(k = sqrt(n): :func:`model.novelty.query.density_neighbours`; ``query_combined`` = Mahalanobis +
query_density: ``QUERY_COMBINED_PARTS`` of :mod:`model.novelty.scores`) were chosen with it on the
sorted PBMCs, never on PBMC3k (``$M``: the folder of the extra data sets):

    python -m scripts.experiments.novelty_query_variants --data $M/pbmc_sorted_2140.h5ad
"""

from __future__ import annotations

import math

import numpy as np

from model.novelty.calibration import ScoreCombination
from model.novelty.query import QueryDensity
from scripts.benchmark.harness import development_runs
from scripts.benchmark.report import NoveltyTally
from scripts.experiments.common import each_data_file


def fisher(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Fisher's combination of (calibration, query) score pairs: calibration cells left out of their own reference."""
    cal = {str(i): c for i, (c, _) in enumerate(parts)}
    comb = ScoreCombination.of(cal, tuple(cal))
    return comb(cal, leave_one_out=True), comb({str(i): q for i, (_, q) in enumerate(parts)})


def main(path: str, label_key: str = "celltype", label_map: dict[str, str] | None = None) -> None:
    tally = NoveltyTally()
    for run in development_runs(path, label_key, label_map):
        X, split, cal, model, novel = run.X, run.split, run.cal, run.model, run.novel
        sc, sq = run.calibration_scores, run.test_scores
        tally.add("mahalanobis (expression PCA)", split, sc["mahalanobis"], sq["mahalanobis"], novel)
        density = model.query_density_
        n = len(density.references[0]) + len(split.test) + len(cal)
        for mult in (1, 2, 3):
            k = int(np.clip(round(mult * math.sqrt(n)), 15, 200))
            q, c = density.score(X[split.test], X[cal], k=k)
            tally.add(f"query_density, k = {mult} sqrt(n)", split, c, q, novel)
            tally.add(f"Fisher(density {mult} sqrt(n), mahalanobis)", split, *fisher([(c, q), (sc["mahalanobis"], sq["mahalanobis"])]), novel)
            tally.add(f"Fisher(density {mult} sqrt(n), mahalanobis, energy)", split,
                      *fisher([(c, q), (sc["mahalanobis"], sq["mahalanobis"]), (sc["energy"], sq["energy"])]), novel)
        half = QueryDensity(density.pcas[:1], density.references[:1])  # one half, not cross-fitted
        q, c = half.score(X[split.test], X[cal])
        tally.add("query_density, one half (not cross-fitted)", split, c, q, novel)
        # the reference made of the cells that fitted the PCA (the whole training part, in-sample)
        insample = QueryDensity([model.pca_], [model.pca_.transform(X[run.fit]).astype(np.float32)])
        q, c = insample.score(X[split.test], X[cal])
        tally.add("query_density, in-sample reference", split, c, q, novel)
    print(path)
    print("\n".join(tally.lines()))


if __name__ == "__main__":
    each_data_file(main, __doc__)
