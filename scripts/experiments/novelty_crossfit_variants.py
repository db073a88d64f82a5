"""Per-cell novelty scores on a development set (RESULTS.md, "Novel cell types (7 December): a
per-cell default"): leave-one-type-out, 2 folds, seed 0, logistic regression (L2) as the
classifier, a tenth of each known type calibrating a 5% reject rate. Variants: Mahalanobis in the
expression PCA fitted on the training cells (``pca_mahalanobis``), the cross-fitted scores of
:mod:`model.novelty.crossfit` (``crossfit_mahalanobis``, ``crossfit_knn``; one half-model alone),
Fisher's combination with energy with rank p-values and with tail p-values
(``crossfit_combined``), two half-models each fitted wholly on its own half (statistics in-sample),
a cross-fitted local density ratio (a kNN distance over the reference cells' own), per-class
(Mondrian) thresholds, and an unexplained-expression score (per gene, a cell's z against each known
type's mean and sd; the sum of its 10 largest positive z; the minimum over the types), alone and in
Fisher combinations. Also the share of the classifier's own
training cells that each score rejects (the calibrated rate is 5%). The default
``DEFAULT_SCORE = "crossfit_combined"`` of :mod:`model.novelty.scores` was chosen with it on the
sorted PBMCs, never on PBMC3k (``$M``: the folder of the extra data sets):

    python -m scripts.experiments.novelty_crossfit_variants --data $M/pbmc_sorted_2140.h5ad
    python -m scripts.experiments.novelty_crossfit_variants --data $M/pdac_1926.h5ad --label-map data/label_maps/pdac_1926_cv.tsv
    python -m scripts.experiments.novelty_crossfit_variants --data $M/pbmc4k_2170.h5ad --label-map data/label_maps/pbmc4k_known.tsv
"""

from __future__ import annotations

import numpy as np

from model.novelty.calibration import ScoreCombination, conformal_threshold
from model.novelty.crossfit import CrossFitPCA, stratified_halves
from model.novelty.expression import ExpressionPCA, dense_rows
from scripts.benchmark.harness import development_runs
from scripts.benchmark.report import NoveltyTally
from scripts.experiments.common import each_data_file


def mondrian(cal: np.ndarray, cal_class: np.ndarray, query: np.ndarray, query_class: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-log of per-class conformal p-values: each cell against the calibration cells of its predicted
    class (calibration cells left out of their own reference)."""
    pc, pq = np.ones(len(cal)), np.ones(len(query))
    for c in np.unique(np.r_[cal_class, query_class]):
        ref = np.sort(cal[cal_class == c])
        if not len(ref):
            continue
        comb = ScoreCombination({"s": ref})
        pc[cal_class == c] = comb.pvalues("s", cal[cal_class == c], leave_one_out=True)
        pq[query_class == c] = comb.pvalues("s", query[query_class == c])
    return -np.log(pc), -np.log(pq)


def own_halves(X: object, codes: np.ndarray, n_classes: int) -> CrossFitPCA:
    """Two half-models fitted each on its half alone (PCA and class statistics), scored as the minimum."""
    a, b = stratified_halves(codes, 0)
    return CrossFitPCA([ExpressionPCA.fit(X[r], codes[r], n_classes, 0, max_cells=len(r)) for r in (a, b)])


def local_density_ratio(cf: CrossFitPCA, X_fit: object, halves: tuple[np.ndarray, np.ndarray], X: object, k: int = 10) -> np.ndarray:
    """Per cell of ``X``, the minimum over the half-models of its k-th nearest reference distance
    divided by the mean k-th nearest distance of those reference cells among themselves (a local
    outlier factor; the reference of a half-model: the other half's cells projected into it)."""
    from sklearn.neighbors import NearestNeighbors

    out = None
    for pca, rows in zip(cf.halves, halves[::-1]):
        ref = pca.transform(X_fit[rows])
        index = NearestNeighbors(n_neighbors=k + 1).fit(ref)
        own = index.kneighbors(ref)[0][:, -1]  # each reference cell's k-th neighbour among the others
        dist, idx = index.kneighbors(pca.transform(X), n_neighbors=k)
        ratio = dist[:, -1] / np.maximum(own[idx].mean(axis=1), 1e-12)
        out = ratio if out is None else np.minimum(out, ratio)
    return out


class TypeProfiles:
    """Per known type, each gene's mean and sd of log expression in the classifier's training cells
    (sd widened by ``tau``, so a gene silent in a type does not make every read of it infinitely far)."""

    def __init__(self, X: object, codes: np.ndarray, n_classes: int, tau: float = 0.3) -> None:
        dense = dense_rows(X, np.arange(X.shape[0]))
        self.mean = np.stack([dense[codes == c].mean(0) for c in range(n_classes)])
        self.sd = np.sqrt(np.stack([dense[codes == c].std(0) for c in range(n_classes)]) ** 2 + tau ** 2)

    def unexplained(self, X: object, k: int = 10, chunk: int = 512) -> np.ndarray:
        """Per cell, the minimum over the types of the sum of its ``k`` largest positive z (clipped at 10):
        high when some genes are up beyond what every known type shows (a new type's markers)."""
        out = []
        for start in range(0, X.shape[0], chunk):
            d = dense_rows(X, np.arange(start, min(start + chunk, X.shape[0])))
            z = np.clip((d[:, None, :] - self.mean[None]) / self.sd[None], 0, 10)  # cells x types x genes
            top = -np.partition(-z, k - 1, axis=2)[:, :, :k]  # each type's k largest z
            out.append(top.sum(2).min(1))
        return np.concatenate(out) if out else np.zeros(0)


def main(path: str, label_key: str = "celltype", label_map: dict[str, str] | None = None) -> None:
    tally = NoveltyTally()
    training: dict[str, list[float]] = {}
    for run in development_runs(path, label_key, label_map):
        X, split, novel, model = run.X, run.split, run.novel, run.model
        sc, sq = dict(run.calibration_scores), dict(run.test_scores)
        sf = model.novelty_scores(X[run.fit])  # the classifier's own training cells
        variants = {"pca_mahalanobis (fitted on the training cells)": "mahalanobis", "pca_knn": "knn",
                    "crossfit_mahalanobis": "crossfit_mahalanobis", "crossfit_knn": "crossfit_knn", "energy": "energy"}
        for name, key in variants.items():
            tally.add(name, split, sc[key], sq[key], novel)
            training.setdefault(name, []).append(float((sf[key] > conformal_threshold(sc[key], 0.05)).mean()))
        half = CrossFitPCA(model.record_.crossfit.halves[:1]).scores(X[run.cal], ["crossfit_mahalanobis"])["crossfit_mahalanobis"]
        tally.add("one half-model alone (mahalanobis)", split, half,
                  CrossFitPCA(model.record_.crossfit.halves[:1]).scores(X[split.test], ["crossfit_mahalanobis"])["crossfit_mahalanobis"], novel)
        for parts in (("mahalanobis", "energy"), ("crossfit_mahalanobis", "energy"), ("crossfit_mahalanobis", "crossfit_knn", "energy")):
            for tail in (False, True):
                comb = ScoreCombination.of(sc, parts, tail)
                name = f"Fisher({', '.join(parts)}){' tail p' if tail else ''}"
                c, q = comb(sc, leave_one_out=True), comb(sq)
                tally.add(name, split, c, q, novel)
                training.setdefault(name, []).append(float((comb(sf) > conformal_threshold(c, 0.05)).mean()))
                sc[name], sq[name] = c, q
        # the halves' own statistics (each half-model all in-sample; training cells out-of-sample for the other half)
        own = own_halves(X[run.fit], model.codes_, len(model.classes_))
        for part, rows in ((sc, run.cal), (sq, split.test), (sf, run.fit)):
            part["own halves"] = own.scores(X[rows], ["crossfit_mahalanobis"])["crossfit_mahalanobis"]
        tally.add("halves with their own statistics (min)", split, sc["own halves"], sq["own halves"], novel)
        comb = ScoreCombination.of(sc, ("own halves", "energy"), True)
        tally.add("Fisher(own halves, energy) tail p", split, comb(sc, leave_one_out=True), comb(sq), novel)
        for name, key in (("halves with their own statistics (min)", "own halves"), ("Fisher(own halves, energy) tail p", None)):
            c, f = (sc[key], sf[key]) if key else (comb(sc, leave_one_out=True), comb(sf))
            training.setdefault(name, []).append(float((f > conformal_threshold(c, 0.05)).mean()))
        halves = stratified_halves(model.codes_, 0)  # those of the record's CrossFitPCA (same seed)
        for part, rows in ((sc, run.cal), (sq, split.test), (sf, run.fit)):
            part["density ratio"] = local_density_ratio(model.record_.crossfit, X[run.fit], halves, X[rows])
        tally.add("crossfit local density ratio (k = 10)", split, sc["density ratio"], sq["density ratio"], novel)
        training.setdefault("crossfit local density ratio (k = 10)", []).append(
            float((sf["density ratio"] > conformal_threshold(sc["density ratio"], 0.05)).mean()))
        for parts in (("density ratio", "energy"), ("density ratio", "crossfit_mahalanobis", "energy")):
            comb = ScoreCombination.of(sc, parts, True)
            name = f"Fisher({', '.join(parts)}) tail p"
            tally.add(name, split, comb(sc, leave_one_out=True), comb(sq), novel)
            training.setdefault(name, []).append(float((comb(sf) > conformal_threshold(comb(sc, leave_one_out=True), 0.05)).mean()))
        profiles = TypeProfiles(X[run.fit], model.codes_, len(model.classes_))
        for part, rows in ((sc, run.cal), (sq, split.test)):
            part["unexplained"] = profiles.unexplained(X[rows])
        tally.add("unexplained expression (top 10 z)", split, sc["unexplained"], sq["unexplained"], novel)
        for parts in (("unexplained", "energy"), ("unexplained", "crossfit_mahalanobis", "energy")):
            comb = ScoreCombination.of(sc, parts, True)
            tally.add(f"Fisher({', '.join(parts)}) tail p", split, comb(sc, leave_one_out=True), comb(sq), novel)
        cal_class = model.predict_proba(X[run.cal]).argmax(1)
        test_class = model.predict_proba(X[split.test]).argmax(1)
        for key in ("crossfit_mahalanobis", "Fisher(crossfit_mahalanobis, energy) tail p"):
            tally.add(f"Mondrian {key}", split, *mondrian(sc[key], cal_class, sq[key], test_class), novel)
    print(path)
    print("\n".join(tally.lines()))
    print("training cells rejected at the 5% threshold (mean over runs):")
    print("\n".join(f"  {name:50s} {np.mean(v):.4f}" for name, v in training.items()))


if __name__ == "__main__":
    each_data_file(main, __doc__)
