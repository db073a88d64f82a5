"""Head-only fine-tuning on stored encodings: the frozen encoder runs once, and the training
gives the weights and the history of running it every epoch; with a trainable encoder, or
encodings above the memory share, nothing is stored."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data.dataset import CellDataset
from model.nn.config import ScBERTConfig
from model.train import encoding_cache, finetuning
from model.train.config import TrainConfig
from model.train.finetuning import finetune
from model.train.initialisation import new_classifier

TINY = ScBERTConfig(n_genes=10, dim=8, depth=2, heads=2, dim_head=4, gene_embedding="none", nb_features=4)


def _run(head_only: bool, share: float, monkeypatch: pytest.MonkeyPatch, dropout: float = 0.0) -> tuple[dict, list[dict], dict[str, torch.Tensor]]:
    monkeypatch.setattr(encoding_cache, "MEMORY_SHARE", share)
    rng = np.random.default_rng(0)
    X = rng.poisson(1.5, (40, 10)).astype(np.float32)
    y = np.array([0] * 25 + [1] * 10 + [2] * 5)
    torch.manual_seed(0)
    encoder = new_classifier(TINY, 3, redraw_features=False)  # stands in for a pretrained encoder: any fixed weights
    torch.manual_seed(1)
    pretrained = SimpleNamespace(state_dict=encoder.state_dict())
    model = new_classifier(TINY, 3, dropout=dropout, pretrained=pretrained, head_only=head_only, train_all=not head_only, redraw_features=False)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-3, head_lr=1e-3, select_metric="macro_f1", logit_adjust=1.0, progress=False)
    best, history = finetune(model, CellDataset(X[:30], 5, y[:30]), CellDataset(X[30:], 5, y[30:]), cfg, torch.device("cpu"))
    return best, history, model.state_dict()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_stored_encodings_train_the_head_as_the_encoder_would(dropout: float, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def spy(*args: object, **kwargs: object) -> encoding_cache.EncodedCells:
        calls.append(1)
        return encoding_cache.encode_dataset(*args, **kwargs)

    monkeypatch.setattr(finetuning, "encode_dataset", spy)
    best, history, state = _run(True, 1.0, monkeypatch, dropout)
    assert len(calls) == 2  # training and validation cells, once each
    best0, history0, state0 = _run(True, 0.0, monkeypatch, dropout)  # nothing fits: the encoder runs every epoch
    assert len(calls) == 2
    assert best["epoch"] == best0["epoch"] and len(history) == len(history0)
    for h, h0 in zip(history, history0):
        for key in ("train_loss", "val_loss", "val_accuracy", "val_macro_f1"):
            assert h[key] == pytest.approx(h0[key], rel=1e-4, abs=1e-6), key
    for key in state:
        torch.testing.assert_close(state[key], state0[key], rtol=1e-4, atol=1e-5)


def test_a_trainable_encoder_is_never_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(finetuning, "encode_dataset", lambda *a, **k: calls.append(1))
    _run(False, 1.0, monkeypatch)
    assert not calls


def test_encodings_given_by_the_caller_train_the_same_head(monkeypatch: pytest.MonkeyPatch) -> None:
    """The development scripts encode a file once and pass each head its cells' encodings."""
    best0, history0, state0 = _run(True, 1.0, monkeypatch)
    given: list[encoding_cache.EncodedCells] = []

    def encode_once(model, ds, options, desc="encoding"):  # what a caller that encoded the file would pass
        cells = encoding_cache.encode_dataset(model, ds, options, desc)
        given.append(cells)
        return cells

    monkeypatch.setattr(finetuning, "encode_dataset", encode_once)
    _run(True, 1.0, monkeypatch)
    calls: list[int] = []
    monkeypatch.setattr(finetuning, "encode_dataset", lambda *a, **k: calls.append(1))
    rng = np.random.default_rng(0)
    X = rng.poisson(1.5, (40, 10)).astype(np.float32)
    y = np.array([0] * 25 + [1] * 10 + [2] * 5)
    torch.manual_seed(0)
    encoder = new_classifier(TINY, 3, redraw_features=False)
    torch.manual_seed(1)
    model = new_classifier(TINY, 3, pretrained=SimpleNamespace(state_dict=encoder.state_dict()), head_only=True, redraw_features=False)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-3, head_lr=1e-3, select_metric="macro_f1", logit_adjust=1.0, progress=False)
    best, _ = finetune(model, CellDataset(X[:30], 5, y[:30]), CellDataset(X[30:], 5, y[30:]), cfg, torch.device("cpu"),
                       encodings=(given[0], given[1]))
    assert not calls and best["epoch"] == best0["epoch"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state0[key], rtol=1e-4, atol=1e-5)


def test_given_encodings_need_a_frozen_encoder() -> None:
    model = new_classifier(TINY, 3, redraw_features=False)
    cells = encoding_cache.EncodedCells(torch.zeros(4, 10, 8), torch.zeros(4, dtype=torch.long))
    ds = CellDataset(np.ones((4, 10), np.float32), 5, np.zeros(4, int))
    with pytest.raises(ValueError, match="head-only"):
        finetune(model, ds, ds, TrainConfig(epochs=1, progress=False), torch.device("cpu"), encodings=(cells, cells))
