"""The training loop both stages share: epochs of (distributed) batches, scoring each epoch,
keeping the best, early stopping, resumable states."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from data.dataset import CellDataset
from model import distributed
from model.nn.network import ScBERT
from model.train.config import TrainConfig
from model.train.encoding_cache import EncodedCells
from model.train.optim import Trainer
from model.train.state import Progress, restore_state, save_state

log = logging.getLogger("scbert")

StepFn = Callable[[nn.Module, dict[str, torch.Tensor], int], tuple[torch.Tensor, float]]


def balanced_sampling_weights(labels: np.ndarray) -> np.ndarray:
    """Per-cell sampling weights under which every class is drawn equally often."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    w = 1.0 / counts[inverse]
    return w / w.sum()


def better(metrics: dict[str, float], best: dict[str, float] | None, score: str) -> bool:
    """Whether an epoch beats the best so far: a higher ``score``; for macro-F1, an equal one with a
    lower validation loss also wins (on few validation cells, equal scores are common)."""
    if best is None or metrics[score] > best[score]:
        return True
    return score == "val_macro_f1" and metrics[score] == best[score] and metrics.get("val_loss", 0.0) < best.get("val_loss", 0.0)


def fit(
    model: ScBERT,
    train: CellDataset | EncodedCells,
    cfg: TrainConfig,
    device: torch.device,
    step_loss: StepFn,
    evaluate: Callable[[], dict[str, float]],
    score: str,
    desc: str,
    on_epoch: Callable[[int, dict[str, float], bool], None] | None,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Train ``model`` on ``train`` (on every rank), scoring each epoch with ``evaluate`` and keeping
    the best epoch by ``score``. ``step_loss(net, batch, epoch)`` returns the summed loss of the
    batch and its denominator (cells or masked tokens); each rank's sum is divided by the total
    denominator of all ranks, so the gradient is exactly that of the mean over the global batch."""
    info = distributed.current()
    weights = balanced_sampling_weights(train.labels.numpy()) if cfg.sampling == "balanced" and train.labels is not None else None
    sampler = distributed.EpochBatches(len(train), cfg.batch_size, cfg.seed, weights=weights)
    n_batches = sampler.batches_per_epoch()
    n_epochs = cfg.epochs_for(n_batches)
    trainer = Trainer(model, cfg, n_batches, device, model.options.precision)
    net = distributed.wrap(model, device)
    if cfg.checkpoint_dir and info.is_main:
        Path(cfg.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        for tmp in Path(cfg.checkpoint_dir).glob(".state-*.tmp"):  # left by a run killed while writing
            tmp.unlink(missing_ok=True)
    run = restore_state(model, trainer, cfg, len(train)) or Progress()
    while not run.finished and run.epoch < n_epochs:
        epoch = run.epoch
        sampler.set_epoch(epoch, run.cells_done)
        loader = DataLoader(train, batch_sampler=sampler, collate_fn=train.collate, num_workers=cfg.num_workers, generator=torch.Generator())
        first = n_batches - len(sampler)
        bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{n_epochs}", unit="batch", total=n_batches, initial=first,
                   disable=not (cfg.progress and info.is_main), leave=False)
        model.train()
        for j, batch in enumerate(bar):
            last = first + j == n_batches - 1
            with distributed.no_sync(net, not trainer.closes_group(last)):
                loss_sum, count = step_loss(net, batch, epoch)
                if sampler.placeholder(j):
                    loss_sum, count = loss_sum * 0.0, 0.0
                total_count = distributed.all_reduce_sum([count], device)[0] if info.enabled else count
                stepped = trainer.backward(loss_sum * (info.world_size / max(total_count, 1e-12)), last)
            run.total += float(loss_sum.detach())
            run.count += count
            run.cells_done += sampler.global_size(j)
            run.step += int(stepped)
            if stepped and cfg.max_steps and run.step >= cfg.max_steps:
                log.info("%s: reached %d optimiser steps (--max-steps), stopping", desc, run.step)
                run.finished = True
                break
            if stepped and cfg.save_every and run.step % cfg.save_every == 0 and not last and cfg.checkpoint_dir:
                save_state(model, trainer, run, cfg, len(train), device)
        total, count = distributed.all_reduce_sum([run.total, run.count], device)
        metrics = {"epoch": epoch + 1, "train_loss": total / max(count, 1e-12), **evaluate()}
        run.history.append(metrics)
        improved = better(metrics, run.best, score)
        if improved:
            run.best, run.best_state, run.stale = dict(metrics), copy.deepcopy(model.state_dict()), 0
        else:
            run.stale += 1
        if info.is_main and on_epoch is not None:
            on_epoch(epoch, metrics, improved)
        run.epoch, run.cells_done, run.total, run.count = epoch + 1, 0, 0.0, 0.0
        trainer.end_epoch()
        # the step floor is a floor: early stopping waits until it is reached
        if cfg.patience and run.stale >= cfg.patience + (cfg.patience_rule == "published") and run.step >= cfg.min_steps:
            log.info("%s: no improvement for %d epochs, stopping early", desc, run.stale)
            run.finished = True
        if cfg.checkpoint_dir:
            save_state(model, trainer, run, cfg, len(train), device)
    assert run.best is not None and run.best_state is not None
    if cfg.select == "last":  # the model holds the last epoch's weights already
        return dict(run.history[-1]), run.history
    model.load_state_dict(run.best_state)
    return run.best, run.history
