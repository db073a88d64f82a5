"""Training and inference loops shared by the stage scripts."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from tqdm.auto import tqdm

from data.dataset import IGNORE_INDEX, CellDataset, cell_seeds, mask_tokens, most_common_bin_baseline
from model import distributed
from model.checkpoint import atomic_torch_save
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
    batch_size: int = 8  # cells per step of each process (the global batch is batch_size x processes)
    grad_acc: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay; 0 = plain Adam, as published
    label_smoothing: float = 0.0  # fine-tuning cross-entropy label smoothing
    select: str = "best"  # the weights a run ends with: "best" validation epoch, or the "last" epoch
    clip_norm: float = 1.0
    warmup_steps: int = 5
    cycle_steps: int | None = None  # default: the whole run is one cycle
    patience: int | None = None  # early stopping (fine-tuning); None or 0 = never stop early
    seed: int = 0
    precision: str = "fp32"
    num_workers: int = 0
    progress: bool = True
    compile: bool = False  # torch.compile the encoder
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, more compute
    checkpoint_dir: str | None = None  # write resumable training states here (None: none)
    save_every: int = 0  # also every this many optimiser steps (0: at epoch ends only)
    keep_last: int = 2  # training states kept
    resume_from: str | None = None  # a training state file, or a folder holding them (the latest is used)
    max_steps: int | None = None  # stop after this many optimiser steps (the epoch in progress is scored)
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


def _rows_loader(ds: CellDataset, rows: np.ndarray, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Batches of the cells ``rows`` of ``ds``, in that order (``batch['index']`` are indices of ``ds``)."""
    return DataLoader(ds, batch_size=batch_size, sampler=rows.tolist(), collate_fn=ds.collate, num_workers=num_workers,
                      generator=torch.Generator())


class _Trainer:
    """Gradient accumulation, clipping, scheduling: the parts both stages share."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, steps_per_epoch: int, device: torch.device) -> None:
        self.model, self.cfg, self.device = model, cfg, device
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        if cfg.weight_decay:
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr)
        total = max(1, math.ceil(steps_per_epoch / cfg.grad_acc) * cfg.epochs)
        self.scheduler = warmup_cosine_restarts(self.optimizer, cfg.warmup_steps, cfg.cycle_steps or total)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
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
            self.scheduler.step()
            self.micro = 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.micro = 0


# --------------------------------------------------------------------------------------------
# Resumable training states
# --------------------------------------------------------------------------------------------

STATE_FORMAT = "scbert-training-state"
STATE_GLOB = "state-*.pt"


def _rng_state() -> dict[str, Any]:
    """This process's random generators, as tensors, numbers and lists (loadable with weights_only)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), py_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_name(epoch: int, cells_done: int) -> str:
    """File name of the state after ``cells_done`` cells of epoch ``epoch`` (0-based); names sort in
    training order."""
    return f"state-{epoch:05d}-{cells_done:011d}.pt"


def list_states(folder: str | Path) -> list[Path]:
    """Training states in ``folder``, oldest first (temporary files of interrupted writes are ignored)."""
    return sorted(Path(folder).glob(STATE_GLOB))


def load_training_state(source: str | Path) -> tuple[dict[str, Any], Path] | None:
    """The newest readable training state of ``source`` (a state file or a folder of them) and its
    path; None when the folder holds none. An unreadable newest file (which atomic writes should
    make impossible) falls back to the one before, with a warning."""
    from model.checkpoint import CheckpointError

    source = Path(source)
    candidates = [source] if source.is_file() else list_states(source)[::-1]
    for path in candidates:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file: try the previous one
            if source.is_file():
                raise CheckpointError(f"{path} cannot be read as a training state ({type(e).__name__}); resume from its folder instead") from None
            log.warning("WARNING: %s cannot be read (%s); trying the state before it", path, type(e).__name__)
            continue
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{path} is not a training state of this package (those are the {STATE_GLOB} files in OUT/checkpoints)")
        return state, path
    if source.is_file() or candidates:
        raise CheckpointError(f"no readable training state in {source}")
    return None


class _Progress:
    """What a run has done so far: all a resumed run needs besides weights and optimiser."""

    def __init__(self) -> None:
        self.epoch = 0  # epoch in progress (0-based)
        self.cells_done = 0  # cells of that epoch already trained on (all ranks)
        self.step = 0  # optimiser steps
        self.total, self.count = 0.0, 0.0  # loss sum and its denominator this epoch (this rank)
        self.history: list[dict[str, float]] = []
        self.best: dict[str, Any] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stale = 0
        self.finished = False  # stopped early (a run that used up its epochs can be given more)


def _cpu_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}


def _save_state(model: nn.Module, trainer: _Trainer, run: _Progress, cfg: TrainConfig, n_train: int, device: torch.device) -> None:
    """Write the training state (rank 0) atomically, then drop states beyond the last ``keep_last``.
    Every rank takes part: their random generators are gathered."""
    info = distributed.current()
    total, count = distributed.all_reduce_sum([run.total, run.count], device)
    rngs = distributed.all_gather_objects(_rng_state())
    if not info.is_main or cfg.checkpoint_dir is None:
        return
    state = {
        "format": STATE_FORMAT, "format_version": 1,
        "epoch": run.epoch, "cells_done": run.cells_done, "step": run.step, "finished": run.finished,
        "epoch_loss": [total, count], "history": run.history, "best": run.best, "stale": run.stale,
        "model": _cpu_state(model.state_dict()),
        "best_state": None if run.best_state is None else _cpu_state(run.best_state),
        "trainer": trainer.state_dict(), "rng": rngs,
        "n_train": n_train, "world_size": info.world_size, "global_batch": cfg.batch_size * info.world_size,
    }
    folder = Path(cfg.checkpoint_dir)
    atomic_torch_save(state, folder / state_name(run.epoch, run.cells_done))
    for old in list_states(folder)[: -max(1, cfg.keep_last)]:
        old.unlink(missing_ok=True)


def _restore_state(model: nn.Module, trainer: _Trainer, cfg: TrainConfig, n_train: int) -> _Progress | None:
    """Load the newest state of ``cfg.resume_from`` into the model, trainer and random generators."""
    from model.checkpoint import CheckpointError

    run = _Progress()
    found = load_training_state(cfg.resume_from) if cfg.resume_from else None
    if found is None:
        return None
    state, path = found
    info = distributed.current()
    if state["n_train"] != n_train:
        raise CheckpointError(f"{path} was trained on {state['n_train']} cells, this run has {n_train}: resume with the same data, "
                              f"--val-frac and --seed")
    if state["global_batch"] != cfg.batch_size * info.world_size:
        log.warning("WARNING: %s was trained with %d cells per step, this run uses %d: the run goes on, but not exactly as "
                    "it would have without the interruption", path.name, state["global_batch"], cfg.batch_size * info.world_size)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path} holds another model ({str(e).splitlines()[0]}): resume with the same model settings and data") from None
    trainer.load_state_dict(state["trainer"])
    run.epoch, run.cells_done, run.step, run.finished = state["epoch"], state["cells_done"], state["step"], state["finished"]
    run.history, run.best, run.stale, run.best_state = list(state["history"]), state["best"], state["stale"], state["best_state"]
    if info.is_main:  # the epoch's loss so far, summed over all ranks, is counted once
        run.total, run.count = state["epoch_loss"]
    rngs = state["rng"]
    _set_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0])
    log.info("resumed from %s: epoch %d, %d cells into it, optimiser step %d", path, run.epoch + 1, run.cells_done, run.step)
    return run


# --------------------------------------------------------------------------------------------
# The training loop both stages share
# --------------------------------------------------------------------------------------------

StepFn = Callable[[nn.Module, dict[str, torch.Tensor], int], tuple[torch.Tensor, float]]


def _fit(
    model: ScBERT,
    train: CellDataset,
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
    sampler = distributed.EpochBatches(len(train), cfg.batch_size, cfg.seed)
    n_batches = sampler.batches_per_epoch()
    trainer = _Trainer(model, cfg, n_batches, device)
    net = distributed.wrap(model, device)
    if cfg.checkpoint_dir and info.is_main:
        Path(cfg.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        for tmp in Path(cfg.checkpoint_dir).glob(".state-*.tmp"):  # left by a run killed while writing
            tmp.unlink(missing_ok=True)
    run = _restore_state(model, trainer, cfg, len(train)) or _Progress()
    while not run.finished and run.epoch < cfg.epochs:
        epoch = run.epoch
        sampler.set_epoch(epoch, run.cells_done)
        loader = DataLoader(train, batch_sampler=sampler, collate_fn=train.collate, num_workers=cfg.num_workers, generator=torch.Generator())
        first = n_batches - len(sampler)
        bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}", unit="batch", total=n_batches, initial=first,
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
                _save_state(model, trainer, run, cfg, len(train), device)
        total, count = distributed.all_reduce_sum([run.total, run.count], device)
        metrics = {"epoch": epoch + 1, "train_loss": total / max(count, 1e-12), **evaluate()}
        run.history.append(metrics)
        improved = run.best is None or metrics[score] > run.best[score]
        if improved:
            run.best, run.best_state, run.stale = dict(metrics), copy.deepcopy(model.state_dict()), 0
        else:
            run.stale += 1
        if info.is_main and on_epoch is not None:
            on_epoch(epoch, metrics, improved)
        run.epoch, run.cells_done, run.total, run.count = epoch + 1, 0, 0.0, 0.0
        if cfg.patience and run.stale >= cfg.patience:
            log.info("%s: no improvement for %d epochs, stopping early", desc, run.stale)
            run.finished = True
        if cfg.checkpoint_dir:
            _save_state(model, trainer, run, cfg, len(train), device)
    assert run.best is not None and run.best_state is not None
    if cfg.select == "last":  # the model holds the last epoch's weights already
        return dict(run.history[-1]), run.history
    if cfg.select != "best":
        raise ValueError(f"select must be 'best' or 'last', got {cfg.select!r}")
    model.load_state_dict(run.best_state)
    return run.best, run.history


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
    the attention to the equivalent :mod:`model.fast` kernel. Under torchrun every rank calls it;
    ``on_epoch`` runs on rank 0 only. Each cell's masking is drawn from (seed, epoch, cell)."""
    prepare_for_speed(model, fast, cfg.compile, cfg.grad_checkpointing)
    model.to(device)
    mask_token = model.config.mask_token

    def step_loss(net: nn.Module, batch: dict[str, torch.Tensor], epoch: int) -> tuple[torch.Tensor, float]:
        seeds = cell_seeds(batch["index"], cfg.seed, epoch)
        inputs, labels = mask_tokens(batch["tokens"], mask_token, mask_prob, replace_prob, row_seeds=seeds)
        inputs, labels = inputs.to(device), labels.to(device)
        with autocast(device, cfg.precision):
            logits = net(inputs)
        loss = nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, float((labels != IGNORE_INDEX).sum())

    def log_epoch(epoch: int, metrics: dict[str, float], improved: bool) -> None:
        log.info(
            "pretrain epoch %d: train loss %.4f, val loss %.4f, val masked accuracy %.4f (baseline %.4f)",
            epoch + 1, metrics["train_loss"], metrics["val_loss"], metrics["val_masked_accuracy"], metrics["baseline_accuracy"],
        )
        if on_epoch is not None:
            on_epoch(epoch, metrics, improved)

    return _fit(model, train, cfg, device, step_loss, lambda: evaluate_mlm(model, val, cfg, device, mask_prob, replace_prob),
                "val_masked_accuracy", "pretrain", log_epoch)


@torch.inference_mode()
def evaluate_mlm(
    model: ScBERT, ds: CellDataset, cfg: TrainConfig, device: torch.device, mask_prob: float = 0.15, replace_prob: float = 0.9
) -> dict[str, float]:
    """Held-out masked-token loss and accuracy, and the accuracy of predicting each cell's most
    common visible non-zero bin on the same masked positions. Each cell's mask is drawn from a
    fixed seed and its index, so every epoch (and any number of processes, each scoring its own
    share of the cells) scores the same positions."""
    model.eval()
    mask_token = model.config.mask_token
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, correct, baseline correct, masked tokens
    for batch in _rows_loader(ds, distributed.shard(len(ds)), cfg.batch_size, cfg.num_workers):
        inputs, labels = mask_tokens(batch["tokens"], mask_token, mask_prob, replace_prob, row_seeds=cell_seeds(batch["index"], 12345))
        baseline = most_common_bin_baseline(inputs, mask_token)
        sel = labels != IGNORE_INDEX
        with autocast(device, cfg.precision):
            logits = model(inputs.to(device))
        logits = logits.float().cpu()
        sums[0] += nn.functional.cross_entropy(logits[sel], labels[sel], reduction="sum").item()
        sums[1] += int((logits[sel].argmax(-1) == labels[sel]).sum())
        sums[2] += int((baseline[:, None].expand_as(labels)[sel] == labels[sel]).sum())
        sums[3] += int(sel.sum())
    loss_sum, correct, base_correct, n = distributed.all_reduce_sum(sums, device)
    n = max(n, 1)
    return {"val_loss": loss_sum / n, "val_masked_accuracy": correct / n, "baseline_accuracy": base_correct / n, "val_masked_tokens": int(n)}


def finetune(
    model: ScBERT,
    train: CellDataset,
    val: CellDataset,
    cfg: TrainConfig,
    device: torch.device,
    class_weights: torch.Tensor | None = None,
    desc: str = "finetune",
    fast: bool = True,
    on_epoch: Callable[[int, dict[str, float], bool], None] | None = None,
    head_init: str = "expression",
    head_init_cells: int = 64,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Supervised fine-tuning with early stopping on validation accuracy. The model ends holding
    the best weights; returns the best epoch's metrics and the history. ``fast``: see :func:`pretrain`.
    ``head_init="expression"`` first points the head's conv1 at the expression read-out of the
    encodings of ``head_init_cells`` training cells (:meth:`CellClassifier.init_from_expression`);
    ``"random"`` keeps the published random start. Under torchrun every rank calls it and the
    validation cells are shared among the ranks (DDP then starts every rank from rank 0's head)."""
    prepare_for_speed(model, fast, cfg.compile, cfg.grad_checkpointing)
    model.to(device)
    if head_init == "expression":  # (a resumed run then restores its own weights over it)
        r2 = init_head_from_expression(model, train, cfg, device, head_init_cells)
        log.info("%s: classifier conv1 set to the read-out of expression from the encodings (R^2 %.3f on %d cells)",
                 desc, r2, min(head_init_cells, len(train)))
    elif head_init not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
    weights = None if class_weights is None else class_weights.to(device)

    def step_loss(net: nn.Module, batch: dict[str, torch.Tensor], epoch: int) -> tuple[torch.Tensor, float]:
        with autocast(device, cfg.precision):
            logits = net(batch["tokens"].to(device))
        labels = batch["labels"].to(device)
        losses = nn.functional.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=cfg.label_smoothing)
        if weights is None:
            return losses.sum(), float(len(labels))
        w = weights[labels]  # as CrossEntropyLoss(weight): sum of w_i * loss_i over sum of w_i
        return (losses * w).sum(), float(w.sum())

    def evaluate() -> dict[str, float]:
        probs, _ = predict_distributed(model, val, cfg.batch_size, device, cfg.precision, fast=fast, num_workers=cfg.num_workers)
        y = val.labels.numpy()
        val_loss = float(nn.functional.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)), torch.from_numpy(y)))
        return {"val_loss": val_loss, "val_accuracy": float((probs.argmax(1) == y).mean())}

    def log_epoch(epoch: int, metrics: dict[str, float], improved: bool) -> None:
        log.info("%s epoch %d: train loss %.4f, val loss %.4f, val accuracy %.4f", desc, epoch + 1, metrics["train_loss"],
                 metrics["val_loss"], metrics["val_accuracy"])
        if on_epoch is not None:
            on_epoch(epoch, metrics, improved)

    return _fit(model, train, cfg, device, step_loss, evaluate, "val_accuracy", desc, log_epoch)


HEAD_INITS = ("expression", "random")


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Loss weights ``n / (n_classes * count)`` per class id 0..n_classes-1 (sklearn's "balanced")."""
    from sklearn.utils.class_weight import compute_class_weight

    if len(np.unique(labels)) != n_classes:
        raise ValueError("every cell type must occur in the training part to weight the classes")
    return torch.tensor(compute_class_weight("balanced", classes=np.arange(n_classes), y=labels), dtype=torch.float32)


@torch.no_grad()
def init_head_from_expression(
    model: ScBERT, ds: CellDataset, cfg: TrainConfig, device: torch.device, n_cells: int = 64, max_tokens: int = 200_000
) -> float:
    """:meth:`CellClassifier.init_from_expression` from the first ``n_cells`` cells of ``ds``
    (encoded in eval mode; the model's mode is restored), on at most ``max_tokens`` gene
    positions drawn evenly from them (memory stays small at 16,906 genes). Returns the R^2."""
    was_training = model.training
    model.eval()
    rows = np.arange(min(n_cells, len(ds)))
    n_genes = model.config.n_genes
    per_cell = min(n_genes, math.ceil(max_tokens / max(1, len(rows))))
    gen = torch.Generator().manual_seed(cfg.seed)
    hs, bins = [], []
    for batch in _rows_loader(ds, rows, 1):  # one cell at a time: the same numbers whatever the batch size or process count
        tokens = batch["tokens"]
        with autocast(device, cfg.precision):
            h = model.encode(tokens.to(device))
        pos = torch.stack([torch.randperm(n_genes, generator=gen)[:per_cell] for _ in range(len(tokens))])
        hs.append(torch.gather(h.float(), 1, pos.to(h.device)[..., None].expand(-1, -1, h.shape[-1])).cpu())
        bins.append(torch.gather(tokens, 1, pos))
    model.train(was_training)
    return model.to_out.init_from_expression(torch.cat(hs), torch.cat(bins), max_tokens=max_tokens, seed=cfg.seed)


def _predict_batches(
    model: ScBERT, loader: DataLoader, device: torch.device, precision: str, embed: bool, pooling: str, bar: tqdm,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    probs, embs = [], []
    for batch in loader:
        tokens = batch["tokens"].to(device)
        with autocast(device, precision):
            h = model.encode(tokens)
            logits = model.to_out(h)
        probs.append(torch.softmax(logits.float(), dim=-1).cpu())
        if embed:
            embs.append(pool_encodings(h, tokens, pooling).cpu())
        bar.update(len(tokens))
    bar.close()
    return probs, embs


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
    bar = tqdm(total=len(ds), desc="predict", unit="cell", disable=not progress, leave=False)
    probs, embs = _predict_batches(model, make_loader(ds, batch_size, False, 0, num_workers), device, precision, embed, pooling, bar)
    return torch.cat(probs).numpy(), (torch.cat(embs).numpy() if embed else None)


@torch.inference_mode()
def predict_distributed(
    model: ScBERT,
    ds: CellDataset,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    fast: bool = True,
    num_workers: int = 0,
) -> tuple[np.ndarray, None]:
    """:func:`predict` with the cells shared among the processes of a torchrun job (each scores a
    contiguous block; every rank gets all probabilities, in dataset order, each cell once). In a
    single process it is :func:`predict`."""
    if not distributed.current().enabled:
        return predict(model, ds, batch_size, device, precision, progress=False, num_workers=num_workers, fast=fast)
    prepare_for_speed(model, fast)
    model.eval().to(device)
    rows = distributed.shard(len(ds))
    bar = tqdm(total=len(rows), disable=True)
    probs, _ = _predict_batches(model, _rows_loader(ds, rows, batch_size, num_workers), device, precision, False, "mean", bar)
    mine = torch.cat(probs).numpy() if probs else np.zeros((0, model.config.n_classes), dtype=np.float32)
    return np.concatenate(distributed.all_gather_objects(mine)), None
