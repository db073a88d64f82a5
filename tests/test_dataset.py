"""Binning, batching and masking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import sparse
from torch.utils.data import DataLoader, DistributedSampler

from data.dataset import IGNORE_INDEX, CellDataset, bin_values, mask_tokens, most_common_bin_baseline, tokenize_rows


def test_bin_values_truncate_and_cap() -> None:
    v = np.array([0.0, 0.4, 0.99, 1.0, 1.7, 4.999, 5.0, 7.3, 13.2])
    assert bin_values(v, 5).tolist() == [0, 0, 0, 1, 1, 4, 5, 5, 5]
    assert bin_values(v, 3).tolist() == [0, 0, 0, 1, 1, 3, 3, 3, 3]


def test_tokenize_rows_matches_per_cell_loop() -> None:
    rng = np.random.default_rng(1)
    X = sparse.random(50, 37, density=0.3, format="csr", random_state=1, data_rvs=lambda n: rng.uniform(0, 9, n)).astype(np.float32)
    rows = [7, 3, 3, 49, 0]
    tokens = tokenize_rows(X, rows, 5)
    assert tokens.shape == (5, 38) and tokens.dtype == torch.int64
    for out_row, r in zip(tokens, rows):
        dense = X[r].toarray().ravel()
        expected = np.append(np.minimum(dense.astype(np.int64), 5), 0)
        assert out_row.tolist() == expected.tolist()


def test_dataset_uses_the_index_it_is_given() -> None:
    X = sparse.csr_matrix(np.arange(20, dtype=np.float32).reshape(10, 2))
    ds = CellDataset(X, bin_num=100, labels=np.arange(10) % 3)
    assert [ds[i] for i in range(10)] == list(range(10))
    batch = ds.collate([9, 2, 5])
    assert batch["index"].tolist() == [9, 2, 5]
    assert batch["tokens"][:, 0].tolist() == [18, 4, 10]
    assert batch["labels"].tolist() == [0, 2, 2]
    with pytest.raises(IndexError):
        ds[10]


def test_distributed_sampler_covers_every_cell_once() -> None:
    X = sparse.csr_matrix(np.ones((11, 3), dtype=np.float32))
    ds = CellDataset(X, 5)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3, drop_last=True)
        loader = DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=ds.collate)
        seen.append([i for b in loader for i in b["index"].tolist()])
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) == len(seen[1]) == 5


def _tokens(n_cells: int = 64, n_genes: int = 300, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    expressed = torch.rand(n_cells, n_genes, generator=g) < torch.rand(n_cells, 1, generator=g)
    values = torch.randint(1, 6, (n_cells, n_genes), generator=g)
    tokens = torch.where(expressed, values, torch.zeros_like(values))
    return torch.cat([tokens, torch.zeros(n_cells, 1, dtype=torch.long)], dim=1)


def test_masking_selects_15_percent_of_nonzero_tokens_only() -> None:
    tokens = _tokens()
    tokens[0, :-1] = 0  # a cell with nothing expressed
    tokens[1, :-1] = 0
    tokens[1, 5] = 3  # a cell with one expressed gene
    inputs, labels = mask_tokens(tokens, mask_token=6, mask_prob=0.15, replace_prob=0.9, generator=torch.Generator().manual_seed(0))
    chosen = labels != IGNORE_INDEX
    k = (tokens[:, :-1] > 0).sum(1)
    expected = torch.where(k > 0, torch.clamp(torch.round(k * 0.15).long(), min=1), torch.zeros_like(k))
    assert chosen.sum(1).tolist() == expected.tolist()
    assert int(chosen.sum(1)[0]) == 0 and int(chosen.sum(1)[1]) == 1
    assert not chosen[tokens == 0].any(), "zero tokens must never be masked"
    assert not chosen[:, -1].any(), "the appended position must never be masked"
    assert torch.equal(labels[chosen], tokens[chosen])
    assert torch.equal(inputs[~chosen], tokens[~chosen])
    replaced = (inputs == 6) & chosen
    assert set(inputs[chosen & ~replaced].tolist()) <= set(range(1, 6))
    frac = replaced.sum().item() / chosen.sum().item()
    assert 0.85 < frac < 0.95, frac


def test_masking_is_reproducible_with_a_generator() -> None:
    tokens = _tokens()
    a = mask_tokens(tokens, 6, generator=torch.Generator().manual_seed(5))
    b = mask_tokens(tokens, 6, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_most_common_bin_baseline() -> None:
    inputs = torch.tensor([
        [1, 2, 2, 6, 6, 6, 0, 0],  # mask tokens (6) do not count -> 2
        [3, 3, 1, 1, 0, 0, 0, 0],  # tie -> lower bin
        [0, 0, 0, 6, 0, 0, 0, 0],  # nothing visible -> 1
    ])
    assert most_common_bin_baseline(inputs, mask_token=6).tolist() == [2, 1, 1]


def test_holdout_per_class_is_disjoint_and_keeps_every_type() -> None:
    from data.labels import holdout_per_class

    y = np.array(["a"] * 20 + ["b"] * 3 + ["c"] * 2 + ["d"])
    for seed in range(5):
        kept, held = holdout_per_class(y, 0.1, seed)
        assert len(np.intersect1d(kept, held)) == 0 and sorted(np.r_[kept, held].tolist()) == list(range(len(y)))
        assert set(y[kept]) == {"a", "b", "c", "d"} and set(y[held]) == {"a", "b", "c"}, "rare types on both sides, singletons kept"
        assert (y[held] == "a").sum() == 2
