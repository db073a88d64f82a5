"""Benchmark harness: identical splits for every method, the paper's protocols, metrics, reports.

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
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

from model.pipeline import UNASSIGNED, classification_metrics, plot_confusion

log = logging.getLogger("scbert")

PROTOCOLS = ("cv", "cross", "novel", "imbalance", "fewshot")


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


def _folds(y: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedKFold

    counts = np.unique(y, return_counts=True)[1]
    if counts.min() < k:
        rare = {str(t): int(c) for t, c in zip(*np.unique(y, return_counts=True)) if c < k}
        raise ValueError(f"cell types with fewer than {k} cells cannot be split into {k} folds: {rare}; use fewer folds or remove them")
    return [(np.sort(tr), np.sort(te)) for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)]


def cv_splits(y: np.ndarray, k: int, seeds: Iterable[int], protocol: str = "cv", variant: str = "all") -> list[Split]:
    """Stratified K-fold for each seed."""
    return [Split(protocol, variant, s, f, tr, te) for s in seeds for f, (tr, te) in enumerate(_folds(y, k, s))]


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
        for f, (tr, te) in enumerate(_folds(y, k, s)):
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
        for f, (tr, te) in enumerate(_folds(y, k, s)):
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
        for f, (tr, te) in enumerate(_folds(y, k, s)):
            for frac in fractions:
                rng = np.random.default_rng([s, f, int(round(frac * 1000))])
                keep = []
                for t in np.unique(y[tr]):
                    cells = tr[y[tr] == t]
                    keep.append(rng.choice(cells, max(1, int(round(frac * len(cells)))), replace=False))
                out.append(Split("fewshot", f"{frac:.0%} of training", s, f, np.sort(np.concatenate(keep)), te))
    return out


def evaluate(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], threshold: float | None = None) -> dict[str, Any]:
    """Metrics of one run. Predictions are the top-scoring class. Test cells whose type the method
    never saw are *novel*: with ``threshold`` (novel protocol), cells scoring below it are
    ``Unassigned``, and the report adds the known-type accuracy (Unassigned counts as wrong), the
    fraction of novel cells left Unassigned and the AUROC of the top score for known vs novel.
    Accuracy and macro-F1 are computed on the known cells."""
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true).astype(str)
    classes = np.asarray(classes, dtype=object)
    conf = probs.max(axis=1)
    pred = classes[probs.argmax(axis=1)].astype(str)
    if threshold is not None:
        pred = np.where(conf >= threshold, pred, UNASSIGNED)
    known = np.isin(y_true, classes.astype(str))
    m = classification_metrics(y_true[known], pred[known]) if known.any() else {"n_cells": 0, "accuracy": float("nan"), "macro_f1": float("nan"), "per_class": {}}
    m["n_unseen_type"] = int((~known).sum())
    if threshold is not None:
        m["known_accuracy"] = m["accuracy"]
        m["known_unassigned"] = float((pred[known] == UNASSIGNED).mean()) if known.any() else float("nan")
        m["novel_unassigned"] = float((pred[~known] == UNASSIGNED).mean()) if (~known).any() else float("nan")
        m["auroc_known_vs_novel"] = float(roc_auc_score(known, conf)) if known.any() and (~known).any() else float("nan")
    m["y_pred"] = pred.tolist()
    return m


def run_benchmark(
    X: sparse.csr_matrix,
    y: np.ndarray,
    genes: Sequence[str],
    splits: Sequence[Split],
    methods: Sequence[tuple[str, Callable[[int], Any]]],
    threshold: float | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Fit each method (``(name, factory(seed))``) on every split and score it; one record per
    (split, method), with the test predictions."""
    from tqdm.auto import tqdm

    X = sparse.csr_matrix(X)
    y = np.asarray(y).astype(str)
    records = []
    bar = tqdm(total=len(splits) * len(methods), desc="benchmark", unit="run", disable=not progress)
    for split in splits:
        for name, factory in methods:
            bar.set_postfix_str(f"{name} {split.key}")
            method = factory(split.seed)
            t0 = time.time()
            method.fit(X[split.train], y[split.train], genes)
            probs = method.predict_proba(X[split.test])
            seconds = time.time() - t0
            m = evaluate(y[split.test], probs, method.classes_, threshold)
            rec = {"method": name, "protocol": split.protocol, "variant": split.variant, "seed": split.seed, "fold": split.fold,
                   "split": split.fingerprint(), "n_train": len(split.train), "n_test": len(split.test),
                   "seconds": round(seconds, 2), "test_index": split.test.tolist(), **m}
            records.append(rec)
            log.info("%s %s: accuracy %.4f, macro-F1 %.4f (%.1f s)", name, split.key, m["accuracy"], m["macro_f1"], seconds)
            bar.update()
    bar.close()
    return records


SUMMARY_KEYS = ("accuracy", "macro_f1", "known_accuracy", "known_unassigned", "novel_unassigned", "auroc_known_vs_novel")


def _mean_sd(values: list[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if x == x], dtype=float)  # drop NaN
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarise(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sd over runs (folds x seeds) per (variant, method), and mean per-class F1."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["variant"], r["method"]), []).append(r)
    out = []
    for (variant, method), rs in groups.items():
        row: dict[str, Any] = {"variant": variant, "method": method, "n_runs": len(rs), "seeds": sorted({r["seed"] for r in rs}),
                               "seconds": round(float(np.mean([r["seconds"] for r in rs])), 1)}
        for k in SUMMARY_KEYS:
            if k in rs[0]:
                row[k], row[k + "_sd"] = _mean_sd([r[k] for r in rs])
        classes = sorted({c for r in rs for c, v in r["per_class"].items() if isinstance(v, dict) and c not in ("macro avg", "weighted avg")})
        row["per_class_f1"] = {c: _mean_sd([r["per_class"][c]["f1-score"] for r in rs if c in r["per_class"]])[0] for c in classes}
        out.append(row)
    return out


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
    """One table per variant: mean ± sd of the metrics over runs."""
    lines: list[str] = []
    for variant in dict.fromkeys(r["variant"] for r in summary):
        rows = [r for r in summary if r["variant"] == variant]
        keys = [k for k in SUMMARY_KEYS if k in rows[0] and (k != "accuracy" or "known_accuracy" not in rows[0])]
        lines += [f"**{variant}**", "", "| method | runs | " + " | ".join(k.replace("_", " ") for k in keys) + " | s/run |",
                  "|---|---|" + "---|" * len(keys) + "---|"]
        for r in sorted(rows, key=lambda r: -np.nan_to_num(r[keys[0]], nan=-1)):
            cells = [f"{r[k]:.4f} ± {r[k + '_sd']:.4f}" for k in keys]
            lines.append(f"| {r['method']} | {r['n_runs']} | " + " | ".join(cells) + f" | {r['seconds']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def per_class_table(summary: Sequence[dict[str, Any]]) -> str:
    """Per-class F1 (mean over runs) as CSV: one row per (variant, method)."""
    classes = sorted({c for r in summary for c in r["per_class_f1"]})
    lines = ["variant,method," + ",".join(f'"{c}"' for c in classes)]
    for r in summary:
        vals = [f"{r['per_class_f1'][c]:.4f}" if c in r["per_class_f1"] else "" for c in classes]
        lines.append(f'"{r["variant"]}",{r["method"]},' + ",".join(vals))
    return "\n".join(lines) + "\n"


def check_same_splits(records: Sequence[dict[str, Any]]) -> None:
    """Refuse results where two methods were scored on different cells under the same split name."""
    seen: dict[str, str] = {}
    for r in records:
        key = f"{r['variant']}/seed{r['seed']}/fold{r['fold']}"
        if seen.setdefault(key, r["split"]) != r["split"]:
            raise ValueError(f"split {key} differs between runs ({seen[key]} vs {r['split']} for {r['method']}): "
                             "merge only results made from the same data, protocol and seeds")


def write_report(out: Path, records: Sequence[dict[str, Any]], y: np.ndarray | None, info: dict[str, Any]) -> list[dict[str, Any]]:
    """results.json, results.md, per_class_f1.csv and one confusion matrix PNG per (variant, method),
    pooling the test cells of the first seed's folds. ``y``: the labels the test indices refer to."""
    check_same_splits(records)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(records)
    table = markdown_table(summary)
    header = f"# Benchmark: protocol {info.get('protocol')} on {info.get('data')}\n\n"
    (out / "results.md").write_text(header + table + "\n", encoding="utf-8")
    (out / "per_class_f1.csv").write_text(per_class_table(summary), encoding="utf-8")
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps({"info": info, "summary": summary, "runs": list(records)}, indent=1, default=_json_default), encoding="utf-8")
    tmp.replace(out / "results.json")
    if y is not None:
        y = np.asarray(y).astype(str)
        for r in summary:
            rs = [x for x in records if x["variant"] == r["variant"] and x["method"] == r["method"] and x["seed"] == r["seeds"][0]]
            idx = np.concatenate([x["test_index"] for x in rs]).astype(int)
            pred = np.concatenate([np.asarray(x["y_pred"], dtype=str) for x in rs])
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{r['variant']}_{r['method']}")
            plot_confusion(y[idx], pred, out / f"confusion_{safe}.png",
                           f"{r['method']} ({r['variant']}, seed {r['seeds'][0]}): accuracy {r.get('accuracy', float('nan')):.3f}")
    return summary


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer | np.floating):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Split):
        return {k: v for k, v in asdict(o).items() if k not in ("train", "test")}
    raise TypeError(type(o))


def read_label_map(path: str | Path) -> dict[str, str]:
    """Two columns per line (tab or comma separated): a label as it appears in the data, and the
    name to use instead (e.g. a query's type name -> the reference's). Lines starting with # are skipped."""
    from data.io import InputError

    mapping: dict[str, str] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = [p.strip() for p in (line.split("\t") if "\t" in line else line.split(","))]
        if len(parts) != 2 or not all(parts):
            raise InputError(f"{path} line {n}: expected two columns (label in the data, label to use), got {line!r}")
        mapping[parts[0]] = parts[1]
    return mapping


def _labels(adata: Any, key: str, path: str) -> np.ndarray:
    from data.io import InputError

    if key not in adata.obs:
        raise InputError(f"--label-key {key!r} is not a column of {path}; available columns: {list(adata.obs.columns)}")
    return adata.obs[key].astype(object).where(adata.obs[key].notna(), None).to_numpy()


def load_labelled(paths: Sequence[str], label_key: str, genes: Sequence[str] | None, n_genes: int | None,
                  min_genes: int | None = 200) -> tuple[Any, np.ndarray, list[str]]:
    """Preprocess ``paths`` onto ``genes`` (or onto the ``n_genes`` most variable genes of the data),
    drop unlabelled cells; returns (AnnData, labels, genes)."""
    from model.pipeline import load_prepared

    adata, vocab = load_prepared(list(paths), genes, min_genes or None)
    if genes is None and n_genes and n_genes < len(vocab):
        vocab = select_genes(adata.X, vocab, n_genes)
        adata = adata[:, vocab].copy()
    y = _labels(adata, label_key, ", ".join(map(str, paths)))
    keep = np.array([v is not None for v in y])
    if not keep.all():
        log.warning("%d cells have no %s label and are left out", int((~keep).sum()), label_key)
        adata, y = adata[keep].copy(), y[keep]
    return adata, y.astype(str), list(vocab)


def run_from_args(args: Any) -> None:
    """What scripts/benchmark.py does once its arguments are parsed."""
    from data.io import InputError
    from data.vocab import load_vocab
    from model.baselines import PRESETS, method_factories
    from model.checkpoint import CheckpointError, load_checkpoint
    from model.cli import fail, start_run, write_json

    if args.merge:
        out = Path(args.out)
        if (out / "results.json").exists() and not args.overwrite:
            fail(f"{out} already holds results.json; pass --overwrite to replace it, or choose another --out")
        try:
            results = [json.loads((Path(d) / "results.json").read_text(encoding="utf-8")) for d in args.merge]
        except (OSError, ValueError) as e:
            fail(f"cannot read the results to merge: {e}")
        records = [r for res in results for r in res["runs"]]
        info = {**results[0]["info"], "merged_from": [str(d) for d in args.merge]}
        labels = results[0]["info"].get("labels")
        try:
            summary = write_report(out, records, np.asarray(labels) if labels else None, info)
        except ValueError as e:
            fail(str(e))
        print(markdown_table(summary))
        return

    if args.write_genes:
        try:
            genes = load_vocab(args.vocab) if args.vocab else None
            adata, _, genes = load_labelled(args.data, args.label_key, genes, args.n_genes, args.min_genes)
        except InputError as e:
            fail(str(e))
        Path(args.write_genes).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write_genes).write_text("\n".join(genes) + "\n", encoding="utf-8")
        print(f"wrote {len(genes)} genes ({adata.n_obs} labelled cells) to {args.write_genes}")
        return

    out = start_run(args.out, args, protected=("results.json",))
    import torch

    torch.set_num_threads(args.threads)
    try:
        pre = load_checkpoint(args.pretrained) if args.pretrained else None
        pre_nog2v = load_checkpoint(args.pretrained_nogene2vec) if args.pretrained_nogene2vec else None
        if pre is not None and pre_nog2v is not None and pre.genes != pre_nog2v.genes:
            raise InputError("--pretrained and --pretrained-nogene2vec have different gene vocabularies; pretrain both on the same genes")
        genes = pre.genes if pre else (pre_nog2v.genes if pre_nog2v else (load_vocab(args.vocab) if args.vocab else None))
        adata, y, genes = load_labelled(args.data, args.label_key, genes, args.n_genes, args.min_genes)
        label_map = read_label_map(args.label_map) if args.label_map else {}
        seeds = list(args.seeds)
        X = adata.X
        if args.protocol == "cross":
            if args.test_data:
                test, y_test, _ = load_labelled(args.test_data, args.label_key, genes, None, args.min_genes)
                train_mask = np.r_[np.ones(len(y), bool), np.zeros(len(y_test), bool)]
                X, y = sparse.vstack([sparse.csr_matrix(X), sparse.csr_matrix(test.X)], format="csr"), np.r_[y, y_test]
                variant = f"{'+'.join(Path(p).stem for p in args.data)} -> {'+'.join(Path(p).stem for p in args.test_data)}"
            elif args.split_key:
                if args.split_key not in adata.obs:
                    raise InputError(f"--split-key {args.split_key!r} is not a column of the data; available: {list(adata.obs.columns)}")
                group = adata.obs[args.split_key].astype(str).to_numpy()
                for vals in (args.train_values, args.test_values):
                    bad = sorted(set(vals) - set(group))
                    if bad:
                        raise InputError(f"{args.split_key} has no value {bad}; available: {sorted(set(group))}")
                train_mask = np.isin(group, args.train_values)
                variant = f"{args.split_key}: {'+'.join(args.train_values)} -> {'+'.join(args.test_values)}"
            else:
                raise InputError("the cross protocol needs --test-data FILE, or --split-key with --train-values and --test-values")
            y = np.array([label_map.get(v, v) for v in y])
            test_mask = ~train_mask if args.test_data else np.isin(group, args.test_values)
            splits = cross_splits(train_mask, test_mask, seeds, variant)
        else:
            y = np.array([label_map.get(v, v) for v in y])
            if args.protocol == "cv":
                splits = cv_splits(y, args.folds, seeds)
            elif args.protocol == "novel":
                if not args.hold_out:
                    raise InputError("the novel protocol needs --hold-out TYPE [TYPE ...]: the cell types to leave out of training")
                splits = novel_splits(y, args.hold_out, args.folds, seeds)
            elif args.protocol == "imbalance":
                if not args.subsample:
                    raise InputError("the imbalance protocol needs --subsample TYPE=N [TYPE=N ...]")
                sizes = {}
                for item in args.subsample:
                    t, _, n = item.rpartition("=")
                    if not t or not n.isdigit():
                        raise InputError(f"--subsample expects TYPE=N (e.g. 'CD14+ Mono=20'), got {item!r}")
                    sizes[t] = int(n)
                splits = imbalance_splits(y, sizes, args.folds, seeds)
            else:
                splits = fewshot_splits(y, args.fractions, args.folds, seeds)
        overrides = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "patience": args.patience,
                     "weight_decay": args.weight_decay, "select": args.select}
        dropout = PRESETS[args.preset].get("dropout", 0.0) if args.dropout is None else args.dropout
        methods = method_factories(args.methods, pre, pre_nog2v, args.preset, overrides, args.train_all, args.device,
                                   head_only=args.head_only, head_init=args.head_init, dropout=dropout,
                                   class_weights=args.class_weights)
        if "celltypist" in args.methods:
            import importlib.util

            if importlib.util.find_spec("celltypist") is None:
                raise InputError("method celltypist needs the celltypist package: pip install -e '.[bench]' (or leave it out of --methods)")
        log.info("%s: %d cells x %d genes, %d types; %d splits x %d methods", args.protocol, X.shape[0], len(genes), len(set(y)), len(splits), len(methods))
        threshold = args.threshold if args.protocol == "novel" else None
        records = run_benchmark(X, y, genes, splits, methods, threshold, progress=not args.quiet)
        info = {"protocol": args.protocol, "data": [str(p) for p in args.data] + [str(p) for p in (args.test_data or [])],
                "label_key": args.label_key, "n_cells": int(X.shape[0]), "n_genes": len(genes), "seeds": seeds,
                "folds": args.folds, "threshold": threshold, "preset": args.preset,
                "scbert_finetuning": {"train_all": args.train_all, "head_only": args.head_only, "head_init": args.head_init,
                                      "class_weights": args.class_weights,
                                      "dropout": dropout, **{k: v for k, v in overrides.items() if v is not None}}, "pretrained": args.pretrained,
                "pretrained_nogene2vec": args.pretrained_nogene2vec, "methods": list(args.methods), "labels": y.tolist(),
                "splits": [{"key": s.key, "fingerprint": s.fingerprint(), "n_train": len(s.train), "n_test": len(s.test)} for s in splits]}
        write_json(out / "genes.json", genes)
        summary = write_report(out, records, y, info)
    except (InputError, CheckpointError, ValueError, ImportError) as e:
        fail(str(e))
    print(markdown_table(summary))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'per_class_f1.csv'} and confusion_*.png")
