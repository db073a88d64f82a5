"""Rough time estimates said at the start of a long stage ("an epoch takes roughly 3 min here").

The cost of a cell is the arithmetic of its forward pass (:func:`model.nn.flops.forward_cost`; a
training step adds two passes' worth for each layer the backward pass goes through), and the
machine's speed is measured now, with a matrix product of this precision (a busy machine is slower,
and the estimate says so). The model's kernels reach about a third of that rate: on the Zen 4 VM of
BENCHMARKS.md a published-size fine-tuning step ran at 33% of the square-product rate in bf16, a
pretraining step at 29%, and the demo's pretraining (dim 32, 2,001 tokens) at about 30% in fp32.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

import torch

from model.nn.flops import forward_cost

KERNEL_SHARE = 0.3  # of the measured matrix-product rate, what the model's passes reach


@lru_cache(maxsize=8)
def product_rate(precision: str = "fp32", device_type: str = "cpu") -> float:
    """FLOP/s of a 768-square matrix product in ``precision`` on this machine now: the median of 9
    (~0.1-0.5 s), so that a machine shared with other jobs is measured as the run will find it."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    device = torch.device(device_type)
    # its own generator: a measurement that runs or not (it is cached) must not move the run's random state
    a = torch.randn(768, 768, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    times = []
    for _ in range(9):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * 768**3 / max(sorted(times)[len(times) // 2], 1e-9)


def cell_seconds(config: Any, precision: str, device: Any, kept_layers: int | None = None) -> float:
    """Seconds per cell of inference (``kept_layers`` None) or of a training step whose backward pass
    goes through ``kept_layers`` of the model's layers."""
    forward = forward_cost(config).total
    work = forward if kept_layers is None else forward * (1 + 2 * kept_layers / max(config.depth, 1))
    return work / (KERNEL_SHARE * product_rate(precision, getattr(device, "type", "cpu")))


def duration(seconds: float) -> str:
    """``seconds`` in words: "40 s", "3 min", "1.5 h"."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def epoch_estimate(config: Any, n_train: int, n_val: int, precision: str, device: Any, kept_layers: int,
                   frozen_encoder: bool = False) -> str:
    """"an epoch of N cells takes roughly T here" for a training run, with the machine's rate; with a
    ``frozen_encoder`` (head-only fine-tuning) the encoder pass is said once, as it runs once when its
    encodings fit in memory (:mod:`model.train.encoding_cache`)."""
    per_epoch = n_train * cell_seconds(config, precision, device, kept_layers) + n_val * cell_seconds(config, precision, device)
    rate = product_rate(precision, getattr(device, "type", "cpu")) / 1e9
    machine = f"(matrix products at {rate:.0f} GFLOP/s in {precision} now; a busy machine is slower)"
    if frozen_encoder:
        return (f"the frozen encoder's pass over {n_train:,} training and {n_val:,} validation cells takes roughly {duration(per_epoch)} "
                f"here {machine}; it runs once when their encodings fit in memory, and each epoch then trains the head alone")
    return f"an epoch of {n_train:,} training cells (and {n_val:,} validation cells) takes roughly {duration(per_epoch)} here {machine}"
