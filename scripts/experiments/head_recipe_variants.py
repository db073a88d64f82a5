"""Development: variants of the head-only fine-tuning recipe on one encoder, compared on the same
splits of the benchmark's protocols (issue 33: regularisation that scales with the data).

The frozen encoder (pretrained draw of random features kept) gives every cell the same encodings
whatever the head, so the file is encoded once and each variant trains only heads on those stored
encodings: a variant costs seconds per split (the ``adapt_*`` variants first continue pretraining the
encoder on each split's training cells and encode the file again: minutes per split). ``default`` is
finetune.py's recipe; every other variant changes the settings it names. Choose on tuning seeds (default 7), never on the seeds the
RESULTS.md tables report (0, 1, 2).

    python -m scripts.experiments.head_recipe_variants --data ../shared/data/pbmc3k_labeled.h5ad \\
        --pretrained /work/runs/enc/pre_main/model.pt --protocol cv --out runs/head_cv_pbmc3k.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.dataset import CellDataset
from data.labels import read_label_map
from model.checkpoint import load_checkpoint
from model.evaluation import classification_metrics
from model.inference import InferenceOptions
from model.runtime import set_seed
from model.train.config import TrainConfig
from model.train.encoding_cache import EncodedCells, encode_dataset, head_probabilities
from model.train.finetuning import finetune, finetune_heads, head_splits, stopping_split
from model.train.initialisation import new_classifier
from model.train.pretraining import pretrain
from model.train.recipes import TRAIN_FIELDS, finetune_parts
from scripts.benchmark.harness import ProtocolSettings, load_labelled, parse_subsample, protocol_splits

TRAIN, REST = finetune_parts("ours")

# name -> overrides of the default recipe (TrainConfig fields and the rest alike)
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "recipe_7dec_evening": {"head_lr": 1e-3, "patience": 4},  # the recipe before 2343b25 (the ablation's "default")
    "head_lr_3e-4": {"head_lr": 3e-4},
    "head_lr_3e-4_steps_1000": {"head_lr": 3e-4, "min_steps": 1000},
    "head_lr_1e-4_steps_1000": {"head_lr": 1e-4, "min_steps": 1000},
    "wd_1": {"weight_decay": 1.0},
    "dropout_0.5": {"dropout": 0.5},
    "dropout_0.1": {"dropout": 0.1},
    "smoothing_0.1": {"label_smoothing": 0.1},
    "last_epoch": {"select": "last", "patience": 0},
    "balanced_sampling": {"sampling": "balanced", "logit_adjust": 0.0},
    "no_logit_adjust": {"logit_adjust": 0.0},
    "batch_32": {"batch_size": 32},
    "val_frac_0.1": {"val_frac": 0.1},
    "select_accuracy": {"select_metric": "accuracy"},
    "patience_8": {"patience": 8},
    "head_lr_3e-4_dropout_0.5": {"head_lr": 3e-4, "dropout": 0.5},
    "head_lr_3e-4_wd_1": {"head_lr": 3e-4, "weight_decay": 1.0},
    "head_lr_3e-4_patience_8": {"head_lr": 3e-4, "patience": 8},
    "head_lr_3e-4_wd_1_steps_1000": {"head_lr": 3e-4, "weight_decay": 1.0, "min_steps": 1000},
    "head_lr_3e-4_wd_1_patience_8": {"head_lr": 3e-4, "weight_decay": 1.0, "patience": 8},
    "head_lr_3e-4_wd_1_batch_32": {"head_lr": 3e-4, "weight_decay": 1.0, "batch_size": 32},
    "head_lr_3e-4_wd_3": {"head_lr": 3e-4, "weight_decay": 3.0},
    "head_lr_3e-4_last_epoch": {"head_lr": 3e-4, "select": "last", "patience": 0},
    "head_lr_3e-4_epochs_15_patience_8": {"head_lr": 3e-4, "epochs": 15, "patience": 8},
    # finetune.py --ensemble N (model.train.finetuning.finetune_heads): the one-head run plus N - 1 heads on their own stopping splits
    "single_head": {"ensemble": 1},  # the recipe before the ensemble (RESULTS.md, 7 December, late)
    "ensemble_3": {"ensemble": 3},
    "ensemble_5": {"ensemble": 5},
    "ensemble_10": {"ensemble": 10},
    # independent single heads on their own stopping splits of all training cells, probabilities averaged (no calibration part)
    "heads_5": {"heads": 5, "ensemble": 1},
    "heads_5_same_split": {"heads": 5, "same_split": True, "ensemble": 1},  # one stopping split, seeds differ
    # the per-gene read-out (conv1) kept at its expression start: a cell's head input is then one number per gene
    "frozen_readout": {"frozen_readout": True},
    "frozen_readout_single_head": {"frozen_readout": True, "ensemble": 1},
    # heads 2..N train on every cell when their stopping part is too small to choose an epoch (the budget is fixed then)
    "all_cells_fixed_budget": {"all_cells_fixed_budget": True},
    # the encoder first continues masked-expression pretraining on the split's training cells (labels unused; test
    # cells never), then the default heads on the adapted encoder: domain-adaptive pretraining
    "adapt_3_lr_1e-4": {"adapt_epochs": 3, "adapt_lr": 1e-4},
    "adapt_3_lr_1e-3": {"adapt_epochs": 3, "adapt_lr": 1e-3},
    # the control: the same pretraining on as many cells of another file (--adapt-other), so that a gain of the
    # adapted encoder can be told from more pretraining on cells the encoder has not seen
    "adapt_other_3_lr_1e-4": {"adapt_epochs": 3, "adapt_lr": 1e-4, "adapt_other": True},
}
EXTRA = ("heads", "same_split", "frozen_readout", "all_cells_fixed_budget", "adapt_epochs", "adapt_lr", "adapt_other")  # settings of this script only


DEVICE = torch.device("cpu")  # where the encoder and the heads run (--device; the RESULTS.md tables: the CPU)


def variant_settings(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The TrainConfig fields and the rest of variant ``name``."""
    over = VARIANTS[name]
    train_kw = {**TRAIN, **{k: v for k, v in over.items() if k in TRAIN_FIELDS}}
    return train_kw, {**REST, "heads": 1, "same_split": False, "frozen_readout": False, "all_cells_fixed_budget": False, "adapt_epochs": 0,
                      "adapt_other": False,
                      **{k: v for k, v in over.items() if k in REST or k in EXTRA}}


def new_head_model(ckpt: Any, n_classes: int, rest: dict[str, Any], members: int = 1) -> Any:
    """A head-only model as finetune.py builds it; with ``frozen_readout`` its heads' ``conv1`` never trains."""
    model = new_classifier(ckpt.config, n_classes, rest["dropout"], pretrained=ckpt, head_only=True, redraw_features=False, members=members)
    if rest["frozen_readout"]:
        for m in model.modules():
            if hasattr(m, "conv1"):
                m.conv1.requires_grad_(False)
    return model


def train_head(name: str, ckpt: Any, X: Any, E: torch.Tensor, codes: np.ndarray, n_classes: int, fit_rows: np.ndarray,
               val_rows: np.ndarray, seed: int) -> tuple[Any, dict[str, Any], list[dict[str, float]]]:
    """One head trained with variant ``name``'s settings on the stored encodings ``E`` of cells
    ``fit_rows``, choosing its epoch on ``val_rows`` (``codes``: every cell's class id). Returns the
    model, the kept epoch's metrics and the history."""
    train_kw, rest = variant_settings(name)
    set_seed(seed)
    model = new_head_model(ckpt, n_classes, rest)
    cfg = TrainConfig(seed=seed, progress=False, **train_kw)
    bins = model.config.bin_num
    fit_y, val_y = torch.as_tensor(codes[fit_rows]), torch.as_tensor(codes[val_rows])
    cells = (EncodedCells(E, fit_y, fit_rows), EncodedCells(E, val_y, val_rows))
    best, history = finetune(model, CellDataset(X[fit_rows], bins, codes[fit_rows]), CellDataset(X[val_rows], bins, codes[val_rows]), cfg,
                             DEVICE, None, name, head_init=rest["head_init"], encodings=cells)
    return model, best, history


def train_model(name: str, ckpt: Any, X: Any, E: torch.Tensor, codes: np.ndarray, n_classes: int, train: np.ndarray, seed: int,
                cal: np.ndarray | None = None) -> tuple[Any, np.ndarray, list[int]]:
    """The model variant ``name`` trains on cells ``train`` as the benchmark's scbert method does:
    the first head on a stopping split (``cal`` given: on ``train``, stopping on ``cal``), further
    heads of an ensemble on their own splits of the same cells. Returns the model, the first
    head's stopping cells (they calibrate the novelty scores) and the kept epochs."""
    train_kw, rest = variant_settings(name)
    if cal is None:
        fit_rel, val_rel = stopping_split(codes[train], rest["val_frac"], seed, rest["keep_rare"])
        fit, cal = train[fit_rel], train[val_rel]
    else:
        fit = train
    if rest["ensemble"] == 1:
        model, best, _ = train_head(name, ckpt, X, E, codes, n_classes, fit, cal, seed)
        return model, cal, [best["epoch"]]
    heads = head_splits((fit, cal), codes, rest["ensemble"], rest["val_frac"], seed, rest["keep_rare"])
    if rest["all_cells_fixed_budget"]:
        every = np.sort(np.concatenate((fit, cal)))
        heads = [heads[0], *((every if len(v) < train_kw["fixed_budget_below"] else f, v) for f, v in heads[1:])]

    def build(k: int) -> Any:
        return new_head_model(ckpt, n_classes, rest, k)

    model, bests, _ = finetune_heads(build, X, codes, heads, TrainConfig(seed=seed, progress=False, **train_kw), DEVICE,
                                     desc=name, head_init=rest["head_init"], encodings=E)
    return model, cal, [b["epoch"] for b in bests]


def run_variant(name: str, ckpt: Any, X: Any, E: torch.Tensor, y: np.ndarray, train: np.ndarray, test: np.ndarray, seed: int,
                other: Any = None) -> dict[str, Any]:
    """Train variant ``name`` on the cells ``train`` (split as the benchmark's scbert method splits
    them) and score it on ``test``; ``heads`` variants average the probabilities of that many
    single heads, each on its own stopping split of all of ``train``; ``other``: the matrix of
    ``--adapt-other`` (the ``adapt_other_*`` variants pretrain on as many of its cells as ``train`` has)."""
    _, rest = variant_settings(name)
    classes = np.unique(y[train])
    codes = np.searchsorted(classes, y)  # (cells of types outside the training part are never trained on)
    if rest["adapt_epochs"]:
        if rest["adapt_other"] and other is None:
            raise SystemExit(f"variant {name} needs --adapt-other FILE")
        source, cells = (X, train) if not rest["adapt_other"] else (
            other, np.sort(np.random.default_rng(seed).choice(other.shape[0], min(len(train), other.shape[0]), replace=False)))
        ckpt = adapt_encoder(ckpt, source, cells, rest["adapt_epochs"], rest["adapt_lr"], seed)
        E = encode_file(ckpt, X)
    probs, epochs = np.zeros((len(test), len(classes))), []
    for k in range(rest["heads"]):
        s = seed + 1000 * k
        if rest["same_split"]:
            fit_rel, val_rel = stopping_split(codes[train], rest["val_frac"], seed, rest["keep_rare"])
            model, best, _ = train_head(name, ckpt, X, E, codes, len(classes), train[fit_rel], train[val_rel], s)
            kept = [best["epoch"]]
        else:
            model, _, kept = train_model(name, ckpt, X, E, codes, len(classes), train, s)
        epochs += kept
        probs += head_probabilities(model, EncodedCells(E, None, test), 64, DEVICE)
    m = classification_metrics(y[test], classes[probs.argmax(1)], list(classes))
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "balanced_accuracy": m.get("balanced_accuracy"), "best_epoch": epochs}


def adapt_encoder(ckpt: Any, X: Any, cells: np.ndarray, epochs: int, lr: float, seed: int) -> Any:
    """``ckpt`` after ``epochs`` more epochs of masked-expression pretraining on ``cells`` (a tenth
    of them, at random, held out for the masked accuracy; the last epoch kept)."""
    net = ckpt.build_model().train()
    order = np.random.default_rng(seed).permutation(cells)
    held = max(1, len(order) // 10)
    bins = ckpt.config.bin_num
    _, history = pretrain(net, CellDataset(X[np.sort(order[held:])], bins), CellDataset(X[np.sort(order[:held])], bins),
                          TrainConfig(epochs=epochs, batch_size=16, lr=lr, seed=seed, progress=False, select="last"), DEVICE)
    accuracies = ", ".join(f"{h['val_masked_accuracy']:.4f}" for h in history)
    print(f"  adapted encoder: held-out masked accuracy by epoch {accuracies}", flush=True)
    return dataclasses.replace(ckpt, state_dict={k: v.detach().clone() for k, v in net.state_dict().items()})


def encode_file(ckpt: Any, X: Any) -> torch.Tensor:
    """The frozen encoder's encodings of every cell of ``X`` (cells, genes + 1, dim), float32."""
    encoder = new_classifier(ckpt.config, 2, 0.0, pretrained=ckpt, head_only=True, redraw_features=False)
    return encode_dataset(encoder, CellDataset(X, encoder.config.bin_num), InferenceOptions(64, DEVICE, progress=False)).encodings


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, nargs="+")
    p.add_argument("--label-key", default="celltype")
    p.add_argument("--pretrained", required=True, help="the encoder checkpoint (its genes are the vocabulary)")
    p.add_argument("--protocol", default="cv", choices=("cv", "imbalance", "fewshot"))
    p.add_argument("--seeds", type=int, nargs="+", default=[7], help="split seeds (tuning: not 0, 1, 2)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--subsample", nargs="*", default=[], metavar="TYPE=N")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1])
    p.add_argument("--label-map", default=None, help="two columns: label in the data, label to use (- leaves the cells out)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--adapt-other", default=None, help="a labelled file whose cells the adapt_other_* variants pretrain on")
    p.add_argument("--device", default="cpu", help="cpu (default: the RESULTS.md tables), cuda, cuda:1, ...")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    global DEVICE
    DEVICE = torch.device(args.device)

    ckpt = load_checkpoint(args.pretrained)
    adata, y, genes = load_labelled(args.data, args.label_key, ckpt.genes, None)
    settings = ProtocolSettings(protocol=args.protocol, folds=args.folds, seeds=args.seeds, subsample=parse_subsample(args.subsample),
                                fractions=args.fractions, label_map=read_label_map(args.label_map) if args.label_map else {})
    X, y, splits = protocol_splits(settings, adata, y, genes, args.data, args.label_key, None)
    other = load_labelled([args.adapt_other], args.label_key, ckpt.genes, None)[0].X if args.adapt_other else None
    t0 = time.time()
    E = encode_file(ckpt, X)
    print(f"encoded {len(y)} cells in {time.time() - t0:.0f} s", flush=True)
    rows: list[dict[str, Any]] = []
    for split in splits:
        for name in args.variants:
            t = time.time()
            r = run_variant(name, ckpt, X, E, y, split.train, split.test, split.seed, other)
            rows.append({"variant": name, "split": split.key, **r, "seconds": time.time() - t})
            print(f"{split.key} {name}: accuracy {r['accuracy']:.4f} macro-F1 {r['macro_f1']:.4f} (kept epochs {r['best_epoch']}, "
                  f"{time.time() - t:.0f} s)", flush=True)
            Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"\n{'variant':26s} accuracy  macro-F1  (mean over {len(splits)} splits; paired difference to {args.variants[0]})")
    base = {r["split"]: r for r in rows if r["variant"] == args.variants[0]}
    for name in args.variants:
        rs = [r for r in rows if r["variant"] == name]
        acc, f1 = np.mean([r["accuracy"] for r in rs]), np.mean([r["macro_f1"] for r in rs])
        d = [(r["accuracy"] - base[r["split"]]["accuracy"], r["macro_f1"] - base[r["split"]]["macro_f1"]) for r in rs if r["split"] in base]
        diff = f"  {np.mean([a for a, _ in d]):+.4f} {np.mean([b for _, b in d]):+.4f}" if d else ""
        print(f"{name:26s} {acc:.4f}    {f1:.4f}{diff}")


if __name__ == "__main__":
    main()
