"""Normalisation, state detection, vocabulary alignment and the preprocess stage."""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pytest
from scipy import sparse

from data.io import InputError
from data.preprocess import PREP_KEY, align_to_genes, detect_state, prepare

GENES = ["CD3E", "MS4A1", "LYZ", "NKG7", "GNLY", "CD14", "PPBP", "CD79A", "FCGR3A", "S100A8"]


def _counts(n_cells: int = 40, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    X = rng.poisson(rng.uniform(0.2, 6, size=(1, len(GENES))), size=(n_cells, len(GENES))).astype(np.float32)
    X[:, 0] += 1  # no empty cells
    adata = ad.AnnData(X=sparse.csr_matrix(X))
    adata.var_names = GENES
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    return adata


def _lognorm(X: np.ndarray, base: float, total: float) -> np.ndarray:
    return np.log1p(X / X.sum(1, keepdims=True) * total) / math.log(base)


def test_detect_state() -> None:
    X = _counts().X.toarray()
    assert detect_state(sparse.csr_matrix(X)).kind == "counts"
    s = detect_state(sparse.csr_matrix(_lognorm(X, 2, 1e4)))
    assert (s.kind, s.log_base) == ("log", 2.0) and abs(s.row_sum - 1e4) < 1
    s = detect_state(sparse.csr_matrix(_lognorm(X, math.e, 1e4)))
    assert s.kind == "log" and abs(s.log_base - math.e) < 1e-9
    assert detect_state(sparse.csr_matrix(X / X.sum(1, keepdims=True) * 1e4)).kind == "normalized"


@pytest.mark.parametrize("base,total", [(2.0, 1e4), (math.e, 1e4), (2.0, 1e6), (math.e, 1e6)])
def test_any_normalisation_ends_as_published_log2_1e4(base: float, total: float) -> None:
    raw = _counts()
    want, _ = prepare(raw, min_genes=None)
    other = raw.copy()
    other.X = sparse.csr_matrix(_lognorm(raw.X.toarray(), base, total).astype(np.float32))
    got, rep = prepare(other, min_genes=None)
    np.testing.assert_allclose(got.X.toarray(), want.X.toarray(), atol=1e-3)
    assert not rep.warnings


def test_never_normalises_twice() -> None:
    once, _ = prepare(_counts(), min_genes=None)
    assert PREP_KEY in once.uns
    twice, rep = prepare(once, min_genes=None)
    np.testing.assert_array_equal(twice.X.toarray(), once.X.toarray())
    expected = np.log2(1 + _counts().X.toarray() / _counts().X.toarray().sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(once.X.toarray(), expected, rtol=1e-5)


def test_library_size_uses_all_genes_before_subsetting() -> None:
    raw = _counts()
    full, _ = prepare(raw, min_genes=None)
    vocab = ["LYZ", "CD3E", "NOTAGENE1"]
    sub, rep = prepare(raw, genes=vocab, min_genes=None)
    assert list(sub.var_names) == vocab
    np.testing.assert_allclose(sub.X.toarray()[:, :2], full[:, ["LYZ", "CD3E"]].X.toarray())
    assert np.all(sub.X.toarray()[:, 2] == 0)
    assert rep.vocab_present == 2 and rep.vocab_size == 3


def test_low_vocabulary_overlap_warns_and_zero_overlap_fails() -> None:
    raw = _counts()
    _, rep = prepare(raw, genes=["CD3E", "A1", "A2", "A3", "A4"], min_genes=None)
    assert any("1 of 5 vocabulary genes" in w for w in rep.warnings)
    with pytest.raises(InputError, match="none of the 2 vocabulary genes"):
        prepare(raw, genes=["XX1", "XX2"], min_genes=None)


def test_revision_rescues_aliases_but_never_touches_vocabulary_names() -> None:
    raw = _counts()
    names = list(GENES)
    names[1] = "P53"  # an alias of TP53
    names[2] = "DAO"  # a current symbol that is also an alias of AOC1
    raw.var_names = names
    out, rep = prepare(raw, genes=["TP53", "DAO", "CD3E"], min_genes=None)
    assert rep.vocab_present == 3
    np.testing.assert_array_equal(out.X.toarray()[:, 1] > 0, raw.X.toarray()[:, 2] > 0)


def test_align_to_genes_order_and_missing() -> None:
    X = sparse.csr_matrix(np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32))
    out, present = align_to_genes(X, ["a", "b", "c"], ["c", "x", "a"])
    assert present == 2
    assert out.toarray().tolist() == [[3, 0, 1], [6, 0, 4]]


def test_filter_cells_and_hvg() -> None:
    raw = _counts(60)
    out, rep = prepare(raw, min_genes=8, n_top_genes=4)
    assert out.n_vars == 4 and rep.n_top_genes == 4
    assert out.n_obs == int((np.diff(raw.X.indptr) >= 8).sum())
    assert set(out.obs_names) <= set(raw.obs_names)
    with pytest.raises(InputError, match="no cell"):
        prepare(raw, min_genes=200)


@pytest.mark.parametrize("bad,match", [(np.nan, "NaN"), (np.inf, "NaN or infinite"), (-1.0, "negative")])
def test_bad_values_are_refused(bad: float, match: str) -> None:
    raw = _counts()
    X = raw.X.toarray()
    X[3, 2] = bad
    raw.X = sparse.csr_matrix(X)
    with pytest.raises(InputError, match=match):
        prepare(raw, min_genes=None)
