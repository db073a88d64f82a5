"""When a cell is Unassigned: the rule chosen from what a checkpoint stores (the published rule for
models without a calibration, the calibrated default, each score on request, what older records
lack), the calibration fine-tuning stores, and the query scores' cutoff and fall-back."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import predict
from data.io import InputError
from model.annotation import annotate
from model.checkpoint import load_checkpoint
from model.inference import InferenceOptions, predict_outputs
from model.novelty import (
    PCA_COMPONENTS,
    PUBLISHED_RULE,
    QUERY_SCORES,
    QUERY_SHIFT_SHARE,
    SCORES,
    ClassStatistics,
    ExpressionPCA,
    NoveltyRecord,
    NoveltyRule,
    NoveltySettings,
    QueryDensity,
    ScoreCombination,
    assign_labels,
    calibrate,
    choose_rule,
    conformal_threshold,
    novelty_scores,
    query_rule,
    query_scores,
    query_shift,
)

from .conftest import linked_run, upgraded, v1_novelty

LEGACY = Path(__file__).parent / "fixtures" / "legacy_v1"
QUIET = InferenceOptions(progress=False)


def _clusters(rng: np.random.Generator, centres: np.ndarray, n: int, genes: int = 40) -> np.ndarray:
    """Log-expression-like cells around ``centres`` (one row per cluster), ``n`` per cluster."""
    return np.vstack([np.abs(c + rng.normal(scale=0.6, size=(n, genes))) for c in centres]).astype(np.float32)


def test_published_rule_unchanged() -> None:
    probs = np.array([[0.5, 0.5], [0.49, 0.51], [0.6, 0.4], [0.2, 0.8]], dtype=np.float32)
    labels, top, conf = assign_labels(probs, ["a", "b"], PUBLISHED_RULE)
    assert labels.tolist() == ["a", "b", "a", "b"] and top.tolist() == labels.tolist()
    labels, _, _ = assign_labels(probs, ["a", "b"], NoveltyRule.published(0.55))
    assert labels.tolist() == ["Unassigned", "Unassigned", "a", "b"]
    assert (labels == "Unassigned").tolist() == (conf < 0.55).tolist()
    assert assign_labels(probs, ["a", "b"], None)[0].tolist() == ["a", "b", "a", "b"]


def test_old_checkpoints_fall_back_to_the_published_rule(scbert_log: pytest.LogCaptureFixture) -> None:
    ckpt = load_checkpoint(LEGACY / "classifier.pt")
    with scbert_log.at_level(logging.INFO, logger="scbert"):
        rule = choose_rule(ckpt.novelty, model_name=ckpt.source)
    assert rule == PUBLISHED_RULE and ckpt.novelty is None and "published rule" in scbert_log.text
    result = annotate(ad.read_h5ad(LEGACY / "query.h5ad"), ckpt, options=QUIET)
    assert set(result.novelty) == {"softmax", "energy"}
    assert ((result.labels == "Unassigned") == (result.confidence < 0.5)).all()
    with pytest.raises(ValueError, match="fine-tune the model again"):
        choose_rule(ckpt.novelty, NoveltySettings("knn", 1.0))


@pytest.fixture(scope="module")
def calibrated(tiny_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared tiny run (fine-tuned with novelty calibrated to reject 10%), with a folder of this module's own."""
    return linked_run(tiny_run, tmp_path_factory.mktemp("novelty"))


def test_fine_tuning_stores_a_calibration_that_rejects_the_rate(calibrated: Path) -> None:
    from data.dataset import CellDataset

    ckpt = load_checkpoint(calibrated / "ft" / "model.pt")
    stats, cal = ckpt.novelty, ckpt.novelty.calibration
    assert stats is not None and cal.reject_rate == 0.1 and cal.n == 48  # the 48 validation cells
    m = json.loads((calibrated / "ft" / "metrics.json").read_text())
    assert m["novelty"]["reject_rate"] == 0.1 and set(m["novelty"]["thresholds"]) == set(SCORES) - set(QUERY_SCORES)
    # query_density: two cross-fitted PCAs, each with its reference half and the 48 calibration cells projected
    assert len(stats.density.pcas) == 2 and all(len(c) == cal.n for c in stats.density.calibrations)
    for score, values in cal.scores.items():
        assert (values > cal.thresholds[score]).mean() <= 0.1, score
    # the stored scores are those of the model: recomputed on the validation cells
    prep = ad.read_h5ad(calibrated / "prep.h5ad")
    y = prep.obs["celltype"].astype(str).to_numpy()
    from data.labels import stratified_holdout

    _, val = stratified_holdout(np.array([ckpt.classes.index(c) for c in y]), 0.2, 0)
    out = predict_outputs(ckpt.build_model(), CellDataset(prep.X[val], 5), QUIET, embed=True, features=True)
    again = novelty_scores(out["probs"], out["logits"], out["features"], out["embedding"], stats, expression=prep.X[val])
    np.testing.assert_allclose(np.sort(again["knn"]), np.sort(cal.scores["knn"]), rtol=1e-4)
    np.testing.assert_allclose(np.sort(again["pca_mahalanobis"]), np.sort(cal.scores["pca_mahalanobis"]), rtol=1e-6)
    assert stats.pca.components.shape == (PCA_COMPONENTS, prep.n_vars)


def test_predict_uses_the_calibration_and_writes_the_keys(calibrated: Path, pbmc_small: Path) -> None:
    out = calibrated / "pred.h5ad"
    predict.main(["--data", str(pbmc_small), "--model", str(calibrated / "ft" / "model.pt"), "--out", str(out), "--quiet",
                  "--novelty", "mahalanobis", "--majority-voting", "--csv", str(calibrated / "pred.csv")])
    a = ad.read_h5ad(out)
    rule = a.uns["scbert_novelty"]  # a dict, written as a group of the .h5ad
    assert rule["score"] == "mahalanobis" and rule["calibrated"] and rule["reject_rate"] == 0.1
    rejected = a.obs["scbert_novelty"].to_numpy() > rule["cutoff"]
    assert ((a.obs["scbert_celltype"] == "Unassigned").to_numpy() == rejected).all()
    assert (a.obs["scbert_celltype_raw"] != "Unassigned").all()
    assert {"scbert_majority_voting", "scbert_over_clustering"} <= set(a.obs.columns)
    soft = calibrated / "soft.h5ad"
    predict.main(["--data", str(pbmc_small), "--model", str(calibrated / "ft" / "model.pt"), "--out", str(soft), "--quiet",
                  "--majority-voting", "--voting", "soft", "--over-clustering-basis", "embedding"])
    c = ad.read_h5ad(soft)
    assert set(c.obs["scbert_majority_voting"]) <= set(c.uns["scbert_classes"])
    published = calibrated / "pub.h5ad"
    predict.main(["--data", str(pbmc_small), "--model", str(calibrated / "ft" / "model.pt"), "--out", str(published), "--quiet",
                  "--threshold", "0.5", "--novelty", "softmax"])
    b = ad.read_h5ad(published)
    assert ((b.obs["scbert_celltype"] == "Unassigned") == (b.obs["scbert_confidence"] < 0.5)).all()


def test_combined_score_from_a_checkpoint(calibrated: Path, pbmc_small: Path) -> None:
    """predict's ``combined`` score: the cells' pca_mahalanobis and energy against the stored
    calibration scores; checkpoints calibrated before it existed get it from those scores."""
    ckpt = load_checkpoint(calibrated / "ft" / "model.pt")
    adata = ad.read_h5ad(pbmc_small)
    res = annotate(adata, ckpt, NoveltySettings("combined"), QUIET)
    cal = ckpt.novelty.calibration
    assert res.rule.score == "combined" and res.rule.cutoff == cal.thresholds["combined"]
    direct = ScoreCombination.of(cal.scores)(res.novelty)
    np.testing.assert_allclose(res.novelty["combined"], direct)
    assert (res.labels == "Unassigned").sum() == (direct > cal.thresholds["combined"]).sum()
    record = v1_novelty(ckpt.novelty)
    c = dict(record["calibration"])
    c["thresholds"] = {k: v for k, v in c["thresholds"].items() if k != "combined"}
    c["scores"] = {k: v for k, v in c["scores"].items() if k != "combined"}
    record["calibration"] = c
    old_cal = upgraded(record).calibration
    assert old_cal.thresholds["combined"] == pytest.approx(cal.thresholds["combined"])
    with pytest.raises(InputError, match="calibration that fine-tuning now stores"):
        choose_rule(upgraded({**record, "calibration": None}), NoveltySettings("combined", 3.0))


def test_checkpoint_calibrated_before_the_pca_scores(calibrated: Path) -> None:
    """A checkpoint whose record has no PCA (fine-tuned before the pca_* scores): its own scores
    still work, a pca_* score is refused with what to do."""
    ckpt = load_checkpoint(calibrated / "ft" / "model.pt")
    record = v1_novelty(ckpt.novelty)
    record["stats"] = {k: v for k, v in record["stats"].items() if k != "pca"}
    record["calibration"] = dict(record["calibration"], thresholds={k: v for k, v in record["calibration"]["thresholds"].items()
                                                                     if not k.startswith("pca_")})
    old = upgraded(record)
    rule = choose_rule(old, NoveltySettings("mahalanobis"))
    assert rule.score == "mahalanobis" and old.pca is None
    assert record["default"] == "query_combined" and choose_rule(old).score == "mahalanobis"  # auto: the best it has
    old = upgraded(dict(record, default="pca_mahalanobis"))  # the default such a checkpoint recorded
    assert choose_rule(old).score == "mahalanobis"
    for threshold in ("auto", 3.0):
        with pytest.raises(ValueError, match="fine-tune the model again"):
            choose_rule(old, NoveltySettings("pca_mahalanobis", threshold))


def test_checkpoint_calibrated_before_the_crossfit_scores(calibrated: Path) -> None:
    """A checkpoint without the cross-fitted statistics: auto falls back to a score it has; an
    explicit cross-fitted score is refused in one line naming what it has (never silently swapped)."""
    ckpt = load_checkpoint(calibrated / "ft" / "model.pt")
    old = dataclasses.replace(ckpt.novelty, crossfit=None)
    assert not old.can_score("crossfit_combined") and choose_rule(old).score not in ("crossfit_combined", "crossfit_feature_combined")
    for score in ("crossfit_combined", "crossfit_mahalanobis", "crossfit_feature_combined"):
        with pytest.raises(ValueError, match=r"before the cross-fitted statistics existed: choose one of \[.*'pca_mahalanobis'"):
            choose_rule(old, NoveltySettings(score))


def test_query_scores_from_a_checkpoint(calibrated: Path, pbmc_small: Path, scbert_log: pytest.LogCaptureFixture) -> None:
    """predict's query_* scores: the calibration cells scored in the query's graph set the cutoff;
    a query annotated a chunk at a time cannot use them; older checkpoints refuse them."""
    ckpt = load_checkpoint(calibrated / "ft" / "model.pt")
    adata = ad.read_h5ad(pbmc_small)
    stats, cal = ckpt.novelty, ckpt.novelty.calibration
    for score in QUERY_SCORES:
        rule = choose_rule(ckpt.novelty, NoveltySettings(score))
        assert rule.score == score and rule.cutoff is None and rule.reject_rate == 0.1  # set once the query is scored
        res = annotate(adata, ckpt, NoveltySettings(score), QUIET)
        prepared, _ = ckpt.prepare(adata)
        q, c = query_scores(stats.density, prepared.X, res.novelty, cal.scores)
        np.testing.assert_allclose(res.novelty[score], q[score])
        assert res.rule.cutoff == conformal_threshold(c[score], 0.1)
        assert ((res.labels == "Unassigned") == (q[score] > res.rule.cutoff)).all()
        fixed = annotate(adata, ckpt, NoveltySettings(score, 0.6), QUIET)
        assert fixed.rule.cutoff == 0.6 and ((fixed.labels == "Unassigned") == (fixed.novelty[score] > 0.6)).all()
    with pytest.raises(InputError, match="a chunk at a time"):
        choose_rule(ckpt.novelty, NoveltySettings("query_density"), whole_query=False)
    record = upgraded(dict(v1_novelty(ckpt.novelty), default="query_combined"))
    old = dataclasses.replace(record, density=None)
    with scbert_log.at_level(logging.INFO, logger="scbert"):
        rule = choose_rule(record, whole_query=False)
        assert rule.score == "pca_mahalanobis" and "chunk at a time" in scbert_log.text
        assert choose_rule(old).score == "pca_mahalanobis"  # auto: the best it has
        annotate(adata[:40].copy(), ckpt, NoveltySettings("query_density"), QUIET)
    assert "with 40 cells" in scbert_log.text
    for threshold in ("auto", 0.5):
        with pytest.raises(InputError, match="fine-tune"):
            choose_rule(old, NoveltySettings("query_density", threshold))
    with pytest.raises(InputError, match="fine-tune"):  # never Unassigned, but the score is still asked for
        annotate(adata, dataclasses.replace(ckpt, novelty=old), NoveltySettings("query_density", None), QUIET)


def test_a_shifted_query_falls_back_from_the_query_scores(scbert_log: pytest.LogCaptureFixture) -> None:
    """A query that differs from the training cells as a whole (every gene shifted, as another batch
    or technology might) is query-dense everywhere: the default falls back to pca_mahalanobis, an
    explicit query score warns; a query of the training cells' kind keeps the query score."""

    rng = np.random.default_rng(4)
    centres = rng.normal(scale=2.0, size=(3, 40)) + 3
    train, cal = _clusters(rng, centres, 150), _clusters(rng, centres, 40)
    labels = np.repeat([0, 1, 2], 150)
    stats = NoveltyRecord(classes=ClassStatistics.fit(train[:, :6], train[:, :5], labels, 3), pca=ExpressionPCA.fit(train, labels, 3),
                          density=QueryDensity.fit(train).set_calibration(cal))
    stats.calibration = calibrate(stats.pca.scores(cal), 0.05)
    with scbert_log.at_level(logging.INFO, logger="scbert"):
        for query, shifted in ((_clusters(rng, centres, 100), False), (_clusters(rng, centres + 0.8, 100), True)):
            scores = stats.pca.scores(query)
            rule = query_rule(NoveltyRule("query_combined", None, 0.05), stats, query, scores, fall_back=True)
            assert (query_shift(scores["query_density"], stats.density.score(query)[1]) > QUERY_SHIFT_SHARE) is shifted
            assert rule.score == ("pca_mahalanobis" if shifted else "query_combined") and rule.cutoff is not None
            if shifted:
                assert rule == NoveltyRule("pca_mahalanobis", stats.calibration.thresholds["pca_mahalanobis"], 0.05)
        assert "differs from the training cells" in scbert_log.text
        scbert_log.clear()
        explicit = query_rule(NoveltyRule("query_density", None, 0.05), stats, query, stats.pca.scores(query))
        assert explicit.score == "query_density" and "most cells will be Unassigned" in scbert_log.text


def test_query_scores_do_not_depend_on_the_thread_count(calibrated: Path, pbmc_small: Path) -> None:
    """The neighbour search is exact (a k-d tree): the same scores with 1 and 2 BLAS threads, even for
    a query that repeats the training and validation cells (near-ties everywhere)."""
    from threadpoolctl import threadpool_limits

    ckpt = load_checkpoint(calibrated / "ft" / "model.pt")
    stats, cal = ckpt.novelty, ckpt.novelty.calibration
    prepared, _ = ckpt.prepare(ad.read_h5ad(pbmc_small))
    runs = []
    for threads in (1, 2):
        with threadpool_limits(threads):
            runs.append(query_scores(stats.density, prepared.X, stats.pca.scores(prepared.X), cal.scores))
    for part in (0, 1):
        for score in QUERY_SCORES:
            np.testing.assert_array_equal(runs[0][part][score], runs[1][part][score])

