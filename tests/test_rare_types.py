"""The fine-tuning recipe for rare types and small training sets: class-balanced sampling and the
logit-adjusted loss, the step floor, the stopping split that keeps a rare type's cells, fixed
FAVOR+ features (the published recipe still redraws them), macro-F1 model choice, and the one
recipe that finetune.py and the benchmark's scbert method share. Tiny data, no timing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import finetune as finetune_script
from data.dataset import CellDataset
from model.cli.args import apply_recipe, train_config
from model.distributed import EpochBatches
from model.nn.config import ScBERTConfig
from model.nn.network import ScBERT
from model.train.config import TrainConfig
from model.train.finetuning import class_prior, finetune, stopping_split
from model.train.initialisation import new_classifier
from model.train.loop import balanced_sampling_weights, better, fit
from model.train.optim import Trainer
from model.train.recipes import finetune_parts
from scripts.benchmark.methods import PRESETS, ScBERTMethod

TINY = ScBERTConfig(n_genes=10, dim=8, depth=2, heads=2, dim_head=4, gene_embedding="none", nb_features=4)


def _drawn(labels: np.ndarray, epochs: int = 20) -> np.ndarray:
    sampler = EpochBatches(len(labels), 10, seed=0, weights=balanced_sampling_weights(labels))
    counts = np.zeros(labels.max() + 1)
    for e in range(epochs):
        sampler.set_epoch(e)
        for batch in sampler:
            counts += np.bincount(labels[batch], minlength=len(counts))
    return counts / counts.sum()


def test_balanced_sampling_draws_each_type_equally() -> None:
    labels = np.array([0] * 180 + [1] * 15 + [2] * 5)
    shares = _drawn(labels)
    np.testing.assert_allclose(shares, [1 / 3] * 3, atol=0.03)  # uniform shuffling would give 0.90 / 0.075 / 0.025
    sampler = EpochBatches(len(labels), 10, seed=0)
    assert sorted(i for b in sampler for i in b) == list(range(len(labels)))  # without weights: each cell once an epoch


def test_logit_adjustment_adds_the_log_prior() -> None:
    prior = class_prior(np.array([0, 0, 0, 1]), 3)
    np.testing.assert_allclose(prior.numpy(), [3 / 5, 1 / 5, 1 / 5], rtol=1e-6)  # a class without cells counts as one cell
    assert torch.isfinite(torch.log(prior)).all()
    # the adjusted loss is the plain loss of logits + tau log(prior): a rare class costs more to miss
    logits = torch.zeros(1, 3)
    plain = torch.nn.functional.cross_entropy(logits, torch.tensor([1]))
    adjusted = torch.nn.functional.cross_entropy(logits + torch.log(prior), torch.tensor([1]))
    assert adjusted > plain


def _fit_epochs(cfg: TrainConfig, n_cells: int = 12, scores: list[float] | None = None) -> list[dict[str, float]]:
    torch.manual_seed(0)
    model = ScBERT(TINY)
    ds = CellDataset(np.ones((n_cells, 10), dtype=np.float32), 5)
    seq = iter(scores or [])

    def step(net: torch.nn.Module, batch: dict, epoch: int) -> tuple[torch.Tensor, float]:
        return net(batch["tokens"]).float().mean() * 0.0, 1.0

    _, history = fit(model, ds, cfg, torch.device("cpu"), step, lambda: {"score": next(seq, 0.0)}, "score", "t", None)
    return history


def test_step_floor_adds_epochs_and_delays_early_stopping() -> None:
    cfg = TrainConfig(epochs=2, batch_size=4, min_steps=10, progress=False)
    assert cfg.epochs_for(3) == 4 and dataclasses.replace(cfg, min_steps=0).epochs_for(3) == 2
    assert len(_fit_epochs(cfg)) == 4  # 12 cells, batches of 4: 3 steps an epoch, 10 steps need 4 epochs
    stop = TrainConfig(epochs=20, batch_size=4, min_steps=15, patience=1, progress=False)
    assert len(_fit_epochs(stop, scores=[1.0])) == 5  # patience would stop after epoch 2; the floor (15 steps) runs 5
    model = ScBERT(TINY)
    trainer = Trainer(model, TrainConfig(epochs=1, batch_size=4, min_steps=30, warmup_steps=0), 3, torch.device("cpu"))
    assert trainer.scheduler.lr_lambdas[0](29) > 0.01 * 1.001  # the cosine spans the whole floor, not 1 epoch


def test_macro_f1_selection_breaks_ties_on_the_loss() -> None:
    best = {"val_macro_f1": 0.5, "val_accuracy": 0.9, "val_loss": 0.4}
    assert better({"val_macro_f1": 0.6, "val_accuracy": 0.8, "val_loss": 0.9}, best, "val_macro_f1")
    assert better({"val_macro_f1": 0.5, "val_accuracy": 0.8, "val_loss": 0.3}, best, "val_macro_f1")
    assert not better({"val_macro_f1": 0.5, "val_accuracy": 0.8, "val_loss": 0.5}, best, "val_macro_f1")
    assert not better({"val_macro_f1": 0.9, "val_accuracy": 0.9, "val_loss": 0.1}, best, "val_accuracy")  # accuracy: strict >


def test_finetune_chooses_the_epoch_on_macro_f1() -> None:
    rng = np.random.default_rng(0)
    X = rng.integers(0, 4, (24, 10)).astype(np.float32)
    y = np.array([0] * 20 + [1] * 4)
    torch.manual_seed(0)
    model = new_classifier(TINY, 2, redraw_features=False)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-3, select_metric="macro_f1", logit_adjust=1.0, progress=False)
    best, history = finetune(model, CellDataset(X, 5, y), CellDataset(X[:12], 5, y[:12]), cfg, torch.device("cpu"), head_init="random")
    assert all("val_macro_f1" in h for h in history)
    top = max(h["val_macro_f1"] for h in history)
    assert best["val_macro_f1"] == top


def test_stopping_split_never_takes_a_rare_type() -> None:
    y = np.array([0] * 3 + [1] * 50 + [2] * 19 + [3] * 20 + [4])
    tr, va = stopping_split(y, 0.1, 0, keep_rare=20)
    assert set(np.unique(y[tr])) == {0, 1, 2, 3, 4}
    assert set(np.unique(y[va])) == {1, 3}  # 3, 19 and 1 cells stay whole in training
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(y)
    tr, va = stopping_split(np.array([0] * 5 + [1] * 6), 0.2, 0, keep_rare=20)  # every type rare: one cell each, as before
    assert len(va) == 2 and set(np.unique(np.array([0] * 5 + [1] * 6)[tr])) == {0, 1}


def _projections(model: ScBERT) -> list[torch.Tensor]:
    return [m.projection_matrix.clone() for m in model.modules() if hasattr(m, "projection_matrix")]


@pytest.mark.parametrize("redraw", [False, True])
def test_fixed_features_during_finetuning(redraw: bool) -> None:
    torch.manual_seed(0)
    model = new_classifier(TINY.replace(feature_redraw_interval=2), 2, redraw_features=redraw)
    before = _projections(model)
    model.train()
    tokens = torch.zeros(2, TINY.seq_len, dtype=torch.long)
    for _ in range(5):
        model(tokens)
    moved = any(not torch.equal(a, b) for a, b in zip(before, _projections(model)))
    assert moved == redraw  # ours keeps the pretrained draw; published (redraw) changes it every interval


def _cli_args(*extra: str) -> object:
    p = finetune_script.build_parser()
    return apply_recipe(p.parse_args(["--data", "x.h5ad", "--label-key", "celltype", "--out", "o", *extra]), "finetune")


def test_benchmark_runs_finetune_py_defaults() -> None:
    args = _cli_args("--pretrained", "pre.pt")
    cli_cfg = train_config(args, progress=False, patience=args.patience, patience_rule=args.patience_rule, select=args.select,
                           min_steps=args.min_steps, select_metric=args.select_metric, logit_adjust=args.logit_adjust,
                           sampling=args.sampling, head_lr=args.head_lr, fixed_budget_below=args.fixed_budget_below)
    method = ScBERTMethod()
    train_fields, rest = finetune_parts("ours")
    for key in train_fields:
        assert getattr(method.train, key) == getattr(cli_cfg, key) == PRESETS["cpu"]["train"][key], key
    for key in ("dropout", "head_init", "keep_rare", "redraw_features", "val_frac", "head_only", "train_all"):
        assert getattr(method, key) == getattr(args, key) == rest[key] == PRESETS["cpu"][key], key


def test_published_recipe_keeps_the_published_behaviour() -> None:
    args = _cli_args("--recipe", "published")
    assert (args.min_steps, args.logit_adjust, args.select_metric, args.keep_rare, args.redraw_features, args.head_lr) == (
        0, 0.0, "accuracy", 0, True, None)
    assert (args.dropout, args.weight_decay, args.val_frac, args.sampling) == (0.0, 0.0, 0.2, "uniform")
    ours = _cli_args("--redraw-features", "--min-steps", "0")
    assert ours.redraw_features is True and ours.min_steps == 0  # an explicit flag wins over the recipe


def test_logit_adjusted_baseline_divides_by_the_prior() -> None:
    from scripts.benchmark.methods import LogitAdjusted

    class Constant:
        def fit(self, X: object, y: np.ndarray, genes: object) -> None:
            self.classes_ = ["a", "b"]

        def predict_proba(self, X: object) -> np.ndarray:
            return np.array([[0.6, 0.4]])

    method = LogitAdjusted(Constant(), "constant_la")
    method.fit(None, np.array(["a"] * 3 + ["b"]), [])
    np.testing.assert_allclose(method.predict_proba(None), [[0.6 / 0.75 / (0.8 + 1.6), 0.4 / 0.25 / (0.8 + 1.6)]])


def test_binned_baseline_sees_scberts_bins() -> None:
    from scipy import sparse

    from scripts.benchmark.methods import BinnedInput

    seen = []

    class Recorder:
        def fit(self, X: sparse.csr_matrix, y: np.ndarray, genes: object) -> None:
            seen.append(X.toarray())
            self.classes_ = ["a", "b"]

        def predict_proba(self, X: sparse.csr_matrix) -> np.ndarray:
            seen.append(X.toarray())
            return np.full((X.shape[0], 2), 0.5)

    X = sparse.csr_matrix(np.array([[0.0, 0.4, 1.7, 9.3], [2.9, 0.0, 5.0, 4.99]]))
    method = BinnedInput(Recorder(), "recorder_bins")
    method.fit(X, np.array(["a", "b"]), [])
    method.predict_proba(X)
    for binned in seen:  # truncated to integers and capped at the top bin, as scBERT's tokens
        np.testing.assert_array_equal(binned, [[0, 0, 1, 5], [2, 0, 5, 4]])
    assert X.data[1] == pytest.approx(1.7)  # the caller's matrix is left as it was


def test_explicit_epochs_turn_the_step_floor_off() -> None:
    assert _cli_args().min_steps == finetune_parts("ours")[0]["min_steps"] > 0
    assert _cli_args("--epochs", "3").min_steps == 0
    assert _cli_args("--epochs", "3", "--min-steps", "50").min_steps == 50


def test_one_layer_flag_sets_the_other_off() -> None:
    assert (_cli_args("--train-all").train_all, _cli_args("--train-all").head_only) == (True, False)
    assert (_cli_args("--head-only").train_all, _cli_args("--head-only").head_only) == (False, True)
    rest = finetune_parts("ours")[1]
    assert (_cli_args("--pretrained", "p.pt").train_all, _cli_args("--pretrained", "p.pt").head_only) == (rest["train_all"], rest["head_only"])


def test_recipe_head_only_needs_a_pretrained_encoder() -> None:
    assert _cli_args().head_only is False  # no --pretrained: trained from scratch, every layer
    with_encoder = _cli_args("--pretrained", "pre.pt")
    assert with_encoder.head_only == finetune_parts("ours")[1]["head_only"]
