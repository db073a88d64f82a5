"""Stage 2, fine-tuning a cell-type classifier: the objective with early stopping, class weights,
and the whole stage from labelled cells to a saved classifier, on one split or K folds
(:func:`run_finetuning`)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import sparse
from torch import nn

from data.dataset import CellDataset, is_row_source
from data.io import InputError
from data.labels import holdout_per_class, stratified_folds, stratified_holdout
from data.preprocess import DEFAULT_PREPROCESSING
from model import distributed
from model.checkpoint import Checkpoint, save_checkpoint
from model.evaluation import classification_metrics, macro_f1
from model.inference import InferenceOptions, predict_distributed, predict_outputs
from model.nn.config import ExecutionOptions, ModelSize
from model.nn.network import ScBERT
from model.novelty.calibration import MAX_CALIBRATION_CELLS, calibrate
from model.novelty.record import NoveltyRecord, output_scores
from model.novelty.scores import MAX_REFERENCE_CELLS
from model.recheck import PRECISION_CHECK_CELLS, measure_precision_error
from model.runtime import set_seed
from model.train.config import TrainConfig
from model.train.encoding_cache import EncodedCells, can_store_encodings, encode_dataset, head_probabilities
from model.train.initialisation import HEAD_INITS, freezing_policy, gene_embedding, init_head_from_expression, new_classifier
from model.train.loop import fit

log = logging.getLogger("scbert")


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Loss weights ``n / (n_classes * count)`` per class id 0..n_classes-1 (sklearn's "balanced")."""
    from sklearn.utils.class_weight import compute_class_weight

    if len(np.unique(labels)) != n_classes:
        raise ValueError("every cell type must occur in the training part to weight the classes")
    return torch.tensor(compute_class_weight("balanced", classes=np.arange(n_classes), y=labels), dtype=torch.float32)


def finetune(
    model: ScBERT,
    train: CellDataset,
    val: CellDataset,
    cfg: TrainConfig,
    device: torch.device,
    class_weights: torch.Tensor | None = None,
    desc: str = "finetune",
    on_epoch: Callable[[int, dict[str, float], bool], None] | None = None,
    head_init: str = "expression",
    head_init_cells: int = 64,
    encodings: tuple[EncodedCells, EncodedCells] | None = None,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Supervised fine-tuning with early stopping on the validation score ``cfg.select_metric``
    (accuracy or macro-F1), the logit-adjusted loss with ``cfg.logit_adjust`` and, with fewer than
    ``cfg.fixed_budget_below`` validation cells, the whole budget and the last epoch. The model
    ends holding the kept weights; returns the kept epoch's metrics and the history.
    ``head_init="expression"`` first points the head's conv1 at the expression read-out of the
    encodings of ``head_init_cells`` training cells (:func:`init_head_from_expression`);
    ``"random"`` keeps the published random start. Under torchrun every rank calls it and the
    validation cells are shared among the ranks (DDP then starts every rank from rank 0's head).
    ``encodings``: the stored encodings of ``train`` and ``val`` when the caller already has them
    (a head-only model; the development scripts encode a file once for many heads)."""
    model.to(device)
    if head_init == "expression":  # (a resumed run then restores its own weights over it)
        r2 = init_head_from_expression(model, train, device, head_init_cells, seed=cfg.seed)
        log.info("%s: classifier conv1 set to the read-out of expression from the encodings (R^2 %.3f on %d cells)",
                 desc, r2, min(head_init_cells, len(train)))
    elif head_init not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
    weights = None if class_weights is None else class_weights.to(device)
    adjust = cfg.logit_adjust * torch.log(class_prior(train.labels.numpy(), model.config.n_classes)).to(device) if cfg.logit_adjust else None
    if cfg.fixed_budget_below and len(val) < cfg.fixed_budget_below:
        log.info("%s: %d validation cells are too few to choose an epoch: the whole budget is trained and the last epoch kept", desc, len(val))
        cfg = dataclasses.replace(cfg, patience=0, select="last")

    options = InferenceOptions(cfg.batch_size, device, cfg.num_workers, progress=cfg.progress)
    stored = encodings is not None or can_store_encodings(model, len(train) + len(val))
    if encodings is not None:
        if not getattr(model, "frozen_encoder", False):
            raise ValueError("stored encodings need a head-only model (a frozen encoder)")
        train_cells, val_cells = encodings
    elif stored:  # the frozen encoder gives the same encodings every epoch: computed once, the head trains on them
        train_cells, val_cells = encode_dataset(model, train, options, "encoding training cells"), encode_dataset(model, val, options, "encoding validation cells")

    def step_loss(net: nn.Module, batch: dict[str, torch.Tensor], epoch: int) -> tuple[torch.Tensor, float]:
        with model.autocast():
            logits = model.to_out(batch["encodings"].to(device)) if "encodings" in batch else net(batch["tokens"].to(device))
        labels = batch["labels"].to(device)
        if adjust is not None:  # training sees the prior in the logits, so the learned scores are balanced
            logits = logits.float() + adjust
        losses = nn.functional.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=cfg.label_smoothing)
        if weights is None:
            return losses.sum(), float(len(labels))
        w = weights[labels]  # as CrossEntropyLoss(weight): sum of w_i * loss_i over sum of w_i
        return (losses * w).sum(), float(w.sum())

    def evaluate() -> dict[str, float]:
        if len(val) == 0:
            return {"val_loss": float("nan"), "val_accuracy": float("nan"), "val_macro_f1": float("nan")}
        probs = (head_probabilities(model, val_cells, cfg.batch_size, device) if stored
                 else predict_distributed(model, val, options))
        y = val.labels.numpy()
        val_loss = float(nn.functional.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)), torch.from_numpy(y)))
        return {"val_loss": val_loss, "val_accuracy": float((probs.argmax(1) == y).mean()), "val_macro_f1": macro_f1(y, probs.argmax(1))}

    def log_epoch(epoch: int, metrics: dict[str, float], improved: bool) -> None:
        log.info("%s epoch %d: train loss %.4f, val loss %.4f, val accuracy %.4f, val macro-F1 %.4f", desc, epoch + 1,
                 metrics["train_loss"], metrics["val_loss"], metrics["val_accuracy"], metrics["val_macro_f1"])
        if on_epoch is not None:
            on_epoch(epoch, metrics, improved)

    return fit(model, train_cells if stored else train, cfg, device, step_loss, evaluate, f"val_{cfg.select_metric}", desc, log_epoch)


def class_prior(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Each class's share of the training cells (a class without cells counts as one cell, so its
    log stays finite)."""
    counts = np.maximum(np.bincount(labels, minlength=n_classes), 1).astype(np.float64)
    return torch.tensor(counts / counts.sum(), dtype=torch.float32)


def stopping_split(y: np.ndarray, frac: float, seed: int, keep_rare: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) cells of a part whose validation cells only choose the epoch: a
    ``frac`` of each type, but a type with fewer than ``keep_rare`` cells keeps them all for
    training (when every type is that rare, each gives up one cell as before)."""
    tr, va = holdout_per_class(y, frac, seed, keep_below=keep_rare)
    return (tr, va) if len(va) else holdout_per_class(y, frac, seed)


# --------------------------------------------------------------------------------------------
# An ensemble of heads on one frozen encoder
# --------------------------------------------------------------------------------------------

HEAD_SEED_STEP = 1000  # head j's stopping split, start and shuffling use seed + 1000 j


def head_splits(first: tuple[np.ndarray, np.ndarray], y: np.ndarray, members: int, val_frac: float, seed: int,
                keep_rare: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each head's (training, stopping) cells, positions into ``y``: the first head's is ``first``,
    the run's own split (its stopping cells also calibrate the novelty thresholds, which read the
    first head alone); head j draws :func:`stopping_split` of the same cells with seed
    ``seed + 1000 j``, so the heads together learn from every cell."""
    cells = np.sort(np.concatenate(first))
    return [first, *((cells[f], cells[v]) for f, v in (stopping_split(y[cells], val_frac, seed + HEAD_SEED_STEP * j, keep_rare)
                                                         for j in range(1, members)))]


def finetune_heads(build: Callable[[int], ScBERT], X: Any, y: np.ndarray, heads: list[tuple[np.ndarray, np.ndarray]], cfg: TrainConfig,
                   device: torch.device, *, weights: Callable[[np.ndarray], torch.Tensor | None] | None = None, desc: str = "finetune",
                   head_init: str = "expression", encodings: torch.Tensor | None = None,
                   seed: int | None = None) -> tuple[ScBERT, list[dict[str, Any]], list[list[dict[str, float]]]]:
    """One head per (training, stopping) split of ``heads`` (positions in ``X`` and its class ids
    ``y``; :func:`head_splits`), each trained alone by :func:`finetune` on the frozen encoder of
    ``build(1)`` (a head-only model), joined into ``build(len(heads))``'s
    :class:`~model.nn.network.ClassifierEnsemble`. Head j is built after ``set_seed(seed + 1000 j)``
    (``seed``: ``cfg.seed`` when None) and trained with ``cfg.seed + 1000 j``, so the first head is
    the one a one-head run gives (its training states in the run's own folders; head j's in
    ``headJ/``). The encodings are computed once for every head when they fit in memory
    (``encodings``: those of every cell of ``X``, when the caller has them). Returns the model, each
    head's kept-epoch metrics and history."""
    start = cfg.seed if seed is None else seed
    set_seed(start)
    first = build(1)  # head 1 itself: encoding the cells below leaves the global random state as it was
    if not getattr(first, "frozen_encoder", False):
        raise ValueError("an ensemble of heads needs a head-only model: the heads share one frozen encoder")
    bins = first.config.bin_num
    rows = np.unique(np.concatenate([np.concatenate(h) for h in heads]))
    stored, where = encodings, np.arange(len(y))
    if stored is None and can_store_encodings(first, len(rows)):
        first.to(device)
        options = InferenceOptions(cfg.batch_size, device, cfg.num_workers, progress=cfg.progress)
        stored = encode_dataset(first, CellDataset(rows_of(X, rows), bins), options, "encoding the cells once for every head").encodings
        where = np.full(len(y), -1)
        where[rows] = np.arange(len(rows))
    if stored is None and len(heads) > 1:  # each head runs the encoder itself: say what that costs, and the way out
        log.info("%s: the %d heads each run the frozen encoder every epoch (about %d times the encoder work of one head); "
                 "--ensemble 1 trains one head", desc, len(heads), len(heads))
    bests, histories, states = [], [], []
    for j, (train, val) in enumerate(heads):
        if j:
            set_seed(start + HEAD_SEED_STEP * j)
        model = first if j == 0 else build(1)  # (after the seed: head j starts as a run of its own with that seed would)
        head_cfg = cfg if j == 0 else dataclasses.replace(cfg.for_part(f"head{j + 1}"), seed=cfg.seed + HEAD_SEED_STEP * j)
        cells = None if stored is None else (EncodedCells(stored, torch.as_tensor(y[train]), where[train]),
                                             EncodedCells(stored, torch.as_tensor(y[val]), where[val]))
        best, history = finetune(model, CellDataset(rows_of(X, train), bins, y[train]), CellDataset(rows_of(X, val), bins, y[val]), head_cfg,
                                 device, None if weights is None else weights(y[train]), f"{desc} head {j + 1}/{len(heads)}",
                                 head_init=head_init, encodings=cells)
        bests.append(best)
        histories.append(history)
        states.append({k: v.detach().clone() for k, v in model.to_out.state_dict().items()})
    ensemble = build(len(heads))
    ensemble.load_encoder_state(first.state_dict())
    for member, state in zip(ensemble.to_out.members, states, strict=True):
        member.load_state_dict(state)
    return ensemble.to(device), bests, histories


# --------------------------------------------------------------------------------------------
# The stage: labelled cells -> classifier
# --------------------------------------------------------------------------------------------


@dataclass
class FinetuningSettings:
    """Everything :func:`run_finetuning` needs besides the cells and the pretrained checkpoint."""

    size: ModelSize = field(default_factory=ModelSize)  # from scratch only (a pretrained model keeps its size)
    gene2vec: str = "train"  # from scratch only: see model.train.initialisation.gene_embedding
    gene2vec_genes: str | None = None
    cv: int | None = None  # K folds instead of one split
    val_frac: float = 0.2
    dropout: float = 0.0  # classifier head
    class_weights: bool = False
    train_all: bool = False
    head_only: bool = False
    head_init: str = "expression"
    keep_rare: int = 0  # types with fewer cells keep them all for training (0: each gives up its share to validation, as published)
    redraw_features: bool = True  # False: the pretrained FAVOR+ random features are kept (no redraw every 1,000 steps)
    ensemble: int = 1  # classifier heads, each on its own stopping split, their logits averaged (finetune_heads)
    reject_rate: float = 0.05  # novelty thresholds reject this fraction of the validation cells (known types)
    precision_check_cells: int = PRECISION_CHECK_CELLS  # validation cells on which the bf16 error is measured, for predict's fp32 re-check (0: none)
    recipe: str = "ours"
    train: TrainConfig = field(default_factory=TrainConfig)
    options: ExecutionOptions = field(default_factory=ExecutionOptions)
    preprocessing: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_PREPROCESSING))  # how the cells were normalised

    def record(self, data: list[str], label_key: str, pretrained: str | None) -> dict[str, Any]:
        """The checkpoint's ``training`` dict (see :mod:`model.checkpoint.format`)."""
        o = self.options
        rec: dict[str, Any] = {
            "stage": "finetune", "data": data, "recipe": self.recipe,
            "finetuning": {"label_key": label_key, "pretrained": pretrained, "cv": self.cv, "val_frac": self.val_frac,
                           "dropout": self.dropout, "class_weights": self.class_weights,
                           "trained_layers": freezing_policy(pretrained is not None, self.train_all, self.head_only),
                           "head_init": self.head_init, "keep_rare": self.keep_rare, "redraw_features": self.redraw_features,
                           "ensemble": self.ensemble},
            "optimisation": self.train.optimisation(),
            "execution": {"precision": o.precision, "grad_checkpointing": o.grad_checkpointing, "compile": o.compile},
            "world_size": distributed.current().world_size,
        }
        if pretrained is None:
            rec["model_size"] = dataclasses.asdict(self.size)
            rec["gene2vec"] = {"spec": self.gene2vec, "genes": self.gene2vec_genes}
        return rec


@dataclass
class FoldResult:
    """One split. With cross-validation: the metrics on the fold's test cells, which neither trained
    the model nor chose its epoch (``inner_val_accuracy``: the best accuracy on the inner validation
    cells that chose it); on one split: the metrics on the validation cells, which also chose the
    epoch. With ``best_epoch``, ``n_train``, ``n_val``, ``n_test`` and ``history``, and the true and
    predicted labels of the scored cells."""

    name: str
    metrics: dict[str, Any]
    y_true: np.ndarray
    y_pred: np.ndarray
    history: list[dict[str, float]] | list[list[dict[str, float]]]  # an ensemble: one per head


CV_METRICS_MEANING = {
    "accuracy": "mean over the folds of the accuracy on each fold's test cells (never trained on, never used to choose an epoch "
                "or the kept model: early stopping used an inner validation part of the fold's training cells)",
    "macro_f1": "the same for macro-F1 (over the test cells' true labels)",
    "model_fold": "the fold whose model is model.pt: the highest inner validation score of the recipe's select_metric (test cells not looked at)",
}
SPLIT_METRICS_MEANING = {
    "accuracy": "accuracy on the validation cells, which also chose the best epoch (early stopping): an optimistic estimate; "
                "--cv K reports accuracy on test cells that played no part in training",
}
ENSEMBLE_SPLIT_METRICS_MEANING = {
    "accuracy": "accuracy of the first head alone on the validation cells, which chose its epoch (the other heads trained on some "
                "of them, so the ensemble is not scored here); --cv K reports the ensemble's accuracy on test cells no head saw",
    "head_epochs": "the epoch each head kept, each chosen on its own stopping split of the cells (the first head's is best_epoch)",
}


@dataclass
class FinetuningResult:
    model: ScBERT  # the kept model: the only one, or the fold with the highest inner validation score
    classes: list[str]
    folds: list[FoldResult]
    kept_fold: int  # 0-based
    metrics: dict[str, Any]  # what metrics.json holds
    cv: int | None = None

    def summary_lines(self) -> list[str]:
        m = self.metrics
        if self.cv:
            n = sum(f.metrics["n_test"] for f in self.folds)
            return [f"{self.cv}-fold cross-validation on {n} cells: accuracy {m['accuracy']:.4f} ± {m['accuracy_sd']:.4f}, "
                    f"macro-F1 {m['macro_f1']:.4f} ± {m['macro_f1_sd']:.4f} on each fold's test cells (early stopping on an inner "
                    f"validation part of its training cells)",
                    f"model.pt is the model of fold {self.kept_fold + 1} (highest inner validation score)"]
        if "head_epochs" in m:
            return [f"validation ({self.folds[0].metrics['n_val']} cells): accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f} "
                    f"of the first of {m['heads']} heads (best epoch {m['best_epoch']}; these cells also chose it; the others kept epochs "
                    f"{', '.join(map(str, m['head_epochs'][1:]))} on their own splits and trained on some of these cells: --cv K scores "
                    f"the ensemble)"]
        return [f"validation ({self.folds[0].metrics['n_val']} cells): accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f} "
                f"(best epoch {m['best_epoch']}; these cells also chose it)"]


GENE2VEC_CELLS = 50_000  # cells of an on-disk training set sampled for gene2vec, as pretrain.py --gene2vec-cells


def rows_of(X: Any, rows: np.ndarray) -> Any:
    """Cells ``rows`` of an in-memory matrix, or a view of an on-disk one (read a batch at a time)."""
    return X.subset(rows) if is_row_source(X) else X[rows]


def _gene2vec_cells(X: Any, rows: np.ndarray, seed: int) -> Any:
    """The training cells gene2vec learns from: all of them in memory; a seeded sample on disk."""
    return X.subset(rows).sample(GENE2VEC_CELLS, seed) if is_row_source(X) else X[rows]


def _train_part(s: FinetuningSettings, base: Any, vectors: torch.Tensor | None, pretrained: Checkpoint | None, n_classes: int, X: Any,
                y: np.ndarray, split: tuple[np.ndarray, np.ndarray], cfg: TrainConfig, device: torch.device, name: str,
                seed: int) -> tuple[ScBERT, list[dict[str, Any]], list[list[dict[str, float]]]]:
    """The model of one part of a run, trained on ``split`` (training, validation cells): one head,
    or ``s.ensemble`` heads of which the first has that split. Returns it, each head's kept-epoch
    metrics and history."""
    set_seed(seed)

    def build(members: int) -> ScBERT:
        return new_classifier(base, n_classes, s.dropout, pretrained=pretrained, gene_vectors=vectors, train_all=s.train_all,
                              head_only=s.head_only, options=s.options, redraw_features=s.redraw_features, members=members)

    def class_weights(labels: np.ndarray) -> torch.Tensor | None:
        if not s.class_weights:
            return None
        try:
            return balanced_class_weights(labels, n_classes)
        except ValueError as e:
            raise InputError(str(e)) from None

    if s.ensemble > 1:
        heads = head_splits(split, y, s.ensemble, s.val_frac, seed, s.keep_rare)
        return finetune_heads(build, X, y, heads, cfg, device, weights=class_weights, desc=name, head_init=s.head_init, seed=seed)
    model = build(1)
    tr, va = split
    best, history = finetune(model, CellDataset(rows_of(X, tr), model.config.bin_num, y[tr]), CellDataset(rows_of(X, va), model.config.bin_num, y[va]),
                             cfg, device, class_weights(y[tr]), name, head_init=s.head_init)
    return model, [best], [history]


def run_finetuning(X: sparse.csr_matrix, labels: Sequence[str], classes: list[str], genes: list[str], settings: FinetuningSettings,
                   device: torch.device, pretrained: Checkpoint | None = None, out: Path | None = None,
                   record: dict[str, Any] | None = None, progress: bool = True) -> FinetuningResult:
    """Fine-tune a classifier of ``classes`` on the cells ``X`` (on ``genes``) labelled ``labels``:
    from ``pretrained`` (its encoder and the freezing policy of ``settings``) or from scratch
    (gene2vec computed from the training cells only), on one stratified split (validation fraction
    ``val_frac``, which chooses the epoch and is scored) or on ``cv`` folds (each fold's test cells
    are scored; a ``val_frac`` of its training cells, per type, chooses the epoch). With ``out``, rank 0
    saves the kept model to ``out/model.pt`` (``record``: its ``training`` dict) and each fold's
    model to ``out/foldK/model.pt``. Every rank of a torchrun job calls it."""
    s = settings
    main = distributed.current().is_main
    y_str = np.asarray(labels).astype(str)
    y = np.array([classes.index(c) for c in y_str])
    ensemble = s.ensemble > 1
    if ensemble and not s.head_only:
        raise InputError(f"--ensemble {s.ensemble} trains heads on one frozen pretrained encoder: it needs --head-only (or --ensemble 1)")
    if s.cv:  # outer folds; each fold's training part is split again for early stopping
        splits = [(*stopping_split(y[tr], s.val_frac, s.train.seed + k, s.keep_rare), tr, te)
                  for k, (tr, te) in enumerate(stratified_folds(y, s.cv, s.train.seed))]
        splits = [(tr[fit], tr[va], te) for fit, va, tr, te in splits]
    else:
        rare = s.keep_rare and np.bincount(y).min() < s.keep_rare  # without rare types the split stays scikit-learn's
        fit_idx, val_idx = stopping_split(y, s.val_frac, s.train.seed, s.keep_rare) if rare else stratified_holdout(y, s.val_frac, s.train.seed)
        splits = [(fit_idx, val_idx, None)]

    folds: list[FoldResult] = []
    kept, kept_state, kept_score, kept_split = -1, None, -1.0, splits[0][:2]
    for k, (tr, va, te) in enumerate(splits):
        if pretrained is None:  # gene2vec sees only the cells the model is fitted on
            mode, vectors, g2v = gene_embedding(s.gene2vec, s.gene2vec_genes, genes, _gene2vec_cells(X, tr, s.train.seed), s.size.dim, s.train.seed, progress)
            base = s.size.config(len(genes), gene_embedding=mode)
        else:
            vectors, g2v, base = None, {"source": f"pretrained:{pretrained.source}"}, pretrained.config
        name = f"fold {k + 1}/{len(splits)}" if s.cv else "finetune"
        cfg = s.train.for_part(f"fold{k + 1}" if s.cv else "")
        model, bests, histories = _train_part(s, base, vectors, pretrained, len(classes), X, y, (tr, va), cfg, device, name, s.train.seed + k)
        best, history = bests[0], histories[0]  # with an ensemble, the first head's: the one the validation cells chose and calibrate
        scored = va if te is None else te
        scored_ds = CellDataset(rows_of(X, scored), model.config.bin_num, y[scored])
        options = InferenceOptions(cfg.batch_size, device, cfg.num_workers, progress=cfg.progress)
        if ensemble and te is None:  # the other heads trained on some of the validation cells: the first head's predictions score the run
            probs = predict_outputs(model, scored_ds, options)["head_probs"]
        else:
            probs = predict_distributed(model, scored_ds, options, desc="scoring")
        pred = np.asarray(classes)[probs.argmax(1)]
        m = classification_metrics(y_str[scored], pred, classes)
        m.update(best_epoch=best["epoch"], n_train=len(tr), n_val=len(va), history=history)
        if ensemble:
            m.update(heads=s.ensemble, head_epochs=[b["epoch"] for b in bests])
        if te is not None:
            m.update(n_test=len(te), inner_val_accuracy=best["val_accuracy"])
        folds.append(FoldResult(name, m, y_str[scored], pred, histories if ensemble else history))
        if s.cv and main and out is not None:
            save_checkpoint(out / f"fold{k + 1}" / "model.pt", model, genes, classes, s.preprocessing, record,
                            {k2: v for k2, v in m.items() if k2 != "history"})
        metric = s.train.select_metric
        score = best[f"val_{metric}"] if s.cv else m[metric]
        if kept < 0 or score > kept_score:
            kept, kept_score, kept_state = k, score, {k2: v.detach().clone() for k2, v in model.state_dict().items()}
            kept_split = (tr, va)
        where = "test" if te is not None else "validation"
        log.info("%s: accuracy %.4f, macro-F1 %.4f on %d %s cells", name, m["accuracy"], m["macro_f1"], len(scored), where)

    model.load_state_dict(kept_state)
    metrics: dict[str, Any] = {"classes": classes, "class_counts": {c: int((y_str == c).sum()) for c in classes}, "gene2vec": g2v,
                               "recipe": s.recipe}
    if s.cv:
        acc = np.array([f.metrics["accuracy"] for f in folds])
        f1 = np.array([f.metrics["macro_f1"] for f in folds])
        metrics.update(accuracy=float(acc.mean()), accuracy_sd=float(acc.std(ddof=1)), macro_f1=float(f1.mean()),
                       macro_f1_sd=float(f1.std(ddof=1)), folds=[f.metrics for f in folds], model_fold=kept + 1,
                       what=CV_METRICS_MEANING)
    else:
        metrics.update(folds[0].metrics, what=ENSEMBLE_SPLIT_METRICS_MEANING if ensemble else SPLIT_METRICS_MEANING)
    novelty = None
    if main:
        novelty = calibrate_novelty(model, X, y, *kept_split, len(classes), s.reject_rate, s.train.seed, cfg.batch_size, device, progress,
                                    s.precision_check_cells)
        cal = novelty.calibration.to_dict()
        metrics["novelty"] = {"reject_rate": cal["reject_rate"], "n_calibration_cells": cal["n_cells"], "thresholds": cal["thresholds"],
                              "what": "novelty thresholds: each rejects at most reject_rate of new cells of known types (split-conformal "
                                      "quantile of the scores of the validation cells, which did not train the model)"}
    if main and out is not None:
        summary = {"accuracy": folds[kept].metrics["accuracy"], "macro_f1": folds[kept].metrics["macro_f1"], "cv": s.cv,
                   "class_counts": metrics["class_counts"]}
        save_checkpoint(out / "model.pt", model, genes, classes, s.preprocessing, record, summary, novelty=novelty)
    return FinetuningResult(model, classes, folds, kept, metrics, s.cv)


def calibrate_novelty(model: ScBERT, X: sparse.csr_matrix, y: np.ndarray, train: np.ndarray, val: np.ndarray, n_classes: int,
                      reject_rate: float, seed: int, batch_size: int, device: torch.device, progress: bool = False,
                      precision_cells: int = 0) -> NoveltyRecord:
    """The checkpoint's novelty record: statistics of (up to MAX_REFERENCE_CELLS, seeded) training
    cells, and the thresholds of every score calibrated on the validation cells ``val``; with
    ``precision_cells``, also how much bf16 moves the outputs on that many (seeded) validation cells
    (``precision_error``, what predict.py's ``--fp32-recheck auto`` reads)."""
    if len(train) > MAX_REFERENCE_CELLS:
        train = np.sort(np.random.default_rng(seed).choice(train, MAX_REFERENCE_CELLS, replace=False))
    if len(val) > MAX_CALIBRATION_CELLS:  # here, not in calibrate(): the query_* scores keep these cells' coordinates, aligned
        val = np.sort(np.random.default_rng(seed).choice(val, MAX_CALIBRATION_CELLS, replace=False))
    bins = model.config.bin_num
    options = InferenceOptions(batch_size, device, progress=progress)
    ref = predict_outputs(model, CellDataset(rows_of(X, train), bins), options, embed=True, features=True)
    # the knn score's reference: the classifier's features, the cell embedding (X_scbert) of a fine-tuned model
    record = NoveltyRecord.fit(ref["features"], rows_of(X, train), y[train], n_classes, seed)
    if record.density is not None:
        record.density.set_calibration(rows_of(X, val))
    cal = predict_outputs(model, CellDataset(rows_of(X, val), bins), options, embed=True, features=True)
    scores = output_scores(cal, record, expression=rows_of(X, val))
    record.calibration = calibrate(scores, reject_rate, seed)
    if precision_cells > 0 and len(val):
        rows = val if len(val) <= precision_cells else np.sort(np.random.default_rng(seed).choice(val, precision_cells, replace=False))
        log.info("measuring the bf16 error on %d validation cells (for predict.py --precision bf16)", len(rows))
        err = measure_precision_error(model, CellDataset(rows_of(X, rows), bins), record, dict(record.calibration.thresholds), options, "bf16")
        record.precision_error["bf16"] = err
        log.info("bf16 error: largest probability change %.2g, novelty scores %s", err["probs"],
                 ", ".join(f"{k} {v:.2g}" for k, v in err["scores"].items()) or "-")
    return record
