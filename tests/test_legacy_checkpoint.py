"""Checkpoints written before the package was restructured load and predict as they did then
(fixtures made by the code of commit 5c26539; see tests/fixtures/legacy_v1/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

import predict
from model import embed
from model.checkpoint import load_checkpoint

FIX = Path(__file__).parent / "fixtures" / "legacy_v1"


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    return dict(np.load(FIX / "expected.npz"))


def test_old_checkpoints_load_with_their_record() -> None:
    ckpt = load_checkpoint(FIX / "classifier.pt")
    raw = torch.load(FIX / "classifier.pt", weights_only=True)
    assert "training" not in raw and raw["format_version"] == 1
    assert ckpt.training == raw["train_args"], "the old flags are kept as the checkpoint's training record"
    assert ckpt.classes == ["B", "CD14+ Mono", "CD8 T", "NK"] and ckpt.config.dim == 16 and len(ckpt.genes) == 100
    assert load_checkpoint(FIX / "pretrained.pt").config.head == "mlm"


def test_old_classifier_predicts_as_before(expected: dict[str, np.ndarray], tmp_path: Path) -> None:
    out = tmp_path / "annotated.h5ad"
    predict.main(["--data", str(FIX / "query.h5ad"), "--model", str(FIX / "classifier.pt"), "--out", str(out),
                  "--threshold", "0.35", "--quiet", "--precision", "fp32",  # fp32 as then (auto: bf16 on some CPUs)
                  "--embedding", "mean"])  # the embedding of then (the default is now the head's features)
    got = ad.read_h5ad(out)
    assert got.uns["scbert_classes"].tolist() == expected["classes"].tolist()
    assert got.obs["scbert_celltype"].tolist() == expected["celltype"].tolist()
    np.testing.assert_allclose(got.obsm["scbert_probabilities"], expected["probabilities"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.obs["scbert_confidence"].to_numpy(), expected["confidence"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.obsm["X_scbert"], expected["embedding"], rtol=1e-4, atol=1e-5)


def test_old_pretrained_model_embeds_as_before(expected: dict[str, np.ndarray]) -> None:
    adata = embed(ad.read_h5ad(FIX / "query.h5ad"), model=FIX / "pretrained.pt", progress=False, device="cpu", precision="fp32")
    np.testing.assert_allclose(adata.obsm["X_scbert"], expected["pretrained_embedding"], rtol=1e-4, atol=1e-5)


V1 = Path(__file__).parent / "fixtures" / "v1_novelty"
V1_RULES = {"auto": {}, "pca_mahalanobis": {"novelty": "pca_mahalanobis"}, "softmax": {"novelty": "softmax", "threshold": 0.5},
            "energy": {"novelty": "energy"}, "combined": {"novelty": "combined"}, "query_density": {"novelty": "query_density"},
            "mahalanobis": {"novelty": "mahalanobis"}, "knn": {"novelty": "knn"}, "bf16": {"precision": "bf16"}}


@pytest.mark.parametrize("rule", sorted(V1_RULES))
def test_format_1_checkpoint_with_novelty_record_predicts_as_before(rule: str) -> None:
    """A format-1 checkpoint with every part of the novelty record of its time (written by commit
    5e056b4) is upgraded on load and gives the labels, scores and thresholds it gave then."""
    from model import annotate

    exp = dict(np.load(V1 / "expected.npz"))
    got = annotate(ad.read_h5ad(V1 / "query.h5ad"), V1 / "classifier.pt", progress=False, device="cpu", pooling="mean",
                   **{"precision": "fp32", **V1_RULES[rule]})  # fp32 and the mean embedding, as then
    assert got.obs["scbert_celltype"].astype(str).tolist() == exp[f"{rule}_celltype"].tolist()
    np.testing.assert_allclose(got.obs["scbert_novelty"].to_numpy(), exp[f"{rule}_novelty"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.uns["scbert_threshold"], exp[f"{rule}_threshold"], rtol=1e-9)
    assert got.uns["scbert_novelty"] == json.loads(str(exp[f"{rule}_rule"]))  # a dict now, JSON text then
    if rule == "auto":
        np.testing.assert_allclose(got.obsm["scbert_probabilities"], exp["probabilities"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got.obsm["X_scbert"], exp["embedding"], rtol=1e-5, atol=1e-6)


def test_format_1_checkpoint_card_and_pretrained_embedding() -> None:
    from model.checkpoint.card import card_text, checkpoint_card
    from model.novelty import SCORE_MEANINGS

    exp = dict(np.load(V1 / "expected.npz"))
    card = card_text(checkpoint_card(load_checkpoint(V1 / "classifier.pt"))).replace(str(V1 / "classifier.pt"), "/tmp/fx/ft/model.pt")
    meaning = "novelty score query_combined: " + SCORE_MEANINGS["query_combined"]
    assert meaning in card.splitlines()
    # lines the card gained after the fixture was written: what its default score measures, what its kNN reference holds
    knn = "novelty kNN reference: the mean-pooled final encodings (a model fine-tuned before the classifier's features were used) of the training cells"
    assert knn in card.splitlines()
    assert "\n".join(line for line in card.splitlines() if line not in (meaning, knn)) == str(exp["card"])
    adata = embed(ad.read_h5ad(V1 / "query.h5ad"), model=V1 / "pretrained.pt", progress=False, device="cpu", precision="fp32")
    np.testing.assert_allclose(adata.obsm["X_scbert"], exp["pretrained_embedding"], rtol=1e-5, atol=1e-6)


def test_upgraded_checkpoint_saves_in_the_current_format(tmp_path: Path) -> None:
    """Loading upgrades a format-1 file; saving writes the current format, which loads to the same record."""
    from model.checkpoint.format import FORMAT_VERSION, save_checkpoint

    ckpt = load_checkpoint(V1 / "classifier.pt")
    save_checkpoint(tmp_path / "model.pt", ckpt.build_model(), ckpt.genes, ckpt.classes, ckpt.preprocessing, ckpt.training, ckpt.metrics,
                    novelty=ckpt.novelty)
    raw = torch.load(tmp_path / "model.pt", weights_only=True)
    assert raw["format_version"] == FORMAT_VERSION == 2 and "stats" not in raw["novelty"]
    again = load_checkpoint(tmp_path / "model.pt")
    assert again.novelty.calibration.thresholds == ckpt.novelty.calibration.thresholds
    np.testing.assert_array_equal(again.novelty.density.references[0], ckpt.novelty.density.references[0])
    assert again.novelty.precision_error == ckpt.novelty.precision_error and again.novelty.default == "query_combined"
