"""Where and how a run computes: device, arithmetic precision, random seeds, threads, allocator."""

from __future__ import annotations

import contextlib
import ctypes
import random
import sys

import numpy as np
import torch

from model.nn.config import PRECISIONS


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (a CUDA GPU when one is visible), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return dev


def check_precision(precision: str, device: torch.device | None = None) -> str:
    """``precision`` if it is one of :data:`PRECISIONS` (fp16 on a GPU only), else a ValueError."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16" and device is not None and device.type != "cuda":
        raise ValueError("fp16 needs a GPU; use --precision bf16 on CPU")
    return precision


def low_precision_dtype(precision: str) -> torch.dtype | None:
    """The dtype of the products under ``precision``: None for fp32."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[check_precision(precision)]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision context for ``precision`` in fp32 / bf16 / fp16 (fp16 on GPU only)."""
    dtype = low_precision_dtype(check_precision(precision, device))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# On a CPU, per-cell inference is fastest when a batch's activations (cells x tokens x dim) stay in
# the caches: 2 cells of the published size at 4,000 genes (0.21 s a cell in bf16 against 0.34 s in
# batches of 16, BENCHMARKS.md); GPUs want full batches.
CPU_BATCH_ELEMENTS = 2 * 4001 * 200
MAX_INFERENCE_BATCH = 16


def inference_batch_size(n_tokens: int, dim: int, device: torch.device) -> int:
    """Cells per forward pass for inference of a model with ``n_tokens`` tokens of width ``dim``:
    MAX_INFERENCE_BATCH on a GPU; on a CPU as many as keep CPU_BATCH_ELEMENTS activations, 1 to 16."""
    if device.type != "cpu":
        return MAX_INFERENCE_BATCH
    return int(min(MAX_INFERENCE_BATCH, max(1, CPU_BATCH_ELEMENTS // max(1, n_tokens * dim))))


def set_seed(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(n: int) -> None:
    """torch's CPU threads for this process."""
    torch.set_num_threads(n)


def release_memory() -> bool:
    """Hand the free memory of glibc's heap back to the kernel (``malloc_trim``): between chunks of a
    long annotation, where :func:`tune_allocator` would otherwise let freed chunks pile up in the
    heap. Does nothing outside glibc. Returns whether memory was released."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def tune_allocator(threshold: int = 1 << 30) -> bool:
    """Serve tensors up to ``threshold`` bytes from glibc's heap instead of fresh ``mmap`` pages.

    PyTorch hands every freed CPU tensor back to ``malloc``; above glibc's mmap threshold (at most
    32 MB by default) each activation of a 16,907-gene cell is a new mapping whose pages the kernel
    faults in and zeroes again, layer after layer. Reusing heap memory instead cut the system time of
    ``predict.py`` by more than half and its wall time by ~15% (BENCHMARKS.md), for ~25% more peak
    memory. Used for annotation only: in training it doubled peak memory for no gain. Process-wide;
    does nothing outside glibc. Returns whether the setting took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        value = ctypes.c_int(min(threshold, (1 << 31) - 1))
        # -3: M_MMAP_THRESHOLD; -1: M_TRIM_THRESHOLD (else freed memory at the top of the heap is
        # returned to the kernel at once and faulted in again by the next tensor)
        return bool(libc.mallopt(-3, value)) and bool(libc.mallopt(-1, value))
    except (OSError, AttributeError):
        return False
