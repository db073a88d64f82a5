"""Shared fixtures: small real data cut from the bundled PBMC3k file, and tiny model sizes."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PBMC = REPO / "data" / "pbmc3k_labeled.h5ad"
TINY_MODEL = ["--dim", "16", "--depth", "2", "--heads", "2", "--dim-head", "8"]


@pytest.fixture(scope="session")
def pbmc_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 raw-count PBMCs of 4 cell types (60 each) with all 32,738 genes, as an .h5ad."""
    adata = ad.read_h5ad(PBMC)
    rng = np.random.default_rng(0)
    keep = []
    for ct in ["B", "CD14+ Mono", "NK", "Naive CD4 T"]:
        idx = np.flatnonzero(adata.obs["celltype"].to_numpy() == ct)
        keep.extend(rng.choice(idx, 60, replace=False))
    small = adata[np.sort(keep)].copy()
    path = tmp_path_factory.mktemp("data") / "pbmc_small.h5ad"
    small.write_h5ad(path)
    return path
