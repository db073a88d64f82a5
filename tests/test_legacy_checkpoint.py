"""Checkpoints written before the package was restructured load and predict as they did then
(fixtures made by the code of commit 5c26539; see tests/fixtures/legacy_v1/README.md)."""

from __future__ import annotations

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
                  "--threshold", "0.35", "--quiet"])
    got = ad.read_h5ad(out)
    assert got.uns["scbert_classes"].tolist() == expected["classes"].tolist()
    assert got.obs["scbert_celltype"].tolist() == expected["celltype"].tolist()
    np.testing.assert_allclose(got.obsm["scbert_probabilities"], expected["probabilities"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.obs["scbert_confidence"].to_numpy(), expected["confidence"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.obsm["X_scbert"], expected["embedding"], rtol=1e-4, atol=1e-5)


def test_old_pretrained_model_embeds_as_before(expected: dict[str, np.ndarray]) -> None:
    adata = embed(ad.read_h5ad(FIX / "query.h5ad"), model=FIX / "pretrained.pt", progress=False, device="cpu")
    np.testing.assert_allclose(adata.obsm["X_scbert"], expected["pretrained_embedding"], rtol=1e-4, atol=1e-5)
