"""The classifier ensemble (``--ensemble``): heads each trained alone on its own stopping split,
their logits averaged; a calibration part no head sees; one head keeps the published state-dict
keys; the recipe's setting reaches the model, the benchmark and finetune.py."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data.dataset import CellDataset
from model.checkpoint import load_checkpoint
from model.checkpoint.format import save_checkpoint
from model.inference import InferenceOptions
from model.nn.config import ScBERTConfig
from model.nn.network import CellClassifier, ClassifierEnsemble, ScBERT
from model.runtime import set_seed
from model.train.config import TrainConfig
from model.train.encoding_cache import encode_dataset
from model.train.finetuning import ensemble_parts, finetune, finetune_heads, head_splits
from model.train.initialisation import new_classifier
from model.train.recipes import finetune_parts

TINY = ScBERTConfig(n_genes=10, dim=8, depth=2, heads=2, dim_head=4, gene_embedding="none", nb_features=4)


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.poisson(1.5, (40, 10)).astype(np.float32)
    X[:25, :3] += 4  # something to learn
    return X, np.array([0] * 25 + [1] * 10 + [2] * 5)


def _pretrained() -> SimpleNamespace:
    torch.manual_seed(0)
    return SimpleNamespace(state_dict=new_classifier(TINY, 3, redraw_features=False).state_dict())


def test_the_ensemble_is_its_members_side_by_side() -> None:
    torch.manual_seed(0)
    e = ClassifierEnsemble(11, 8, 3, 4, hidden=5).eval()
    h = torch.randn(2, 11, 8)
    f = e.features(h)
    torch.testing.assert_close(f, torch.cat([m.features(h) for m in e.members], -1))
    per = e.member_logits(f)
    assert per.shape == (4, 2, 3)
    torch.testing.assert_close(per[1], e.members[1](h))
    torch.testing.assert_close(e(h), per.mean(0))
    r2 = e.init_from_expression(h, torch.randint(0, 5, (2, 11)).float())
    assert 0 <= r2 <= 1
    for m in e.members[1:]:
        torch.testing.assert_close(m.conv1.weight, e.members[0].conv1.weight)


def test_one_head_keeps_the_published_keys_and_an_ensemble_round_trips(tmp_path) -> None:
    one = new_classifier(TINY, 3)
    assert isinstance(one.to_out, CellClassifier) and "to_out.fc3.weight" in one.state_dict()
    torch.manual_seed(1)
    model = new_classifier(TINY, 3, members=3).eval()
    assert "to_out.members.2.fc3.weight" in model.state_dict()
    genes = [f"G{i}" for i in range(10)]
    save_checkpoint(tmp_path / "model.pt", model, genes, ["a", "b", "c"], {}, {"stage": "finetune"}, {})
    back = load_checkpoint(tmp_path / "model.pt")
    assert back.config.classifier_members == 3
    tokens = torch.randint(0, 5, (4, 11))
    torch.testing.assert_close(back.build_model().eval()(tokens), model(tokens))


def test_the_parts_of_an_ensemble() -> None:
    y = np.array([0] * 60 + [1] * 30 + [2] * 5)  # type 2 is rare: never held out
    pool, cal, heads = ensemble_parts(y, 4, 0.2, 0, keep_rare=20)
    assert len(np.intersect1d(pool, cal)) == 0 and len(pool) + len(cal) == len(y)
    assert np.bincount(y[cal], minlength=3).tolist() == [6, 3, 0]
    stops = []
    for fit, val in heads:
        assert set(fit) | set(val) == set(pool) and not set(fit) & set(val)
        assert set(np.flatnonzero(y == 2)) <= set(fit)
        stops.append(tuple(sorted(val)))
    assert len(set(stops)) == 4, "each head stops on its own cells"
    assert set(np.concatenate([f for f, _ in heads])) == set(pool), "together the heads train on every pool cell"


def test_an_ensemble_is_its_heads_each_trained_alone() -> None:
    """Head j of the ensemble is exactly the head a single run on split j with seed + 1000 j gives;
    stored encodings (computed once) and an encoder run every epoch give the same heads."""
    X, y = _data()
    pre = _pretrained()
    cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-3, head_lr=1e-3, select_metric="macro_f1", logit_adjust=1.0, seed=3, progress=False)
    heads = head_splits(y, 3, 0.25, 3, keep_rare=0)

    def build(members: int) -> ScBERT:
        return new_classifier(TINY, 3, 0.2, pretrained=pre, head_only=True, redraw_features=False, members=members)

    model, bests, histories = finetune_heads(build, X, y, heads, cfg, torch.device("cpu"))
    assert isinstance(model.to_out, ClassifierEnsemble) and len(bests) == len(histories) == 3
    for j, (fit, val) in enumerate(heads):
        set_seed(3 + 1000 * j)
        alone = build(1)
        finetune(alone, CellDataset(X[fit], 5, y[fit]), CellDataset(X[val], 5, y[val]), dataclasses.replace(cfg, seed=3 + 1000 * j),
                 torch.device("cpu"))
        for k, v in alone.to_out.state_dict().items():
            torch.testing.assert_close(model.to_out.members[j].state_dict()[k], v, rtol=1e-4, atol=1e-6)
    E = encode_dataset(build(1), CellDataset(X, 5), InferenceOptions(8, torch.device("cpu"), progress=False)).encodings
    again, _, _ = finetune_heads(build, X, y, heads, cfg, torch.device("cpu"), encodings=E)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="head-only"):
        finetune_heads(lambda m: new_classifier(TINY, 3, pretrained=pre, train_all=True, members=m), X, y, heads, cfg, torch.device("cpu"))


def test_the_recipes_set_the_ensemble() -> None:
    assert finetune_parts("ours")[1]["ensemble"] == 1  # opt-in: RESULTS.md, 7 December, late
    assert finetune_parts("published")[1]["ensemble"] == 1
