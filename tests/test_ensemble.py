"""The classifier ensemble (``--ensemble``): heads trained side by side, each as if alone, their
logits averaged; one head keeps the published state-dict keys; the recipe's setting reaches the model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from data.dataset import CellDataset
from model.checkpoint import load_checkpoint
from model.checkpoint.format import save_checkpoint
from model.nn.config import ScBERTConfig
from model.nn.network import CellClassifier, ClassifierEnsemble
from model.train.config import TrainConfig
from model.train.finetuning import finetune
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
    assert model(tokens, members=True).shape == (3, 4, 3)


def test_each_member_learns_as_if_it_were_alone() -> None:
    """Side by side, a member ends where it would alone from the same start: each has its own loss."""
    X, y = _data()
    pre = _pretrained()
    cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-3, head_lr=1e-3, clip_norm=1e6, select="last", patience=0, logit_adjust=1.0,
                      progress=False)
    torch.manual_seed(1)
    ens = new_classifier(TINY, 3, pretrained=pre, head_only=True, redraw_features=False, members=2)
    alone = new_classifier(TINY, 3, pretrained=pre, head_only=True, redraw_features=False)
    alone.to_out.load_state_dict(ens.to_out.members[1].state_dict())
    train, val = CellDataset(X[:30], 5, y[:30]), CellDataset(X[30:], 5, y[30:])
    before = {k: v.clone() for k, v in alone.to_out.state_dict().items()}
    finetune(ens, train, val, cfg, torch.device("cpu"), head_init="random")
    finetune(alone, train, val, cfg, torch.device("cpu"), head_init="random")
    after = ens.to_out.members[1].state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in before), "the member trained"
    for k, v in alone.to_out.state_dict().items():
        torch.testing.assert_close(after[k], v, rtol=1e-4, atol=1e-6)


def test_a_trainable_encoder_trains_an_ensemble_through_the_network() -> None:
    """Without stored encodings the step goes through ``forward(tokens, members=True)``."""
    X, y = _data()
    torch.manual_seed(1)
    model = new_classifier(TINY, 3, pretrained=_pretrained(), train_all=True, redraw_features=False, members=2)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-3, progress=False)
    best, history = finetune(model, CellDataset(X[:30], 5, y[:30]), CellDataset(X[30:], 5, y[30:]), cfg, torch.device("cpu"))
    assert len(history) == 2 and np.isfinite(history[-1]["train_loss"])


def test_the_recipes_set_the_ensemble() -> None:
    assert finetune_parts("ours")[1]["ensemble"] == 5
    assert finetune_parts("published")[1]["ensemble"] == 1
