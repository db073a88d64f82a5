"""``--recipe published``: the published code's schedule, mask count, stopping rule and masked
accuracy, each against a direct re-statement, and the recipe reaching config.json, metrics.json
and the checkpoint (explicit flags win)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import finetune
import pretrain
from data.dataset import CellDataset, mask_tokens
from model.checkpoint import load_checkpoint
from model.nn.config import ScBERTConfig
from model.nn.network import ScBERT
from model.train import pretraining
from model.train.config import TrainConfig
from model.train.loop import fit
from model.train.optim import published_warmup_cosine
from model.train.pretraining import evaluate_mlm, visible_loss

from .conftest import TINY_MODEL


def _reference_lrs(n_epochs: int, max_lr: float, first: int = 15, mult: float = 2.0, min_lr: float = 1e-6, warmup: int = 5,
                   gamma: float = 0.9) -> list[float]:
    """The published CosineAnnealingWarmupRestarts, stepped once per epoch, re-stated step by step."""
    cur, step, cycle, out = first, 0, 0, []
    for _ in range(n_epochs):
        peak = max_lr * gamma**cycle
        if step < warmup:
            out.append((peak - min_lr) * step / warmup + min_lr)
        else:
            out.append(min_lr + (peak - min_lr) * (1 + math.cos(math.pi * (step - warmup) / (cur - warmup))) / 2)
        step += 1
        if step >= cur:
            cycle, step = cycle + 1, step - cur
            cur = int((cur - warmup) * mult) + warmup
    return out


def test_published_schedule_per_epoch() -> None:
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = published_warmup_cosine(opt)
    got = []
    for _ in range(100):
        got.append(opt.param_groups[0]["lr"])
        sched.step()
    np.testing.assert_allclose(got, _reference_lrs(100, 1e-4), rtol=1e-9, atol=1e-15)
    assert got[0] == pytest.approx(1e-6) and got[5] == pytest.approx(1e-4) and got[15] == pytest.approx(1e-6)
    assert max(got[15:40]) == pytest.approx(0.9e-4)  # the second cycle lasts 25 epochs, peak x 0.9


def test_mask_count_rounding() -> None:
    tokens = torch.zeros(1, 41, dtype=torch.long)
    tokens[0, :7] = 3  # 7 expressed genes: 0.15 x 7 = 1.05
    for rounding, n in (("round", 1), ("ceil", 2)):
        _, labels = mask_tokens(tokens, 6, 0.15, 1.0, generator=torch.Generator().manual_seed(0), rounding=rounding)
        assert int((labels != -100).sum()) == n, rounding


@pytest.mark.parametrize(("rule", "epochs"), [("ours", 3), ("published", 4)])
def test_patience_rule(rule: str, epochs: int) -> None:
    torch.manual_seed(0)
    model = ScBERT(ScBERTConfig(n_genes=10, dim=8, depth=1, heads=2, dim_head=4, gene_embedding="none"))
    ds = CellDataset(np.ones((4, 10), dtype=np.float32), 5)
    cfg = TrainConfig(epochs=10, batch_size=4, patience=2, patience_rule=rule, progress=False)

    def step(net: torch.nn.Module, batch: dict, epoch: int) -> tuple[torch.Tensor, float]:
        return net(batch["tokens"]).float().mean() * 0.0, 1.0

    _, history = fit(model, ds, cfg, torch.device("cpu"), step, lambda: {"score": 1.0}, "score", "t", None)
    assert len(history) == epochs  # one improving epoch, then 2 (ours) or 3 (published) without improvement


def test_masked_accuracy_over_expression_bins() -> None:
    torch.manual_seed(0)
    model = ScBERT(ScBERTConfig(n_genes=30, dim=8, depth=1, heads=2, dim_head=4, gene_embedding="none"))
    with torch.no_grad():
        model.to_out.weight.zero_()
        model.to_out.bias.copy_(torch.tensor([100.0, 0.0, 50.0, 0.0, 0.0, 0.0, 0.0]))  # always token 0, then bin 2
    X = np.random.default_rng(0).integers(1, 5, (6, 30)).astype(np.float32)
    ds = CellDataset(X, 5)
    cfg = TrainConfig(batch_size=3)
    all_tokens = evaluate_mlm(model, ds, cfg, torch.device("cpu"), accuracy="all_tokens")
    bins = evaluate_mlm(model, ds, cfg, torch.device("cpu"), accuracy="expression_bins")
    assert all_tokens["val_masked_accuracy"] == 0.0
    assert 0 < bins["val_masked_accuracy"] < 1  # the masked genes that hold bin 2


def test_visible_loss_scores_only_the_visible_genes() -> None:
    tokens = torch.tensor([[0, 3, 2, 1, 0], [4, 0, 1, 2, 5]])
    inputs, labels = mask_tokens(tokens, 6, 0.5, 1.0, row_seeds=[1, 2])
    logits = torch.full((2, 5, 7), -30.0)
    logits.scatter_(2, tokens[..., None], 30.0)  # every position predicts its own bin...
    assert float(visible_loss(logits, tokens, labels)) < 1e-6
    chosen = labels != -100
    logits[chosen] = 0.0  # ...a wrong guess at the masked positions and the last one does not count
    logits[:, -1] = 0.0
    assert float(visible_loss(logits, tokens, labels)) < 1e-6
    logits[~chosen] = 0.0
    assert float(visible_loss(logits, tokens, labels)) == pytest.approx(math.log(7), abs=1e-5)


def test_visible_weight_zero_is_the_masked_loss() -> None:
    """--visible-loss 0 trains exactly as before; a weight changes the training and its recorded loss."""
    X = np.random.default_rng(0).poisson(1.0, (12, 20)).astype(np.float32)

    def run(weight: float) -> tuple[float, torch.Tensor]:
        torch.manual_seed(0)
        model = ScBERT(ScBERTConfig(n_genes=20, dim=8, depth=1, heads=2, dim_head=4, gene_embedding="none"))
        ds = CellDataset(X, 5)
        _, history = pretraining.pretrain(model, ds.subset(np.arange(9)), ds.subset(np.arange(9, 12)), TrainConfig(batch_size=3, epochs=1, progress=False),
                              torch.device("cpu"), visible_weight=weight)
        return history[0]["train_loss"], model.to_out.weight.detach().clone()

    base, again, weighted = run(0.0), run(0.0), run(1.0)
    assert base[0] == again[0] and torch.equal(base[1], again[1])
    assert weighted[0] > base[0] and not torch.equal(weighted[1], base[1])


@pytest.fixture(scope="module")
def prep(tiny_run: dict[str, Path]) -> Path:
    return tiny_run["prep"]


@pytest.mark.slow
def test_recipe_reaches_the_records(prep: Path, tmp_path: Path) -> None:
    pbmc_small = prep
    out = tmp_path / "pre"
    pretrain.main(["--data", str(pbmc_small), "--out", str(out), *TINY_MODEL, "--recipe", "published", "--epochs", "1",
                   "--batch-size", "16", "--quiet"])
    args = json.loads((out / "config.json").read_text())["args"]
    assert (args["recipe"], args["grad_acc"], args["clip_norm"], args["batch_size"], args["schedule"]) == ("published", 60, 100.0, 16, "published")
    assert (args["mask_rounding"], args["masked_accuracy"]) == ("ceil", "expression_bins")
    assert json.loads((out / "metrics.json").read_text())["recipe"] == "published"
    rec = load_checkpoint(out / "model.pt").training
    assert rec["recipe"] == "published" and rec["optimisation"]["schedule"] == "published" and rec["optimisation"]["grad_acc"] == 60
    assert rec["pretraining"]["mask_rounding"] == "ceil" and rec["pretraining"]["visible_weight"] == 0.0  # the published objective

    ft = tmp_path / "ft"
    finetune.main(["--data", str(pbmc_small), "--label-key", "celltype", "--pretrained", str(out / "model.pt"), "--out", str(ft),
                   "--recipe", "published", "--epochs", "1", "--batch-size", "16", "--head-init", "expression", "--quiet"])
    args = json.loads((ft / "config.json").read_text())["args"]
    assert (args["patience"], args["patience_rule"], args["clip_norm"], args["head_init"]) == (10, "published", 1e6, "expression")
    assert load_checkpoint(ft / "model.pt").training["recipe"] == "published"
    ours = tmp_path / "ours"
    finetune.main(["--data", str(pbmc_small), "--label-key", "celltype", "--pretrained", str(out / "model.pt"), "--out", str(ours),
                   "--epochs", "1", "--quiet"])
    args = json.loads((ours / "config.json").read_text())["args"]
    assert (args["recipe"], args["batch_size"], args["grad_acc"], args["patience"], args["head_init"]) == ("ours", 16, 1, 8, "expression")
