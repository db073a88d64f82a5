"""How much memory a batch of cells needs, and refusing a batch size that cannot fit before the
first step (instead of an allocator's traceback, or a machine that starts swapping).

The estimate is a model of the peak, not a measurement: one cell of a batch holds the working
tensors of one layer at a time (:func:`cell_working_bytes`), and in training also what the backward
pass keeps of each layer it goes through. Against the peak RSS of whole processes measured on a CPU
(BENCHMARKS.md, fp32) it gives, at the published size and batch 3, 3.1 GiB for a fine-tuning step
(measured 2,987 MB) and 6.4 GiB for a pretraining step (6,841 MB); for 16 cells of one layer's
inference at 4,000 genes 1.45 GiB (1,548 MB). bf16 needs less; the estimate stays the fp32 one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.io import InputError

GB = 2**30
KEPT_LAYER_SHARE = 0.75  # of one layer's working tensors, what the backward pass keeps per layer it goes through
OPTIMISER_COPIES = 4  # weights, gradients and Adam's two moments


def cell_working_bytes(config: Any) -> int:
    """Bytes one cell of a batch holds at the peak of a layer's forward pass, in float32: the
    residual stream and its LayerNorm, q, k, v, the heads' output and the block's output, the
    feed-forward hidden layer twice (linear, GELU) and the q, k that attention hooks keep."""
    hd = config.heads * config.dim_head
    per_token = 3 * config.dim + 4 * hd + 2 * 4 * config.dim + 2 * hd
    return 4 * config.seq_len * per_token


def parameter_count(config: Any) -> int:
    """About how many weights a model of ``config`` has (embeddings, layers, head)."""
    hd = config.heads * config.dim_head
    layer = 4 * config.dim * hd + 2 * 4 * config.dim * config.dim + 6 * config.dim
    head = config.seq_len * 512 + 512 * config.classifier_hidden if config.head == "classifier" else config.dim * config.num_tokens
    return config.seq_len * config.dim + config.num_tokens * config.dim + config.depth * layer + head


def size_text(n_bytes: float) -> str:
    """Bytes in words: "350 MB", "2.4 GB"."""
    return f"{n_bytes / 2**20:.0f} MB" if n_bytes < 0.1 * GB else f"{n_bytes / GB:.1f} GB"


@dataclass(frozen=True)
class BatchMemory:
    """The memory a batch is estimated to need (``bytes``) and what is free for it (``free``, None when unknown)."""

    bytes: int
    per_cell: int
    fixed: int
    free: int | None
    limited: bool  # ``free`` is a limit the user set, not the free memory

    def describe(self, batch_size: int) -> str:
        free = "" if self.free is None else f" ({size_text(self.free)} {'allowed' if self.limited else 'free'})"
        return f"a batch of {batch_size} cells needs about {size_text(self.bytes)}{free}"

    def largest_batch(self) -> int:
        """The most cells a batch can hold within ``free`` (0 when not even one cell fits)."""
        if self.free is None:
            return 0
        return max(0, int((self.free - self.fixed) // max(self.per_cell, 1)))


def available_memory(device: Any) -> int | None:
    """Bytes free for this process: on a GPU what the device has free; on a CPU the kernel's
    MemAvailable, or what the cgroup limit leaves when that is less. None when unknown."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max" and free is not None:
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def batch_memory(config: Any, batch_size: int, device: Any, kept_layers: int | None = None, limit_gb: float | None = None) -> BatchMemory:
    """The memory of a batch of ``batch_size`` cells through a model of ``config``: inference
    (``kept_layers`` None) or a training step whose backward pass goes through ``kept_layers``
    layers; ``limit_gb`` replaces the free memory of ``device`` as what may be used."""
    working = cell_working_bytes(config)
    weights = 4 * parameter_count(config)
    if kept_layers is None:
        per_cell, fixed = working, weights
    else:
        per_cell, fixed = int(working * (1 + KEPT_LAYER_SHARE * kept_layers)), OPTIMISER_COPIES * weights
    free = int(limit_gb * GB) if limit_gb is not None else available_memory(device)
    return BatchMemory(batch_size * per_cell + fixed, per_cell, fixed, free, limit_gb is not None)


def check_batch_memory(config: Any, batch_size: int, device: Any, kept_layers: int | None = None, limit_gb: float | None = None,
                       name: str = "--batch-size", hint: str = "") -> BatchMemory:
    """:func:`batch_memory`, or an InputError saying the estimate, what is free and the largest
    batch that fits (``name``: how the caller sets the batch size; ``hint``: other ways out, where
    ``{acc}`` becomes the accumulation steps that keep ``{cells}``, the cells of a step)."""
    need = batch_memory(config, batch_size, device, kept_layers, limit_gb)
    if need.free is None or need.bytes <= need.free:
        return need
    what = "one inference pass" if kept_layers is None else f"one training step ({kept_layers} layers in the backward pass)"
    fits = need.largest_batch()
    smaller = min(fits, batch_size - 1)
    advice = (f"use {name} {smaller} or less{hint.format(acc=math.ceil(batch_size / max(smaller, 1)), cells=batch_size)}" if fits >= 1 else
              "not even one cell fits: close other programs, use a machine with more memory, or a smaller model")
    where = f"{size_text(need.free)} {'are allowed (--memory-limit)' if need.limited else 'are free'}"
    raise InputError(f"{name} {batch_size} needs about {size_text(need.bytes)} for {what} of this model ({config.seq_len:,} tokens "
                     f"x dim {config.dim}, {config.depth} layers), but {where}: {advice}")


def kept_layers_of(depth: int, trained: str, grad_checkpointing: bool = False) -> int:
    """Layers the backward pass goes through: ``"all"`` (pretraining, training from scratch,
    --train-all), ``"published"`` (the last two: the second-to-last is trained), ``"head"`` (none);
    with gradient checkpointing one layer's tensors at a time."""
    kept = {"all": depth, "published": min(2, depth), "head": 0}[trained]
    return min(kept, 1) if grad_checkpointing else kept


def gigabytes(value: str) -> float:
    """A --memory-limit value: a positive number of GB."""
    x = float(value)
    if not (x > 0 and math.isfinite(x)):
        raise ValueError(f"expected a number of GB above 0, got {value!r}")
    return x
