"""The settings of a training run (optimisation, stopping, resumable states) as one dataclass.

How the network computes (precision, compile, gradient checkpointing) is not here: it belongs to
the network (:class:`model.nn.config.ExecutionOptions`, set when the model is built).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SELECTIONS = ("best", "last")
SELECT_METRICS = ("accuracy", "macro_f1")
SAMPLINGS = ("uniform", "balanced")
SCHEDULES = ("ours", "published")
PATIENCE_RULES = ("ours", "published")


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
    # "ours": warm-up cosine restarts per optimiser step (warmup_steps, cycle_steps); "published":
    # the published per-epoch schedule (model.train.optim.published_warmup_cosine)
    schedule: str = "ours"
    patience: int | None = None  # early stopping (fine-tuning); None or 0 = never stop early
    # "ours": stop after `patience` epochs without a better validation score; "published": after patience + 1
    patience_rule: str = "ours"
    seed: int = 0
    num_workers: int = 0
    progress: bool = True
    checkpoint_dir: str | None = None  # write resumable training states here (None: none)
    save_every: int = 0  # also every this many optimiser steps (0: at epoch ends only)
    keep_last: int = 2  # training states kept
    resume_from: str | None = None  # a training state file, or a folder holding them (the latest is used)
    max_steps: int | None = None  # stop after this many optimiser steps (the epoch in progress is scored)
    # fine-tuning for rare types (the published recipe leaves all of these off)
    min_steps: int = 0  # step floor: epochs are added until the run has at least this many optimiser steps
    select_metric: str = "accuracy"  # validation metric that chooses the kept epoch; macro_f1 ties go to the lower val loss
    logit_adjust: float = 0.0  # tau: training logits + tau * log(class prior), the logit-adjusted cross-entropy
    sampling: str = "uniform"  # "balanced": each class drawn equally often (with replacement)
    head_lr: float | None = None  # learning rate of the classifier head (None: lr)
    fixed_budget_below: int = 0  # fewer validation cells than this: no early stopping, the last epoch is kept

    def __post_init__(self) -> None:
        if self.select not in SELECTIONS:
            raise ValueError(f"select must be one of {SELECTIONS}, got {self.select!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.select_metric not in SELECT_METRICS:
            raise ValueError(f"select_metric must be one of {SELECT_METRICS}, got {self.select_metric!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if self.patience_rule not in PATIENCE_RULES:
            raise ValueError(f"patience_rule must be one of {PATIENCE_RULES}, got {self.patience_rule!r}")

    def optimisation(self) -> dict[str, Any]:
        """The settings that shape the weights (for a checkpoint's ``training`` record): everything
        but progress display, workers and where states are kept."""
        skip = {"progress", "num_workers", "checkpoint_dir", "save_every", "keep_last", "resume_from"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    def epochs_for(self, batches_per_epoch: int) -> int:
        """Epochs of the run: ``epochs``, or more when that many would give fewer than ``min_steps``
        optimiser steps (a small training set then still gets a real budget)."""
        steps = max(1, -(-batches_per_epoch // self.grad_acc))
        return max(self.epochs, -(-self.min_steps // steps))

    def for_part(self, part: str) -> TrainConfig:
        """The settings of one part of a run (a cross-validation fold): its training states go to,
        and are resumed from, the subfolder ``part`` of ``checkpoint_dir`` and of ``resume_from``
        (a single state file is resumed from as it is)."""
        if not part:
            return self
        resume = self.resume_from
        if resume is not None and not Path(resume).is_file():
            resume = str(Path(resume) / part)
        return dataclasses.replace(self, checkpoint_dir=None if self.checkpoint_dir is None else str(Path(self.checkpoint_dir) / part),
                                   resume_from=resume)
