"""The Python API: AnnData in, AnnData out, the same keys and values as predict.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pytest
from scipy import sparse

import predict
from model import annotate, embed, load_model, preprocess
from model.api import CheckpointError, InputError

from .conftest import PBMC, REPO

TYPES = ["B", "CD14+ Mono", "NK"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, random_checkpoints: Any) -> dict[str, object]:
    """16 raw PBMCs x their 200 most expressed genes, and tiny classifier / pretrained checkpoints on those genes."""
    d = tmp_path_factory.mktemp("api")
    full = ad.read_h5ad(PBMC)
    rows = np.sort(np.concatenate([np.flatnonzero(full.obs["celltype"] == t)[:5] for t in TYPES] + [np.array([0])]))
    cells = full[rows]
    top = np.sort(np.argsort(-np.asarray(cells.X.sum(0)).ravel())[:200])
    query = cells[:, top].copy()
    query.obs = query.obs[["celltype"]].astype(str)
    query.X = sparse.csr_matrix(query.X, dtype=np.float32)
    query.write_h5ad(d / "query.h5ad")
    genes = list(query.var_names)
    for name, path in random_checkpoints(genes, TYPES).items():
        (d / f"{name}.pt").symlink_to(path)
    return {"dir": d, "query": query, "genes": genes}


def test_annotate_writes_what_predict_writes(setup: dict, tmp_path: Path) -> None:
    d = setup["dir"]
    predict.main(["--data", str(d / "query.h5ad"), "--model", str(d / "clf.pt"), "--out", str(tmp_path / "p.h5ad"), "--quiet"])
    cli = ad.read_h5ad(tmp_path / "p.h5ad")
    adata = ad.read_h5ad(d / "query.h5ad")
    returned = annotate(adata, model=str(d / "clf.pt"), progress=False, device="cpu")
    assert returned is adata, "in place by default"
    for key in ("scbert_celltype", "scbert_confidence"):
        assert key in adata.obs
        np.testing.assert_array_equal(adata.obs[key].to_numpy(), cli.obs[key].to_numpy())
    for key in ("scbert_probabilities", "X_scbert"):
        np.testing.assert_allclose(adata.obsm[key], cli.obsm[key], atol=1e-6)
    assert set(cli.uns) - {"description"} <= set(adata.uns)
    assert list(adata.uns["scbert_classes"]) == TYPES and adata.uns["scbert_threshold"] == 0.5
    adata.write_h5ad(tmp_path / "api.h5ad")  # the result can be saved


def test_copy_leaves_the_input_alone(setup: dict) -> None:
    adata = setup["query"].copy()
    out = annotate(adata, setup["dir"] / "clf.pt", copy=True, progress=False, threshold=0.9)
    assert out is not adata and "scbert_celltype" not in adata.obs and "X_scbert" not in adata.obsm
    assert (out.obs["scbert_celltype"] == "Unassigned").sum() == (out.obs["scbert_confidence"] < 0.9).sum()


def test_embed_works_with_pretrained_and_finetuned_models(setup: dict) -> None:
    d = setup["dir"]
    adata = setup["query"].copy()
    embed(adata, d / "mlm.pt", progress=False)
    assert adata.obsm["X_scbert"].shape == (adata.n_obs, 8) and np.all(np.isfinite(adata.obsm["X_scbert"]))
    embed(adata, d / "clf.pt", key_added="X_clf", progress=False, precision="fp32")  # one precision for both (auto: bf16 on some CPUs)
    ann = annotate(adata.copy(), d / "clf.pt", progress=False, precision="fp32")
    np.testing.assert_allclose(adata.obsm["X_clf"], ann.obsm["X_scbert"], atol=1e-5)
    assert adata.obsm["X_clf"].shape == (adata.n_obs, 128)  # a fine-tuned model: the head's penultimate features by default
    assert ann.uns["scbert_annotation"]["embedding"] == "head" and "penultimate" in ann.uns["scbert_annotation"]["embedding_meaning"]
    rec = annotate(adata.copy(), d / "clf.pt", progress=False, pooling="expressed", embedding="X_expr").uns["scbert_annotation"]
    assert (rec["embedding"], rec["embedding_key"]) == ("expressed", "X_expr")
    assert "not written" in annotate(adata.copy(), d / "clf.pt", progress=False, embedding=False).uns["scbert_annotation"]["embedding_key"]
    embed(adata, d / "clf.pt", key_added="X_mean", pooling="mean", progress=False, precision="fp32")
    embed(adata, d / "clf.pt", key_added="X_expr", pooling="expressed", progress=False, precision="fp32")
    assert adata.obsm["X_mean"].shape == (adata.n_obs, 8) and not np.allclose(adata.obsm["X_expr"], adata.obsm["X_mean"])
    with pytest.raises(InputError, match="needs a fine-tuned model"):
        embed(adata, d / "mlm.pt", pooling="head", progress=False)


def test_preprocess_and_load_model(setup: dict) -> None:
    ckpt = load_model(setup["dir"] / "clf.pt")
    assert ckpt.classes == TYPES
    prep = preprocess(setup["query"], vocab=ckpt, min_genes=None)
    assert list(prep.var_names) == setup["genes"] and "scbert_preprocess" in prep.uns
    assert prep.X.max() < np.log2(1 + 1e4) + 1e-3
    assert annotate(prep, ckpt, copy=True, progress=False).n_obs == setup["query"].n_obs


def test_mouse_symbols_through_the_api(setup: dict) -> None:
    mouse = setup["query"].copy()
    mouse.var_names = [g.capitalize() for g in mouse.var_names]
    a = annotate(mouse, setup["dir"] / "clf.pt", copy=True, progress=False)
    b = annotate(setup["query"], setup["dir"] / "clf.pt", copy=True, progress=False)
    np.testing.assert_allclose(a.obsm["scbert_probabilities"], b.obsm["scbert_probabilities"], atol=1e-5)
    try:  # species="human" refuses the mapping: no gene left (an error) or very few (a warning, other results)
        c = annotate(mouse, setup["dir"] / "clf.pt", copy=True, progress=False, species="human")
    except InputError as e:
        assert "none of the 200 vocabulary genes" in str(e)
    else:
        assert not np.allclose(c.obsm["scbert_probabilities"], b.obsm["scbert_probabilities"], atol=1e-5)


def test_api_errors_are_clean(setup: dict, tmp_path: Path) -> None:
    d = setup["dir"]
    with pytest.raises(InputError, match="expected an AnnData"):
        annotate(np.zeros((3, 3)), d / "clf.pt")
    with pytest.raises(InputError, match="threshold"):
        annotate(setup["query"], d / "clf.pt", threshold=1.5)
    with pytest.raises(InputError, match="pretrained"):
        annotate(setup["query"], d / "mlm.pt", copy=True, progress=False)
    with pytest.raises(InputError, match="pooling"):
        embed(setup["query"], d / "mlm.pt", pooling="max")
    with pytest.raises(CheckpointError, match="does not exist"):
        annotate(setup["query"], tmp_path / "none.pt")
    bad = setup["query"].copy()
    bad.X = bad.X.copy()
    bad.X.data[0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        annotate(bad, d / "clf.pt", progress=False)
    assert "scbert_celltype" not in bad.obs, "a failed call leaves the AnnData unchanged"


def test_importing_the_package_stays_light() -> None:
    code = "import sys, model; assert 'torch' not in sys.modules; from model import annotate; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
