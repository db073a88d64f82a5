"""Cell-type labels: reading the label column, checking that the labels can train a classifier,
and stratified splits of labelled cells (one definition used by fine-tuning, the accuracy
benchmark and ``scripts/split_h5ad.py``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data.io import InputError


def label_column(adata: Any, key: str, source: str) -> pd.Series:
    """``adata.obs[key]``, or an InputError naming the columns ``source`` does have."""
    if key not in adata.obs:
        raise InputError(f"--label-key {key!r} is not a column of {source}; available columns: {list(adata.obs.columns)}")
    return adata.obs[key]


DROP_LABEL = "-"  # a label map's "label to use" that leaves those cells out (e.g. unassigned, or a type the model lacks)


def read_label_map(path: str | Path) -> dict[str, str]:
    """Two columns per line (tab or comma separated): a label as it appears in the data, and the
    name to use instead (e.g. a query's type name -> the model's class; ``-`` leaves those cells
    out). Lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"label map {path} does not exist: give a text file of two columns (label in the data, label to use)")
    mapping: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = [p.strip() for p in (line.split("\t") if "\t" in line else line.split(","))]
        if len(parts) != 2 or not all(parts):
            raise InputError(f"{path} line {n}: expected two columns (label in the data, label to use), got {line!r}")
        mapping[parts[0]] = parts[1]
    return mapping


def as_label_map(label_map: Mapping[str, str] | str | Path | None) -> dict[str, str] | None:
    """A label map as a dict: read from its file (:func:`read_label_map`) when given as a path."""
    if label_map is None:
        return None
    return read_label_map(label_map) if isinstance(label_map, (str, Path)) else dict(label_map)


def map_labels(labels: pd.Series, mapping: Mapping[str, str]) -> pd.Series:
    """``labels`` renamed through ``mapping`` (labels it does not name are kept; those mapped to
    :data:`DROP_LABEL` become missing, so they are left out of any score); missing labels stay missing."""
    known = labels.notna()
    text = labels.astype(object).where(~known, labels.astype(str))
    renamed = text.map(lambda v: mapping.get(v, v) if isinstance(v, str) else v)
    return renamed.where(renamed != DROP_LABEL, None).rename(labels.name)


def check_labels(y: Sequence[str], key: str, cv: int | None = None, val_frac: float = 0.2) -> tuple[list[str], dict[str, int]]:
    """Classes (sorted) and their cell counts, or an InputError when the labels cannot train a
    classifier with the requested split (``cv`` folds, or a validation fraction ``val_frac``)."""
    y = np.asarray(y, dtype=object)
    if len(y) == 0:
        raise InputError(f"no cell has a label in column {key!r}: fill it in, or choose another --label-key")
    classes = sorted(set(map(str, y)))
    if len(classes) < 2:
        raise InputError(f"column {key!r} holds a single cell type ({classes[0]!r}); a classifier needs at least two")
    counts = {c: int((y == c).sum()) for c in classes}
    need = cv if cv else 2
    rare = {c: n for c, n in counts.items() if n < need}
    if rare:
        how = f"into {cv} folds" if cv else "into training and validation"
        raise InputError(f"cell types with fewer than {need} cells cannot be split {how}: {rare}. "
                         f"Remove them from the data (or merge them into related types){' or use fewer folds' if cv else ''}")
    if not cv:
        n_val = int(np.ceil(val_frac * len(y)))
        if n_val < len(classes) or len(y) - n_val < len(classes):
            raise InputError(f"a validation fraction of {val_frac} keeps {n_val} of {len(y)} cells for validation, but each of the "
                             f"{len(classes)} cell types needs a cell on both sides: set --val-frac between "
                             f"{len(classes) / len(y):.2f} and {1 - len(classes) / len(y):.2f}")
    return classes, counts


def stratified_holdout(y: Sequence[Any], test_size: float | int, seed: int, stratify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) sorted cell indices: ``test_size`` cells (a fraction or a number) held out,
    each label in proportion (``stratify``); scikit-learn's ``train_test_split``."""
    from sklearn.model_selection import train_test_split

    y = np.asarray(y)
    kept, held = train_test_split(np.arange(len(y)), test_size=test_size, stratify=y if stratify else None, random_state=seed)
    return np.sort(kept), np.sort(held)


def stratified_folds(y: Sequence[Any], k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(training, test) sorted cell indices of each of ``k`` stratified folds (scikit-learn's
    shuffled ``StratifiedKFold``); a ValueError when a label has fewer than ``k`` cells."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y)
    names, counts = np.unique(y, return_counts=True)
    if counts.min() < k:
        rare = {str(t): int(c) for t, c in zip(names, counts) if c < k}
        raise ValueError(f"cell types with fewer than {k} cells cannot be split into {k} folds: {rare}; use fewer folds or remove them")
    return [(np.sort(tr), np.sort(te)) for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)]


def holdout_per_class(y: Sequence[Any], frac: float, seed: int, keep_below: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) sorted, disjoint cell indices covering every cell: of each label with at
    least ``keep_below`` (and 2) cells, round(``frac`` x its cells) are held out, at least 1 and at
    most all but 1; a label with fewer cells stays whole in the kept part. For validation splits
    of small training parts (a fold's, a benchmark run's), where a stratified split may fail or
    drop a rare type; ``keep_below`` keeps a rare type's few cells for training."""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for label in np.unique(y):
        cells = np.flatnonzero(y == label)
        if len(cells) < max(2, keep_below):
            continue
        n = min(len(cells) - 1, max(1, int(round(frac * len(cells)))))
        held.extend(rng.choice(cells, n, replace=False).tolist())
    held_arr = np.sort(np.asarray(held, dtype=np.int64))
    return np.setdiff1d(np.arange(len(y)), held_arr), held_arr
