"""Stage 1, masked-expression pretraining: the objective, its held-out score, and the whole stage
from a corpus to a saved checkpoint (:func:`run_pretraining`)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data.corpus import Corpus
from data.dataset import IGNORE_INDEX, CellDataset, cell_seeds, mask_tokens, most_common_bin_baseline
from data.io import InputError
from data.preprocess import DEFAULT_PREPROCESSING
from model import distributed
from model.checkpoint import save_checkpoint
from model.inference import InferenceOptions, run_batches
from model.nn.config import ExecutionOptions, ModelSize
from model.nn.network import ScBERT
from model.train.config import TrainConfig
from model.train.initialisation import gene_embedding
from model.train.loop import fit

log = logging.getLogger("scbert")

MASK_SEED = 12345  # held-out cells are masked from this seed and their index: every epoch scores the same positions


def pretrain(
    model: ScBERT,
    train: CellDataset,
    val: CellDataset,
    cfg: TrainConfig,
    device: torch.device,
    mask_prob: float = 0.15,
    replace_prob: float = 0.9,
    on_epoch: Callable[[int, dict[str, float], bool], None] | None = None,
    mask_rounding: str = "round",
    accuracy: str = "all_tokens",
    visible_weight: float = 0.0,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Masked-expression pretraining. Returns the best (by held-out masked accuracy) validation
    metrics and the per-epoch history; the model ends holding the best weights. Under torchrun
    every rank calls it; ``on_epoch`` runs on rank 0 only. Each cell's masking is drawn from
    (seed, epoch, cell); ``mask_rounding`` and ``accuracy``: see :func:`mask_tokens` and
    :func:`evaluate_mlm`. ``visible_weight`` > 0 adds that weight times the mean loss of reproducing
    every visible (not chosen) gene's own bin, so that the final encodings keep each cell's own
    values as well as what its context predicts (the masked loss alone never asks for them)."""
    model.to(device)
    mask_token = model.config.mask_token

    def step_loss(net: nn.Module, batch: dict[str, torch.Tensor], epoch: int) -> tuple[torch.Tensor, float]:
        seeds = cell_seeds(batch["index"], cfg.seed, epoch)
        inputs, labels = mask_tokens(batch["tokens"], mask_token, mask_prob, replace_prob, row_seeds=seeds, rounding=mask_rounding)
        inputs, labels = inputs.to(device), labels.to(device)
        with model.autocast():
            logits = net(inputs)
        logits = logits.float()  # once: the visible-gene loss below reads the same float32 copy
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        n_masked = float((labels != IGNORE_INDEX).sum())
        if visible_weight > 0:
            loss = loss + visible_weight * n_masked * visible_loss(logits, batch["tokens"].to(device), labels)
        return loss, n_masked

    def log_epoch(epoch: int, metrics: dict[str, float], improved: bool) -> None:
        log.info(
            "pretrain epoch %d: train loss %.4f, val loss %.4f, val masked accuracy %.4f (baseline %.4f)",
            epoch + 1, metrics["train_loss"], metrics["val_loss"], metrics["val_masked_accuracy"], metrics["baseline_accuracy"],
        )
        if on_epoch is not None:
            on_epoch(epoch, metrics, improved)

    return fit(model, train, cfg, device, step_loss,
               lambda: evaluate_mlm(model, val, cfg, device, mask_prob, replace_prob, mask_rounding, accuracy),
               "val_masked_accuracy", "pretrain", log_epoch)


def visible_loss(logits: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each visible gene's own bin (positions not chosen for masking; the
    appended last position excluded)."""
    targets = tokens.masked_fill(labels != IGNORE_INDEX, IGNORE_INDEX)
    targets[:, -1] = IGNORE_INDEX
    return nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX)


ACCURACIES = ("all_tokens", "expression_bins")


def evaluate_mlm(
    model: ScBERT, ds: CellDataset, cfg: TrainConfig, device: torch.device, mask_prob: float = 0.15, replace_prob: float = 0.9,
    mask_rounding: str = "round", accuracy: str = "all_tokens",
) -> dict[str, float]:
    """Held-out masked-token loss and accuracy, and the accuracy of predicting each cell's most
    common visible non-zero bin on the same masked positions. Each cell's mask is drawn from a
    fixed seed and its index, so every epoch (and any number of processes, each scoring its own
    share of the cells) scores the same positions. ``accuracy``: the prediction is the most likely
    of all tokens (``all_tokens``) or of the expression bins 1..bin_num (``expression_bins``, as
    the published code scores it: a masked position always holds a non-zero bin)."""
    if accuracy not in ACCURACIES:
        raise ValueError(f"accuracy must be one of {ACCURACIES}, got {accuracy!r}")
    mask_token, bins = model.config.mask_token, model.config.bin_num

    def score(m: ScBERT, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs, labels = mask_tokens(batch["tokens"].cpu(), mask_token, mask_prob, replace_prob, row_seeds=cell_seeds(batch["index"], MASK_SEED),
                                     rounding=mask_rounding)
        baseline = most_common_bin_baseline(inputs, mask_token)
        sel = labels != IGNORE_INDEX
        logits = m(inputs.to(device)).float().cpu()
        pred = logits[sel].argmax(-1) if accuracy == "all_tokens" else logits[sel][:, 1 : bins + 1].argmax(-1) + 1
        return {"loss": nn.functional.cross_entropy(logits[sel], labels[sel], reduction="sum"),
                "correct": (pred == labels[sel]).sum(),
                "baseline": (baseline[:, None].expand_as(labels)[sel] == labels[sel]).sum(), "n": sel.sum()}

    sums = [0.0, 0.0, 0.0, 0.0]  # loss, correct, baseline correct, masked tokens
    options = InferenceOptions(cfg.batch_size, device, cfg.num_workers, progress=cfg.progress and distributed.current().is_main)
    for _, out in run_batches(model, ds, score, options, rows=distributed.shard(len(ds)), desc="held-out cells"):
        sums[0] += out["loss"].item()
        sums[1] += int(out["correct"])
        sums[2] += int(out["baseline"])
        sums[3] += int(out["n"])
    loss_sum, correct, base_correct, n = distributed.all_reduce_sum(sums, device)
    n = max(n, 1)
    return {"val_loss": loss_sum / n, "val_masked_accuracy": correct / n, "baseline_accuracy": base_correct / n, "val_masked_tokens": int(n)}


# --------------------------------------------------------------------------------------------
# The stage: corpus -> checkpoint
# --------------------------------------------------------------------------------------------


# What pretraining does with a vocabulary gene that a corpus file does not measure (see
# data.corpus.build_corpus): it enters as bin 0 (not expressed), like a measured zero, and, since only
# expressed genes are ever masked (data.dataset.mask_tokens), it is never a target and never scored.
UNMEASURED_GENES = "input as not expressed (bin 0); never masked or scored (only expressed genes are masked)"


@dataclass
class PretrainingSettings:
    """Everything :func:`run_pretraining` needs besides the cells."""

    size: ModelSize = field(default_factory=ModelSize)
    gene2vec: str = "train"  # train, none, learned, or a file (word2vec text, or .npy with gene2vec_genes)
    gene2vec_genes: str | None = None
    mask_prob: float = 0.15
    replace_prob: float = 0.9
    mask_rounding: str = "round"  # masked genes per cell: round(mask_prob * k), or "ceil" as published
    accuracy: str = "all_tokens"  # held-out masked accuracy over all tokens, or "expression_bins" as published
    visible_weight: float = 0.0  # weight of the loss of reproducing the visible genes' own bins (0: masked genes only, as published)
    val_frac: float = 0.05
    recipe: str = "ours"
    train: TrainConfig = field(default_factory=TrainConfig)
    options: ExecutionOptions = field(default_factory=ExecutionOptions)
    preprocessing: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_PREPROCESSING))  # how the cells were normalised

    def record(self, data: list[str]) -> dict[str, Any]:
        """The checkpoint's ``training`` dict (see :mod:`model.checkpoint.format`)."""
        o = self.options
        return {"stage": "pretrain", "data": data, "model_size": dataclasses.asdict(self.size),
                "gene2vec": {"spec": self.gene2vec, "genes": self.gene2vec_genes},
                "recipe": self.recipe,
                "pretraining": {"mask_prob": self.mask_prob, "replace_prob": self.replace_prob, "val_frac": self.val_frac,
                                "mask_rounding": self.mask_rounding, "accuracy": self.accuracy,
                                "visible_weight": self.visible_weight, "unmeasured_genes": UNMEASURED_GENES},
                "optimisation": self.train.optimisation(),
                "execution": {"precision": o.precision, "grad_checkpointing": o.grad_checkpointing, "compile": o.compile},
                "world_size": distributed.current().world_size}


@dataclass
class PretrainingResult:
    model: ScBERT
    genes: list[str]
    best: dict[str, Any]
    history: list[dict[str, float]]
    metrics: dict[str, Any]  # what metrics.json holds

    def summary_lines(self) -> list[str]:
        m, best = self.metrics, self.best
        return [
            f"pretrained on {m['n_cells_train']} cells x {len(self.genes)} genes for {len(self.history)} epochs ({m['seconds']} s)",
            f"held-out masked-token accuracy {best['val_masked_accuracy']:.4f} (best epoch {best['epoch']}) vs "
            f"{best['baseline_accuracy']:.4f} for the most-common-bin baseline: {'beats' if m['beats_baseline'] else 'DOES NOT beat'} it",
        ]


def split_cells(n_cells: int, val_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) sorted cell indices: a seeded random ``val_frac`` held out (at least one
    cell on each side)."""
    perm = np.random.default_rng(seed).permutation(n_cells)
    n_val = min(n_cells - 1, max(1, round(val_frac * n_cells)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def run_pretraining(corpus: Corpus, settings: PretrainingSettings, device: torch.device, out: Path | None = None,
                    data: list[str] | None = None, progress: bool = True) -> PretrainingResult:
    """Pretrain a new model on ``corpus``: gene embedding, masked-expression training with a
    held-out ``val_frac`` of the cells; with ``out``, the best epoch's weights are saved to
    ``out/model.pt`` as training goes (rank 0). Every rank of a torchrun job calls it."""
    info = distributed.current()
    genes, n_cells = corpus.genes, corpus.n_cells
    if n_cells < 2:
        raise InputError(f"pretraining needs at least 2 cells, the corpus has {n_cells}")
    s = settings
    if s.gene2vec == "train" and not info.is_main:
        # gene2vec is deterministic: rank 0 trains it and DDP copies rank 0's weights to every rank.
        mode, vectors, g2v = "gene2vec", None, {"source": "rank 0"}
    else:
        mode, vectors, g2v = gene_embedding(s.gene2vec, s.gene2vec_genes, genes, corpus.gene2vec_cells, s.size.dim, s.train.seed,
                                            progress and info.is_main)
    model = ScBERT(s.size.config(len(genes), gene_embedding=mode, head="mlm"), vectors, s.options)
    train_idx, val_idx = split_cells(n_cells, s.val_frac, s.train.seed)
    train_ds = CellDataset(corpus.X, model.config.bin_num).subset(train_idx)
    val_ds = CellDataset(corpus.X, model.config.bin_num).subset(val_idx)
    log.info("pretraining on %d cells (%d held out), %d genes, model dim %d depth %d heads %d", len(train_idx), len(val_idx), len(genes),
             s.size.dim, s.size.depth, s.size.heads)
    record = s.record(list(data or []))

    def save(metrics: dict[str, Any]) -> None:
        if out is not None:
            save_checkpoint(out / "model.pt", model, genes, preprocessing=s.preprocessing, training=record, metrics=metrics)

    t0 = time.time()
    best, history = pretrain(model, train_ds, val_ds, s.train, device, s.mask_prob, s.replace_prob,
                             on_epoch=lambda epoch, metrics, improved: save(metrics) if improved else None,
                             mask_rounding=s.mask_rounding, accuracy=s.accuracy, visible_weight=s.visible_weight)
    if info.is_main:
        save(best)  # the best weights, also when they predate a --resume into another folder
    metrics = {
        **best,
        "beats_baseline": best["val_masked_accuracy"] > best["baseline_accuracy"],
        "n_cells_train": len(train_idx), "n_cells_val": len(val_idx), "n_genes": len(genes),
        "seconds": round(time.time() - t0, 1), "gene2vec": g2v, "recipe": s.recipe, "accuracy_over": s.accuracy, "history": history,
    }
    return PretrainingResult(model, list(genes), best, history, metrics)
