"""Training and inference loops shared by the stage scripts."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from tqdm.auto import tqdm

from data.dataset import IGNORE_INDEX, CellDataset, mask_tokens, most_common_bin_baseline
from model.fast import prepare_for_speed
from model.scbert import ScBERT, pool_encodings

log = logging.getLogger("scbert")

PRECISIONS = ("fp32", "bf16", "fp16")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return dev


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision context for ``precision`` in fp32 / bf16 / fp16 (fp16 on GPU only)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 needs a GPU; use --precision bf16 on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def warmup_cosine_restarts(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    cycle_steps: int,
    cycle_mult: float = 2.0,
    gamma: float = 0.9,
    min_lr_ratio: float = 0.01,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine annealing with warm restarts (as in the published training): each cycle warms up
    linearly for ``warmup_steps``, then decays to ``min_lr_ratio`` of its peak; cycles grow by
    ``cycle_mult`` and each peak is ``gamma`` times the previous one. Stepped once per optimiser step."""
    warmup_steps = max(0, warmup_steps)
    cycle_steps = max(cycle_steps, warmup_steps + 1)

    def factor(step: int) -> float:
        length, start, peak = cycle_steps, 0, 1.0
        while step >= start + length:
            start += length
            length = int(math.ceil(length * cycle_mult))
            peak *= gamma
        t = step - start
        if t < warmup_steps:
            return peak * (t + 1) / (warmup_steps + 1)
        progress = (t - warmup_steps) / max(1, length - warmup_steps)
        low = min_lr_ratio * peak
        return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 8
    grad_acc: int = 1
    lr: float = 1e-4
    clip_norm: float = 1.0
    warmup_steps: int = 5
    cycle_steps: int | None = None  # default: the whole run is one cycle
    patience: int | None = None  # early stopping (fine-tuning); None = never stop early
    seed: int = 0
    precision: str = "fp32"
    num_workers: int = 0
    progress: bool = True
    compile: bool = False  # torch.compile the encoder
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, more compute
    extra: dict[str, Any] = field(default_factory=dict)


def make_loader(ds: CellDataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0) -> DataLoader:
    if shuffle:
        sampler: torch.utils.data.Sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(ds)
    return DataLoader(
        ds, batch_size=batch_size, sampler=sampler, collate_fn=ds.collate, num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


def _epoch_batches(loader: DataLoader, cfg: TrainConfig, epoch: int, desc: str) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Numbered batches of one epoch, behind a progress bar."""
    bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not cfg.progress, leave=False)
    yield from enumerate(bar)


class _Trainer:
    """Gradient accumulation, clipping, scheduling: the parts both stages share."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, steps_per_epoch: int, device: torch.device) -> None:
        self.model, self.cfg, self.device = model, cfg, device
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr)
        total = max(1, math.ceil(steps_per_epoch / cfg.grad_acc) * cfg.epochs)
        self.scheduler = warmup_cosine_restarts(self.optimizer, cfg.warmup_steps, cfg.cycle_steps or total)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.micro = 0

    def backward(self, loss: torch.Tensor, last_in_epoch: bool) -> None:
        self.scaler.scale(loss / self.cfg.grad_acc).backward()
        self.micro += 1
        if self.micro % self.cfg.grad_acc == 0 or last_in_epoch:
            self.scaler.unscale_(self.optimizer)
            if self.cfg.clip_norm:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.micro = 0


def pretrain(
    model: ScBERT,
    train: CellDataset,
    val: CellDataset,
    cfg: TrainConfig,
    device: torch.device,
    mask_prob: float = 0.15,
    replace_prob: float = 0.9,
    on_epoch: Callable[[int, dict[str, float], bool], None] | None = None,
    fast: bool = True,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Masked-expression pretraining. Returns the best (by held-out masked accuracy) validation
    metrics and the per-epoch history; the model ends holding the best weights. ``fast`` switches
    the attention to the equivalent :mod:`model.fast` kernel."""
    prepare_for_speed(model, fast, cfg.compile, cfg.grad_checkpointing)
    model.to(device)
    mask_token = model.config.mask_token
    loader = make_loader(train, cfg.batch_size, True, cfg.seed, cfg.num_workers)
    trainer = _Trainer(model, cfg, len(loader), device)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    history: list[dict[str, float]] = []
    best: dict[str, Any] | None = None
    best_state = None
    for epoch in range(cfg.epochs):
        model.train()
        total, n = 0.0, 0
        for i, batch in _epoch_batches(loader, cfg, epoch, "pretrain"):
            inputs, labels = mask_tokens(batch["tokens"], mask_token, mask_prob, replace_prob, gen)
            inputs, labels = inputs.to(device), labels.to(device)
            with autocast(device, cfg.precision):
                logits = model(inputs)
            loss = loss_fn(logits.float().transpose(1, 2), labels)
            trainer.backward(loss, i == len(loader) - 1)
            total += loss.item() * len(inputs)
            n += len(inputs)
        metrics = {"epoch": epoch + 1, "train_loss": total / max(n, 1), **evaluate_mlm(model, val, cfg, device, mask_prob, replace_prob)}
        history.append(metrics)
        improved = best is None or metrics["val_masked_accuracy"] > best["val_masked_accuracy"]
        if improved:
            best, best_state = dict(metrics), copy.deepcopy(model.state_dict())
        log.info(
            "pretrain epoch %d: train loss %.4f, val loss %.4f, val masked accuracy %.4f (baseline %.4f)",
            epoch + 1, metrics["train_loss"], metrics["val_loss"], metrics["val_masked_accuracy"], metrics["baseline_accuracy"],
        )
        if on_epoch is not None:
            on_epoch(epoch, metrics, improved)
    assert best is not None and best_state is not None
    model.load_state_dict(best_state)
    return best, history


@torch.inference_mode()
def evaluate_mlm(
    model: ScBERT, ds: CellDataset, cfg: TrainConfig, device: torch.device, mask_prob: float = 0.15, replace_prob: float = 0.9
) -> dict[str, float]:
    """Held-out masked-token loss and accuracy, and the accuracy of predicting each cell's most
    common visible non-zero bin on the same masked positions. Masks are drawn from a fixed seed, so
    every epoch is scored on the same positions."""
    model.eval()
    mask_token = model.config.mask_token
    gen = torch.Generator().manual_seed(12345)
    loss_sum, correct, base_correct, n = 0.0, 0, 0, 0
    for batch in make_loader(ds, cfg.batch_size, False, 0, cfg.num_workers):
        inputs, labels = mask_tokens(batch["tokens"], mask_token, mask_prob, replace_prob, gen)
        baseline = most_common_bin_baseline(inputs, mask_token)
        sel = labels != IGNORE_INDEX
        with autocast(device, cfg.precision):
            logits = model(inputs.to(device))
        logits = logits.float().cpu()
        loss_sum += nn.functional.cross_entropy(logits[sel], labels[sel], reduction="sum").item()
        correct += int((logits[sel].argmax(-1) == labels[sel]).sum())
        base_correct += int((baseline[:, None].expand_as(labels)[sel] == labels[sel]).sum())
        n += int(sel.sum())
    n = max(n, 1)
    return {"val_loss": loss_sum / n, "val_masked_accuracy": correct / n, "baseline_accuracy": base_correct / n, "val_masked_tokens": n}


def finetune(
    model: ScBERT,
    train: CellDataset,
    val: CellDataset,
    cfg: TrainConfig,
    device: torch.device,
    class_weights: torch.Tensor | None = None,
    desc: str = "finetune",
    fast: bool = True,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Supervised fine-tuning with early stopping on validation accuracy. The model ends holding
    the best weights; returns the best epoch's metrics and the history. ``fast``: see :func:`pretrain`."""
    prepare_for_speed(model, fast, cfg.compile, cfg.grad_checkpointing)
    model.to(device)
    loader = make_loader(train, cfg.batch_size, True, cfg.seed, cfg.num_workers)
    trainer = _Trainer(model, cfg, len(loader), device)
    loss_fn = nn.CrossEntropyLoss(weight=None if class_weights is None else class_weights.to(device))
    history: list[dict[str, float]] = []
    best: dict[str, Any] | None = None
    best_state = None
    stale = 0
    for epoch in range(cfg.epochs):
        model.train()
        total, n = 0.0, 0
        for i, batch in _epoch_batches(loader, cfg, epoch, desc):
            with autocast(device, cfg.precision):
                logits = model(batch["tokens"].to(device))
            loss = loss_fn(logits.float(), batch["labels"].to(device))
            trainer.backward(loss, i == len(loader) - 1)
            total += loss.item() * len(batch["labels"])
            n += len(batch["labels"])
        probs, _ = predict(model, val, cfg.batch_size, device, cfg.precision, progress=False, fast=fast)
        y = val.labels.numpy()
        val_loss = float(nn.functional.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)), torch.from_numpy(y)))
        acc = float((probs.argmax(1) == y).mean())
        metrics = {"epoch": epoch + 1, "train_loss": total / max(n, 1), "val_loss": val_loss, "val_accuracy": acc}
        history.append(metrics)
        log.info("%s epoch %d: train loss %.4f, val loss %.4f, val accuracy %.4f", desc, epoch + 1, metrics["train_loss"], val_loss, acc)
        if best is None or acc > best["val_accuracy"]:
            best, best_state, stale = dict(metrics), copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if cfg.patience is not None and stale >= cfg.patience:
                log.info("%s: no improvement for %d epochs, stopping early", desc, stale)
                break
    assert best is not None and best_state is not None
    model.load_state_dict(best_state)
    return best, history


@torch.inference_mode()
def predict(
    model: ScBERT,
    ds: CellDataset,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    embed: bool = False,
    pooling: str = "mean",
    progress: bool = True,
    num_workers: int = 0,
    fast: bool = True,
    compile_model: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities (cells x classes) and, with ``embed``, cell embeddings (cells x dim),
    in dataset order, from one encoder pass per batch. ``fast``: see :func:`pretrain`."""
    prepare_for_speed(model, fast, compile_model)
    model.eval().to(device)
    probs, embs = [], []
    bar = tqdm(total=len(ds), desc="predict", unit="cell", disable=not progress, leave=False)
    for batch in make_loader(ds, batch_size, False, 0, num_workers):
        tokens = batch["tokens"].to(device)
        with autocast(device, precision):
            h = model.encode(tokens)
            logits = model.to_out(h)
        probs.append(torch.softmax(logits.float(), dim=-1).cpu())
        if embed:
            embs.append(pool_encodings(h, tokens, pooling).cpu())
        bar.update(len(tokens))
    bar.close()
    return torch.cat(probs).numpy(), (torch.cat(embs).numpy() if embed else None)

