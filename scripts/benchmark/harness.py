"""Running the accuracy benchmark: labelled data on one gene set, the splits of a protocol, and
every method fitted and scored on every split."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

from data.io import InputError
from data.labels import label_column
from data.preprocess import MIN_GENES, read_prepared
from scripts.benchmark.protocols import Split, cross_splits, cv_splits, fewshot_splits, imbalance_splits, novel_splits, select_genes
from scripts.benchmark.report import evaluate, evaluate_novelty

log = logging.getLogger("scbert")


def load_labelled(paths: Sequence[str], label_key: str, genes: Sequence[str] | None, n_genes: int | None,
                  min_genes: int | None = MIN_GENES, library_size: str = "all") -> tuple[Any, np.ndarray, list[str]]:
    """Preprocess ``paths`` onto ``genes`` (or onto the ``n_genes`` most variable genes of the data),
    drop unlabelled cells; returns (AnnData, labels, genes)."""
    adata, vocab = read_prepared(list(paths), genes, min_genes or None, library_size=library_size)
    if genes is None and n_genes and n_genes < len(vocab):
        vocab = select_genes(adata.X, vocab, n_genes)
        adata = adata[:, vocab].copy()
    col = label_column(adata, label_key, ", ".join(map(str, paths)))
    y = col.astype(object).where(col.notna(), None).to_numpy()
    keep = np.array([v is not None for v in y])
    if not keep.all():
        log.warning("%d cells have no %s label and are left out", int((~keep).sum()), label_key)
        adata, y = adata[keep].copy(), y[keep]
    return adata, y.astype(str), list(vocab)


@dataclass
class ProtocolSettings:
    """Which protocol, and its settings (see :mod:`scripts.benchmark.protocols`)."""

    protocol: str = "cv"
    folds: int = 5
    seeds: list[int] = field(default_factory=lambda: [0])
    label_map: dict[str, str] = field(default_factory=dict)  # label in the data -> label to use
    test_data: list[str] | None = None  # cross: the test files
    split_key: str | None = None  # cross within one file
    train_values: list[str] = field(default_factory=list)
    test_values: list[str] = field(default_factory=list)
    hold_out: list[str] | None = None  # novel: these types; None: each type with min_novel_cells or more in turn
    min_novel_cells: int = 20
    threshold: float = 0.5  # novel: the published rule's threshold (a row of its own)
    reject_rate: float = 0.05  # novel: the calibrated thresholds reject this fraction of the calibration cells
    subsample: dict[str, int] = field(default_factory=dict)  # imbalance: type -> training cells
    fractions: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75])  # fewshot


def parse_subsample(items: Sequence[str]) -> dict[str, int]:
    """``TYPE=N`` items as {TYPE: N}."""
    sizes = {}
    for item in items:
        t, _, n = item.rpartition("=")
        if not t or not n.isdigit():
            raise InputError(f"--subsample expects TYPE=N (e.g. 'CD14+ Mono=20'), got {item!r}")
        sizes[t] = int(n)
    return sizes


DROP_LABEL = "-"  # a label map's "label to use" that leaves the cells out (e.g. unassigned, or a type the other dataset lacks)


def _map_labels(label_map: dict[str, str], X: Any, y: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray]:
    """Labels through ``label_map``; the cells mapped to :data:`DROP_LABEL` left out of ``X`` and
    ``y``. Also returns the mask of the cells kept."""
    y = np.array([label_map.get(v, v) for v in y])
    keep = y != DROP_LABEL
    if keep.all():
        return X, y, keep
    return sparse.csr_matrix(X)[keep], y[keep], keep


def protocol_splits(p: ProtocolSettings, adata: Any, y: np.ndarray, genes: Sequence[str], data: Sequence[str], label_key: str,
                    min_genes: int | None, library_size: str = "all") -> tuple[sparse.csr_matrix, np.ndarray, list[Split]]:
    """The matrix, the labels (mapped through ``label_map``; cells mapped to ``-`` are left out) and
    the splits of protocol ``p`` on the labelled ``adata`` (the cross protocol with ``test_data``
    adds those files' cells)."""
    X = adata.X
    if p.protocol == "cross":
        if p.test_data:
            test, y_test, _ = load_labelled(p.test_data, label_key, genes, None, min_genes, library_size)
            train_mask = np.r_[np.ones(len(y), bool), np.zeros(len(y_test), bool)]
            X, y = sparse.vstack([sparse.csr_matrix(X), sparse.csr_matrix(test.X)], format="csr"), np.r_[y, y_test]
            variant = f"{'+'.join(Path(f).stem for f in data)} -> {'+'.join(Path(f).stem for f in p.test_data)}"
            test_mask = ~train_mask
        elif p.split_key:
            if p.split_key not in adata.obs:
                raise InputError(f"--split-key {p.split_key!r} is not a column of the data; available: {list(adata.obs.columns)}")
            group = adata.obs[p.split_key].astype(str).to_numpy()
            for vals in (p.train_values, p.test_values):
                bad = sorted(set(vals) - set(group))
                if bad:
                    raise InputError(f"{p.split_key} has no value {bad}; available: {sorted(set(group))}")
            train_mask, test_mask = np.isin(group, p.train_values), np.isin(group, p.test_values)
            variant = f"{p.split_key}: {'+'.join(p.train_values)} -> {'+'.join(p.test_values)}"
        else:
            raise InputError("the cross protocol needs --test-data FILE, or --split-key with --train-values and --test-values")
        X, y, keep = _map_labels(p.label_map, X, y)
        return X, y, cross_splits(train_mask[keep], test_mask[keep], p.seeds, variant)
    X, y, _ = _map_labels(p.label_map, X, y)
    if p.protocol == "cv":
        return X, y, cv_splits(y, p.folds, p.seeds)
    if p.protocol == "novel":
        if p.hold_out:
            return X, y, novel_splits(y, p.hold_out, p.folds, p.seeds)
        names, counts = np.unique(y, return_counts=True)
        types = [str(t) for t, n in zip(names, counts) if n >= p.min_novel_cells]
        if len(types) < 2:
            raise InputError(f"leave-one-type-out needs at least 2 cell types with {p.min_novel_cells} or more cells; give --hold-out TYPE")
        return X, y, [s for t in types for s in novel_splits(y, [t], p.folds, p.seeds)]
    if p.protocol == "imbalance":
        if not p.subsample:
            raise InputError("the imbalance protocol needs --subsample TYPE=N [TYPE=N ...]")
        return X, y, imbalance_splits(y, p.subsample, p.folds, p.seeds)
    if p.protocol == "fewshot":
        return X, y, fewshot_splits(y, p.fractions, p.folds, p.seeds)
    raise InputError(f"unknown protocol {p.protocol!r}: cv, cross, novel, imbalance or fewshot")


def development_splits(path: str, label_key: str = "celltype", label_map: dict[str, str] | None = None,
                       ) -> tuple[sparse.csr_matrix, np.ndarray, list[str], list[Split]]:
    """The novel protocol of the novelty development scripts on one file: its 2,000 most variable
    genes (label-free), every type with >= 20 cells held out in turn, 2 folds, seed 0; labels through
    ``label_map`` (cells mapped to ``-`` left out). Returns the matrix, labels, genes and splits."""
    adata, y, genes = load_labelled([path], label_key, None, 2000)
    settings = ProtocolSettings(protocol="novel", folds=2, seeds=[0], label_map=dict(label_map or {}))
    X, y, splits = protocol_splits(settings, adata, y, genes, [path], label_key, 200)
    return X, y, list(genes), splits


@dataclass
class DevelopmentRun:
    """One run of the novelty development scripts: logistic regression (L2) fitted on a split's
    training part less its calibration cells, and its novelty scores of those calibration cells and of
    the split's test cells (``novel`` marks the test cells of the held-out type)."""

    split: Split
    X: sparse.csr_matrix  # every cell of the file (rows: split indices)
    fit: np.ndarray
    cal: np.ndarray
    model: Any
    novel: np.ndarray
    calibration_scores: dict[str, np.ndarray]
    test_scores: dict[str, np.ndarray]


def development_runs(path: str, label_key: str = "celltype", label_map: dict[str, str] | None = None) -> Iterator[DevelopmentRun]:
    """The runs of :func:`development_splits` on ``path``, one at a time (see :class:`DevelopmentRun`)."""
    from scripts.benchmark.methods import LogisticL2

    X, y, genes, splits = development_splits(path, label_key, label_map)
    for split in splits:
        fit, cal = calibration_holdout(y, split)
        model = LogisticL2()
        model.fit(X[fit], y[fit], genes)
        novel = ~np.isin(y[split.test], model.classes_)
        yield DevelopmentRun(split, X, fit, cal, model, novel, model.novelty_scores(X[cal]), model.novelty_scores(X[split.test]))


def calibration_holdout(y: np.ndarray, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """The novel protocol's division of ``split``'s training cells: those a method is fitted on, and
    a tenth of each type held out (seeded by the split) to calibrate the novelty thresholds."""
    from data.labels import holdout_per_class

    kept, held = holdout_per_class(y[split.train], 0.1, split.seed)
    return split.train[kept], split.train[held]


def _novelty(method: Any, X: sparse.csr_matrix, probs: np.ndarray) -> dict[str, np.ndarray]:
    """The novelty scores a method gives (at least softmax: 1 - its top probability)."""
    if hasattr(method, "novelty_scores"):
        return method.novelty_scores(X)
    from model.novelty.scores import softmax_score

    return {"softmax": softmax_score(probs)}


def _over_clusters(X_test: sparse.csr_matrix, seed: int, basis: str, method: Any, resolution: float | None) -> np.ndarray:
    """Over-clusters of the test cells for majority voting (see :func:`run_benchmark`)."""
    from model.majority_voting import expression_pcs, over_cluster

    if basis == "expression":
        return over_cluster(expression_pcs(X_test, seed=seed), resolution, seed=seed)
    if not hasattr(method, "embedding"):
        raise ValueError(f"{type(method).__name__} has no embedding to over-cluster; use over_clustering_basis='expression'")
    return over_cluster(method.embedding(X_test), resolution, seed=seed)


def _voted(rule: str, probs: np.ndarray, classes: Sequence[str], clusters: np.ndarray) -> np.ndarray:
    """The labels after majority voting by ``rule``, one-hot over ``classes`` (what :func:`evaluate` scores)."""
    from model.majority_voting import vote

    names = np.asarray(classes)
    voted = vote(rule, names[probs.argmax(1)], probs, names, clusters)
    return (voted[:, None] == names[None]).astype(float)


def run_benchmark(
    X: sparse.csr_matrix,
    y: np.ndarray,
    genes: Sequence[str],
    splits: Sequence[Split],
    methods: Sequence[tuple[str, Callable[[int], Any]]],
    threshold: float | None = None,
    progress: bool = True,
    reject_rate: float | None = None,
    extra_reject_rates: Sequence[float] = (),
    majority_voting: bool = False,
    over_clustering_basis: str = "expression",
    over_clustering_resolution: float | None = None,
) -> list[dict[str, Any]]:
    """Fit each method (``(name, factory(seed))``) on every split and score it; one record per
    (split, method), with the test predictions. With ``reject_rate`` (the novel protocol) each
    split's training part first gives up a tenth of its cells per type for calibration (the same
    cells for every method; scBERT stops early on them too), and there is one record per novelty
    score of the method, thresholded to reject ``reject_rate`` of the calibration cells (split-
    conformal), plus the published rule (top probability below ``threshold``), and per score one more
    record for each of ``extra_reject_rates`` (``method [score @ 1%]``). With
    ``majority_voting``, every method also gets ``[majority voting]``, ``[soft voting]`` and
    ``[cautious voting]`` records (:mod:`model.majority_voting`'s rules): the test cells'
    predictions voted within Leiden over-clusters of the test cells, made once per split from their
    expression PCA (``over_clustering_basis="expression"``, the same clusters for every method) or
    from each method's own ``embedding`` (``"embedding"``), at ``over_clustering_resolution``
    (default: CellTypist's, growing with the number of test cells)."""
    from tqdm.auto import tqdm

    from model.novelty.calibration import COMBINATIONS, ScoreCombination, conformal_threshold
    from model.novelty.query import query_scores
    from model.novelty.scores import COMBINED_PARTS

    X = sparse.csr_matrix(X)
    y = np.asarray(y).astype(str)
    records = []
    clusters_of: dict[str, np.ndarray] = {}
    bar = tqdm(total=len(splits) * len(methods), desc="benchmark", unit="run", disable=not progress)
    for split in splits:
        fit_idx, cal_idx = split.train, None
        if reject_rate is not None:
            fit_idx, cal_idx = calibration_holdout(y, split)
        for name, factory in methods:
            bar.set_postfix_str(f"{name} {split.key}")
            method = factory(split.seed)
            t0 = time.time()
            if cal_idx is not None and "val" in inspect.signature(method.fit).parameters:
                method.fit(X[fit_idx], y[fit_idx], genes, val=(X[cal_idx], y[cal_idx]))
            else:
                method.fit(X[fit_idx], y[fit_idx], genes)
            probs = method.predict_proba(X[split.test])
            base = {"protocol": split.protocol, "variant": split.variant, "seed": split.seed, "fold": split.fold,
                    "split": split.fingerprint(), "n_train": len(fit_idx), "n_test": len(split.test), "test_index": split.test.tolist()}
            if cal_idx is None:
                results = [(name, evaluate(y[split.test], probs, method.classes_, threshold))]
                if majority_voting:
                    from model.majority_voting import soft_vote

                    ckey = split.key if over_clustering_basis == "expression" else f"{split.key} {name}"
                    if ckey not in clusters_of:
                        clusters_of[ckey] = _over_clusters(X[split.test], split.seed, over_clustering_basis, method,
                                                           over_clustering_resolution)
                    clusters = clusters_of[ckey]
                    hard, cautious = (_voted(rule, probs, method.classes_, clusters) for rule in ("hard", "cautious"))
                    results.append((f"{name} [majority voting]", evaluate(y[split.test], hard, method.classes_, threshold)))
                    results.append((f"{name} [soft voting]", evaluate(y[split.test], soft_vote(probs, clusters), method.classes_, threshold)))
                    results.append((f"{name} [cautious voting]", evaluate(y[split.test], cautious, method.classes_, threshold)))
            else:
                test_scores = _novelty(method, X[split.test], probs)
                cal_scores = _novelty(method, X[cal_idx], method.predict_proba(X[cal_idx]))
                parts = getattr(method, "combined_parts", COMBINED_PARTS)
                comb = ScoreCombination.of(cal_scores, parts)
                if comb is not None:  # p-values against the calibration cells (each of them against the others)
                    cal_scores["combined"], test_scores["combined"] = comb(cal_scores, leave_one_out=True), comb(test_scores)
                for combined, (combined_parts, tail) in COMBINATIONS.items():
                    if combined == "combined":  # above, with the method's own parts
                        continue
                    comb = ScoreCombination.of(cal_scores, combined_parts, tail=tail)
                    if comb is not None:  # the other combinations, as a fine-tuned model's calibration computes them
                        cal_scores[combined] = comb(cal_scores, leave_one_out=True)
                        test_scores[combined] = comb(test_scores)
                density = getattr(method, "query_density_", None)
                if density is not None:  # the calibration cells join the test cells' neighbour graph
                    q, c = query_scores(density, X[split.test], test_scores, cal_scores, X[cal_idx], mahalanobis=parts[0])
                    test_scores.update(q)
                    cal_scores.update(c)
                results = [(f"{name} [published: top probability < {threshold:g}]",
                            evaluate_novelty(y[split.test], probs, method.classes_, "softmax", test_scores["softmax"], 1.0 - threshold))]
                for rate in (reject_rate, *extra_reject_rates):
                    at = "" if rate == reject_rate else f" @ {rate:.2%}".replace(".00%", "%")
                    for score, values in test_scores.items():
                        cutoff = conformal_threshold(cal_scores[score], rate)
                        results.append((f"{name} [{score}{at}]", evaluate_novelty(y[split.test], probs, method.classes_, score, values, cutoff)))
            seconds = time.time() - t0
            for label, m in results:
                rec = {"method": label, **base, "seconds": round(seconds, 2), **m}
                if getattr(method, "pretraining_", None):
                    rec["pretraining"] = method.pretraining_
                records.append(rec)
            m = results[-1][1] if cal_idx is None else results[0][1]
            log.info("%s %s: accuracy %.4f, macro-F1 %.4f (%.1f s)", name, split.key, m["accuracy"], m["macro_f1"], seconds)
            bar.update()
    bar.close()
    return records


def encoder_exposure(pretrained: Any, data: Sequence[str], per_split: bool, corpus: Sequence[str] = ()) -> dict[str, Any]:
    """Which cells the scBERT encoder saw before fine-tuning, for the report: pretrained per run on
    ``corpus`` plus the run's training cells (never a test cell), or a given checkpoint, whose
    recorded pretraining files are compared with the evaluation ``data``."""
    if per_split:
        return {"pretraining": "per run", "corpus": [str(c) for c in corpus], "includes_test_cells": False,
                "text": f"encoder pretrained for each run on {', '.join(Path(c).name for c in corpus) or 'no extra corpus'} plus the run's "
                        f"training cells only: no test cell was seen by pretraining or gene2vec"}
    if pretrained is None:
        return {"pretraining": "none", "includes_test_cells": False, "text": "no pretrained encoder"}
    files = [str(f) for f in (pretrained.training.get("data") or [])]
    if not files:
        return {"pretraining": str(pretrained.source), "includes_test_cells": None,
                "text": f"encoder {pretrained.source}: its pretraining cells are not recorded (an older or converted checkpoint)"}

    # the same file, or a preprocessed copy named after it (the paper scripts write prep_<i>_<name>.h5ad)
    seen = any(Path(f).resolve() == Path(d).resolve() or Path(d).stem in Path(f).stem for f in files for d in data)
    text = (f"encoder {pretrained.source} was pretrained on {', '.join(Path(f).name for f in files)}: "
            + ("THESE INCLUDE THE EVALUATION CELLS (without their labels), test cells included" if seen else "not the evaluation data"))
    return {"pretraining": str(pretrained.source), "files": files, "includes_test_cells": seen, "text": text}
