"""Two-process torchrun (gloo, CPU) runs of pretraining and fine-tuning on a tiny model, checked
against single-process runs with the same global batch."""

from __future__ import annotations

import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

import finetune
import pretrain
from model.distributed import EpochBatches, shard

REPO = Path(__file__).resolve().parents[1]

N_CELLS, N_GENES, TYPES = 48, 100, ("alpha", "beta", "gamma")
TINY = ["--dim", "8", "--depth", "1", "--heads", "2", "--dim-head", "4", "--device", "cpu", "--quiet", "--lr", "3e-3",
        "--warmup-steps", "1", "--min-genes", "0"]


def write_tiny(folder: Path, n_cells: int = N_CELLS, seed: int = 0) -> tuple[Path, Path]:
    """A preprocessed-looking .h5ad (log2 values, uns marker of preprocess.py) of three cell types
    with their own expressed genes, and its gene list; returns (data, genes)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.array([TYPES[i % 3] for i in range(n_cells)])
    X = np.zeros((n_cells, N_GENES), dtype=np.float32)
    for i, t in enumerate(labels):
        block = TYPES.index(t) * 30
        X[i, block : block + 30] = rng.uniform(1, 5, 30) * (rng.random(30) < 0.7)
        X[i, 90:] = rng.uniform(0, 3, 10) * (rng.random(10) < 0.5)
    genes = [f"GENE{j}" for j in range(N_GENES)]
    adata = ad.AnnData(X=sparse.csr_matrix(X), obs=pd.DataFrame({"celltype": labels}, index=[f"cell{i}" for i in range(n_cells)]))
    adata.var_names = genes
    adata.uns["scbert_preprocess"] = json.dumps({"synthetic": True})
    data = folder / "tiny.h5ad"
    adata.write_h5ad(data)
    (folder / "genes.txt").write_text("\n".join(genes) + "\n")
    return data, folder / "genes.txt"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_cmd(script: str | Path, args: list[str], nproc: int = 2) -> list[str]:
    """``torchrun --nproc_per_node=N`` on this machine only (127.0.0.1, a free port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), *args]


def run_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}


def torchrun(script: str | Path, args: list[str], nproc: int = 2) -> None:
    proc = subprocess.run(torchrun_cmd(script, args, nproc), cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def model_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


# A worker that runs the real pretraining loop and records the cells each rank's batches hold.
WORKER = '''
import json, sys
import anndata as ad
import torch
from data.dataset import CellDataset
from model import distributed
from model.nn.config import ScBERTConfig
from model.nn.network import ScBERT
from model.runtime import set_seed
from model.train.config import TrainConfig
from model.train.pretraining import pretrain

data, out, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
info, device = distributed.init_distributed("cpu")
seen = []

class Recording(CellDataset):
    def collate(self, indices):
        seen.append([int(i) for i in indices])
        return super().collate(indices)

X = ad.read_h5ad(data).X
set_seed(0)
model = ScBERT(ScBERTConfig(n_genes=X.shape[1], dim=8, depth=1, heads=2, dim_head=4, gene_embedding="none", head="mlm"))
train, val = Recording(X[:43], 5), CellDataset(X[43:], 5)
cfg = TrainConfig(epochs=3, batch_size=batch, lr=3e-3, warmup_steps=1, seed=0, progress=False)
best, history = pretrain(model, train, val, cfg, device)
if info.is_main:
    torch.save(model.state_dict(), f"{out}/model.pt")
# mixed precision (bf16 autocast) with gradient accumulation and clipping
cfg = TrainConfig(epochs=2, batch_size=batch, grad_acc=2, clip_norm=0.5, lr=3e-3, warmup_steps=1, seed=0, progress=False)
model.configure(model.options.replace(precision="bf16"))
_, bf16 = pretrain(model, Recording(X[:43], 5), val, cfg, device)
json.dump({"seen": seen[: 24], "history": history, "bf16": bf16, "rank": info.rank}, open(f"{out}/rank{info.rank}.json", "w"))
distributed.shutdown()
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_tiny(tmp_path_factory.mktemp("tiny"))


def test_epoch_batches_split_every_cell_once() -> None:
    n, per_rank, world = 43, 3, 2
    ranks = [EpochBatches(n, per_rank, seed=7, rank=r, world_size=world) for r in range(world)]
    for epoch in range(2):
        for s in ranks:
            s.set_epoch(epoch)
        assert len(ranks[0]) == len(ranks[1]) == ranks[0].batches_per_epoch() == 8
        cells = [i for s in ranks for j, b in enumerate(s) if not s.placeholder(j) for i in b]
        assert sorted(cells) == list(range(n))  # disjoint and covering: each cell exactly once
        single = EpochBatches(n, per_rank * world, seed=7, rank=0, world_size=1)
        single.set_epoch(epoch)
        # the global batches are those of one process with the whole batch
        for j, b in enumerate(single):
            assert sorted(b) == sorted(i for s in ranks if not s.placeholder(j) for i in list(s)[j])
    assert ranks[1].placeholder(7) and not ranks[0].placeholder(7)  # 43 = 7 x 6 + 1: rank 1 idles on the last step
    ranks[0].set_epoch(0, start=12)  # resuming 12 cells into the epoch
    assert [i for b in ranks[0] for i in b][:3] == list(np.random.default_rng([7, 0]).permutation(n)[12:15])
    assert [len(shard(10, r, 4)) for r in range(4)] == [3, 3, 2, 2] and np.concatenate([shard(10, r, 4) for r in range(4)]).tolist() == list(range(10))


@pytest.mark.slow
def test_two_process_pretraining_loop_matches_one_process(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """The real loop under torchrun (2 x 3 cells per step) sees each cell once per epoch, and ends
    with the weights of one process with 6 cells per step (tolerance 1e-5, float summation order)."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    torchrun(worker, [str(tiny[0]), str(tmp_path), "3"])
    single = tmp_path / "single"
    single.mkdir()
    argv = sys.argv
    try:  # the one-process reference runs in this process
        sys.argv = [str(worker), str(tiny[0]), str(single), "6"]
        runpy.run_path(str(worker), run_name="__main__")
    finally:
        sys.argv = argv
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, got in enumerate(logs):
        expected = []
        s = EpochBatches(43, 3, seed=0, rank=r, world_size=2)
        for epoch in range(3):
            s.set_epoch(epoch)
            expected.extend(list(s))
        assert got["seen"] == expected  # the loop trains on exactly the planned batches
    history = logs[0]["history"]
    assert history == logs[1]["history"]  # validation is gathered: every rank sees the same metrics
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    ref = json.loads((single / "rank0.json").read_text())["history"]
    assert [h["val_masked_tokens"] for h in history] == [h["val_masked_tokens"] for h in ref]  # every val cell once
    assert max_diff(torch.load(tmp_path / "model.pt", weights_only=True), torch.load(single / "model.pt", weights_only=True)) < 1e-5
    # bf16 autocast + clipping + accumulation under DDP: the losses of one process, to bf16 accuracy
    for mine, one in zip(logs[0]["bf16"], json.loads((single / "rank0.json").read_text())["bf16"]):
        assert np.isfinite(mine["train_loss"]) and abs(mine["train_loss"] - one["train_loss"]) < 2e-2 * one["train_loss"]


@pytest.mark.slow
def test_two_process_finetune_cli_matches_one_process(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """finetune.py under torchrun (2 x 3 cells, gradient accumulation over 2 steps with no_sync,
    class weights) writes the model.pt of one process with 6 cells per step (tolerance 1e-5)."""
    data, genes = tiny
    # --head-init random: the expression read-out that starts the head by default is fitted on
    # encodings whose last bits depend on the thread count of each process (~1e-5 after training),
    # which would blur this check of the distributed arithmetic; DDP starts every rank from rank 0's head.
    common = ["--data", str(data), "--label-key", "celltype", "--vocab", str(genes), *TINY, "--epochs", "3", "--gene2vec", "none",
              "--grad-acc", "2", "--class-weights", "--head-init", "random",
              "--dropout", "0"]  # the head's dropout masks come from each process's own random stream
    torchrun(REPO / "finetune.py", [*common, "--out", str(tmp_path / "ddp"), "--batch-size", "3"])
    finetune.main([*common, "--out", str(tmp_path / "one"), "--batch-size", "6"])
    assert max_diff(model_state(tmp_path / "ddp" / "model.pt"), model_state(tmp_path / "one" / "model.pt")) < 1e-5
    m_ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    m_one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert m_ddp["n_val"] == m_one["n_val"] == 9 and m_ddp["accuracy"] == m_one["accuracy"]
    losses = [h["train_loss"] for h in m_ddp["history"]]
    assert losses[-1] < losses[0]
    assert not (tmp_path / "ddp" / "log.txt").read_text().count("torchrun job") > 1  # only rank 0 logs


@pytest.mark.slow
def test_two_process_pretraining_resumes_after_sigkill(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """pretrain.py under torchrun is SIGKILLed (the whole job) once a mid-epoch state is on disk,
    resumed under torchrun, and ends with the weights of an uninterrupted one-process run with the
    same global batch (tolerance 1e-5); every state file left behind loads."""
    data, genes = tiny
    common = ["--data", str(data), "--vocab", str(genes), *TINY, "--epochs", "2", "--gene2vec", "train", "--val-frac", "0.1",
              "--save-every", "2", "--keep-last", "2"]
    out = tmp_path / "ddp"
    cmd = torchrun_cmd(REPO / "pretrain.py", [*common, "--out", str(out), "--batch-size", "3"])
    proc = subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        kill_when(out / "checkpoints", lambda names: any(n.startswith("state-00000-") for n in names), proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
    for f in (out / "checkpoints").glob("state-*.pt"):
        torch.load(f, weights_only=True)
    torchrun(REPO / "pretrain.py", [*common, "--out", str(out), "--batch-size", "3", "--resume", str(out)])
    pretrain.main([*common, "--out", str(tmp_path / "one"), "--batch-size", "6"])
    assert "resumed from" in (out / "log.txt").read_text()
    assert max_diff(model_state(out / "model.pt"), model_state(tmp_path / "one" / "model.pt")) < 1e-5


def kill_when(folder: Path, ready: Callable[[list[str]], bool], proc: subprocess.Popen, timeout: float = 240.0) -> None:
    """SIGKILL ``proc`` and its whole process group as soon as ``ready`` holds for the file names in ``folder``."""
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        names = [p.name for p in folder.glob("*")] if folder.is_dir() else []
        if ready(names):
            os.killpg(proc.pid, signal.SIGKILL)
            return
        time.sleep(0.005)
    raise AssertionError("no training state appeared in time")


def test_launcher_flags_are_accepted() -> None:
    """Older and newer launchers pass --local_rank / --local-rank; rank and world size come from the environment."""
    for flag in ("--local_rank", "--local-rank"):
        args = pretrain.build_parser().parse_args(["--data", "x.h5ad", "--out", "o", flag, "1", "--resume", "o", "--save-every", "5"])
        assert args.local_rank == 1 and args.resume == "o" and args.save_every == 5 and args.keep_last == 2


def test_head_learning_rate_reaches_the_head_inside_ddp() -> None:
    """The head's own learning rate applies when the model is wrapped (DistributedDataParallel keeps it as .module)."""
    from torch import nn

    from model.train.config import TrainConfig
    from model.train.optim import parameter_groups

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.to_out = nn.Linear(2, 2), nn.Linear(2, 1)

    class Wrapped(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    cfg = TrainConfig(lr=1e-4, head_lr=1e-3)
    for model in (Net(), Wrapped(Net())):
        groups = parameter_groups(model, cfg)
        assert len(groups) == 2 and groups[1]["lr"] == 1e-3 and len(groups[1]["params"]) == 2
