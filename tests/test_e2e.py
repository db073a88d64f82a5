"""All four stages on bundled data with a tiny model: preprocess -> pretrain -> finetune -> predict."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import finetune
import predict
import pretrain
from model.checkpoint import load_checkpoint

from .conftest import FAST, TINY_MODEL, linked_run


@pytest.fixture(scope="module")
def runs(tiny_run: dict[str, Path], pbmc_small: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = linked_run(tiny_run, tmp_path_factory.mktemp("e2e"))
    predict.main(["--data", str(pbmc_small), "--model", str(d / "ft" / "model.pt"), "--out", str(d / "pred.h5ad"),
                  "--csv", str(d / "pred.csv"), "--label-key", "celltype", "--threshold", "0.5", "--novelty", "softmax", "--quiet"])
    return {"dir": d, "prep": d / "prep.h5ad", "raw": pbmc_small}


def test_preprocess_output(runs: dict[str, Path]) -> None:
    prep = ad.read_h5ad(runs["prep"])
    assert prep.n_vars == 300 and prep.n_obs == 240
    assert prep.X.max() < 16 and "scbert_preprocess" in prep.uns


def test_pretrain_outputs(runs: dict[str, Path]) -> None:
    out = runs["dir"] / "pre"
    m = json.loads((out / "metrics.json").read_text())
    for key in ("val_masked_accuracy", "baseline_accuracy", "beats_baseline", "history", "gene2vec"):
        assert key in m
    assert 0 <= m["val_masked_accuracy"] <= 1 and len(m["history"]) == 2
    ck = load_checkpoint(out / "model.pt")
    assert ck.config.head == "mlm" and ck.config.dim == 16 and ck.genes == list(ad.read_h5ad(runs["prep"]).var_names)
    assert ck.config.gene_embedding == "gene2vec"
    for name in ("config.json", "log.txt", "summary.txt", "training_curves.png"):
        assert (out / name).is_file(), name


def test_finetune_outputs(runs: dict[str, Path]) -> None:
    out = runs["dir"] / "ft"
    m = json.loads((out / "metrics.json").read_text())
    assert {"accuracy", "macro_f1", "per_class", "classes"} <= set(m)
    assert m["classes"] == ["B", "CD14+ Mono", "NK", "Naive CD4 T"]
    assert m["n_val"] == 48
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    ck = load_checkpoint(out / "model.pt")
    assert ck.classes == m["classes"] and ck.config.head == "classifier"
    pre = load_checkpoint(runs["dir"] / "pre" / "model.pt")
    np.testing.assert_array_equal(ck.state_dict["pos_emb.emb.weight"].numpy(), pre.state_dict["pos_emb.emb.weight"].numpy())


def test_predict_outputs(runs: dict[str, Path]) -> None:
    """The published rule, one flag away: Unassigned exactly when the top probability is below 0.5."""
    raw = ad.read_h5ad(runs["raw"])
    pred = ad.read_h5ad(runs["dir"] / "pred.h5ad")
    assert list(pred.obs_names) == list(raw.obs_names), "every cell kept, in order"
    assert pred.obsm["scbert_probabilities"].shape == (240, 4)
    np.testing.assert_allclose(pred.obsm["scbert_probabilities"].sum(1), 1, atol=1e-5)
    assert pred.obsm["X_scbert"].shape == (240, 128)  # the head's penultimate features (--embedding head, the default)
    conf = pred.obs["scbert_confidence"].to_numpy()
    labels = pred.obs["scbert_celltype"].to_numpy()
    assert np.all((labels == "Unassigned") == (conf < 0.5))
    assert set(labels) <= {"B", "CD14+ Mono", "NK", "Naive CD4 T", "Unassigned"}
    table = pd.read_csv(runs["dir"] / "pred.csv", index_col=0)
    assert list(table.columns[:3]) == ["celltype", "scbert_celltype", "scbert_confidence"] and len(table) == 240  # the known label first


def test_predicting_prepared_or_raw_input_gives_the_same_answer(runs: dict[str, Path]) -> None:
    out = runs["dir"] / "pred_from_prep.h5ad"
    predict.main(["--data", str(runs["prep"]), "--model", str(runs["dir"] / "ft" / "model.pt"), "--out", str(out), "--quiet",
                  "--threshold", "0.5", "--novelty", "softmax"])  # the same rule: under bf16 it decides which cells the fp32 re-check re-scores
    a, b = ad.read_h5ad(out), ad.read_h5ad(runs["dir"] / "pred.h5ad")
    np.testing.assert_allclose(a.obsm["scbert_probabilities"], b.obsm["scbert_probabilities"], atol=1e-5)


def test_outputs_are_not_overwritten_without_permission(runs: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        predict.main(["--data", str(runs["raw"]), "--model", str(runs["dir"] / "ft" / "model.pt"), "--out", str(runs["dir"] / "pred.h5ad"), "--quiet"])
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain.main(["--data", str(runs["prep"]), "--out", str(runs["dir"] / "pre"), *TINY_MODEL, "--quiet"])


def test_missing_label_column_lists_the_available_ones(runs: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        finetune.main(["--data", str(runs["prep"]), "--label-key", "cell_type", "--out", str(runs["dir"] / "bad"), *TINY_MODEL, "--quiet"])
    err = capsys.readouterr().err
    assert "'cell_type' is not a column" in err and "celltype" in err


def test_cross_validation_from_scratch_without_gene2vec(runs: dict[str, Path]) -> None:
    out = runs["dir"] / "cv"
    finetune.main(["--data", str(runs["prep"]), "--label-key", "celltype", "--out", str(out), "--cv", "2", "--epochs", "1",
                   "--gene2vec", "none", "--class-weights", *TINY_MODEL, *FAST])
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["folds"]) == 2 and "accuracy_sd" in m and "macro_f1_sd" in m
    assert sum(f["n_test"] for f in m["folds"]) == 240, "every cell tested exactly once"
    assert all(f["n_train"] + f["n_val"] + f["n_test"] == 240 and f["n_val"] > 0 for f in m["folds"]), "inner validation inside each training part"
    assert "test cells" in m["what"]["accuracy"] and m["model_fold"] in (1, 2)
    assert (out / "fold1" / "model.pt").is_file() and (out / "fold2" / "confusion_matrix.png").is_file()
    assert load_checkpoint(out / "model.pt").config.gene_embedding == "none"


def test_head_only_fine_tuning_keeps_the_encoder_and_the_last_epoch(runs: dict[str, Path]) -> None:
    """--head-only trains the classifier alone (the encoder stays the pretrained one), --select last
    --patience 0 keeps the last of a fixed number of epochs, --weight-decay uses AdamW."""
    out = runs["dir"] / "ft_head"
    finetune.main(["--data", str(runs["prep"]), "--label-key", "celltype", "--pretrained", str(runs["dir"] / "pre" / "model.pt"),
                   "--out", str(out), "--epochs", "3", "--head-only", "--select", "last", "--patience", "0",
                   "--weight-decay", "0.01", "--dropout", "0.2", *FAST])
    pre, ft = load_checkpoint(runs["dir"] / "pre" / "model.pt"), load_checkpoint(out / "model.pt")
    for k, v in pre.state_dict.items():
        if not k.startswith("to_out."):
            assert np.array_equal(v.numpy(), ft.state_dict[k].numpy()), k
    m = json.loads((out / "metrics.json").read_text())
    assert m["best_epoch"] == 3 and len(m["history"]) == 3
    assert "read-out of expression" in (out / "log.txt").read_text()


def test_head_only_needs_a_pretrained_encoder(runs: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        finetune.main(["--data", str(runs["prep"]), "--label-key", "celltype", "--out", str(runs["dir"] / "bad_head"),
                       "--head-only", *TINY_MODEL, "--quiet"])
    assert e.value.code == 2 and "--head-only needs a pretrained encoder" in capsys.readouterr().err


def test_the_default_ensemble_and_its_first_head(runs: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    """The default model has 5 heads whose first is the one-head run (--ensemble 1: same first head,
    validation metrics and novelty thresholds); an ensemble needs the frozen encoder."""
    m = json.loads((runs["dir"] / "ft" / "metrics.json").read_text())
    assert m["heads"] == 5 and len(m["head_epochs"]) == 5 and m["head_epochs"][0] == m["best_epoch"]
    ens = load_checkpoint(runs["dir"] / "ft" / "model.pt")
    assert ens.config.classifier_members == 5
    one = runs["dir"] / "ft_one"
    finetune.main(["--data", str(runs["prep"]), "--label-key", "celltype", "--pretrained", str(runs["dir"] / "pre" / "model.pt"),
                   "--out", str(one), "--epochs", "3", "--reject-rate", "0.1", "--ensemble", "1", *FAST])
    single = load_checkpoint(one / "model.pt")
    assert single.config.classifier_members == 1
    for k, v in single.state_dict.items():
        key = k.replace("to_out.", "to_out.members.0.") if k.startswith("to_out.") else k
        np.testing.assert_allclose(ens.state_dict[key].numpy(), v.numpy(), rtol=1e-4, atol=1e-5, err_msg=k)
    m1 = json.loads((one / "metrics.json").read_text())
    assert m1["accuracy"] == m["accuracy"] and m1["best_epoch"] == m["best_epoch"]
    th, th1 = m["novelty"]["thresholds"], m1["novelty"]["thresholds"]
    for score in th1:
        assert th[score] == pytest.approx(th1[score], rel=1e-4, abs=1e-6), score
    with pytest.raises(SystemExit) as e:
        finetune.main(["--data", str(runs["prep"]), "--label-key", "celltype", "--pretrained", str(runs["dir"] / "pre" / "model.pt"),
                       "--out", str(runs["dir"] / "bad_ens"), "--ensemble", "3", "--head-only", "false", "--quiet"])
    assert e.value.code == 2 and "needs --head-only" in capsys.readouterr().err


def test_gene2vec_from_scratch_sees_only_the_training_cells(runs: dict[str, Path]) -> None:
    """Fine-tuning from scratch computes gene2vec from the cells it fits, not the validation cells."""
    out = runs["dir"] / "g2v_train_only"
    finetune.main(["--data", str(runs["prep"]), "--label-key", "celltype", "--out", str(out), "--epochs", "1", *TINY_MODEL, *FAST])
    m = json.loads((out / "metrics.json").read_text())
    assert m["gene2vec"]["extra"]["n_cells_used"] == m["n_train"] == 240 - m["n_val"]
    assert "also chose the best epoch" in m["what"]["accuracy"]
