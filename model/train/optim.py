"""Optimiser and learning-rate schedule, and the optimiser steps of a run: gradient accumulation,
clipping, loss scaling."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from model.train.config import TrainConfig


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


def published_warmup_cosine(
    optimizer: torch.optim.Optimizer,
    first_cycle: int = 15,
    cycle_mult: float = 2.0,
    warmup: int = 5,
    min_lr: float = 1e-6,
    gamma: float = 0.9,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The published scBERT schedule (its ``CosineAnnealingWarmupRestarts``), stepped once per
    epoch: each cycle warms up linearly from ``min_lr`` to its peak over ``warmup`` epochs, then
    decays by a cosine to ``min_lr``; the first cycle lasts ``first_cycle`` epochs, each next one
    ``(length - warmup) * cycle_mult + warmup`` (15, 25, 45, ...), and each peak is ``gamma`` times
    the previous one. The optimiser's learning rate is the first peak."""
    max_lr = optimizer.param_groups[0]["lr"]

    def factor(epoch: int) -> float:
        length, start, cycle = first_cycle, 0, 0
        while epoch >= start + length:
            start += length
            cycle += 1
            length = int((length - warmup) * cycle_mult) + warmup
        t, peak = epoch - start, max_lr * gamma**cycle
        if t < warmup:
            lr = (peak - min_lr) * t / warmup + min_lr
        else:
            lr = min_lr + (peak - min_lr) * (1.0 + math.cos(math.pi * (t - warmup) / max(1, length - warmup))) / 2.0
        return lr / max_lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: one at ``lr``; with ``head_lr``, the classifier head
    (``to_out``) in a group of its own at that rate (a new head needs a larger step than a
    pretrained encoder it sits on)."""
    base = getattr(model, "module", model)  # under torchrun the model is inside DistributedDataParallel
    head = getattr(base, "to_out", None) if cfg.head_lr is not None else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    own = [p for p in model.parameters() if p.requires_grad and id(p) in head_ids]
    groups = [{"params": rest}] if rest else []
    if own:
        groups.append({"params": own, "lr": cfg.head_lr})
    return groups


class Trainer:
    """Gradient accumulation, clipping, scheduling: the parts both stages share."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, steps_per_epoch: int, device: torch.device, precision: str = "fp32") -> None:
        self.model, self.cfg, self.device = model, cfg, device
        groups = parameter_groups(model, cfg)
        if not groups:
            raise ValueError("the model has no trainable parameters")
        if cfg.weight_decay:
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(groups, lr=cfg.lr)
        total = max(1, math.ceil(steps_per_epoch / cfg.grad_acc) * cfg.epochs_for(steps_per_epoch))
        if cfg.schedule == "published":
            self.scheduler = published_warmup_cosine(self.optimizer)
        else:
            self.scheduler = warmup_cosine_restarts(self.optimizer, cfg.warmup_steps, cfg.cycle_steps or total)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.micro = 0

    def closes_group(self, last_in_epoch: bool) -> bool:
        """Whether the next backward ends an accumulation group (and is followed by a step)."""
        return (self.micro + 1) % self.cfg.grad_acc == 0 or last_in_epoch

    def backward(self, loss: torch.Tensor, last_in_epoch: bool) -> bool:
        """Accumulate ``loss``'s gradients; step the optimiser at the end of a group. Returns
        whether it stepped."""
        self.scaler.scale(loss / self.cfg.grad_acc).backward()
        self.micro += 1
        if self.micro % self.cfg.grad_acc == 0 or last_in_epoch:
            self.scaler.unscale_(self.optimizer)
            if self.cfg.clip_norm:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.cfg.schedule != "published":  # the published schedule steps per epoch (end_epoch)
                self.scheduler.step()
            self.micro = 0
            return True
        return False

    def end_epoch(self) -> None:
        """At the end of each epoch: the published schedule's step."""
        if self.cfg.schedule == "published":
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.micro = 0
