"""Time of the query_* novelty scores at prediction (:meth:`model.novelty.query.QueryDensity.score`: two
PCA projections of the query and one neighbour search per PCA among reference + query + calibration
cells), for growing queries, on synthetic log-expression (clusters of cells over ``--genes`` genes).
The reference halves and calibration cells are as large as a checkpoint keeps at most (5,000 each
half; ``--calibration`` validation cells, at most 10,000).

    python -m scripts.bench.query_density --genes 2000 --calibration 2000 10000 --queries 100 1000 10000 50000
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from model.novelty.query import QueryDensity, density_neighbours
from model.novelty.scores import MAX_REFERENCE_CELLS


def cells(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    """``n`` cells around random ``centres``, non-negative like log expression."""
    pick = rng.integers(len(centres), size=n)
    return np.abs(centres[pick] + rng.normal(scale=0.7, size=(n, centres.shape[1]))).astype(np.float32)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--calibration", type=int, nargs="+", default=[2000, 10000])
    p.add_argument("--queries", type=int, nargs="+", default=[100, 1000, 10000, 50000])
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=1.5, size=(8, args.genes)) + 1.0
    t0 = time.perf_counter()
    density = QueryDensity.fit(cells(rng, centres, 2 * MAX_REFERENCE_CELLS))
    print(f"fit on {2 * MAX_REFERENCE_CELLS} training cells x {args.genes} genes: {time.perf_counter() - t0:.1f} s")
    for n_cal in args.calibration:
        density.set_calibration(cells(rng, centres, n_cal))
        for n in args.queries:
            query = cells(rng, centres, n)
            t0 = time.perf_counter()
            density.score(query)
            points = 2 * MAX_REFERENCE_CELLS // 2 + n + n_cal
            print(f"calibration {n_cal:>6,} cells, query {n:>7,} cells: {time.perf_counter() - t0:6.1f} s "
                  f"(k = {density_neighbours(points)}, {points:,} cells per graph)")


if __name__ == "__main__":
    main()
