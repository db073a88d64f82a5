"""Running on several processes with PyTorch's own engine (torchrun + DistributedDataParallel).

The same code runs as one process (CPU or one GPU) and under ``torchrun --nproc_per_node=N
[--nnodes ...]``: rank and world size are read from the environment that torchrun sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); the backend is NCCL on GPUs and Gloo on CPUs. Every
collective here is a no-op in a single process.

Data are split by :class:`EpochBatches`: one seeded permutation of all cells per epoch (the same
on every rank) is cut into global batches of ``batch_size x world_size`` cells, and rank ``r``
takes the ``r``-th slice of each. Every cell is seen exactly once per epoch across ranks (no
padding, no dropped cells), and a run on N processes sees the same global batches as one process
with N times the batch size. Validation cells are split into contiguous shards (:func:`shard`)
whose results are summed or gathered, so each counts once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from model.runtime import resolve_device


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs, plots and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


_INFO = DistInfo()


def current() -> DistInfo:
    """The distributed state of this process (single-process until :func:`init_distributed`)."""
    return _INFO


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group when started by torchrun (several processes), else stay single.

    Each process of a GPU job uses the GPU ``LOCAL_RANK`` of its node (``--device cuda`` or
    ``auto``); a CPU job (``--device cpu``, or no GPU) uses Gloo. Returns the state and the device.
    """
    global _INFO
    if not launched_by_torchrun():
        _INFO = DistInfo()
        return _INFO, resolve_device(device_name)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"process {rank} wants GPU {local} but this node has {torch.cuda.device_count()}: "
                             f"start at most that many processes per node (--nproc_per_node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    _INFO = DistInfo(rank=rank, world_size=world, local_rank=local, backend=backend)
    return _INFO, device


def shutdown() -> None:
    """Leave the process group (after a last barrier, so no rank exits while another still writes)."""
    global _INFO
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _INFO = DistInfo()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (float64)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (picklable objects; small ones)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` inside DistributedDataParallel when there are several processes, else itself.
    Parameters and buffers are broadcast from rank 0, so every rank starts from the same weights."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(net: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` (gradients are not all-reduced) when ``skip``: for the micro-batches of a
    gradient-accumulation group that do not end it."""
    if skip and hasattr(net, "no_sync"):
        return net.no_sync()
    return contextlib.nullcontext()


def shard(n: int, rank: int | None = None, world_size: int | None = None) -> np.ndarray:
    """The contiguous block of ``range(n)`` that ``rank`` evaluates: blocks in rank order are
    ``range(n)`` exactly (no padding; a rank may get none when n < world size)."""
    info = current()
    rank = info.rank if rank is None else rank
    world_size = info.world_size if world_size is None else world_size
    return np.array_split(np.arange(n), world_size)[rank]


class EpochBatches(Sampler[list[int]]):
    """Training batches of one rank (a batch sampler for ``DataLoader(batch_sampler=...)``).

    Epoch ``e`` permutes all ``n`` cells with ``seed`` and ``e`` (identically on every rank), skips
    the first ``start`` cells (to resume mid-epoch), and cuts the rest into global batches of
    ``batch_size * world_size``; rank ``r`` takes the ``r``-th of ``world_size`` near-equal slices
    of each. Every rank gets the same number of batches. When a final global batch has fewer cells
    than ranks, a rank with an empty slice gets one cell of that batch as a *placeholder*
    (``placeholder(i)``): it is computed with weight 0 so that the ranks' gradient exchanges stay
    in step without counting any cell twice.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True, rank: int | None = None,
                 world_size: int | None = None, weights: np.ndarray | None = None) -> None:
        info = current()
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.weights = weights  # per-cell draw probabilities: each epoch draws n cells with replacement
        self.rank = info.rank if rank is None else rank
        self.world_size = info.world_size if world_size is None else world_size
        self.global_batch = batch_size * self.world_size
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Plan epoch ``epoch`` from its ``start``-th cell on."""
        self.epoch, self.start = epoch, start
        rng = np.random.default_rng([self.seed, epoch])
        if self.weights is not None:
            order = rng.choice(self.n, self.n, replace=True, p=self.weights)
        else:
            order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        rest = order[start:]
        self._batches: list[np.ndarray] = []
        self._placeholder: list[bool] = []
        self._sizes: list[int] = []
        for s in range(0, len(rest), self.global_batch):
            chunk = rest[s : s + self.global_batch]
            mine = np.array_split(chunk, self.world_size)[self.rank]
            self._placeholder.append(len(mine) == 0)
            self._batches.append(mine if len(mine) else chunk[:1])
            self._sizes.append(len(chunk))

    def placeholder(self, i: int) -> bool:
        """Whether batch ``i`` (counted from ``start``) is a weight-0 placeholder on this rank."""
        return self._placeholder[i]

    def global_size(self, i: int) -> int:
        """Cells of global batch ``i`` (all ranks together)."""
        return self._sizes[i]

    def __iter__(self) -> Iterator[list[int]]:
        return (b.tolist() for b in self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    def batches_per_epoch(self) -> int:
        """Batches of a whole epoch (from its first cell)."""
        return -(-self.n // self.global_batch)
