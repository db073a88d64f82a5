"""The classifier ensemble (``--ensemble``): heads each trained alone on its own stopping split,
their logits averaged; the first head is the one-head run and the novelty scores read it alone;
one head keeps the published state-dict keys; the recipe's setting reaches the model."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data.dataset import CellDataset
from model.checkpoint import load_checkpoint
from model.checkpoint.format import save_checkpoint
from model.inference import InferenceOptions, predict_outputs
from model.nn.config import ScBERTConfig
from model.nn.network import CellClassifier, ClassifierEnsemble, ScBERT
from model.novelty.record import novelty_scores, output_scores
from model.runtime import set_seed
from model.train.config import TrainConfig
from model.train.encoding_cache import encode_dataset
from model.train.finetuning import finetune, finetune_heads, head_splits, stopping_split
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


def test_the_ensemble_averages_the_logits_and_shows_its_first_head() -> None:
    torch.manual_seed(0)
    e = ClassifierEnsemble(11, 8, 3, 4, hidden=5).eval()
    h = torch.randn(2, 11, 8)
    f, logits, own = e.outputs(h)
    torch.testing.assert_close(f, e.members[0].features(h))
    torch.testing.assert_close(own, e.members[0](h))
    torch.testing.assert_close(logits, torch.stack([m(h) for m in e.members]).mean(0))
    torch.testing.assert_close(e(h), logits)
    one = CellClassifier(11, 8, 3, hidden=5).eval()
    f1, l1, o1 = one.outputs(h)
    assert l1 is o1 and f1.shape == (2, 5)


def test_the_novelty_scores_read_the_first_head() -> None:
    """An ensemble's outputs carry the first head's probabilities and logits, and the novelty scores use them."""
    torch.manual_seed(1)
    model = new_classifier(TINY, 3, members=3).eval()
    X, _ = _data()
    out = predict_outputs(model, CellDataset(X, 5), InferenceOptions(8, torch.device("cpu"), progress=False), features=True)
    assert {"head_probs", "head_logits"} <= set(out) and not np.allclose(out["head_probs"], out["probs"])
    got = output_scores(out, None)
    want = novelty_scores(out["head_probs"], out["head_logits"], out["features"], None, None)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    single = predict_outputs(new_classifier(TINY, 3).eval(), CellDataset(X, 5), InferenceOptions(8, torch.device("cpu"), progress=False))
    assert "head_logits" not in single


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


def test_the_heads_split_the_same_cells_their_own_ways() -> None:
    y = np.array([0] * 60 + [1] * 30 + [2] * 5)  # type 2 is rare: never in a stopping part
    first = stopping_split(y, 0.2, 0, 20)
    heads = head_splits(first, y, 4, 0.2, 0, keep_rare=20)
    assert heads[0] is first and len(heads) == 4
    stops = []
    for fit, val in heads:
        assert set(fit) | set(val) == set(range(len(y))) and not set(fit) & set(val)
        assert set(np.flatnonzero(y == 2)) <= set(fit)
        stops.append(tuple(sorted(val)))
    assert len(set(stops)) == 4, "each head stops on its own cells"


def test_an_ensemble_is_its_heads_each_trained_alone() -> None:
    """The first head is the one-head run; head j the run on split j with seed + 1000 j; stored
    encodings (computed once) and an encoder run every epoch give the same heads."""
    X, y = _data()
    pre = _pretrained()
    cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-3, head_lr=1e-3, select_metric="macro_f1", logit_adjust=1.0, seed=3, progress=False)
    heads = head_splits(stopping_split(y, 0.25, 3, 0), y, 3, 0.25, 3, keep_rare=0)

    def build(members: int) -> ScBERT:
        return new_classifier(TINY, 3, 0.2, pretrained=pre, head_only=True, redraw_features=False, members=members)

    model, bests, histories = finetune_heads(build, X, y, heads, cfg, torch.device("cpu"), seed=7)
    assert isinstance(model.to_out, ClassifierEnsemble) and len(bests) == len(histories) == 3
    for j, (fit, val) in enumerate(heads):
        set_seed(7 + 1000 * j)
        alone = build(1)
        finetune(alone, CellDataset(X[fit], 5, y[fit]), CellDataset(X[val], 5, y[val]), dataclasses.replace(cfg, seed=3 + 1000 * j),
                 torch.device("cpu"))
        for k, v in alone.to_out.state_dict().items():
            torch.testing.assert_close(model.to_out.members[j].state_dict()[k], v, rtol=1e-4, atol=1e-6)
    E = encode_dataset(build(1), CellDataset(X, 5), InferenceOptions(8, torch.device("cpu"), progress=False)).encodings
    again, _, _ = finetune_heads(build, X, y, heads, cfg, torch.device("cpu"), encodings=E, seed=7)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="head-only"):
        finetune_heads(lambda m: new_classifier(TINY, 3, pretrained=pre, train_all=True, members=m), X, y, heads, cfg, torch.device("cpu"))


def test_heads_without_stored_encodings_say_what_they_cost(monkeypatch, scbert_log) -> None:
    """When the encodings are not kept (too large, or under torchrun), each head runs the encoder
    every epoch: the run says so once, with the way to a single head."""
    import logging

    import model.train.finetuning as finetuning

    X, y = _data()
    pre = _pretrained()
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-3, head_lr=1e-3, seed=3, progress=False)
    heads = head_splits(stopping_split(y, 0.25, 3, 0), y, 2, 0.25, 3, keep_rare=0)
    monkeypatch.setattr(finetuning, "can_store_encodings", lambda model, n: False)
    with scbert_log.at_level(logging.INFO, logger="scbert"):
        finetune_heads(lambda m: new_classifier(TINY, 3, pretrained=pre, head_only=True, redraw_features=False, members=m),
                       X, y, heads, cfg, torch.device("cpu"))
    lines = [r.getMessage() for r in scbert_log.records if "run the frozen encoder every epoch" in r.getMessage()]
    assert len(lines) == 1 and "2 heads" in lines[0] and "--ensemble 1" in lines[0]


def test_the_recipes_set_the_ensemble() -> None:
    assert finetune_parts("ours")[1]["ensemble"] == 5
    assert finetune_parts("published")[1]["ensemble"] == 1
