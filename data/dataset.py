"""From a sparse cells x genes matrix to model tokens, one batch at a time.

Binning follows the published code: each log-normalised value is truncated to an integer and
capped at ``bin_num``; a 0 token is appended after the last gene. It runs per batch on the CSR
rows (no per-cell Python loop, and the whole matrix is never densified).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import sparse
from torch.utils.data import DataLoader, Dataset, SequentialSampler

IGNORE_INDEX = -100
MASK_ROUNDINGS = ("round", "ceil")


def bin_values(values: np.ndarray, bin_num: int) -> np.ndarray:
    """Truncate to integer and cap at ``bin_num`` (negative values are refused upstream)."""
    return np.minimum(np.trunc(values), bin_num).astype(np.int64)


def tokenize_rows(X: sparse.csr_matrix, rows: Sequence[int] | np.ndarray, bin_num: int) -> torch.Tensor:
    """Tokens (len(rows), n_genes + 1) for the given rows of a CSR matrix."""
    sub = X[np.asarray(rows, dtype=np.int64)]
    if not sparse.isspmatrix_csr(sub):
        sub = sparse.csr_matrix(sub)
    tokens = np.zeros((sub.shape[0], sub.shape[1] + 1), dtype=np.int64)
    r = np.repeat(np.arange(sub.shape[0]), np.diff(sub.indptr))
    tokens[r, sub.indices] = bin_values(sub.data, bin_num)
    return torch.from_numpy(tokens)


def is_row_source(X: Any) -> bool:
    """Whether ``X`` is an on-disk row source (e.g. :class:`data.corpus.H5adCorpus`): it has a
    ``shape``, gives a CSR matrix for ``X[rows]`` and a view for ``X.subset(rows)``, and is read
    a batch at a time instead of being loaded into memory."""
    return hasattr(X, "subset") and hasattr(X, "shape") and not sparse.issparse(X)


class CellDataset(Dataset):
    """Cells of a CSR matrix (or of an on-disk row source, see :func:`is_row_source`), addressed by
    index (no resampling), tokenised per batch.

    Use with ``DataLoader(ds, batch_size=..., sampler=..., collate_fn=ds.collate)``; any sampler
    works, ``DistributedSampler`` included. ``labels`` are integer class ids or None.
    """

    def __init__(self, X: sparse.csr_matrix | Any, bin_num: int, labels: np.ndarray | None = None) -> None:
        self.X = X if is_row_source(X) else sparse.csr_matrix(X)
        self.bin_num = bin_num
        if labels is not None and len(labels) != self.X.shape[0]:
            raise ValueError(f"{len(labels)} labels for {self.X.shape[0]} cells")
        self.labels = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)

    def __len__(self) -> int:
        return self.X.shape[0]

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return i

    def subset(self, rows: Sequence[int] | np.ndarray) -> CellDataset:
        """The cells ``rows`` (in that order) as a dataset of their own; on-disk sources stay on disk."""
        rows = np.asarray(rows, dtype=np.int64)
        X = self.X.subset(rows) if is_row_source(self.X) else self.X[rows]
        return CellDataset(X, self.bin_num, None if self.labels is None else self.labels[torch.from_numpy(rows)].numpy())

    def loader(self, batch_size: int, rows: Sequence[int] | np.ndarray | None = None, num_workers: int = 0) -> DataLoader:
        """Batches of all cells in order, or of the cells ``rows`` in that order (``batch['index']``
        are indices of this dataset), tokenised in ``num_workers`` processes (0: in this one).

        A loader over all cells draws its workers' base seed from the global torch generator, as a
        plain DataLoader does; one over given rows has its own generator and leaves the global
        one untouched. (Training runs reproduce earlier releases' numbers only with both kept so.)
        """
        if rows is None:
            return DataLoader(self, batch_size=batch_size, sampler=SequentialSampler(self), collate_fn=self.collate,
                              num_workers=num_workers, persistent_workers=num_workers > 0)
        return DataLoader(self, batch_size=batch_size, sampler=np.asarray(rows).tolist(), collate_fn=self.collate,
                          num_workers=num_workers, generator=torch.Generator())

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch = {"index": idx, "tokens": tokenize_rows(self.X, idx.numpy(), self.bin_num)}
        if self.labels is not None:
            batch["labels"] = self.labels[idx]
        return batch


def cell_seeds(cells: Sequence[int] | np.ndarray | torch.Tensor, *keys: int) -> list[int]:
    """One 63-bit seed per cell from ``keys`` (e.g. run seed and epoch) and the cell's index: the
    masking of a cell then depends on nothing else (not on the batch it lands in, the process that
    reads it under torchrun, or where a run was resumed)."""
    return [int(np.random.SeedSequence([*keys, int(c)]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1) for c in cells]


def _row_uniforms(shape: tuple[int, int], row_seeds: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (rows, positions) uniform tensors, each row drawn from its own seeded generator."""
    a = torch.empty(shape)
    b = torch.empty(shape)
    for i, seed in enumerate(row_seeds):
        g = torch.Generator().manual_seed(seed)
        torch.rand(shape[1], generator=g, out=a[i])
        torch.rand(shape[1], generator=g, out=b[i])
    return a.to(device), b.to(device)


def mask_tokens(
    tokens: torch.Tensor,
    mask_token: int,
    mask_prob: float = 0.15,
    replace_prob: float = 0.9,
    generator: torch.Generator | None = None,
    row_seeds: Sequence[int] | None = None,
    rounding: str = "round",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose round(mask_prob * k) of each cell's k non-zero gene tokens (at least one when k > 0;
    ``rounding="ceil"``: ceil(mask_prob * k), as the published code).

    Of the chosen positions, ``replace_prob`` are replaced by ``mask_token`` and the rest keep
    their value. Zero tokens and the appended last position are never chosen. Returns the model
    input and the labels (the original token at chosen positions, IGNORE_INDEX elsewhere).
    Random numbers come from ``generator``, or, with ``row_seeds`` (see :func:`cell_seeds`), from
    one generator per row so that each cell's masking is independent of the rest of the batch.
    """
    candidates = tokens > 0
    candidates[:, -1] = False
    k = candidates.sum(dim=1)
    if rounding not in MASK_ROUNDINGS:
        raise ValueError(f"rounding must be one of {MASK_ROUNDINGS}, got {rounding!r}")
    want = torch.ceil(k.double() * mask_prob) if rounding == "ceil" else torch.round(k.double() * mask_prob)
    n_mask = torch.where(k > 0, torch.clamp(want.long(), min=1), torch.zeros_like(k))
    if row_seeds is not None:
        if len(row_seeds) != tokens.shape[0]:
            raise ValueError(f"{len(row_seeds)} row seeds for {tokens.shape[0]} cells")
        scores, second = _row_uniforms(tuple(tokens.shape), row_seeds, tokens.device)
    else:
        scores = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    scores[~candidates] = -1.0
    order = scores.argsort(dim=1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(tokens.shape[1], device=tokens.device).expand_as(order))
    chosen = ranks < n_mask[:, None]
    labels = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE_INDEX))
    if row_seeds is None:
        second = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    replace = chosen & (second < replace_prob)
    inputs = tokens.masked_fill(replace, mask_token)
    return inputs, labels


def most_common_bin_baseline(inputs: torch.Tensor, mask_token: int) -> torch.Tensor:
    """The trivial predictor for masked tokens: each cell's most common visible non-zero bin
    (ties to the lower bin; 1 for a cell with no visible non-zero token). Returns (batch,)."""
    visible = (inputs > 0) & (inputs != mask_token)
    counts = torch.zeros(inputs.shape[0], mask_token + 1, dtype=torch.long, device=inputs.device)
    counts.scatter_add_(1, inputs.clamp(max=mask_token), visible.long())
    counts[:, 0] = 0
    counts[:, mask_token] = 0
    best = counts.argmax(dim=1)
    return torch.where(counts.sum(dim=1) > 0, best, torch.ones_like(best))
