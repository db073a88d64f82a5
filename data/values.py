"""What kind of values an expression matrix holds (raw counts, normalised, log-normalised in some
base), and bringing any of them to the published scale: log2(1 + x) of counts normalised to 10,000
per cell, without normalising twice.

The log base is told from the values when their per-cell totals can be checked; otherwise from the
input's own record (scanpy's ``uns['log1p']['base']``: absent or None means the natural log, as
``sc.pp.log1p`` writes by default), which ``--log-base`` / ``log_base=`` set when a file lacks it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse

from data.io import InputError

TARGET_SUM = 1e4
LOG_BASE = 2.0
LOG_BASES = {"2": 2.0, "e": math.e, "10": 10.0}  # the bases --log-base names


@dataclass
class ValueState:
    """What the values of an expression matrix look like."""

    kind: str  # "counts", "normalized" (not logged), "log" or "log_counts" (log(1 + raw counts), never normalised)
    log_base: float | None = None  # for "log"/"log_counts": the base, when it could be told
    row_sum: float | None = None  # per-cell total after undoing the log, when constant across cells
    note: str = ""
    base_given: bool = False  # the base came from the input's record (uns['log1p']), not from the values


def base_name(base: float) -> str:
    """``2``, ``e``, ``10`` or the number."""
    for name, value in LOG_BASES.items():
        if abs(base - value) < 1e-9:
            return name
    return f"{base:g}"


def parse_log_base(value: str | float | None) -> float | None:
    """A log base given by a user: ``2``, ``e``, ``10`` or a number above 1; None or ``auto``: none."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    if isinstance(value, str) and value.strip().lower() in LOG_BASES:
        return LOG_BASES[value.strip().lower()]
    try:
        base = float(value)
    except (TypeError, ValueError):
        raise InputError(f"log base {value!r}: give 2, e, 10 or a number above 1 (or auto)") from None
    if not base > 1:
        raise InputError(f"log base {value!r}: give 2, e, 10 or a number above 1 (or auto)")
    return base


def input_log_base(uns: Mapping[str, Any]) -> float | None:
    """The base an input records for its log(1 + x) values: scanpy's ``uns['log1p']['base']`` (None
    or absent: the natural log); None when the input records no log."""
    record = uns.get("log1p") if hasattr(uns, "get") else None
    if record is None:
        return None
    base = record.get("base") if isinstance(record, Mapping) else None
    if base is None or (isinstance(base, float) and math.isnan(base)):
        return math.e
    return parse_log_base(base if isinstance(base, str) else float(np.asarray(base).item()))


def _sample_rows(X: sparse.csr_matrix, n: int = 2000, seed: int = 0) -> sparse.csr_matrix:
    if X.shape[0] <= n:
        return X
    rows = np.sort(np.random.default_rng(seed).choice(X.shape[0], n, replace=False))
    return X[rows]


def check_values(X: sparse.csr_matrix, what: str = "the input") -> None:
    """Refuse NaN, infinite and negative values, which no scBERT input can hold."""
    data = X.data
    if not np.all(np.isfinite(data)):
        n = int((~np.isfinite(data)).sum())
        raise InputError(f"{what} contains {n} NaN or infinite values; fix or remove those entries before running scBERT")
    if data.size and data.min() < 0:
        raise InputError(
            f"{what} contains negative values (min {data.min():.3g}): it looks scaled or batch-corrected. "
            f"scBERT needs raw counts or log-normalised values (e.g. adata.raw or adata.layers['counts'])"
        )


def _pow_minus_one(X: sparse.csr_matrix, base: float) -> sparse.csr_matrix:
    Y = X.copy()
    Y.data = np.power(base, Y.data, dtype=np.float64) - 1.0
    return Y


def _constant_totals(S: sparse.csr_matrix, bases: list[float]) -> ValueState | None:
    """The base among ``bases`` under which undoing the log gives the same total in every cell."""
    best: ValueState | None = None
    best_cv = math.inf
    for base in bases:
        sums = np.asarray(_pow_minus_one(S, base).sum(axis=1)).ravel()
        sums = sums[sums > 0]
        if sums.size == 0:
            continue
        cv = float(sums.std() / sums.mean())
        if cv < best_cv:
            best_cv, best = cv, ValueState("log", base, float(np.median(sums)))
    return best if best is not None and best_cv < 0.01 else None


def _log_of_counts(data: np.ndarray, bases: list[float]) -> float | None:
    """The base in which ``data`` is log(1 + x) of whole counts (never normalised), if any."""
    x = data.astype(np.float64)
    for base in bases:
        counts = np.power(base, x) - 1.0
        tol = 1e-3 + 4 * np.finfo(np.float32).eps * x * math.log(base) * (counts + 1.0)  # float32 rounding of x
        if np.all(np.abs(counts - np.round(counts)) <= tol) and np.all(counts > 0.5):
            return base
    return None


def detect_state(X: sparse.csr_matrix, log_base: float | None = None) -> ValueState:
    """Tell raw counts from normalised or log-normalised values, and which log when possible:
    the values decide when their per-cell totals can be checked; else ``log_base`` (the input's
    record of its log, see :func:`input_log_base`) is used, and without it the values are taken as log2."""
    S = _sample_rows(X)
    data = S.data
    if data.size == 0:
        return ValueState("counts", note="all values are zero")
    if np.allclose(data, np.round(data)):
        return ValueState("counts")
    if data.max() > 30:
        return ValueState("normalized", note=f"non-integer values up to {data.max():.3g}")
    bases = [2.0, math.e] if log_base is None else list(dict.fromkeys([log_base, 2.0, math.e]))
    found = _constant_totals(S, bases)
    if found is not None:
        return found
    counts_base = _log_of_counts(data, [math.e, 2.0] if log_base is None else [log_base])
    if counts_base is not None:
        return ValueState("log_counts", counts_base, note="log(1 + x) of raw counts that were not normalised per cell")
    if log_base is not None:
        return ValueState("log", log_base, None, base_given=True,
                          note="its per-cell totals cannot be verified: were genes removed after normalising?")
    return ValueState("log", None, None, note="log-transformed values whose base and per-cell total cannot be verified: "
                      "were genes removed after normalising?")


def normalize_log2(X: sparse.csr_matrix, state: ValueState, target_sum: float = TARGET_SUM,
                   over: str | None = None) -> tuple[sparse.csr_matrix, str]:
    """Bring any supported input to log2(1 + x) of counts normalised to ``target_sum`` per cell
    over the columns of ``X``: all input genes, or (``over``, e.g. "the 16906 vocabulary genes")
    the vocabulary the cells were aligned to, in which case log-normalised input is always
    renormalised over those genes.

    Returns the matrix and one line saying what was done.
    """
    X = sparse.csr_matrix(X, dtype=np.float32, copy=True)
    where = over or f"all {X.shape[1]} genes"
    if state.kind == "log_counts":
        X = sparse.csr_matrix(np.round(_pow_minus_one(X, state.log_base or 2.0)), dtype=np.float32)
        X.eliminate_zeros()
        X, how = normalize_log2(X, ValueState("counts"), target_sum, over)
        return X, f"log{base_name(state.log_base or 2.0)}(1 + raw counts) (not normalised per cell): counts recovered, then {how.split(': ', 1)[1]}"
    if state.kind == "counts" or state.kind == "normalized":
        totals = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        X = sparse.csr_matrix(sparse.diags(scale.astype(np.float32)) @ X)
        X.data = np.log2(1.0 + X.data, dtype=np.float32)
        how = "raw counts" if state.kind == "counts" else "normalised (not logged) values"
        return X, f"{how}: normalised to {target_sum:g} per cell over {where}, then log2(1 + x)"
    if state.log_base is None:
        return X, f"log-normalised input used as is, assumed log2(1 + x) at {target_sum:g} per cell ({state.note})"
    name = base_name(state.log_base)
    if state.row_sum is None and over is None:
        # The base is known but not the per-cell total: change the base only (log2(1 + x) = log_b(1 + x) * log2(b)).
        how = "used as log2(1 + x)" if name == "2" else "converted to log2(1 + x)"
        X.data = (X.data.astype(np.float64) * math.log2(state.log_base)).astype(np.float32)
        return X, (f"log{name}(1 + x) values (base {name}, as uns['log1p'] records or as given) {how}, assumed normalised to "
                   f"{target_sum:g} per cell ({state.note})")
    at_target = name == "2" and state.row_sum is not None and abs(state.row_sum / target_sum - 1) < 0.01
    if at_target and over is None:
        return X, f"already log2-normalised at {target_sum:g} per cell: used as is"
    # Undo the log, rescale the per-cell total, and redo it in base 2.
    Y = _pow_minus_one(X, state.log_base)
    totals = np.asarray(Y.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    Y = sparse.csr_matrix(sparse.diags(scale) @ Y)
    Y.data = np.log2(1.0 + Y.data)
    if over is not None:
        return sparse.csr_matrix(Y, dtype=np.float32), (
            f"log{name}-normalised input undone, renormalised to {target_sum:g} per cell over {over}, then log2(1 + x)")
    return sparse.csr_matrix(Y, dtype=np.float32), (
        f"log{name}-normalised input at ~{state.row_sum:.3g} per cell converted to log2(1 + x) at {target_sum:g} per cell"
    )
