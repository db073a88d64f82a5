"""Property tests: random matrices, gene lists and labels give a clean result or a clean InputError,
never another exception and never invalid output."""

from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scipy import sparse

from data.io import InputError, read_cells
from data.labels import check_labels
from data.preprocess import prepare
from model.annotation import annotate
from model.checkpoint import CheckpointError, load_checkpoint
from model.inference import InferenceOptions
from model.novelty import NoveltySettings

pytestmark = pytest.mark.filterwarnings("ignore:(Observation|Variable) names are not unique:UserWarning")

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

# Real current symbols, an alias (SEPT1), Ensembl ids, mouse-style names, junk and a duplicate.
HUMAN = ["CD3E", "MS4A1", "LYZ", "NKG7", "GNLY", "CD14", "PPBP", "CD79A", "FCGR3A", "S100A8", "GAPDH", "ACTB"]
NAMES = [*HUMAN, "SEPT1", "ENSG00000010610", "ENSG00000105374.9", "Cd3e", "Gapdh", "Actb", "XYZ_1", "", "12345", "CD3E"]
VOCAB = HUMAN[:8]
MAX_LOG2 = math.log2(1 + 1e4) + 1e-3


@st.composite
def matrices(draw: st.DrawFn, max_cells: int = 10, max_genes: int = 12) -> ad.AnnData:
    """A cells x genes AnnData with random sparsity, scale and (sometimes) invalid values or names."""
    n_cells = draw(st.sampled_from(range(max_cells + 1)))  # uniform: empty inputs are one case among many
    n_genes = draw(st.sampled_from(range(max_genes + 1)))
    kind = draw(st.sampled_from(["counts", "counts", "float", "log", "bad"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    density = draw(st.floats(0.0, 1.0))
    X = rng.poisson(draw(st.floats(0.1, 50.0)), size=(n_cells, n_genes)).astype(np.float64)
    X *= rng.random((n_cells, n_genes)) < density
    if kind == "float":
        X = X * draw(st.floats(1e-3, 1e3))
    elif kind == "log":
        X = np.log1p(X)
    elif kind == "bad" and X.size:
        X.flat[rng.integers(X.size)] = draw(st.sampled_from([np.nan, np.inf, -1.0, -1e-3]))
    names = draw(st.lists(st.sampled_from(NAMES), min_size=n_genes, max_size=n_genes))
    a = ad.AnnData(X=sparse.csr_matrix(X.astype(np.float32)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.var_names = names
        a.obs_names = [f"c{i % max(1, n_cells - 1)}" for i in range(n_cells)]  # sometimes duplicated
    return a


def _valid_prepared(out: ad.AnnData, warned: bool) -> None:
    X = out.X
    assert sparse.issparse(X) and X.dtype == np.float32
    assert np.all(np.isfinite(X.data)) and (X.data.size == 0 or X.data.min() >= 0)
    if X.data.size and X.data.max() > MAX_LOG2:
        assert warned, "values that cannot be log2 at 1e4 per cell are used only with a warning"
    assert out.var_names.is_unique


@SETTINGS
@given(a=matrices(), use_vocab=st.booleans(), min_genes=st.sampled_from([None, 1, 3]), top=st.sampled_from([None, 2, 5]),
       species=st.sampled_from(["auto", "human", "mouse"]))
def test_prepare_gives_valid_output_or_a_clean_error(a: ad.AnnData, use_vocab: bool, min_genes: int | None, top: int | None, species: str) -> None:
    try:
        out, rep = prepare(a, genes=VOCAB if use_vocab else None, n_top_genes=top, min_genes=min_genes, species=species)
    except InputError as e:
        assert str(e)
        event(f"clean error: {str(e)[:40]}")
        return
    event("result")
    _valid_prepared(out, bool(rep.warnings))
    assert out.n_obs <= a.n_obs and rep.n_cells_out == out.n_obs
    if use_vocab:
        assert list(out.var_names) == VOCAB
    if min_genes is None:
        assert list(out.obs_names) == list(a.obs_names), "prediction keeps every cell, in order"


@pytest.fixture(scope="module")
def tiny_classifier(random_checkpoints: Any) -> object:
    return load_checkpoint(random_checkpoints(list(VOCAB), ["a", "b", "c"])["clf"])


@SETTINGS
@given(a=matrices(max_cells=6), threshold=st.floats(0.0, 1.0), truth=st.lists(st.sampled_from(["a", "b", "z", None]), min_size=6, max_size=6))
def test_annotate_gives_valid_output_or_a_clean_error(tiny_classifier: object, a: ad.AnnData, threshold: float, truth: list) -> None:
    a.obs["truth"] = truth[: a.n_obs]
    try:
        result = annotate(a, tiny_classifier, NoveltySettings(threshold=threshold), InferenceOptions(4, progress=False))
        out = result.to_adata(a.copy())
    except InputError as e:
        assert str(e)
        event(f"clean error: {str(e)[:40]}")
        return
    event("result")
    assert out.n_obs == a.n_obs and list(out.obs_names) == list(a.obs_names)
    p = out.obsm["scbert_probabilities"]
    assert p.shape == (a.n_obs, 3) and np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    labels = out.obs["scbert_celltype"].to_numpy()
    assert set(labels) <= {"a", "b", "c", "Unassigned"}
    assert np.all((labels == "Unassigned") == (out.obs["scbert_confidence"].to_numpy() < threshold))
    assert np.all(np.isfinite(out.obsm["X_scbert"]))
    metrics, lines = result.report(out.obs["truth"])
    assert metrics["n_cells"] == a.n_obs and lines
    known = [t for t in truth[: a.n_obs] if t is not None]
    assert ("accuracy" in metrics) == bool(set(known) & {"a", "b", "c"})  # no accuracy when no known label is a class
    if "accuracy" in metrics:
        assert ("z" in known) == ("z" in metrics.get("unknown_types", []))


@SETTINGS
@given(labels=st.lists(st.sampled_from(["B", "T", "NK", "Mono", "DC"]), min_size=0, max_size=30),
       cv=st.sampled_from([None, 2, 3, 5]), val_frac=st.sampled_from([0.05, 0.2, 0.5, 0.9]))
def test_label_checks_guarantee_a_working_split(labels: list[str], cv: int | None, val_frac: float) -> None:
    """Whatever check_labels accepts, the stratified split of finetune.py can make."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    y = np.array(labels, dtype=object)
    try:
        classes, counts = check_labels(y, "celltype", cv, val_frac)
    except InputError as e:
        assert str(e)
        event(f"clean error: {str(e)[:40]}")
        return
    event("result")
    assert classes == sorted(set(labels)) and sum(counts.values()) == len(labels)
    idx = np.arange(len(y))
    codes = np.array([classes.index(c) for c in y])
    if cv:
        folds = list(StratifiedKFold(cv, shuffle=True, random_state=0).split(idx, codes))
        assert sorted(np.concatenate([va for _, va in folds]).tolist()) == idx.tolist()
    else:
        tr, va = train_test_split(idx, test_size=val_frac, stratify=codes, random_state=0)
        assert set(codes[tr]) == set(codes[va]) == set(range(len(classes)))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(blob=st.binary(min_size=0, max_size=400), suffix=st.sampled_from([".h5ad", ".csv", ".tsv", ".mtx", ".h5", ".pt"]))
def test_random_bytes_are_refused_cleanly(blob: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"input{suffix}"
        path.write_bytes(blob)
        if suffix == ".pt":
            with pytest.raises(CheckpointError):
                load_checkpoint(path)
            return
        try:
            a = read_cells(path)
        except InputError as e:
            assert str(e)
            event("clean error")
            return
        event("result")
        assert a.n_obs > 0 and a.n_vars > 0 and sparse.issparse(a.X)
