"""Novelty scores against direct computations: softmax, energy, Mahalanobis and kNN, their versions in
the expression PCA, conformal thresholds, Fisher's combination, the query density, and the record
that carries them through a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from model.checkpoint.upgrade import _pca_v1
from model.novelty import (
    ClassStatistics,
    ExpressionPCA,
    NoveltyRecord,
    QueryDensity,
    ScoreCombination,
    calibrate,
    conformal_threshold,
    fpr_at_tpr,
    novelty_scores,
    query_scores,
)


def _toy(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), 40)
    features = rng.normal(size=(120, 6)) + 3 * labels[:, None]
    embeddings = rng.normal(size=(120, 5)) + labels[:, None]
    logits = rng.normal(size=(120, 3)) * 2
    return labels, features, embeddings, logits


def _clusters(rng: np.random.Generator, centres: np.ndarray, n: int, genes: int = 40) -> np.ndarray:
    """Log-expression-like cells around ``centres`` (one row per cluster), ``n`` per cluster."""
    return np.vstack([np.abs(c + rng.normal(scale=0.6, size=(n, genes))) for c in centres]).astype(np.float32)


def test_scores_against_direct_computations() -> None:
    labels, features, embeddings, logits = _toy()
    stats = ClassStatistics.fit(features, embeddings, labels, 3, k=4)
    q_logits, q_feat, q_emb = logits[:7] + 1, features[:7] + 0.5, embeddings[:7] * 1.3
    probs = np.exp(q_logits) / np.exp(q_logits).sum(1, keepdims=True)
    s = novelty_scores(probs, q_logits, q_feat, q_emb, NoveltyRecord(classes=stats))
    np.testing.assert_allclose(s["softmax"], 1 - probs.max(1))
    np.testing.assert_allclose(s["energy"], -np.log(np.exp(q_logits).sum(1)))
    # Mahalanobis: shared covariance of the class-centred features, Ledoit-Wolf shrunk
    from sklearn.covariance import ledoit_wolf

    means = np.stack([features[labels == c].mean(0) for c in range(3)])
    cov, _ = ledoit_wolf(features - means[labels], assume_centered=True)
    prec = np.linalg.inv(cov)
    direct = np.min([np.einsum("ij,jk,ik->i", q_feat - m, prec, q_feat - m) for m in means], axis=0)
    np.testing.assert_allclose(s["mahalanobis"], direct, rtol=1e-6)
    # kNN: distance to the 4th nearest training cell, on unit-length embeddings
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    d = np.linalg.norm(unit(q_emb)[:, None] - unit(embeddings)[None], axis=2)
    np.testing.assert_allclose(s["knn"], np.sort(d, axis=1)[:, 3], rtol=1e-5)


def test_pca_scores_against_sklearn_and_numpy() -> None:
    from scipy import sparse
    from sklearn.covariance import ledoit_wolf
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(3), 50)
    X = np.log1p(rng.poisson(1.0 + 4 * (labels[:, None] == np.arange(30) % 3), size=(150, 30))).astype(np.float32)
    X[0, 0] = 40.0  # an extreme value: clipped at 10 sd after scaling
    space = ExpressionPCA.fit(sparse.csr_matrix(X), labels, 3, n_components=5)
    scaled = np.clip((X - X.mean(0)) / X.std(0), -10, 10)  # scanpy's pp.scale(max_value=10)
    assert scaled.max() == 10.0
    pca = PCA(n_components=5, random_state=0).fit(scaled)
    z = pca.transform(scaled)
    np.testing.assert_allclose(np.abs(space.transform(sparse.csr_matrix(X))), np.abs(z), atol=1e-4)  # signs may differ
    q = X[:9] + rng.normal(size=(9, 30)).astype(np.float32)
    record = NoveltyRecord(classes=ClassStatistics.fit(np.zeros((150, 1)), np.zeros((150, 1)), labels, 3), pca=space)
    s = novelty_scores(np.full((9, 3), 1 / 3), np.zeros((9, 3)), record=record, expression=sparse.csr_matrix(q))
    W = space.components.T.astype(np.float64)  # in the stored components' own signs
    zq = (np.clip((q - X.mean(0)) / X.std(0), -10, 10) - scaled.mean(0)) @ W
    zt = (scaled - scaled.mean(0)) @ W
    means = np.stack([zt[labels == c].mean(0) for c in range(3)])
    prec = np.linalg.inv(ledoit_wolf(zt - means[labels], assume_centered=True)[0])
    direct = np.min([np.einsum("ij,jk,ik->i", zq - m, prec, zq - m) for m in means], axis=0)
    np.testing.assert_allclose(s["pca_mahalanobis"], direct, rtol=1e-4)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    d = np.linalg.norm(unit(zq)[:, None] - unit(zt)[None], axis=2)
    np.testing.assert_allclose(s["pca_knn"], np.sort(d, axis=1)[:, 9], rtol=1e-4)
    # the PCA travels with the record through the checkpoint
    s2 = NoveltyRecord.from_dict(record.to_dict())
    np.testing.assert_array_equal(s2.pca.components, space.components)
    again = novelty_scores(np.full((9, 3), 1 / 3), np.zeros((9, 3)), record=s2, expression=sparse.csr_matrix(q))
    np.testing.assert_allclose(again["pca_mahalanobis"], s["pca_mahalanobis"])
    # a cap on the cells kept: a seeded sample of them
    small = ExpressionPCA.fit(sparse.csr_matrix(X), labels, 3, n_components=5, max_cells=60)
    assert small.stats.reference.shape == (60, 5)
    # an unscaled PCA (a version-1 record without scale, upgraded on load) is read and used as it was computed
    old = {k: v for k, v in space.to_dict().items() if k not in ("scale", "offset", "class_statistics")}
    old["stats"] = space.to_dict()["class_statistics"]
    unscaled = ExpressionPCA.from_dict(_pca_v1(old))
    assert unscaled.scale is None
    np.testing.assert_allclose(unscaled.transform(sparse.csr_matrix(q)), (q - space.mean) @ W, rtol=1e-6)


def test_conformal_threshold_rejects_at_most_the_rate() -> None:
    scores = np.arange(100, dtype=float)
    t = conformal_threshold(scores, 0.05)
    assert t == 95.0  # the ceil(101 x 0.95) = 96th smallest score
    assert (scores > t).mean() == 0.04 <= 0.05
    assert conformal_threshold(scores[:10], 0.05) == np.inf  # too few cells for 5%: reject nothing
    rng = np.random.default_rng(1)
    cal, new = rng.normal(size=2000), rng.normal(size=200_000)
    assert abs((new > conformal_threshold(cal, 0.1)).mean() - 0.1) < 0.02  # new cells of known types: ~the rate
    with pytest.raises(ValueError):
        conformal_threshold(scores, 0.0)


def test_knn_follows_the_classifier_features() -> None:
    labels, features, embeddings, logits = _toy()
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    on_features = ClassStatistics.fit(features, None, labels, 3, k=4)  # what fine-tuning stores
    assert on_features.knn_input == "features"
    s = novelty_scores(probs, logits, features[:7] + 0.5, embeddings[:7], NoveltyRecord(classes=on_features))
    np.testing.assert_allclose(s["knn"], ClassStatistics.fit(features, features, labels, 3, k=4).knn(features[:7] + 0.5))
    back = ClassStatistics.from_dict(on_features.to_dict())
    assert back.knn_input == "features"
    old = {k: v for k, v in ClassStatistics.fit(features, embeddings, labels, 3).to_dict().items() if k != "knn_input"}
    assert ClassStatistics.from_dict(old).knn_input == "embedding"  # records of older models: the embeddings they were fitted on


def test_record_round_trip_and_rule() -> None:
    labels, features, embeddings, logits = _toy()
    stats = ClassStatistics.fit(features, embeddings, labels, 3)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    cal = calibrate(novelty_scores(probs, logits, features, embeddings, NoveltyRecord(classes=stats)), 0.1)
    back = NoveltyRecord.from_dict(NoveltyRecord(classes=stats, calibration=cal).to_dict())
    s2, c2 = back.classes, back.calibration
    np.testing.assert_array_equal(s2.precision, stats.precision)
    np.testing.assert_array_equal(s2.reference, stats.reference)
    assert c2.thresholds == cal.thresholds and c2.reject_rate == 0.1
    assert c2.threshold("knn", 0.5) < c2.threshold("knn")  # another rate from the stored scores
    assert fpr_at_tpr(np.zeros(10), np.ones(10)) == 0.0


def test_combined_score_is_fishers_combination_of_conformal_pvalues() -> None:
    cal = {"pca_mahalanobis": np.array([1.0, 2.0, 3.0, 4.0]), "energy": np.array([-5.0, -4.0, -3.0, -2.0])}
    comb = ScoreCombination.of(cal)
    new = {"pca_mahalanobis": np.array([0.5, 3.0, 10.0]), "energy": np.array([-1.0, -4.5, -6.0])}
    # p = (1 + calibration cells scoring at least as high) / (n + 1)
    p_maha, p_energy = np.array([5, 3, 1]) / 5, np.array([1, 4, 5]) / 5
    np.testing.assert_allclose(comb.pvalues("pca_mahalanobis", new["pca_mahalanobis"]), p_maha)
    np.testing.assert_allclose(comb(new), -2 * (np.log(p_maha) + np.log(p_energy)))
    # the calibration cells themselves, each against the other three: (1 + higher others) / 4
    np.testing.assert_allclose(comb.pvalues("energy", cal["energy"], leave_one_out=True), [1.0, 0.75, 0.5, 0.25])
    assert ScoreCombination.of({"energy": cal["energy"]}) is None  # a part missing: no combined score
    # calibrated like any other score: its threshold rejects at most the rate of calibration cells
    rng = np.random.default_rng(0)
    c = calibrate({"pca_mahalanobis": rng.gamma(2.0, size=400), "energy": rng.normal(size=400), "softmax": rng.uniform(size=400)}, 0.1)
    assert (c.scores["combined"] > c.thresholds["combined"]).mean() <= 0.1
    np.testing.assert_allclose(c.scores["combined"], ScoreCombination.of(c.scores)(c.scores, leave_one_out=True))


def test_query_density_against_a_direct_computation() -> None:
    """Each cross-fitted half: PCA of one half, the other half projected as the reference; a cell's
    score is the share of its k nearest neighbours (itself left out) among reference + query +
    calibration cells that are not reference cells, averaged over the two halves."""
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(0)
    centres = rng.normal(scale=2.0, size=(3, 40)) + 3
    train, cal, query = _clusters(rng, centres, 30), _clusters(rng, centres, 8), _clusters(rng, centres[:2], 10)
    density = QueryDensity.fit(train, seed=3).set_calibration(cal)
    q, c = density.score(query, k=7)
    shares = []
    for pca, ref in zip(density.pcas, density.references):
        z = lambda x, p=pca: np.clip((x - p.mean) / p.scale, -10, 10) @ p.components.T - p.offset  # noqa: E731
        points = np.vstack([ref, z(query), z(cal)])
        d = cdist(points, points)
        np.fill_diagonal(d, np.inf)
        nearest = np.argsort(d, axis=1, kind="stable")[len(ref):, :7]
        shares.append((nearest >= len(ref)).mean(axis=1))
    direct = np.mean(shares, axis=0)
    np.testing.assert_allclose(np.r_[q, c], direct)
    assert sum(len(r) for r in density.references) == len(train)  # every training cell is a reference once


def test_query_density_finds_a_missing_type_beside_a_known_one() -> None:
    """A type missing from training that lies right beside a known one (where distance to the known
    type's mean sees little) makes the query locally denser than the reference."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=40) + 3, rng.normal(size=40) + 3
    sibling = a + 0.9 * rng.normal(size=40)  # close to type a
    train = _clusters(rng, np.stack([a, b]), 150)
    cal = _clusters(rng, np.stack([a, b]), 30)
    query = np.vstack([_clusters(rng, np.stack([a, b]), 100), _clusters(rng, sibling[None], 60)])
    novel = np.r_[np.zeros(200, bool), np.ones(60, bool)]
    density = QueryDensity.fit(train).set_calibration(cal)
    q, c = density.score(query)
    from model.novelty import auroc

    assert auroc(q[~novel], q[novel]) > 0.95
    cut = conformal_threshold(c, 0.1)
    assert (q[novel] > cut).mean() > 0.8 and (q[~novel] > cut).mean() < 0.2


def test_query_density_calibration_rejects_the_rate_without_a_novel_type() -> None:
    """Query and calibration cells drawn like the training cells: the threshold set on the calibration
    cells in the query's own graph rejects about the stated rate of query cells (exchangeable cells;
    averaged over repeats, as conformal guarantees hold on average)."""
    rng = np.random.default_rng(2)
    centres = rng.normal(scale=2.0, size=(3, 40)) + 3
    density = QueryDensity.fit(_clusters(rng, centres, 100))
    rejected = []
    for _ in range(10):
        density.set_calibration(_clusters(rng, centres, 40))
        q, c = density.score(_clusters(rng, centres, 80))
        rejected.append((q > conformal_threshold(c, 0.1)).mean())
    assert 0.03 < np.mean(rejected) <= 0.14


def test_query_density_round_trip_and_query_combined() -> None:
    rng = np.random.default_rng(3)
    centres = rng.normal(scale=2.0, size=(2, 40)) + 3
    train, cal, query = _clusters(rng, centres, 40), _clusters(rng, centres, 10), _clusters(rng, centres, 20)
    labels = np.repeat([0, 1], 40)
    stats = NoveltyRecord(classes=ClassStatistics.fit(train[:, :6], train[:, :5], labels, 2), pca=ExpressionPCA.fit(train, labels, 2),
                          density=QueryDensity.fit(train).set_calibration(cal))
    cal_scores = stats.pca.scores(cal)
    stats.calibration = calibrate(cal_scores, 0.1)
    back = NoveltyRecord.from_dict(stats.to_dict())
    back_cal = back.calibration
    q1, c1 = stats.density.score(query)
    q2, c2 = back.density.score(query)
    np.testing.assert_array_equal(q1, q2)
    np.testing.assert_array_equal(c1, c2)
    scores = back.pca.scores(query)
    out_q, out_c = query_scores(back.density, query, scores, back_cal.scores)
    comb = ScoreCombination.of({"pca_mahalanobis": back_cal.scores["pca_mahalanobis"], "query_density": c2}, ("pca_mahalanobis", "query_density"))
    np.testing.assert_allclose(out_q["query_combined"], comb({"pca_mahalanobis": scores["pca_mahalanobis"], "query_density": q2}))
    np.testing.assert_allclose(out_c["query_combined"], comb({"pca_mahalanobis": back_cal.scores["pca_mahalanobis"], "query_density": c2},
                                                             leave_one_out=True))
    assert QueryDensity.fit(train[:20]) is None  # too few training cells to split

