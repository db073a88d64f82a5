"""Resumable training states: everything a run needs to go on after an interruption (weights,
optimiser, schedule, random generators, position in the epoch, early-stopping state), written
atomically to OUT/checkpoints and read back by ``--resume``."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model import distributed
from model.checkpoint import CheckpointError, atomic_torch_save
from model.train.config import TrainConfig
from model.train.optim import Trainer

log = logging.getLogger("scbert")

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


class Progress:
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


def save_state(model: nn.Module, trainer: Trainer, run: Progress, cfg: TrainConfig, n_train: int, device: torch.device) -> None:
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


def restore_state(model: nn.Module, trainer: Trainer, cfg: TrainConfig, n_train: int) -> Progress | None:
    """Load the newest state of ``cfg.resume_from`` into the model, trainer and random generators."""
    run = Progress()
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
