"""Novelty scores against direct numpy computations, the conformal calibration, the checkpoint
record, majority voting, the published rule unchanged, and the old-checkpoint fallback."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

import finetune
import predict
import preprocess
import pretrain
from data.io import InputError
from model.checkpoint import load_checkpoint
from model.checkpoint.card import card_text, checkpoint_card
from model.inference import PUBLISHED_RULE, NoveltyRule, annotate, assign_labels, novelty_rule
from model.majority_voting import cautious_vote, expression_pcs, majority_vote, over_cluster, over_clustering_resolution, soft_vote
from model.novelty import (
    PCA_COMPONENTS,
    QUERY_SCORES,
    SCORES,
    ExpressionPCA,
    NoveltyStats,
    QueryDensity,
    ScoreCombination,
    calibrate,
    conformal_threshold,
    fpr_at_tpr,
    novelty_record,
    novelty_scores,
    query_scores,
    read_novelty_record,
)

from .conftest import TINY_MODEL

LEGACY = Path(__file__).parent / "fixtures" / "legacy_v1"


def _toy(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), 40)
    features = rng.normal(size=(120, 6)) + 3 * labels[:, None]
    embeddings = rng.normal(size=(120, 5)) + labels[:, None]
    logits = rng.normal(size=(120, 3)) * 2
    return labels, features, embeddings, logits


def test_scores_against_direct_computations() -> None:
    labels, features, embeddings, logits = _toy()
    stats = NoveltyStats.fit(features, embeddings, labels, 3, k=4)
    q_logits, q_feat, q_emb = logits[:7] + 1, features[:7] + 0.5, embeddings[:7] * 1.3
    probs = np.exp(q_logits) / np.exp(q_logits).sum(1, keepdims=True)
    s = novelty_scores(probs, q_logits, q_feat, q_emb, stats)
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
    stats = NoveltyStats.fit(np.zeros((150, 1)), np.zeros((150, 1)), labels, 3)
    stats.pca = space
    s = novelty_scores(np.full((9, 3), 1 / 3), np.zeros((9, 3)), stats=stats, expression=sparse.csr_matrix(q))
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
    # the PCA travels with the stats through the checkpoint record
    s2, _ = read_novelty_record(novelty_record(stats, None))
    np.testing.assert_array_equal(s2.pca.components, space.components)
    again = novelty_scores(np.full((9, 3), 1 / 3), np.zeros((9, 3)), stats=s2, expression=sparse.csr_matrix(q))
    np.testing.assert_allclose(again["pca_mahalanobis"], s["pca_mahalanobis"])
    # a cap on the cells kept: a seeded sample of them
    small = ExpressionPCA.fit(sparse.csr_matrix(X), labels, 3, n_components=5, max_cells=60)
    assert small.stats.reference.shape == (60, 5)
    # a PCA of 4 December (unscaled: no scale in its record) is read and used as it was computed
    old = space.to_dict()
    del old["scale"], old["offset"]
    unscaled = ExpressionPCA.from_dict(old)
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


def test_record_round_trip_and_rule() -> None:
    labels, features, embeddings, logits = _toy()
    stats = NoveltyStats.fit(features, embeddings, labels, 3)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    cal = calibrate(novelty_scores(probs, logits, features, embeddings, stats), 0.1)
    s2, c2 = read_novelty_record(novelty_record(stats, cal))
    np.testing.assert_array_equal(s2.precision, stats.precision)
    np.testing.assert_array_equal(s2.reference, stats.reference)
    assert c2.thresholds == cal.thresholds and c2.reject_rate == 0.1
    assert c2.threshold("knn", 0.5) < c2.threshold("knn")  # another rate from the stored scores
    assert fpr_at_tpr(np.zeros(10), np.ones(10)) == 0.0


def test_published_rule_unchanged() -> None:
    probs = np.array([[0.5, 0.5], [0.49, 0.51], [0.6, 0.4], [0.2, 0.8]], dtype=np.float32)
    labels, top, conf = assign_labels(probs, ["a", "b"], PUBLISHED_RULE)
    assert labels.tolist() == ["a", "b", "a", "b"] and top.tolist() == labels.tolist()
    labels, _, _ = assign_labels(probs, ["a", "b"], NoveltyRule.published(0.55))
    assert labels.tolist() == ["Unassigned", "Unassigned", "a", "b"]
    assert (labels == "Unassigned").tolist() == (conf < 0.55).tolist()
    assert assign_labels(probs, ["a", "b"], None)[0].tolist() == ["a", "b", "a", "b"]


def test_majority_voting_on_a_toy_clustering() -> None:
    labels = ["T", "T", "B", "T", "B", "B", "NK"]
    clusters = [0, 0, 0, 0, 1, 1, 1]
    assert majority_vote(labels, clusters).tolist() == ["T", "T", "T", "T", "B", "B", "B"]
    assert over_clustering_resolution(3000) == 5 and over_clustering_resolution(50_000) == 20 and over_clustering_resolution(10**6) == 30


def test_soft_voting_blends_each_cell_with_its_cluster_mean() -> None:
    probs = np.array([[0.9, 0.1], [0.48, 0.52], [0.2, 0.8], [0.6, 0.4]])
    clusters = ["a", "a", "a", "b"]
    mean_a = probs[:3].mean(0)
    want = np.vstack([0.5 * probs[:3] + 0.5 * mean_a, probs[3:]])
    np.testing.assert_allclose(soft_vote(probs, clusters), want)
    # the unsure cell 1 follows cluster a's mean (class 0); the confident cells 0 and 2 keep their classes
    assert soft_vote(probs, clusters).argmax(1).tolist() == [0, 0, 1, 0]
    np.testing.assert_allclose(soft_vote(probs, clusters, weight=1.0)[:3], np.tile(mean_a, (3, 1)))


def test_over_clustering_keeps_torch_threads() -> None:
    """scanpy's kNN graph resets OpenMP's thread count; over_cluster puts torch's back (a benchmark
    run with --threads 1 ran its later folds on every core, oversubscribing the CPU)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pcs = expression_pcs(np.log1p(np.random.default_rng(0).poisson(0.5, (300, 200)).astype(np.float32)), n_pcs=10)
        over_cluster(pcs, resolution=1.0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_expression_over_clusters_follow_the_types() -> None:
    rng = np.random.default_rng(0)
    lam = np.ones((3, 30))
    for t in range(3):
        lam[t, 10 * t: 10 * t + 10] = 8.0
    X = np.log1p(np.vstack([rng.poisson(lam[t], size=(40, 30)) for t in range(3)]).astype(np.float32))
    pcs = expression_pcs(X, n_pcs=10)
    assert pcs.shape == (120, 10)
    np.testing.assert_allclose(pcs, expression_pcs(X, n_pcs=10))  # seeded
    clusters = over_cluster(pcs, resolution=1.0)
    truth = np.repeat(["x", "y", "z"], 40)
    # every over-cluster holds one type
    assert all(len(set(truth[clusters == c])) == 1 for c in set(clusters))


def test_old_checkpoints_fall_back_to_the_published_rule(caplog: pytest.LogCaptureFixture) -> None:
    ckpt = load_checkpoint(LEGACY / "classifier.pt")
    log = logging.getLogger("scbert")  # the stages' logger does not propagate: listen on it directly
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="scbert"):
            rule, stats = novelty_rule(ckpt)
    finally:
        log.removeHandler(caplog.handler)
    assert rule == PUBLISHED_RULE and stats is None and "published rule" in caplog.text
    result = annotate(ad.read_h5ad(LEGACY / "query.h5ad"), ckpt, progress=False)
    assert set(result.novelty) == {"softmax", "energy"}
    assert ((result.labels == "Unassigned") == (result.confidence < 0.5)).all()
    with pytest.raises(ValueError, match="fine-tune the model again"):
        novelty_rule(ckpt, "knn", 1.0)


@pytest.fixture(scope="module")
def calibrated(pbmc_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("novelty")
    preprocess.main(["--data", str(pbmc_small), "--out", str(d / "prep.h5ad"), "--n-top-genes", "200", "--quiet"])
    pretrain.main(["--data", str(d / "prep.h5ad"), "--out", str(d / "pre"), *TINY_MODEL, "--epochs", "1", "--batch-size", "16", "--quiet"])
    finetune.main(["--data", str(d / "prep.h5ad"), "--label-key", "celltype", "--pretrained", str(d / "pre" / "model.pt"),
                   "--out", str(d / "ft"), "--epochs", "2", "--batch-size", "16", "--reject-rate", "0.1", "--quiet"])
    return d


def test_fine_tuning_stores_a_calibration_that_rejects_the_rate(calibrated: Path) -> None:
    from data.dataset import CellDataset
    from model.inference import predict_outputs

    ckpt = load_checkpoint(calibrated / "ft" / "model.pt")
    stats, cal = read_novelty_record(ckpt.novelty)
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
    out = predict_outputs(ckpt.build_model(), CellDataset(prep.X[val], 5), 16, torch.device("cpu"), embed=True, features=True, progress=False)
    again = novelty_scores(out["probs"], out["logits"], out["features"], out["embedding"], stats, expression=prep.X[val])
    np.testing.assert_allclose(np.sort(again["knn"]), np.sort(cal.scores["knn"]), rtol=1e-4)
    np.testing.assert_allclose(np.sort(again["pca_mahalanobis"]), np.sort(cal.scores["pca_mahalanobis"]), rtol=1e-6)
    assert stats.pca.components.shape == (PCA_COMPONENTS, prep.n_vars)


def test_predict_uses_the_calibration_and_writes_the_keys(calibrated: Path, pbmc_small: Path) -> None:
    out = calibrated / "pred.h5ad"
    predict.main(["--data", str(pbmc_small), "--model", str(calibrated / "ft" / "model.pt"), "--out", str(out), "--quiet",
                  "--novelty", "mahalanobis", "--majority-voting", "--csv", str(calibrated / "pred.csv")])
    a = ad.read_h5ad(out)
    rule = json.loads(a.uns["scbert_novelty"])
    assert rule["score"] == "mahalanobis" and rule["calibrated"] and rule["reject_rate"] == 0.1
    rejected = a.obs["scbert_novelty"].to_numpy() > rule["cutoff"]
    assert ((a.obs["scbert_celltype"] == "Unassigned").to_numpy() == rejected).all()
    assert (a.obs["scbert_celltype_raw"] != "Unassigned").all()
    assert {"scbert_majority_voting", "scbert_over_clustering"} <= set(a.obs.columns)
    soft = calibrated / "soft.h5ad"
    predict.main(["--data", str(pbmc_small), "--model", str(calibrated / "ft" / "model.pt"), "--out", str(soft), "--quiet",
                  "--majority-voting", "--voting", "soft", "--over-clustering-basis", "embedding"])
    c = ad.read_h5ad(soft)
    assert set(c.obs["scbert_majority_voting"]) <= set(json.loads(c.uns["scbert_classes"]) if isinstance(c.uns["scbert_classes"], str)
                                                       else c.uns["scbert_classes"])
    published = calibrated / "pub.h5ad"
    predict.main(["--data", str(pbmc_small), "--model", str(calibrated / "ft" / "model.pt"), "--out", str(published), "--quiet",
                  "--threshold", "0.5", "--novelty", "softmax"])
    b = ad.read_h5ad(published)
    assert ((b.obs["scbert_celltype"] == "Unassigned") == (b.obs["scbert_confidence"] < 0.5)).all()


@pytest.mark.parametrize("backed", ["false", "true"])
def test_predict_script_writes_everything_before_its_quick_exit(calibrated: Path, pbmc_small: Path, backed: str) -> None:
    """``python predict.py`` ends without the interpreter's teardown (exit_now): its h5ad, table and
    run record are complete, and equal to those of main() in this process."""
    import subprocess
    import sys

    args = ["--data", str(pbmc_small), "--model", str(calibrated / "ft" / "model.pt"), "--backed", backed, "--chunk-size", "50"]
    here, there = calibrated / f"here_{backed}", calibrated / f"there_{backed}"
    predict.main([*args, "--out", f"{here}.h5ad", "--csv", f"{here}.csv", "--quiet"])
    proc = subprocess.run([sys.executable, "predict.py", *args, "--out", f"{there}.h5ad", "--csv", f"{there}.csv"],
                          cwd=Path(predict.__file__).parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote" in proc.stderr
    a, b = ad.read_h5ad(f"{here}.h5ad"), ad.read_h5ad(f"{there}.h5ad")
    assert (a.obs["scbert_celltype"] == b.obs["scbert_celltype"]).all()
    np.testing.assert_allclose(a.obsm["scbert_probabilities"], b.obsm["scbert_probabilities"], rtol=1e-5, atol=1e-6)
    assert Path(f"{here}.csv").read_text() == Path(f"{there}.csv").read_text()
    log_lines = Path(f"{there}_run/log.txt").read_text().splitlines()
    assert "wrote" in log_lines[-1]  # the last message reached the file
    assert json.loads(Path(f"{there}_run/metrics.json").read_text())["n_cells"] == a.n_obs


def test_checkpoint_card(calibrated: Path, capsys: pytest.CaptureFixture) -> None:
    """python -m model.info: what a checkpoint holds, as text and JSON."""
    from model.cli.info import main as info_main

    assert info_main([str(calibrated / "ft" / "model.pt")]) == 0
    text = capsys.readouterr().out
    assert "fine-tuned classifier, this package" in text and "B (60 cells)" in text
    assert "novelty: default score" in text and "rejecting 10% of 48 validation cells" in text and "git commit" in text
    assert info_main([str(calibrated / "ft" / "model.pt"), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["model"]["genes"] == 200 and card["recipe"] == "ours" and card["training"]["stage"] == "finetune"
    assert {c["name"] for c in card["classes"]} == {"B", "CD14+ Mono", "NK", "Naive CD4 T"} and all(c["training_cells"] for c in card["classes"])
    assert card["provenance"]["package"] == "scbert-pytorch"
    assert info_main([str(LEGACY / "classifier.pt")]) == 0
    assert "no calibration" in capsys.readouterr().out
    assert info_main([str(calibrated / "missing.pt")]) == 2


def test_near_decision_finds_close_calls() -> None:
    from model.inference import near_decision

    probs = np.array([[0.50, 0.48, 0.02], [0.90, 0.05, 0.05], [0.60, 0.30, 0.10], [0.52, 0.40, 0.08]])
    assert near_decision(probs, None, None, 0.05).tolist() == [True, False, False, False]
    published = NoveltyRule.published(0.5)  # softmax score 1 - top, cutoff 0.5: absolute band
    assert near_decision(probs, published, None, 0.05).tolist() == [True, False, False, True]
    rule = NoveltyRule("mahalanobis", 100.0)  # relative band: 95..105
    assert near_decision(probs, rule, np.array([10.0, 96.0, 104.9, 200.0]), 0.05).tolist() == [True, True, True, False]
    # a score of the input expression is the same in any precision: only the top-two gap counts
    pca_rule = NoveltyRule("pca_mahalanobis", 100.0)
    assert near_decision(probs, pca_rule, np.array([10.0, 96.0, 104.9, 200.0]), 0.05).tolist() == [True, False, False, False]


def test_bf16_recheck_gives_the_fp32_labels(calibrated: Path, pbmc_small: Path) -> None:
    from model.nn.config import ExecutionOptions

    ckpt = load_checkpoint(calibrated / "ft" / "model.pt")
    adata = ad.read_h5ad(pbmc_small)
    ref = annotate(adata, ckpt, progress=False, options=ExecutionOptions(precision="fp32"))
    assert ref.rechecked is None
    every = annotate(adata, ckpt, progress=False, options=ExecutionOptions(precision="bf16"), recheck_margin=1.0)
    assert every.rechecked == adata.n_obs  # a margin of 1 re-scores every cell: the float32 outputs, batch rounding aside
    np.testing.assert_allclose(every.probabilities, ref.probabilities, atol=1e-5)
    np.testing.assert_allclose(every.novelty_score, ref.novelty_score, rtol=1e-4)
    assert (every.labels == ref.labels).all()
    off = annotate(adata, ckpt, progress=False, options=ExecutionOptions(precision="bf16"), recheck_margin=0)
    assert off.rechecked is None and not np.array_equal(off.probabilities, ref.probabilities)
    default = annotate(adata, ckpt, progress=False, options=ExecutionOptions(precision="bf16"))
    assert 0 <= default.rechecked < adata.n_obs
    assert default.report()[0]["rechecked_fp32"] == default.rechecked


def test_fine_tuning_measures_the_bf16_error_for_the_recheck(calibrated: Path) -> None:
    """Fine-tuning stores how much bf16 moves the model's outputs on its validation cells; the
    figures are those of one float32 and one bf16 pass over them, and "auto" turns them into the margin."""
    from data.dataset import CellDataset
    from data.labels import stratified_holdout
    from model.inference import RECHECK_FLOOR, RECHECK_SAFETY, auto_recheck_margin, predict_outputs
    from model.nn.config import ExecutionOptions

    ckpt = load_checkpoint(calibrated / "ft" / "model.pt")
    err = ckpt.novelty["precision_error"]["bf16"]
    assert err["n_cells"] == 48 and err["precision"] == "bf16" and set(err["scores"]) == {"energy", "mahalanobis", "knn"}
    assert err["head"] == "float32"
    prep = ad.read_h5ad(calibrated / "prep.h5ad")
    y = prep.obs["celltype"].astype(str).to_numpy()
    _, val = stratified_holdout(np.array([ckpt.classes.index(c) for c in y]), 0.2, 0)
    ds = CellDataset(ckpt.prepare(prep[val])[0].X, ckpt.config.bin_num)
    probs = {p: predict_outputs(ckpt.build_model(ExecutionOptions(precision=p)), ds, 16, torch.device("cpu"), progress=False)["probs"]
             for p in ("fp32", "bf16")}
    assert err["probs"] == pytest.approx(np.abs(probs["bf16"].astype(np.float64) - probs["fp32"]).max(), rel=1e-5, abs=1e-7)
    assert err["probs"] > 0  # bf16 does move them
    rule = NoveltyRule("mahalanobis", 10.0)
    assert auto_recheck_margin(err, rule) == max(RECHECK_FLOOR, RECHECK_SAFETY * max(2 * err["probs"], err["scores"]["mahalanobis"]))
    assert "bf16 error on 48 validation cells" in card_text(checkpoint_card(ckpt))


def test_auto_recheck_margin() -> None:
    from model.inference import RECHECK_MARGIN, auto_recheck_margin

    err = {"n_cells": 100, "probs": 0.002, "scores": {"energy": 0.001, "mahalanobis": 0.03}}
    assert auto_recheck_margin(None, NoveltyRule("energy", -3.0)) == RECHECK_MARGIN  # not measured: the fixed margin
    assert auto_recheck_margin(err, NoveltyRule("energy", -3.0)) == pytest.approx(4 * 0.004)  # the top-two gap moves by 2 x 0.002
    assert auto_recheck_margin(err, NoveltyRule("mahalanobis", 50.0)) == pytest.approx(4 * 0.03)
    assert auto_recheck_margin(err, NoveltyRule("knn", 1.0)) == RECHECK_MARGIN  # the rule's score was not measured
    assert auto_recheck_margin(err, NoveltyRule("pca_knn", 1.0)) == pytest.approx(0.016)  # the precision cannot move a pca_* score
    assert auto_recheck_margin({"probs": 1e-5, "scores": {}}, NoveltyRule.published(0.5)) == 0.005  # the floor


def test_recheck_margin_auto_and_given(calibrated: Path, pbmc_small: Path, caplog: pytest.LogCaptureFixture) -> None:
    from model.inference import RECHECK_MARGIN, resolve_recheck_margin
    from model.nn.config import ExecutionOptions

    ckpt = load_checkpoint(calibrated / "ft" / "model.pt")
    bf16 = ExecutionOptions(precision="bf16")
    rule = NoveltyRule("energy", -1.0)
    assert resolve_recheck_margin("auto", ckpt, ExecutionOptions(), rule) is None  # fp32: nothing to re-check
    assert resolve_recheck_margin(0.2, ckpt, bf16, rule) == 0.2
    auto = resolve_recheck_margin("auto", ckpt, bf16, rule)
    assert 0.005 <= auto < RECHECK_MARGIN  # a tiny model moves little under bf16
    old = dataclasses.replace(ckpt, novelty={k: v for k, v in ckpt.novelty.items() if k != "precision_error"})
    assert resolve_recheck_margin("auto", old, bf16, rule) == RECHECK_MARGIN
    # measured before the head ran in float32: the same margin, and a word that it is cautious
    err = {k: v for k, v in ckpt.novelty["precision_error"]["bf16"].items() if k != "head"}
    before = dataclasses.replace(ckpt, novelty={**ckpt.novelty, "precision_error": {"bf16": {**err, "probs": 0.01}}})
    log = logging.getLogger("scbert")
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="scbert"):
            assert resolve_recheck_margin("auto", before, bf16, rule) == pytest.approx(max(0.08, 4 * err["scores"]["energy"]))
    finally:
        log.removeHandler(caplog.handler)
    assert "head still ran in bf16" in caplog.text
    with pytest.raises(InputError, match="re-check margin"):
        resolve_recheck_margin("sometimes", ckpt, bf16, rule)
    adata = ad.read_h5ad(pbmc_small)
    res = annotate(adata, ckpt, progress=False, options=bf16)
    assert res.recheck_margin == resolve_recheck_margin("auto", ckpt, bf16, res.rule)
    assert json.loads(res.to_adata(adata.copy()).uns["scbert_annotation"])["recheck_margin"] == res.recheck_margin
    assert res.report()[0]["recheck_margin"] == res.recheck_margin


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


def test_combined_score_from_a_checkpoint(calibrated: Path, pbmc_small: Path) -> None:
    """predict's ``combined`` score: the cells' pca_mahalanobis and energy against the stored
    calibration scores; checkpoints calibrated before it existed get it from those scores."""
    ckpt = load_checkpoint(calibrated / "ft" / "model.pt")
    adata = ad.read_h5ad(pbmc_small)
    res = annotate(adata, ckpt, novelty="combined", progress=False)
    stats, cal = read_novelty_record(ckpt.novelty)
    assert res.rule.score == "combined" and res.rule.cutoff == cal.thresholds["combined"]
    direct = ScoreCombination.of(cal.scores)(res.novelty)
    np.testing.assert_allclose(res.novelty["combined"], direct)
    assert (res.labels == "Unassigned").sum() == (direct > cal.thresholds["combined"]).sum()
    record = dict(ckpt.novelty)
    c = dict(record["calibration"])
    c["thresholds"] = {k: v for k, v in c["thresholds"].items() if k != "combined"}
    c["scores"] = {k: v for k, v in c["scores"].items() if k != "combined"}
    record["calibration"] = c
    _, old_cal = read_novelty_record(record)
    assert old_cal.thresholds["combined"] == pytest.approx(cal.thresholds["combined"])
    with pytest.raises(InputError, match="calibration that fine-tuning now stores"):
        novelty_rule(dataclasses.replace(ckpt, novelty={**record, "calibration": None}), "combined", 3.0)


def test_checkpoint_calibrated_before_the_pca_scores(calibrated: Path) -> None:
    """A checkpoint whose record has no PCA (fine-tuned before the pca_* scores): its own scores
    still work, a pca_* score is refused with what to do."""
    ckpt = load_checkpoint(calibrated / "ft" / "model.pt")
    record = dict(ckpt.novelty)
    record["stats"] = {k: v for k, v in record["stats"].items() if k != "pca"}
    record["calibration"] = dict(record["calibration"], thresholds={k: v for k, v in record["calibration"]["thresholds"].items()
                                                                     if not k.startswith("pca_")})
    ckpt.novelty = record
    rule, stats = novelty_rule(ckpt, "mahalanobis")
    assert rule.score == "mahalanobis" and stats.pca is None
    assert record["default"] == "query_combined" and novelty_rule(ckpt)[0].score == "mahalanobis"  # auto: the best it has
    ckpt.novelty = dict(record, default="pca_mahalanobis")  # the default such a checkpoint recorded
    assert novelty_rule(ckpt)[0].score == "mahalanobis"
    for threshold in ("auto", 3.0):
        with pytest.raises(ValueError, match="fine-tune the model again"):
            novelty_rule(ckpt, "pca_mahalanobis", threshold)


def _clusters(rng: np.random.Generator, centres: np.ndarray, n: int, genes: int = 40) -> np.ndarray:
    """Log-expression-like cells around ``centres`` (one row per cluster), ``n`` per cluster."""
    return np.vstack([np.abs(c + rng.normal(scale=0.6, size=(n, genes))) for c in centres]).astype(np.float32)


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
    stats = NoveltyStats.fit(train[:, :6], train[:, :5], labels, 2)
    stats.pca = ExpressionPCA.fit(train, labels, 2)
    stats.density = QueryDensity.fit(train).set_calibration(cal)
    cal_scores = stats.pca.scores(cal)
    record = novelty_record(stats, calibrate(cal_scores, 0.1))
    back, back_cal = read_novelty_record(record)
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


def test_query_scores_from_a_checkpoint(calibrated: Path, pbmc_small: Path, caplog: pytest.LogCaptureFixture) -> None:
    """predict's query_* scores: the calibration cells scored in the query's graph set the cutoff;
    a query annotated a chunk at a time cannot use them; older checkpoints refuse them."""
    ckpt = load_checkpoint(calibrated / "ft" / "model.pt")
    adata = ad.read_h5ad(pbmc_small)
    stats, cal = read_novelty_record(ckpt.novelty)
    for score in QUERY_SCORES:
        rule, _ = novelty_rule(ckpt, score)
        assert rule.score == score and rule.cutoff is None and rule.reject_rate == 0.1  # set once the query is scored
        res = annotate(adata, ckpt, novelty=score, progress=False)
        prepared, _ = ckpt.prepare(adata)
        q, c = query_scores(stats.density, prepared.X, res.novelty, cal.scores)
        np.testing.assert_allclose(res.novelty[score], q[score])
        assert res.rule.cutoff == conformal_threshold(c[score], 0.1)
        assert ((res.labels == "Unassigned") == (q[score] > res.rule.cutoff)).all()
        fixed = annotate(adata, ckpt, threshold=0.6, novelty=score, progress=False)
        assert fixed.rule.cutoff == 0.6 and ((fixed.labels == "Unassigned") == (fixed.novelty[score] > 0.6)).all()
    with pytest.raises(InputError, match="a chunk at a time"):
        novelty_rule(ckpt, "query_density", whole_query=False)
    record = dict(ckpt.novelty, default="query_combined")
    old = dict(record, stats={k: v for k, v in record["stats"].items() if k != "density"})
    log = logging.getLogger("scbert")  # the stages' logger does not propagate: listen on it directly
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="scbert"):
            rule, _ = novelty_rule(dataclasses.replace(ckpt, novelty=record), whole_query=False)
            assert rule.score == "pca_mahalanobis" and "chunk at a time" in caplog.text
            assert novelty_rule(dataclasses.replace(ckpt, novelty=old))[0].score == "pca_mahalanobis"  # auto: the best it has
            annotate(adata[:40].copy(), ckpt, novelty="query_density", progress=False)
    finally:
        log.removeHandler(caplog.handler)
    assert "with 40 cells" in caplog.text
    for threshold in ("auto", 0.5):
        with pytest.raises(InputError, match="fine-tune"):
            novelty_rule(dataclasses.replace(ckpt, novelty=old), "query_density", threshold)
    with pytest.raises(InputError, match="fine-tune"):  # never Unassigned, but the score is still asked for
        annotate(adata, dataclasses.replace(ckpt, novelty=old), threshold=None, novelty="query_density", progress=False)


def test_cautious_voting_changes_only_unsure_cells_of_nearly_unanimous_clusters() -> None:
    probs = np.array([[0.9, 0.1, 0.0], [0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.85, 0.1, 0.05], [0.3, 0.45, 0.25],  # a: 4 of 5 say 0
                      [0.3, 0.4, 0.3], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.4, 0.6, 0.0]])  # b: 3 of 5 say 1
    clusters = np.array(["a"] * 5 + ["b"] * 5)
    out = cautious_vote(probs, clusters)
    # a's unsure dissenter (0.45) follows its cluster; b is too mixed for anything to change
    np.testing.assert_array_equal(out, [0, 0, 0, 0, 0, 1, 0, 1, 1, 1])
    np.testing.assert_array_equal(cautious_vote(probs, clusters, unsure=0.4), probs.argmax(1))  # 0.45 is sure enough
    # b at a 60% majority: its unsure cell (row 5, already 1) stays, its sure dissenter (row 6, 0.6) too
    np.testing.assert_array_equal(cautious_vote(probs, clusters, majority=0.6), out)
    np.testing.assert_array_equal(cautious_vote(probs, clusters, unsure=0.65, majority=0.6)[6], 1)


def test_a_shifted_query_falls_back_from_the_query_scores(caplog: pytest.LogCaptureFixture) -> None:
    """A query that differs from the training cells as a whole (every gene shifted, as another batch
    or technology might) is query-dense everywhere: the default falls back to pca_mahalanobis, an
    explicit query score warns; a query of the training cells' kind keeps the query score."""
    from model.inference import query_rule
    from model.novelty import QUERY_SHIFT_SHARE, query_shift

    rng = np.random.default_rng(4)
    centres = rng.normal(scale=2.0, size=(3, 40)) + 3
    train, cal = _clusters(rng, centres, 150), _clusters(rng, centres, 40)
    labels = np.repeat([0, 1, 2], 150)
    stats = NoveltyStats.fit(train[:, :6], train[:, :5], labels, 3)
    stats.pca = ExpressionPCA.fit(train, labels, 3)
    stats.density = QueryDensity.fit(train).set_calibration(cal)
    stats.calibration = calibrate(stats.pca.scores(cal), 0.05)
    log = logging.getLogger("scbert")
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="scbert"):
            for query, shifted in ((_clusters(rng, centres, 100), False), (_clusters(rng, centres + 0.8, 100), True)):
                scores = stats.pca.scores(query)
                rule = query_rule(NoveltyRule("query_combined", None, 0.05), stats, query, scores, fall_back=True)
                assert (query_shift(scores["query_density"], stats.density.score(query)[1]) > QUERY_SHIFT_SHARE) is shifted
                assert rule.score == ("pca_mahalanobis" if shifted else "query_combined") and rule.cutoff is not None
                if shifted:
                    assert rule == NoveltyRule("pca_mahalanobis", stats.calibration.thresholds["pca_mahalanobis"], 0.05)
            assert "differs from the training cells" in caplog.text
            caplog.clear()
            explicit = query_rule(NoveltyRule("query_density", None, 0.05), stats, query, stats.pca.scores(query))
            assert explicit.score == "query_density" and "most cells will be Unassigned" in caplog.text
    finally:
        log.removeHandler(caplog.handler)


def test_query_scores_do_not_depend_on_the_thread_count(calibrated: Path, pbmc_small: Path) -> None:
    """The neighbour search is exact (a k-d tree): the same scores with 1 and 2 BLAS threads, even for
    a query that repeats the training and validation cells (near-ties everywhere)."""
    from threadpoolctl import threadpool_limits

    ckpt = load_checkpoint(calibrated / "ft" / "model.pt")
    stats, cal = read_novelty_record(ckpt.novelty)
    prepared, _ = ckpt.prepare(ad.read_h5ad(pbmc_small))
    runs = []
    for threads in (1, 2):
        with threadpool_limits(threads):
            runs.append(query_scores(stats.density, prepared.X, stats.pca.scores(prepared.X), cal.scores))
    for part in (0, 1):
        for score in QUERY_SCORES:
            np.testing.assert_array_equal(runs[0][part][score], runs[1][part][score])
