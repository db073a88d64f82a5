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


def test_a_gene_under_two_names_is_read_from_whichever_column_has_it() -> None:
    """A merged object of two labs that name a gene differently (here TP53 and its alias P53): each
    cell's value comes from the column that holds it, and the cells of one lab get the values they
    get alone, whatever columns the other lab adds."""
    a, b = _counts(20, seed=1), _counts(20, seed=2)
    a.var_names = ["P53", *GENES[1:]]  # lab A names the gene by its alias
    b.var_names = ["TP53", *GENES[1:]]
    merged = ad.concat([a, b], join="outer", index_unique="-")
    merged.X = sparse.csr_matrix(np.nan_to_num(merged.X.toarray()))
    vocab = ["TP53", *GENES[1:]]
    alone_a, _ = prepare(a, genes=vocab, min_genes=None)
    alone_b, _ = prepare(b, genes=vocab, min_genes=None)
    both, rep = prepare(merged, genes=vocab, min_genes=None)
    np.testing.assert_allclose(both.X.toarray()[:20], alone_a.X.toarray(), rtol=1e-6)
    np.testing.assert_allclose(both.X.toarray()[20:], alone_b.X.toarray(), rtol=1e-6)
    assert alone_a.X.toarray()[:, 0].any()  # the alias's counts are TP53's
    assert "1 duplicated genes merged" in rep.symbols_summary
    # adding a column of zeros under the current name does not hide the alias's counts
    padded = ad.AnnData(sparse.hstack([a.X, sparse.csr_matrix((20, 1), dtype=np.float32)]).tocsr(), obs=a.obs)
    padded.var_names = [*a.var_names, "TP53"]
    np.testing.assert_allclose(prepare(padded, genes=vocab, min_genes=None)[0].X.toarray(), alone_a.X.toarray(), rtol=1e-6)


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


# ---------------------------------------------------------------- where library sizes are taken


def _published_by_hand(X: np.ndarray, names: list[str], vocab: list[str], min_genes: int) -> tuple[np.ndarray, np.ndarray]:
    """The published preprocess.py, written out: align to the vocabulary, keep cells with at least
    ``min_genes`` genes > 0 (sc.pp.filter_cells), scale each to 1e4 (sc.pp.normalize_total), log2(1 + x)."""
    aligned = np.zeros((X.shape[0], len(vocab)), dtype=np.float64)
    for j, g in enumerate(vocab):
        if g in names:
            aligned[:, j] = X[:, names.index(g)]
    keep = (aligned > 0).sum(1) >= min_genes
    aligned = aligned[keep]
    return np.log2(1 + aligned / aligned.sum(1, keepdims=True) * 1e4), keep


def _with_outside_genes(seed: int = 1) -> ad.AnnData:
    """Raw counts on the vocabulary genes plus mitochondrial and other genes the vocabulary lacks."""
    rng = np.random.default_rng(seed)
    names = [*GENES[:8], "MT-CO1", "MT-ND1", "ACTB", "MALAT1"]
    X = rng.poisson(rng.uniform(0.5, 8, size=(1, len(names))), size=(30, len(names))).astype(np.float32)
    X[:, 8:10] *= 5  # a few percent of the counts in MT- genes, outside the vocabulary
    X[0, :8] = 0
    X[0, 0] = 3  # cell 0: one vocabulary gene only
    a = ad.AnnData(X=sparse.csr_matrix(X))
    a.var_names, a.obs_names = names, [f"c{i}" for i in range(30)]
    return a


def test_vocab_library_size_is_the_published_preprocessing() -> None:
    a = _with_outside_genes()
    vocab = GENES  # CD3E ... S100A8; FCGR3A and S100A8 are absent from the input
    out, rep = prepare(a, genes=vocab, min_genes=3, library_size="vocab")
    expected, keep = _published_by_hand(a.X.toarray(), list(a.var_names), vocab, 3)
    assert not keep[0] and list(out.obs_names) == list(a.obs_names[keep]), "filtered on vocabulary genes, after aligning"
    np.testing.assert_allclose(out.X.toarray(), expected, rtol=1e-5, atol=1e-5)
    assert rep.library_size == "vocab" and "vocabulary genes" in rep.normalisation
    # ours: the totals include the genes outside the vocabulary, so every value is lower
    ours, _ = prepare(a[keep].copy(), genes=vocab, min_genes=3, library_size="all")
    nz = expected > 0
    assert np.all(ours.X.toarray()[nz] < expected[nz])


def test_vocab_library_size_renormalises_log_input_and_prepared_files() -> None:
    a = _with_outside_genes()
    expected, keep = _published_by_hand(a.X.toarray(), list(a.var_names), GENES, 0)
    logged = a.copy()
    logged.X = sparse.csr_matrix(_lognorm(a.X.toarray(), math.e, 1e4).astype(np.float32))  # ln(1 + x) at 1e4 over all genes
    out, _ = prepare(logged, genes=GENES, min_genes=None, library_size="vocab")
    np.testing.assert_allclose(out.X.toarray(), expected, rtol=1e-4, atol=1e-4)
    prepared_all, _ = prepare(a, min_genes=None)  # preprocess.py output over all genes
    again, rep = prepare(prepared_all, genes=GENES, min_genes=None, library_size="vocab")
    np.testing.assert_allclose(again.X.toarray(), expected, rtol=1e-4, atol=1e-4)
    twice, rep = prepare(again, genes=GENES, min_genes=None, library_size="vocab")
    assert "used as is" in rep.normalisation and (twice.X != again.X).nnz == 0, "never normalised twice"
    with pytest.raises(InputError, match="need a vocabulary"):
        prepare(a, n_top_genes=5, library_size="vocab")


def test_min_genes_counts_values_above_zero() -> None:
    a = _counts(6)
    X = a.X.toarray()
    X[0] = 0
    X[0, :3] = 1.0  # cell 0: 3 expressed genes ...
    M = sparse.csr_matrix(X)
    rows, cols = M.nonzero()
    extra = np.arange(3, 8)  # ... and 5 explicitly stored zeros
    M = sparse.csr_matrix((np.r_[M.data, np.zeros(5, np.float32)], (np.r_[rows, np.zeros(5, int)], np.r_[cols, extra])), shape=M.shape)
    assert M.getrow(0).nnz == 8
    a.X = M
    assert "cell0" not in list(prepare(a, min_genes=4)[0].obs_names), "stored zeros are not expressed genes"
    assert "cell0" in list(prepare(a, min_genes=3)[0].obs_names)


def test_choose_library_size(tmp_path) -> None:  # noqa: ANN001
    from model.checkpoint import choose_library_size

    assert choose_library_size("all")[0] == "all" and choose_library_size("vocab")[0] == "vocab"
    assert choose_library_size()[0] == "all"
    assert choose_library_size(genes=[f"G{i}" for i in range(16906)])[0] == "vocab"
    prepared, _ = prepare(_with_outside_genes(), genes=GENES, min_genes=None, library_size="vocab")
    prepared.write_h5ad(tmp_path / "p.h5ad")
    assert choose_library_size(data=[tmp_path / "p.h5ad"]) == ("vocab", "as preprocess.py recorded in the input")
    with pytest.raises(InputError, match="auto or one of"):
        choose_library_size("total")
