"""Variants of the expression-PCA novelty scores on a development set (RESULTS.md, "Novel cell
types"): leave-one-type-out, 2 folds, seed 0, a tenth of each known type calibrating a 5% reject
rate; prints mean AUROC, novel recall and known cells rejected per variant, and AUROC per held-out
type. The default of :class:`model.novelty.ExpressionPCA` (scaled genes, 30 components) was chosen
with it on the sorted PBMCs, never on PBMC3k:

    python scripts/novelty_pca_variants.py ../shared/data/more/pbmc_sorted_2140.h5ad
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.neighbors import NearestNeighbors

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.accuracy.harness import calibration_holdout, development_splits  # noqa: E402
from model.accuracy.report import NoveltyTally  # noqa: E402
from model.novelty import ExpressionPCA  # noqa: E402


def main(path: str, label_key: str = "celltype") -> None:
    X, y, _, splits = development_splits(path, label_key)
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
    print("\n".join(tally.lines()))


if __name__ == "__main__":
    main(*sys.argv[1:])
