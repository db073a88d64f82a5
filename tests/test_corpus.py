"""On-disk corpora: cells read from preprocessed .h5ad shards a batch at a time."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from scipy import sparse

import pretrain
from data.corpus import H5adCorpus
from data.dataset import CellDataset
from data.io import InputError

from .test_distributed import TINY, max_diff, model_state, write_tiny


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The tiny corpus as one file, and as a folder of two shards, the second with its genes in
    another order, one vocabulary gene missing and one extra gene."""
    d = tmp_path_factory.mktemp("corpus")
    data, genes = write_tiny(d / "whole")
    full = ad.read_h5ad(data)
    (d / "shards").mkdir()
    full[:20].copy().write_h5ad(d / "shards" / "part0.h5ad")
    second = full[20:].copy()
    order = np.random.default_rng(3).permutation(full.n_vars)[1:]  # drops one gene
    second = second[:, order].copy()
    extra = ad.AnnData(X=sparse.csr_matrix(np.ones((second.n_obs, 1), np.float32)), obs=second.obs)
    extra.var_names = ["NOT_IN_VOCAB"]
    merged = ad.concat([second, extra], axis=1)
    merged.obs, merged.uns = second.obs, dict(full.uns)
    merged.write_h5ad(d / "shards" / "part1.h5ad")
    return data, genes, d / "shards"


def test_rows_read_from_disk_equal_the_matrix(shards: tuple[Path, Path, Path]) -> None:
    data, genes, folder = shards
    full = ad.read_h5ad(data)
    X = full.X.toarray()
    missing = [j for j, g in enumerate(full.var_names) if g not in ad.read_h5ad(folder / "part1.h5ad").var_names]
    X[20:, missing] = 0  # the gene the second shard lacks reads as not expressed
    corpus = H5adCorpus([folder], list(full.var_names))
    assert corpus.shape == X.shape and [p.name for p in corpus.paths] == ["part0.h5ad", "part1.h5ad"]
    rows = [47, 3, 20, 19, 0, 33, 33]
    got = corpus[rows]
    assert sparse.isspmatrix_csr(got) and np.array_equal(got.toarray(), X[rows])
    view = corpus.subset([40, 5, 25])
    assert view.shape == (3, X.shape[1]) and np.array_equal(view[[2, 0]].toarray(), X[[25, 40]])
    ds = CellDataset(view, 5)
    assert ds.collate([1, 2])["tokens"].shape == (2, X.shape[1] + 1)
    assert np.array_equal(ds.collate([1, 2])["tokens"][:, :-1].numpy(), np.minimum(np.trunc(X[[5, 25]]), 5))
    assert corpus.sample(10, seed=1).shape == (10, X.shape[1]) and corpus.sample(100).shape == X.shape


def test_files_not_from_preprocess_are_refused(tmp_path: Path) -> None:
    raw = ad.AnnData(X=sparse.csr_matrix(np.ones((3, 2), np.float32)))
    raw.var_names = ["CD3E", "MS4A1"]
    raw.write_h5ad(tmp_path / "raw.h5ad")
    with pytest.raises(InputError, match="not written by preprocess.py"):
        H5adCorpus([tmp_path / "raw.h5ad"])
    dense = ad.AnnData(X=np.ones((3, 2), np.float32), uns={"scbert_preprocess": "{}"})
    dense.write_h5ad(tmp_path / "dense.h5ad")
    with pytest.raises(InputError, match="dense"):
        H5adCorpus([tmp_path / "dense.h5ad"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .h5ad"):
        H5adCorpus([tmp_path / "empty"])


def test_backed_pretraining_equals_in_memory(shards: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """--backed (two shards read from disk by 2 DataLoader workers) trains the same model as the
    in-memory run on the same cells (tolerance 1e-6), gene2vec included."""
    data, genes, folder = shards
    whole = ad.read_h5ad(data)
    whole[:20].copy().write_h5ad(tmp_path / "a.h5ad")
    whole[20:].copy().write_h5ad(tmp_path / "b.h5ad")
    common = ["--vocab", str(genes), *TINY, "--epochs", "2", "--batch-size", "8", "--gene2vec", "train"]
    pretrain.main(["--data", str(data), *common, "--out", str(tmp_path / "mem")])
    pretrain.main(["--data", str(tmp_path / "a.h5ad"), str(tmp_path / "b.h5ad"), "--backed", "--num-workers", "2", *common,
                   "--out", str(tmp_path / "disk")])
    assert max_diff(model_state(tmp_path / "mem" / "model.pt"), model_state(tmp_path / "disk" / "model.pt")) < 1e-6
    m = json.loads((tmp_path / "disk" / "metrics.json").read_text())
    assert m["n_cells_train"] + m["n_cells_val"] == 48


def _counts_file(path: Path, genes: list[str], n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    X = sparse.csr_matrix(rng.poisson(1.5, (n, len(genes))).astype(np.float32))
    a = ad.AnnData(X=X)
    a.var_names = genes
    a.obs_names = [f"{path.stem}_{i}" for i in range(n)]
    a.write_h5ad(path)
    return path


def test_build_corpus_reports_unmeasured_genes_and_pretraining_never_scores_them(tmp_path: Path) -> None:
    import torch

    from data.corpus import CORPUS_KEY, build_corpus
    from data.dataset import IGNORE_INDEX, mask_tokens, tokenize_rows
    from data.genes import load_gene_table
    from model.checkpoint import load_checkpoint
    from scripts import build_corpus as script

    names = sorted(g for g in load_gene_table().symbols if g.isalnum() and g.isupper() and len(g) > 3)[:70]
    a = _counts_file(tmp_path / "a.h5ad", names[:60], 30, 0)  # does not measure GENE60..69
    b = _counts_file(tmp_path / "b.h5ad", names[10:], 25, 1)  # does not measure GENE0..9
    shared, files = build_corpus([a, b], min_genes=None, progress=False)
    assert list(shared.var_names) == names[10:60] and all(not f.unmeasured for f in files)
    (tmp_path / "vocab.txt").write_text("\n".join(names) + "\n")
    script.main(["--data", str(a), str(b), "--out", str(tmp_path / "corpus.h5ad"), "--vocab", str(tmp_path / "vocab.txt"),
                 "--min-genes", "0"])
    corpus = ad.read_h5ad(tmp_path / "corpus.h5ad")
    report = json.loads(corpus.uns[CORPUS_KEY])["files"]
    assert [r["unmeasured"] for r in report] == [names[60:], names[:10]]
    assert [r["cells_kept"] for r in report] == [30, 25] and [r["vocab_present"] for r in report] == [60, 60]
    assert list(corpus.obs["source_file"].unique()) == ["a.h5ad", "b.h5ad"]
    X = sparse.csr_matrix(corpus.X)
    from_b = np.flatnonzero((corpus.obs["source_file"] == "b.h5ad").to_numpy())
    assert X[from_b][:, :10].nnz == 0 and X[:30][:, 60:].nnz == 0
    tokens = tokenize_rows(X, from_b, 5)
    for seed in range(5):
        _, labels = mask_tokens(tokens, 6, 0.5, generator=torch.Generator().manual_seed(seed))
        assert (labels[:, :10] == IGNORE_INDEX).all() and (labels != IGNORE_INDEX).any()
    assert (tmp_path / "corpus_report.tsv").is_file()
    pretrain.main(["--data", str(tmp_path / "corpus.h5ad"), "--out", str(tmp_path / "pre"), *TINY, "--epochs", "1", "--gene2vec", "none"])
    training = load_checkpoint(tmp_path / "pre" / "model.pt").training
    assert "never masked or scored" in training["pretraining"]["unmeasured_genes"]
