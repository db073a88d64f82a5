"""Variants of the expression-PCA novelty scores on a development set (RESULTS.md, "Novel cell
types"): leave-one-type-out, 2 folds, seed 0, a tenth of each known type calibrating a 5% reject
rate; prints mean AUROC, novel recall and known cells rejected per variant, and AUROC per held-out
type. The default of :class:`model.novelty.expression.ExpressionPCA` (scaled genes, ``PCA_COMPONENTS`` =
30) was chosen with it on the sorted PBMCs, never on PBMC3k (``$M``: the folder of the extra data sets):

    python -m scripts.experiments.novelty_pca_variants --data $M/pbmc_sorted_2140.h5ad
"""

from __future__ import annotations

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.neighbors import NearestNeighbors

from model.novelty.expression import ExpressionPCA
from scripts.benchmark.harness import calibration_holdout, development_splits
from scripts.benchmark.report import NoveltyTally
from scripts.experiments.common import each_data_file


def main(path: str, label_key: str = "celltype", label_map: dict[str, str] | None = None) -> None:
    X, y, _, splits = development_splits(path, label_key, label_map)
    tally = NoveltyTally()
    for split in splits:
        fit, cal = calibration_holdout(y, split)
        classes = sorted(set(y[fit]))
        codes = np.searchsorted(classes, y[fit])
        novel = ~np.isin(y[split.test], classes)
        for scaled in (False, True):
            for n_pc in (10, 20, 30, 50, 100):
                space = ExpressionPCA.fit(X[fit], codes, len(classes), n_components=n_pc, scaled=scaled)
                zt, zc, zq = space.transform(X[fit]), space.transform(X[cal]), space.transform(X[split.test])
                variants = {"mahalanobis": space.stats.mahalanobis}
                if n_pc in (20, 50):
                    nn = NearestNeighbors(n_neighbors=10).fit(zt)
                    g = LedoitWolf().fit(zt)

                    def relative(z: np.ndarray, space: ExpressionPCA = space, g: LedoitWolf = g) -> np.ndarray:
                        d = z - g.location_  # relative Mahalanobis (Ren et al. 2021): minus the distance to the global mean
                        return space.stats.mahalanobis(z) - np.einsum("ij,jk,ik->i", d, g.precision_, d)

                    variants.update({"knn_unit": space.stats.knn, "knn_raw": lambda z, nn=nn: nn.kneighbors(z)[0][:, -1],
                                     "relative_mahalanobis": relative})
                for name, f in variants.items():
                    tally.add(f"{name}, {'scaled' if scaled else 'unscaled'}, {n_pc} PCs", split, f(zc), f(zq), novel)
    print(path)
    print("\n".join(tally.lines()))


if __name__ == "__main__":
    each_data_file(main, __doc__)
