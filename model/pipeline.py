"""The steps the stage scripts are made of, usable from Python: AnnData in, AnnData out."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import torch
from scipy import sparse

from data.dataset import CellDataset
from data.gene2vec import embeddings_for_vocab, read_npy_embeddings, read_word2vec_text, train_gene2vec
from data.io import InputError, read_cells
from data.preprocess import PREP_KEY, prepare
from model.checkpoint import Checkpoint, load_checkpoint
from model.fast import prepare_for_speed, tune_allocator
from model.training import autocast, make_loader, predict

log = logging.getLogger("scbert")

UNASSIGNED = "Unassigned"
REPORT_KEY = "annotation"  # uns[f"{key_added}_{REPORT_KEY}"]: JSON of the preprocessing report and settings


def load_prepared(paths: Sequence[str | Path], genes: Sequence[str] | None = None, min_genes: int | None = 200) -> tuple[ad.AnnData, list[str]]:
    """Read one or more files and preprocess them onto one vocabulary: ``genes``, or else the
    first file's genes. Files already written by preprocess.py are not normalised again."""
    parts: list[ad.AnnData] = []
    for path in paths:
        raw = read_cells(path)
        adata, rep = prepare(raw, genes=genes, min_genes=None if PREP_KEY in raw.uns else min_genes, what=str(path))
        for line in rep.lines(with_warnings=False):
            log.info("%s: %s", Path(path).name, line)
        if genes is None:
            genes = list(adata.var_names)
        parts.append(adata)
    assert genes is not None
    if len(parts) == 1:
        return parts[0], list(genes)
    X = sparse.vstack([p.X for p in parts], format="csr")
    obs = ad.concat([ad.AnnData(obs=p.obs) for p in parts], join="outer", label="source_file",
                    keys=[Path(p).name for p in paths], index_unique="-").obs
    out = ad.AnnData(X=X, obs=obs)
    out.var_names = list(genes)
    return out, list(genes)


def gene_embedding(spec: str, genes_path: str | None, vocab: Sequence[str], X: sparse.csr_matrix, dim: int,
                   seed: int = 0, progress: bool = True) -> tuple[str, torch.Tensor | None, dict[str, Any]]:
    """Resolve ``--gene2vec``: returns the config's gene_embedding mode, the (n_genes, dim) vectors
    (or None) and a report. ``spec`` is train, none, learned, or a path."""
    if spec in ("none", "learned"):
        return spec, None, {"source": spec}
    if spec == "train":
        mat, rep = train_gene2vec(X, list(vocab), dim, seed=seed, progress=progress)
    else:
        path = Path(spec)
        if not path.is_file():
            raise InputError(f"--gene2vec {spec}: no such file (use train, none, learned, or a path)")
        if path.suffix == ".npy":
            if genes_path is None:
                raise InputError(f"--gene2vec {spec} is a .npy matrix without gene names: give its gene list with --gene2vec-genes")
            names, mat = read_npy_embeddings(path, genes_path)
            source = f"npy:{path.name}"
        else:
            names, mat = read_word2vec_text(path)
            source = f"file:{path.name}"
        if mat.shape[1] != dim:
            raise InputError(f"the gene2vec vectors in {path} have {mat.shape[1]} dimensions but the model has --dim {dim}; set --dim {mat.shape[1]}")
        mat, rep = embeddings_for_vocab(list(vocab), names, mat, source=source, seed=seed)
    log.info("gene2vec: %s", rep.summary())
    return "gene2vec", torch.from_numpy(np.asarray(mat, dtype=np.float32)), rep.to_dict()


def check_labels(y: Sequence[str], key: str, cv: int | None = None, val_frac: float = 0.2) -> tuple[list[str], dict[str, int]]:
    """Classes and their cell counts, or an InputError when the labels cannot train a classifier
    with the requested split (``cv`` folds, or a validation fraction ``val_frac``)."""
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


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy, macro-F1 and the per-class report of sklearn."""
    from sklearn.metrics import accuracy_score, classification_report, f1_score

    labels = sorted(set(y_true)) if classes is None else list(classes)
    return {
        "n_cells": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=sorted(set(y_true)), average="macro", zero_division=0)),
        "per_class": classification_report(y_true, y_pred, labels=labels, output_dict=True, zero_division=0),
    }


def plot_confusion(y_true: Sequence[str], y_pred: Sequence[str], path: Path, title: str = "") -> None:
    """Row-normalised confusion matrix (true types as rows) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    rows = sorted(set(y_true))
    cols = rows + sorted(set(y_pred) - set(rows))
    cm = confusion_matrix(y_true, y_pred, labels=cols)[: len(rows)]
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(cols), 1.0 + 0.5 * len(rows)))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, label="fraction of true type")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_history(history: list[dict[str, float]], keys: Sequence[str], path: Path, title: str = "") -> None:
    """Training curves (one panel per key) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if history and k in history[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    epochs = [h["epoch"] for h in history]
    for ax, k in zip(axes[0], keys):
        ax.plot(epochs, [h[k] for h in history], marker="o", ms=3)
        ax.set_xlabel("epoch")
        ax.set_title(k.replace("_", " "), fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def annotate(
    adata: ad.AnnData,
    model: str | Path | Checkpoint,
    threshold: float = 0.5,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    key_added: str = "scbert",
    pooling: str = "mean",
    progress: bool = True,
    num_workers: int = 0,
    compile_model: bool = False,
    species: str = "auto",
) -> tuple[ad.AnnData, dict[str, Any]]:
    """Annotate cells with a fine-tuned checkpoint. Accepts raw counts or log-normalised values;
    keeps every cell in its order. Adds ``obs[f'{key_added}_celltype']`` (``Unassigned`` below
    ``threshold``), ``obs[f'{key_added}_confidence']``, ``obsm[f'{key_added}_probabilities']`` and
    ``obsm[f'X_{key_added}']`` (cell embeddings) to a copy of ``adata``, which is returned with the
    preprocessing report."""
    ckpt = model if isinstance(model, Checkpoint) else load_checkpoint(model)
    if ckpt.config.head != "classifier" or not ckpt.classes:
        raise InputError(f"{ckpt.source or 'the model'} is a pretrained (not fine-tuned) model: it cannot name cell types; fine-tune it with finetune.py first")
    prepared, rep = prepare(adata, genes=ckpt.genes, min_genes=None, target_sum=ckpt.preprocessing.get("target_sum", 1e4), what="the query",
                            species=species)
    ds = CellDataset(prepared.X, ckpt.config.bin_num)
    net = ckpt.build_model()
    tune_allocator()
    probs, emb = predict(net, ds, batch_size, torch.device(device), precision, embed=True, pooling=pooling, progress=progress,
                         num_workers=num_workers, compile_model=compile_model)
    classes = np.asarray(ckpt.classes, dtype=object)
    conf = probs.max(axis=1)
    labels = np.where(conf >= threshold, classes[probs.argmax(axis=1)], UNASSIGNED)
    out = adata.copy()
    out.obs[f"{key_added}_celltype"] = labels.astype(str)
    out.obs[f"{key_added}_confidence"] = conf.astype(np.float32)
    out.obsm[f"{key_added}_probabilities"] = probs.astype(np.float32)
    out.obsm[f"X_{key_added}"] = emb.astype(np.float32)
    out.uns[f"{key_added}_classes"] = list(ckpt.classes)
    out.uns[f"{key_added}_threshold"] = float(threshold)
    out.uns[f"{key_added}_{REPORT_KEY}"] = json.dumps({"model": ckpt.source, "preprocessing": rep.to_dict()}, default=str)
    return out, rep.to_dict()


def embed_cells(
    adata: ad.AnnData,
    model: str | Path | Checkpoint,
    pooling: str = "mean",
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    progress: bool = True,
    species: str = "auto",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Cell embeddings (cells x dim, in order, every cell kept) from any of our checkpoints,
    pretrained or fine-tuned; raw counts or log-normalised input. Returns them with the
    preprocessing report."""
    from tqdm.auto import tqdm

    from model.scbert import pool_encodings

    ckpt = model if isinstance(model, Checkpoint) else load_checkpoint(model)
    prepared, rep = prepare(adata, genes=ckpt.genes, min_genes=None, target_sum=ckpt.preprocessing.get("target_sum", 1e4), what="the cells", species=species)
    ds = CellDataset(prepared.X, ckpt.config.bin_num)
    device = torch.device(device)
    net = prepare_for_speed(ckpt.build_model()).to(device)
    tune_allocator()
    out = []
    bar = tqdm(total=len(ds), desc="embed", unit="cell", disable=not progress, leave=False)
    with torch.no_grad():
        for batch in make_loader(ds, batch_size, False, 0):
            tokens = batch["tokens"].to(device)
            with autocast(device, precision):
                out.append(pool_encodings(net.encode(tokens), tokens, pooling).cpu())
            bar.update(len(tokens))
    bar.close()
    return torch.cat(out).numpy(), rep.to_dict()


def prediction_report(annotated: ad.AnnData, classes: Sequence[str], threshold: float, label_key: str | None,
                      folder: Path | None = None, key_added: str = "scbert") -> tuple[dict[str, Any], list[str]]:
    """Metrics and readable lines about an annotation; with ``folder``, also its plots
    (``predictions.png``; ``confusion_matrix.png`` when ``label_key`` holds known labels)."""
    pred = annotated.obs[f"{key_added}_celltype"].astype(str).to_numpy()
    conf = annotated.obs[f"{key_added}_confidence"].to_numpy(dtype=float)
    n_un = int((pred == UNASSIGNED).sum())
    types = sorted(set(pred), key=lambda t: (t == UNASSIGNED, t))
    metrics: dict[str, Any] = {
        "n_cells": int(len(pred)), "n_unassigned": n_un, "threshold": float(threshold),
        "predicted_counts": {t: int((pred == t).sum()) for t in types},
        "mean_confidence": {t: float(conf[pred == t].mean()) for t in types},
    }
    lines = [f"{len(pred)} cells annotated, {n_un} Unassigned (confidence < {threshold:.2f}); "
             + ", ".join(f"{t} {c}" for t, c in metrics["predicted_counts"].items())]
    truth = None
    if label_key:
        col = annotated.obs[label_key]
        ok = col.notna().to_numpy()
        if not ok.any():
            log.warning("WARNING: no cell has a label in column %r: accuracy is not computed", label_key)
        else:
            truth = col[ok].astype(str).to_numpy()
            m = classification_metrics(truth, pred[ok])
            metrics.update(accuracy=m["accuracy"], macro_f1=m["macro_f1"], n_labelled=int(ok.sum()), per_class=m["per_class"])
            lines.append(f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  on {int(ok.sum())} labelled cells "
                         f"(Unassigned counts as wrong; {n_un} Unassigned)")
            unknown = sorted(set(truth) - set(classes))
            if unknown:
                metrics["unknown_types"] = unknown
                lines.append(f"note: the query has cell types the model was not trained on: {unknown}")
    if folder is not None:
        plot_predictions(pred, conf, threshold, folder / "predictions.png")
        if truth is not None:
            plot_confusion(truth, pred[ok], folder / "confusion_matrix.png",
                           f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
    return metrics, lines


def plot_predictions(pred: np.ndarray, conf: np.ndarray, threshold: float, path: Path) -> None:
    """Cells per predicted type, and the distribution of confidences with the threshold, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = sorted(set(pred), key=lambda t: (t == UNASSIGNED, t))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].barh(types[::-1], [int((pred == t).sum()) for t in types[::-1]], color="tab:blue")
    axes[0].set_xlabel("cells")
    axes[0].set_title("predicted cell types", fontsize=10)
    axes[0].tick_params(axis="y", labelsize=8)
    axes[1].hist(conf, bins=np.linspace(0, 1, 41), color="tab:gray")
    axes[1].axvline(threshold, color="tab:red", ls="--", label=f"threshold {threshold:.2f}")
    axes[1].set_xlabel("confidence (top class probability)")
    axes[1].set_ylabel("cells")
    axes[1].legend(fontsize=8)
    axes[1].set_title("confidence", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

