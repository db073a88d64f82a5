"""The benchmark harness on tiny data: identical splits across methods, protocol splits, metrics on a
hand-made case, the CLI end to end with a tiny scBERT, and merging."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from scipy import sparse

from scripts.benchmark.harness import run_benchmark
from scripts.benchmark.methods import CentroidCorrelation, KNNReference, LogisticL1, LogisticL2, method_factories
from scripts.benchmark.protocols import cross_splits, cv_splits, fewshot_splits, imbalance_splits, novel_splits, select_genes
from scripts.benchmark.report import NoveltyTally, check_same_splits, evaluate, paired_against, paired_table

REPO = Path(__file__).resolve().parents[1]
GENES = ["CD3D", "CD3E", "CD2", "IL7R", "CD79A", "MS4A1", "CD19", "CD22", "LYZ", "CD14", "S100A8", "S100A9", "NKG7", "GNLY",
         "GZMB", "PRF1", "PPBP", "PF4", "FCER1A", "CST3", "HBB", "HBA1", "ACTB", "GAPDH"]


def toy(n_per: int = 20, n_genes: int = 24, seed: int = 0) -> tuple[sparse.csr_matrix, np.ndarray, list[str]]:
    """Raw counts of 3 types, each with its own 4 marker genes, plus background."""
    rng = np.random.default_rng(seed)
    types = ["alpha", "beta", "gamma"]
    X, y = [], []
    for t, name in enumerate(types):
        lam = np.full(n_genes, 1.0)
        lam[4 * t: 4 * t + 4] = 12.0
        X.append(rng.poisson(lam, size=(n_per, n_genes)))
        y += [name] * n_per
    return sparse.csr_matrix(np.vstack(X).astype(np.float32)), np.array(y), GENES[:n_genes]


def toy_h5ad(path: Path, **kw) -> Path:
    X, y, genes = toy(**kw)
    a = ad.AnnData(X=X)
    a.var_names = genes
    a.obs_names = [f"c{i}" for i in range(len(y))]
    a.obs["celltype"] = y
    a.obs["batch"] = np.where(np.arange(len(y)) % 2 == 0, "b1", "b2")
    a.write_h5ad(path)
    return path


def test_cv_folds_partition_cells_and_are_stratified() -> None:
    y = np.array(["a"] * 10 + ["b"] * 5 + ["c"] * 5)
    splits = cv_splits(y, 5, [0, 1])
    assert len(splits) == 10
    for seed in (0, 1):
        tests = np.concatenate([s.test for s in splits if s.seed == seed])
        assert sorted(tests) == list(range(20))
    for s in splits:
        assert not set(s.train) & set(s.test)
        assert sorted((y[s.test] == "a").nonzero()[0].shape) == [2]
    assert cv_splits(y, 5, [0])[0].fingerprint() == cv_splits(y, 5, [0])[0].fingerprint()
    assert splits[0].fingerprint() != splits[5].fingerprint()
    with pytest.raises(ValueError, match="fewer than 6 cells"):
        cv_splits(y, 6, [0])


def test_protocol_splits() -> None:
    y = np.array(["a"] * 30 + ["b"] * 20 + ["c"] * 10)
    for s in novel_splits(y, ["c"], 5, [0]):
        assert "c" not in set(y[s.train]) and "c" in set(y[s.test])
    for s in imbalance_splits(y, {"a": 3}, 5, [0]):
        assert (y[s.train] == "a").sum() == 3 and (y[s.train] == "b").sum() == 16
    few = fewshot_splits(y, [0.25, 1.0], 5, [0])
    assert len(few) == 10
    small = [s for s in few if s.variant.startswith("25%")][0]
    assert (y[small.train] == "a").sum() == 6 and (y[small.train] == "c").sum() == 2
    cross = cross_splits(np.arange(60) < 40, np.arange(60) >= 40, [0, 1])
    assert cross[0].fingerprint() == cross[1].fingerprint() and len(cross[0].test) == 20
    with pytest.raises(ValueError, match="not in the data"):
        novel_splits(y, ["zeta"], 5, [0])


def test_metrics_on_a_hand_made_case() -> None:
    classes = ["a", "b"]
    y = np.array(["a", "a", "b", "b", "x", "x"])  # x was never seen in training
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.45, 0.55], [0.6, 0.4], [0.52, 0.48]])
    m = evaluate(y, probs, classes)
    assert m["accuracy"] == pytest.approx(0.75)  # a, (a->b wrong), b, b on the 4 known cells
    # F1(a) = 2*1*0.5/1.5 = 2/3; F1(b) = 2*(2/3)*1/(5/3) = 0.8
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["n_unseen_type"] == 2
    n = evaluate(y, probs, classes, threshold=0.58)
    assert n["y_pred"] == ["a", "b", "b", "Unassigned", "a", "Unassigned"]
    assert n["known_accuracy"] == pytest.approx(0.5)
    assert n["known_unassigned"] == pytest.approx(0.25)
    assert n["novel_unassigned"] == pytest.approx(0.5)
    # confidences known (0.9, 0.7, 0.8, 0.55) vs novel (0.6, 0.52): 7 of 8 pairs ordered
    assert n["auroc_known_vs_novel"] == pytest.approx(7 / 8)


def test_novelty_tally_on_a_hand_made_case() -> None:
    """AUROC, novel recall and known cells rejected at the calibration cells' conformal cut, averaged
    over runs of a held-out type and then over types."""
    calibration = np.arange(1.0, 20.0)  # 19 known cells: at a 5% rate the cut is the largest of them, 19
    query = np.array([0.5, 5.0, 25.0, 30.0, 10.0, 19.5])
    novel = np.array([False, False, True, True, True, False])
    tally = NoveltyTally(reject_rate=0.05)
    split = novel_splits(np.array(["a"] * 10 + ["b"] * 10), ["b"], 2, [0])[0]
    tally.add("score", split, calibration, query, novel)
    other = novel_splits(np.array(["a"] * 10 + ["b"] * 10), ["a"], 2, [0])[0]
    tally.add("score", other, calibration, -query, novel)  # a score that ranks novel cells lowest
    auc, recall, rejected, fpr, ap = tally.runs["score"][split.variant][0]
    assert (auc, recall, rejected) == (pytest.approx(8 / 9), pytest.approx(2 / 3), pytest.approx(1 / 3))
    # 95% of the novel cells (10, 25, 30) lie above 11.5, as does one known cell (19.5); ranked 30, 25, 19.5, 10: AP (1 + 1 + 3/4) / 3
    assert (fpr, ap) == (pytest.approx(1 / 3), pytest.approx(2.75 / 3))
    assert tally.runs["score"][other.variant][0] == (pytest.approx(1 / 9), 0.0, 0.0, 1.0, pytest.approx((1 / 3 + 2 / 5 + 1 / 2) / 3))
    (line,) = tally.lines()
    assert "AUROC 0.5000" in line and "novel recall 0.3333" in line and "known rejected 0.1667" in line and "FPR@95 0.6667" in line


def test_select_genes_keeps_the_most_variable() -> None:
    X = sparse.csr_matrix(np.array([[0, 5, 1], [0, 0, 1], [1, 5, 1]], dtype=np.float32))
    assert select_genes(X, ["g0", "g1", "g2"], 2) == ["g0", "g1"]


def test_baselines_learn_the_toy_types() -> None:
    X, y, genes = toy()
    X = X.log1p()
    for method in (LogisticL1(Cs=(0.1, 1.0)), LogisticL2(), KNNReference(n_pcs=5, k=5), CentroidCorrelation()):
        method.fit(X[::2], y[::2], genes)
        probs = method.predict_proba(X[1::2])
        assert probs.shape == (30, 3) and np.allclose(probs.sum(1), 1)
        assert (np.asarray(method.classes_)[probs.argmax(1)] == y[1::2]).mean() > 0.9, method.name


def test_every_method_gets_the_same_split() -> None:
    X, y, genes = toy()
    X = X.log1p()
    splits = cv_splits(y, 3, [0, 1])
    methods = method_factories(["centroid_corr", "logreg_l2"])
    records = run_benchmark(X, y, genes, splits, methods, progress=False)
    assert len(records) == 12
    by_split: dict[str, set] = {}
    for r in records:
        by_split.setdefault(f"{r['seed']}/{r['fold']}", set()).add((r["split"], tuple(r["test_index"])))
    assert all(len(v) == 1 for v in by_split.values())
    bad = [dict(records[0]), dict(records[1], split="different")]
    bad[1]["fold"], bad[1]["seed"] = bad[0]["fold"], bad[0]["seed"]
    with pytest.raises(ValueError, match="differs between runs"):
        check_same_splits(bad)


def test_celltypist_offline() -> None:
    pytest.importorskip("celltypist")
    from scripts.benchmark.methods import CellTypist

    X, y, genes = toy()
    X = X.log1p().tolil()
    X[:, 23] = 0  # a gene no cell expresses: celltypist drops it from its model
    X = X.tocsr()
    m = CellTypist()
    m.fit(X[::2], y[::2], genes)
    assert len(m.model.features) == len(genes) - 1
    probs = m.predict_proba(X[1::2])
    assert (np.asarray(m.classes_)[probs.argmax(1)] == y[1::2]).mean() > 0.9


@pytest.mark.slow
def test_cli_cross_and_novel_with_tiny_scbert(tmp_path: Path) -> None:
    from scripts.benchmark.cli import main

    data = toy_h5ad(tmp_path / "toy.h5ad")
    out = tmp_path / "cross"
    common = ["--data", str(data), "--label-key", "celltype", "--min-genes", "0", "--n-genes", "20", "--quiet",
              "--epochs", "1", "--batch-size", "8"]
    main([*common, "--protocol", "cross", "--split-key", "batch", "--train-values", "b1", "--test-values", "b2",
          "--methods", "centroid_corr", "scbert_nopretrain", "--seeds", "0", "1", "--out", str(out),
          "--class-weights", "--dropout", "0.1", "--weight-decay", "0.01", "--patience", "0", "--select", "last"])
    res = json.loads((out / "results.json").read_text())
    ft = res["info"]["scbert_finetuning"]
    assert ft["class_weights"] and ft["dropout"] == 0.1 and ft["train"]["weight_decay"] == 0.01 and ft["train"]["select"] == "last"
    assert {r["method"] for r in res["runs"]} == {"centroid_corr", "scbert_nopretrain"}
    assert len({r["split"] for r in res["runs"]}) == 1 and res["info"]["n_genes"] == 20
    assert (out / "results.md").read_text().count("| centroid_corr | 2 |") == 1
    assert len(list(out.glob("confusion_*.png"))) == 2
    assert "alpha" in (out / "per_class_f1.csv").read_text()

    novel = tmp_path / "novel"
    main([*common, "--protocol", "novel", "--hold-out", "gamma", "--folds", "2", "--methods", "logreg_l2", "--out", str(novel)])
    row = json.loads((novel / "results.json").read_text())["summary"][0]
    assert row["known_accuracy"] > 0.9 and 0 <= row["novel_unassigned"] <= 1 and "auroc_known_vs_novel" in row

    merged = tmp_path / "merged"
    main(["--merge", str(out), str(out), "--out", str(merged)])
    assert json.loads((merged / "results.json").read_text())["summary"][0]["n_runs"] == 4


def test_cli_refuses_bad_input_plainly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from scripts.benchmark.cli import main

    data = toy_h5ad(tmp_path / "toy.h5ad")
    with pytest.raises(SystemExit):
        main(["--data", str(data), "--label-key", "cell_type", "--min-genes", "0", "--out", str(tmp_path / "o"), "--quiet"])
    assert "is not a column" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--data", str(data), "--min-genes", "0", "--protocol", "novel", "--hold-out", "delta", "--out", str(tmp_path / "o2"), "--quiet"])
    assert "not in the data" in capsys.readouterr().err


def test_scbert_inner_split_never_puts_a_cell_on_both_sides() -> None:
    """Rare types (2 cells, 1 cell) in a run's training part: validation and training stay disjoint,
    every type is trained on, and a 2-cell type is validated too."""
    from model.train.config import TrainConfig
    from scripts.benchmark.methods import ScBERTMethod

    X, y, genes = toy(n_per=10)
    keep = np.r_[np.flatnonzero(y == "alpha"), np.flatnonzero(y == "beta")[:2], np.flatnonzero(y == "gamma")[:1]]
    m = ScBERTMethod(init="scratch", gene2vec="none", model_args={"dim": 8, "depth": 1, "heads": 2, "dim_head": 4},
                     train=TrainConfig(epochs=1, batch_size=8, progress=False), val_frac=0.3)
    m.fit(X[keep], y[keep], genes)
    tr, va = m.split_
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(keep)
    assert set(y[keep][tr]) == {"alpha", "beta", "gamma"} and "beta" in set(y[keep][va])


def test_macro_f1_over_true_and_over_true_and_predicted_labels() -> None:
    from model.evaluation import classification_metrics

    m = classification_metrics(["a", "a", "b", "b"], ["a", "Unassigned", "b", "c"])
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)  # a and b only
    assert m["macro_f1_union"] == pytest.approx((2 / 3 + 2 / 3 + 0 + 0) / 4)  # Unassigned and c count with F1 0


@pytest.mark.slow
def test_pretraining_per_split_never_sees_the_test_cells(tmp_path: Path) -> None:
    """--pretrain-per-split: each run pretrains its own encoder on the corpus plus its training cells
    (the novel type held out of both), and the report says which cells the encoder saw."""
    from scripts.benchmark.cli import main

    data = toy_h5ad(tmp_path / "toy.h5ad")
    corpus = toy_h5ad(tmp_path / "corpus.h5ad", n_per=4, seed=3)
    out = tmp_path / "novel"
    main(["--data", str(data), "--label-key", "celltype", "--min-genes", "0", "--n-genes", "20", "--quiet", "--epochs", "1",
          "--batch-size", "8", "--protocol", "novel", "--hold-out", "gamma", "--folds", "2", "--methods", "scbert",
          "--pretrain-per-split", "--pretrain-corpus", str(corpus), "--pretrain-epochs", "1", "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    assert res["info"]["encoder"]["includes_test_cells"] is False
    for r in res["runs"]:
        p = r["pretraining"]
        assert p["n_cells_train"] + p["n_cells_val"] == r["n_train"] + 12  # the run's training cells (no gamma) + the corpus
    assert "no test cell was seen" in (out / "results.md").read_text()


def test_encoder_exposure_names_a_checkpoint_pretrained_on_the_evaluation_data(tmp_path: Path) -> None:
    from model.checkpoint import Checkpoint
    from model.nn.config import ScBERTConfig
    from scripts.benchmark.harness import encoder_exposure

    cfg = ScBERTConfig(n_genes=3, dim=8, depth=1, heads=2, dim_head=4)
    seen = Checkpoint(cfg, ["a", "b", "c"], {}, training={"data": ["runs/x/prep_1_pbmc3k_labeled.h5ad", "immune.h5ad"]}, source="pre.pt")
    assert encoder_exposure(seen, ["data/pbmc3k_labeled.h5ad"], False)["includes_test_cells"] is True
    assert encoder_exposure(seen, ["data/pancreas.h5ad"], False)["includes_test_cells"] is False
    assert encoder_exposure(Checkpoint(cfg, ["a", "b", "c"], {}, source="old.pt"), ["d.h5ad"], False)["includes_test_cells"] is None


@pytest.mark.slow
def test_leave_one_type_out_with_calibrated_novelty_scores(tmp_path: Path) -> None:
    """Without --hold-out the novel protocol holds out each type with >= 20 cells in turn; every
    method gets one row per novelty score (thresholds calibrated on the same calibration cells) and
    a row for the published rule; results.md adds the mean over the held-out types."""
    from scripts.benchmark.cli import main

    data = toy_h5ad(tmp_path / "toy.h5ad", n_per=30)
    out = tmp_path / "loto"
    main(["--data", str(data), "--label-key", "celltype", "--min-genes", "0", "--n-genes", "20", "--quiet", "--protocol", "novel",
          "--folds", "2", "--methods", "logreg_l2", "centroid_corr", "scbert_nopretrain", "--epochs", "1", "--batch-size", "8", "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    assert {r["variant"] for r in res["runs"]} == {"novel=alpha", "novel=beta", "novel=gamma"}
    methods = {r["method"] for r in res["runs"]}
    assert {"logreg_l2 [softmax]", "logreg_l2 [energy]", "logreg_l2 [mahalanobis]", "logreg_l2 [knn]", "centroid_corr [softmax]",
            "scbert_nopretrain [knn]", "scbert_nopretrain [mahalanobis]", "scbert_nopretrain [pca_mahalanobis]",
            "scbert_nopretrain [pca_knn]", "logreg_l2 [combined]", "scbert_nopretrain [combined]"} <= methods
    assert "centroid_corr [combined]" not in methods  # it has only the softmax score
    assert any(m.startswith("logreg_l2 [published") for m in methods)
    splits = {(r["variant"], r["fold"]): r["n_train"] for r in res["runs"]}
    assert all(r["n_train"] == splits[(r["variant"], r["fold"])] for r in res["runs"]), "every method fits the same cells"
    for r in res["runs"]:
        assert 0 <= r["auroc_known_vs_novel"] <= 1 and 0 <= r["fpr_at_95_tpr"] <= 1
    maha = [r for r in res["runs"] if r["method"] == "logreg_l2 [mahalanobis]"]
    assert np.mean([r["auroc_known_vs_novel"] for r in maha]) > 0.9  # three well-separated types
    assert "mean over the 3 held-out types" in (out / "results.md").read_text()
    # the best score per method, by mean AUROC over the held-out types (how the default is chosen)
    best = res["best_novelty_score"]
    assert set(best) == {"logreg_l2", "centroid_corr", "scbert_nopretrain"}
    assert "Best novelty score per method" in (out / "results.md").read_text()
    scbert_rows = {}
    for r in res["runs"]:
        if r["method"].startswith("scbert_nopretrain [") and "published" not in r["method"]:
            scbert_rows.setdefault(r["method"], {}).setdefault(r["variant"], []).append(r["auroc_known_vs_novel"])
    mean_auc = {m: np.mean([np.mean(v) for v in per.values()]) for m, per in scbert_rows.items()}
    assert f"scbert_nopretrain [{best['scbert_nopretrain']['score']}]" == max(mean_auc, key=mean_auc.get)
    assert best["scbert_nopretrain"]["auroc"] == pytest.approx(max(mean_auc.values()))


def test_majority_voting_rows(tmp_path: Path) -> None:
    from scripts.benchmark.cli import main

    data = toy_h5ad(tmp_path / "toy.h5ad", n_per=30)
    out = tmp_path / "mv"
    main(["--data", str(data), "--label-key", "celltype", "--min-genes", "0", "--n-genes", "20", "--quiet", "--folds", "2",
          "--methods", "logreg_l2", "centroid_corr", "--majority-voting", "--out", str(out)])
    runs = json.loads((out / "results.json").read_text())["runs"]
    methods = {r["method"] for r in runs}
    assert methods == {f"{m}{v}" for m in ("logreg_l2", "centroid_corr") for v in ("", " [majority voting]", " [soft voting]", " [cautious voting]")}
    # three well-separated types: voting within expression over-clusters keeps the right labels
    for r in runs:
        assert r["accuracy"] > 0.9, r["method"]


def test_label_map_leaves_out_cells_mapped_to_dash(tmp_path: Path) -> None:
    from scripts.benchmark.cli import main

    data = toy_h5ad(tmp_path / "toy.h5ad", n_per=30)
    labels = sorted(set(ad.read_h5ad(data).obs["celltype"]))
    (tmp_path / "map.tsv").write_text(f"# comment\n{labels[0]}\t-\n{labels[1]}\tmerged\n{labels[2]}\tmerged\n")
    out = tmp_path / "mapped"
    main(["--data", str(data), "--label-key", "celltype", "--min-genes", "0", "--n-genes", "20", "--quiet", "--folds", "2",
          "--methods", "centroid_corr", "--label-map", str(tmp_path / "map.tsv"), "--out", str(out)])
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sum(r["n_test"] for r in runs) == 60  # the 30 cells mapped to '-' are in neither part


def test_paired_against_reference() -> None:
    """Differences on shared splits only; counts of higher / lower splits; a method without the
    reference's splits is left out."""
    def rec(method: str, fold: int, acc: float, f1: float, seed: int = 0) -> dict:
        return {"variant": "all", "method": method, "seed": seed, "fold": fold, "accuracy": acc, "macro_f1": f1}

    records = [rec("scbert", 0, 0.90, 0.80), rec("scbert", 1, 0.80, 0.70), rec("scbert", 2, 0.85, 0.75),
               rec("knn", 0, 0.85, 0.82), rec("knn", 1, 0.82, 0.71), rec("knn", 2, 0.85, 0.70),
               rec("knn", 3, 0.10, 0.10),  # no scbert run on fold 3: not paired
               rec("other", 0, 0.5, 0.5, seed=9)]
    paired = paired_against(records)
    assert [r["method"] for r in paired] == ["knn"]
    (r,) = paired
    d = np.array([0.05, -0.02, 0.0])
    assert r["n_splits"] == 3 and r["higher"] == 1 and r["lower"] == 1
    assert r["accuracy_diff"] == pytest.approx(d.mean()) and r["accuracy_diff_sd"] == pytest.approx(d.std(ddof=1))
    assert r["macro_f1_diff"] == pytest.approx(np.mean([-0.02, -0.01, 0.05]))
    assert "| knn | 3 | +0.0100" in paired_table(paired)
    assert paired_against([rec("knn", 0, 0.8, 0.8)]) == []
