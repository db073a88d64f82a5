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


def _cpu_flags() -> tuple[str, set[str]]:
    """(vendor, instruction-set flags) of this CPU, from /proc/cpuinfo (empty where there is none)."""
    vendor, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return vendor, flags


def auto_precision(device: torch.device) -> tuple[str, str]:
    """The precision ``--precision auto`` picks, and why: bf16 where its products are measured or
    known to be faster than fp32 ones, fp32 elsewhere. GPUs with bf16; CPUs with AMX (Intel
    Sapphire Rapids and later); AMD CPUs with AVX512-BF16 (Zen 4 and later: 958 vs 226 GFLOP/s of
    bf16 and fp32 products on the Zen 4 VM of BENCHMARKS.md, and predict.py 5.1-6.8x the published
    way against 2.7-2.9x in fp32). Not Intel's AVX512-BF16 without AMX (Cooper Lake), where bf16
    products ran at half the fp32 rate."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "a GPU with bf16"
        return "fp32", "this GPU has no bf16"
    if device.type != "cpu":
        return "fp32", f"bf16 is not known to be faster on {device.type}"
    vendor, flags = _cpu_flags()
    if "amx_bf16" in flags:
        return "bf16", "a CPU with AMX: bf16 products are several times faster than fp32 ones"
    if "avx512_bf16" in flags and vendor == "AuthenticAMD":
        return "bf16", "an AMD CPU with AVX512-BF16 (Zen 4 or later): bf16 products ~4x faster than fp32 ones"
    if "avx512_bf16" in flags:
        return "fp32", "AVX512-BF16 without AMX: bf16 products are slower than fp32 ones there"
    return "fp32", "no bf16 instructions on this CPU"


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """``precision``, with ``auto`` resolved for ``device`` (:func:`auto_precision`); and why."""
    if precision == "auto":
        return auto_precision(device)
    return check_precision(precision, device), "as asked"


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
