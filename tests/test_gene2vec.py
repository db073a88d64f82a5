"""Tests for data.gene2vec: reading/writing embeddings, vocabulary alignment, and training."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from data.gene2vec import (
    Gene2VecReport,
    embeddings_for_vocab,
    load_pretrained,
    read_npy_embeddings,
    read_word2vec_text,
    save_word2vec_text,
)
from data.gene2vec_training import top_correlated_pairs, train_gene2vec

GENES = ["CD3E", "MS4A1", "LYZ", "NKG7", "PPBP"]


def _table(n: int = 5, dim: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _write_text(path: Path, genes: list[str], matrix: np.ndarray, header: bool) -> None:
    lines = [f"{len(genes)} {matrix.shape[1]}"] if header else []
    lines += [g + "\t" + " ".join(repr(float(v)) for v in row) for g, row in zip(genes, matrix)]
    text = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------- text format


@pytest.mark.parametrize("header", [True, False])
@pytest.mark.parametrize("name", ["emb.txt", "emb.txt.gz"])
def test_read_word2vec_text_round_trip(tmp_path: Path, header: bool, name: str) -> None:
    matrix = _table()
    path = tmp_path / name
    _write_text(path, GENES, matrix, header)
    genes, got = read_word2vec_text(path)
    assert genes == GENES
    assert got.dtype == np.float32 and got.shape == (5, 4)
    np.testing.assert_array_equal(got, matrix)


@pytest.mark.parametrize("name", ["out.txt", "out.txt.gz"])
def test_save_then_read(tmp_path: Path, name: str) -> None:
    matrix = _table(dim=7)
    path = tmp_path / name
    save_word2vec_text(path, GENES, matrix)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left behind
    genes, got = read_word2vec_text(path)
    assert genes == GENES
    np.testing.assert_array_equal(got, matrix)  # 9 significant digits keep float32 exact
    if not name.endswith(".gz"):
        assert path.read_text().splitlines()[0] == "5 7"


def test_save_rejects_bad_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="whitespace"):
        save_word2vec_text(tmp_path / "x.txt", ["A B", "C"], _table(2))
    assert not list(tmp_path.iterdir())


def test_ragged_file_names_line(tmp_path: Path) -> None:
    path = tmp_path / "ragged.txt"
    path.write_text("5 3\nA 1 2 3\nB 1 2 3\nC 1 2\n")
    with pytest.raises(ValueError, match=r"ragged\.txt, line 4"):
        read_word2vec_text(path)


def test_non_number_and_empty_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("A 1 2\nB 1 x\n")
    with pytest.raises(ValueError, match=r"bad\.txt, line 2: non-numeric"):
        read_word2vec_text(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_word2vec_text(empty)
    header_only = tmp_path / "header.txt"
    header_only.write_text("3 2\n")
    with pytest.raises(ValueError, match="no embedding vectors"):
        read_word2vec_text(header_only)


def test_header_must_match_count(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("3 2\nA 1 2\nB 3 4\n")
    with pytest.raises(ValueError, match="header announces 3"):
        read_word2vec_text(path)


# ---------------------------------------------------------------- npy format


def test_npy_round_trip_and_mismatch(tmp_path: Path) -> None:
    matrix = _table().astype(np.float64)  # the published npy is float64
    npy = tmp_path / "gene2vec_5.npy"
    np.save(npy, matrix)
    names = tmp_path / "genes.txt"
    names.write_text("\n".join(GENES) + "\n")
    genes, got = read_npy_embeddings(npy, names)
    assert genes == GENES
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, matrix, rtol=1e-6)

    genes2, got2, source = load_pretrained(npy, names)
    assert source == "npy:gene2vec_5.npy" and genes2 == GENES
    np.testing.assert_array_equal(got2, got)

    short = tmp_path / "short.txt"
    short.write_text("\n".join(GENES[:4]) + "\n")
    with pytest.raises(ValueError, match="5 rows.*4 genes"):
        read_npy_embeddings(npy, short)


# ---------------------------------------------------------------- vocabulary alignment


def test_embeddings_for_vocab_order_and_fallback() -> None:
    table = _table(dim=8)
    vocab = ["LYZ", "NEW1", "CD3E", "NEW2", "PPBP", "NEW3"]
    emb, report = embeddings_for_vocab(vocab, GENES, table, source="file:x.txt", seed=3)
    assert emb.shape == (6, 8) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb[0], table[2])
    np.testing.assert_array_equal(emb[2], table[0])
    np.testing.assert_array_equal(emb[4], table[4])
    assert (report.n_vocab, report.n_found, report.n_fallback) == (6, 3, 3)
    assert report.missing_examples == ["NEW1", "NEW2", "NEW3"]
    assert report.source == "file:x.txt" and report.dim == 8

    fallback = emb[[1, 3, 5]]
    assert np.all(np.isfinite(fallback))
    for i in range(3):
        for j in range(i + 1, 3):
            assert not np.allclose(fallback[i], fallback[j])
    # Same seed -> same fallback, independent of where the gene sits in the vocabulary.
    emb2, _ = embeddings_for_vocab(["NEW2", "CD3E"], GENES, table, source="file:x.txt", seed=3)
    np.testing.assert_allclose(emb2[0] / np.linalg.norm(emb2[0]), emb[3] / np.linalg.norm(emb[3]), rtol=1e-5)
    emb3, _ = embeddings_for_vocab(vocab, GENES, table, source="file:x.txt", seed=4)
    assert not np.allclose(emb3[1], emb[1])

    d = report.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert "3/6" in report.summary() and "\n" not in report.summary()


def test_embeddings_for_vocab_row_mismatch() -> None:
    with pytest.raises(ValueError, match="rows"):
        embeddings_for_vocab(["A"], ["A", "B"], _table(3), source="none")


# ---------------------------------------------------------------- co-expression


def test_top_correlated_pairs_matches_corrcoef() -> None:
    rng = np.random.default_rng(1)
    n_cells, n_genes = 120, 23
    latent = rng.standard_normal((n_cells, 3))
    dense = np.maximum(
        latent @ rng.standard_normal((3, n_genes)) + rng.standard_normal((n_cells, n_genes)), 0
    )
    dense[:, 5] = 0.0  # never expressed
    dense[:2, 7] = [1.0, 2.0]  # expressed in 2 cells only (< min_cells)
    dense[2:, 7] = 0.0
    top_k, min_corr = 3, 0.2

    pairs, corr, n_considered = top_correlated_pairs(
        sp.csr_matrix(dense), top_k=top_k, min_corr=min_corr, min_cells=3, block_size=5
    )
    assert n_considered == n_genes - 2

    active = [g for g in range(n_genes) if g not in (5, 7)]
    full = np.corrcoef(dense[:, active].T)
    np.fill_diagonal(full, -np.inf)
    expected: set[tuple[int, int]] = set()
    for a, row in zip(active, full):
        for b_pos in np.argsort(-row)[:top_k]:
            if row[b_pos] >= min_corr:
                b = active[b_pos]
                expected.add((min(a, b), max(a, b)))
    assert {tuple(p) for p in pairs.tolist()} == expected
    assert np.all(pairs[:, 0] < pairs[:, 1])
    with np.errstate(invalid="ignore"):  # gene 5 is constant
        reference = np.corrcoef(dense.T)[pairs[:, 0], pairs[:, 1]]
    np.testing.assert_allclose(corr, reference, atol=1e-5)

    # Dense input and a single block give the same answer.
    pairs_1, corr_1, _ = top_correlated_pairs(dense, top_k=top_k, min_corr=min_corr, block_size=1000)
    np.testing.assert_array_equal(pairs_1, pairs)
    np.testing.assert_allclose(corr_1, corr, atol=1e-6)


# ---------------------------------------------------------------- training


def _two_module_data(seed: int = 0) -> tuple[sp.csr_matrix, list[str]]:
    """300 cells; genes 0-14 follow factor A, 15-29 factor B, 30-39 are independent noise."""
    rng = np.random.default_rng(seed)
    n_cells = 300
    a = rng.gamma(1.0, 2.0, n_cells)
    b = rng.gamma(1.0, 2.0, n_cells)
    rates = np.empty((n_cells, 40))
    rates[:, :15] = a[:, None]
    rates[:, 15:30] = b[:, None]
    rates[:, 30:] = 1.0
    counts = rng.poisson(rates * rng.uniform(0.5, 1.5, 40)[None, :])
    return sp.csr_matrix(np.log2(1.0 + counts).astype(np.float32)), [f"G{i}" for i in range(40)]


def _mean_cos(emb: np.ndarray, rows_a: range, rows_b: range) -> float:
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = unit[list(rows_a)] @ unit[list(rows_b)].T
    if rows_a == rows_b:
        return float(sims[~np.eye(len(rows_a), dtype=bool)].mean())
    return float(sims.mean())


def test_train_gene2vec_modules_and_report() -> None:
    X, genes = _two_module_data()
    emb, report = train_gene2vec(X, genes, 16, seed=0, top_k=5, min_corr=0.3, epochs=100, block_size=16, progress=False)
    assert emb.shape == (40, 16) and emb.dtype == np.float32
    assert np.all(np.isfinite(emb))

    mod_a, mod_b = range(15), range(15, 30)
    within = min(_mean_cos(emb, mod_a, mod_a), _mean_cos(emb, mod_b, mod_b))
    across = _mean_cos(emb, mod_a, mod_b)
    assert within > across + 0.3, (within, across)

    assert report.source == "trained" and report.dim == 16
    assert report.n_vocab == 40
    assert report.n_found + report.n_fallback == 40
    assert report.n_found == report.extra["n_genes_paired"] == 30
    assert report.missing_examples == [f"G{i}" for i in range(30, 40)]  # noise genes pair with nothing
    assert 0 < report.extra["n_pairs"] <= 30 * 5
    assert report.extra["n_cells_used"] == 300
    assert report.extra["top_k"] == 5 and report.extra["epochs"] == 100
    assert json.loads(json.dumps(report.to_dict())) == report.to_dict()
    assert Gene2VecReport(**report.to_dict()) == report  # the record a checkpoint keeps gives the same report back
    assert report.summary().startswith("gene2vec source=trained dim=16: 30/40 genes with a vector (75.0%), 10 fallback")


def test_train_gene2vec_deterministic_and_subsampling() -> None:
    X, genes = _two_module_data(seed=2)
    kwargs = {"top_k": 5, "epochs": 5, "progress": False}
    emb1, rep1 = train_gene2vec(X, genes, 8, seed=7, **kwargs)
    emb2, rep2 = train_gene2vec(X, genes, 8, seed=7, **kwargs)
    np.testing.assert_array_equal(emb1, emb2)  # gensim with workers=1 and a seed is exact
    assert rep1.extra["n_pairs"] == rep2.extra["n_pairs"]
    emb3, _ = train_gene2vec(X, genes, 8, seed=8, **kwargs)
    assert not np.allclose(emb1, emb3)

    emb4, rep4 = train_gene2vec(X, genes, 8, seed=7, max_cells=100, **kwargs)
    assert rep4.extra["n_cells_used"] == 100 and emb4.shape == (40, 8)


def test_train_gene2vec_without_pairs_falls_back() -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 6)).clip(0)
    emb, report = train_gene2vec(X, list("ABCDEF"), 4, min_corr=0.99, progress=False)
    assert report.n_found == 0 and report.n_fallback == 6 and report.extra["n_pairs"] == 0
    assert emb.shape == (6, 4) and len({tuple(r) for r in emb.tolist()}) == 6
    with pytest.raises(ValueError, match="columns"):
        train_gene2vec(X, list("ABC"), 4, progress=False)
