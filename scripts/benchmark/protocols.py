"""The accuracy benchmark's protocols: which cells each run trains on and is tested on.

A *split* is a pair of index arrays (training cells, test cells) into one labelled matrix; every
method is fitted on ``X[train]`` and scored on ``X[test]`` of the same split. Protocols:

- ``cv``: stratified K-fold, repeated over seeds;
- ``cross``: one fixed training set (dataset A) and test set (dataset B); seeds vary the methods;
- ``novel``: K-fold with some types removed from every training part; scored on known-type accuracy,
  the fraction of novel cells left ``Unassigned`` and the AUROC of the confidence (known vs novel);
- ``imbalance``: K-fold with chosen types subsampled in the training part to given sizes;
- ``fewshot``: K-fold with the training part subsampled (stratified) to given fractions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from data.labels import stratified_folds


@dataclass
class Split:
    """Training and test cells (row indices) of one run; ``variant`` names the protocol setting."""

    protocol: str
    variant: str
    seed: int
    fold: int
    train: np.ndarray
    test: np.ndarray

    @property
    def key(self) -> str:
        return f"{self.variant}/seed{self.seed}/fold{self.fold}"

    def fingerprint(self) -> str:
        """A short hash of the indices: equal fingerprints mean identical splits."""
        h = hashlib.sha1()
        h.update(np.asarray(self.train, dtype=np.int64).tobytes())
        h.update(b"|")
        h.update(np.asarray(self.test, dtype=np.int64).tobytes())
        return h.hexdigest()[:12]


def select_genes(X: sparse.csr_matrix, genes: Sequence[str], n: int) -> list[str]:
    """The ``n`` genes with the highest variance of log expression (label-free), in their input order.
    Unlike dispersion-based HVG selection this keeps highly expressed markers (LYZ, MS4A1, NKG7...)."""
    X = sparse.csr_matrix(X)
    mean = np.asarray(X.mean(axis=0)).ravel()
    var = np.asarray(X.multiply(X).mean(axis=0)).ravel() - mean**2
    keep = np.sort(np.argsort(-var, kind="stable")[: min(n, len(genes))])
    return [genes[i] for i in keep]


def cv_splits(y: np.ndarray, k: int, seeds: Iterable[int], protocol: str = "cv", variant: str = "all") -> list[Split]:
    """Stratified K-fold for each seed."""
    return [Split(protocol, variant, s, f, tr, te) for s in seeds for f, (tr, te) in enumerate(stratified_folds(y, k, s))]


def cross_splits(train_mask: np.ndarray, test_mask: np.ndarray, seeds: Iterable[int], variant: str = "A->B") -> list[Split]:
    """The same training and test cells for every seed (the seed only changes the methods)."""
    tr, te = np.flatnonzero(train_mask), np.flatnonzero(test_mask)
    if not len(tr) or not len(te):
        raise ValueError(f"the cross-dataset split has {len(tr)} training and {len(te)} test cells; both must be non-empty")
    return [Split("cross", variant, s, 0, tr, te) for s in seeds]


def novel_splits(y: np.ndarray, held_out: Sequence[str], k: int, seeds: Iterable[int]) -> list[Split]:
    """K-fold where the ``held_out`` types are removed from every training part (test parts keep them)."""
    missing = sorted(set(held_out) - set(map(str, y)))
    if missing:
        raise ValueError(f"cell types to hold out are not in the data: {missing}; available: {sorted(set(map(str, y)))}")
    novel = np.isin(y.astype(str), list(held_out))
    out = []
    for s in seeds:
        for f, (tr, te) in enumerate(stratified_folds(y, k, s)):
            out.append(Split("novel", "novel=" + "+".join(held_out), s, f, tr[~novel[tr]], te))
    return out


def imbalance_splits(y: np.ndarray, sizes: dict[str, int], k: int, seeds: Iterable[int]) -> list[Split]:
    """K-fold where the training cells of each type in ``sizes`` are subsampled to that many."""
    missing = sorted(set(sizes) - set(map(str, y)))
    if missing:
        raise ValueError(f"cell types to subsample are not in the data: {missing}; available: {sorted(set(map(str, y)))}")
    variant = "sizes=" + ",".join(f"{t}:{n}" for t, n in sizes.items())
    out = []
    for s in seeds:
        for f, (tr, te) in enumerate(stratified_folds(y, k, s)):
            rng = np.random.default_rng([s, f, 1])
            keep = [tr[~np.isin(y[tr].astype(str), list(sizes))]]
            for t, n in sizes.items():
                cells = tr[y[tr].astype(str) == t]
                keep.append(rng.choice(cells, min(n, len(cells)), replace=False))
            out.append(Split("imbalance", variant, s, f, np.sort(np.concatenate(keep)), te))
    return out


def fewshot_splits(y: np.ndarray, fractions: Sequence[float], k: int, seeds: Iterable[int]) -> list[Split]:
    """K-fold where each training part is subsampled per type to ``fraction`` (at least one cell per type)."""
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise ValueError(f"few-shot fractions must be in (0, 1], got {bad}")
    out = []
    for s in seeds:
        for f, (tr, te) in enumerate(stratified_folds(y, k, s)):
            for frac in fractions:
                rng = np.random.default_rng([s, f, int(round(frac * 1000))])
                keep = []
                for t in np.unique(y[tr]):
                    cells = tr[y[tr] == t]
                    keep.append(rng.choice(cells, max(1, int(round(frac * len(cells)))), replace=False))
                out.append(Split("fewshot", f"{frac:.0%} of training", s, f, np.sort(np.concatenate(keep)), te))
    return out
