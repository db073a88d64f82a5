"""The network, its freezing policy, and checkpoints."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.nn.config import ScBERTConfig
from model.nn.network import ScBERT

TINY = {"n_genes": 30, "dim": 16, "depth": 3, "heads": 2, "dim_head": 8}


def _tokens(n: int = 4, n_genes: int = 30, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 6, (n, n_genes + 1), generator=g)
    t[:, -1] = 0
    return t


def test_published_defaults() -> None:
    c = ScBERTConfig(n_genes=16906)
    assert (c.bin_num, c.num_tokens, c.mask_token) == (5, 7, 6)
    assert (c.dim, c.depth, c.heads, c.dim_head) == (200, 6, 10, 64)
    assert c.n_features == 266 and c.feature_redraw_interval == 1000
    assert c.seq_len == 16907 and c.gene_embedding == "gene2vec"


def test_shapes_of_both_heads_and_embeddings() -> None:
    torch.manual_seed(0)
    t = _tokens()
    mlm = ScBERT(ScBERTConfig(**TINY)).eval()
    assert mlm(t).shape == (4, 31, 7)
    clf = ScBERT(ScBERTConfig(**TINY, head="classifier", n_classes=3)).eval()
    assert clf(t).shape == (4, 3)
    assert clf.embed(t).shape == (4, 16) and clf.embed(t, "expressed").shape == (4, 16)
    with pytest.raises(ValueError, match="expected tokens of shape"):
        clf(t[:, :-1])


def test_classifier_head_equals_the_published_conv_formulation() -> None:
    torch.manual_seed(0)
    clf = ScBERT(ScBERTConfig(**TINY, head="classifier", n_classes=3)).eval()
    h = torch.randn(2, 31, 16)
    head = clf.to_out
    x = torch.relu(head.conv1(h[:, None])).flatten(1)
    want = head.fc3(torch.relu(head.fc2(torch.relu(head.fc1(x)))))
    torch.testing.assert_close(head(h), want, rtol=1e-5, atol=1e-5)


def test_classifier_head_runs_in_float32_under_bf16() -> None:
    """Under bf16 autocast the head still computes in float32 (it made nearly all of bf16's change
    to the probabilities): from the same encodings, the same logits as without autocast."""
    torch.manual_seed(0)
    head = ScBERT(ScBERTConfig(**TINY, head="classifier", n_classes=3)).eval().to_out
    h = torch.randn(2, 31, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = head.features(h)
        logits = head(h)
    assert feats.dtype == logits.dtype == torch.float32
    torch.testing.assert_close(logits, head(h.float()), rtol=0, atol=0)
    torch.testing.assert_close(head.logits(feats), logits, rtol=0, atol=0)


def test_gene_embedding_variants() -> None:
    vectors = torch.randn(30, 16)
    m = ScBERT(ScBERTConfig(**TINY), vectors)
    w = m.pos_emb.emb.weight
    assert not w.requires_grad
    torch.testing.assert_close(w[:30], vectors)
    assert torch.count_nonzero(w[30]) == 0, "the extra last position has a zero vector"
    torch.testing.assert_close(m.gene_vectors(), vectors)
    assert ScBERT(ScBERTConfig(**TINY, gene_embedding="learned")).pos_emb.emb.weight.requires_grad
    none = ScBERT(ScBERTConfig(**TINY, gene_embedding="none"))
    assert none.pos_emb is None and not any(k.startswith("pos_emb") for k in none.state_dict())


def test_state_dict_holds_each_weight_once() -> None:
    keys = ScBERT(ScBERTConfig(**TINY)).state_dict().keys()
    assert not any("proj_updater.instance" in k for k in keys)
    assert "performer.proj_updater.calls_since_last_redraw" in keys


def test_published_freezing_policy() -> None:
    m = ScBERT(ScBERTConfig(**TINY, head="classifier", n_classes=3))
    m.freeze_for_finetuning()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("norm.", "to_out.", "performer.net.layers.1.")) for n in trainable)
    assert any(n.startswith("performer.net.layers.1.") for n in trainable)
    assert any(n.startswith("to_out.") for n in trainable) and "norm.weight" in trainable
    m.freeze_for_finetuning(train_all=True)
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {"pos_emb.emb.weight"}, "gene2vec stays frozen even when training everything"


def test_head_only_policy() -> None:
    m = ScBERT(ScBERTConfig(**TINY, head="classifier", n_classes=3))
    m.freeze_for_finetuning(head_only=True)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in m.named_parameters() if n.startswith("to_out.")}
    m.train()  # the frozen encoder stays in eval mode: no dropout, no feature redraw
    assert m.to_out.training and not m.performer.training and not m.performer.proj_updater.training
    m.freeze_for_finetuning()
    m.train()
    assert m.performer.training
    with pytest.raises(ValueError, match="exclude"):
        m.freeze_for_finetuning(train_all=True, head_only=True)


def test_head_init_reads_out_expression() -> None:
    """Encodings that hold the bin along one direction (plus noise in the others): the conv then
    returns the bin itself, and R^2 is ~1; constant bins keep the random start."""
    g = torch.Generator().manual_seed(0)
    bins = torch.randint(0, 6, (5, 40), generator=g).float()
    direction = torch.randn(16, generator=g)
    noise = torch.randn(5, 40, 16, generator=g)
    noise -= (noise @ direction)[..., None] * direction / direction.dot(direction)  # orthogonal to the direction
    h = 0.5 + bins[..., None] * direction / direction.dot(direction) * 2.0 + noise
    head = ScBERT(ScBERTConfig(**TINY, head="classifier", n_classes=3)).to_out  # TINY has dim 16
    r2 = head.init_from_expression(h, bins, max_tokens=150)
    assert r2 > 0.999
    w = head.conv1.weight.reshape(-1)
    torch.testing.assert_close(h @ w + head.conv1.bias, bins, atol=0.02, rtol=0)  # (a light ridge shrinks it a little)
    before = head.conv1.weight.clone()
    assert head.init_from_expression(h, torch.zeros(5, 40)) == 0.0
    assert torch.equal(head.conv1.weight, before)


def test_load_encoder_state_checks_fit() -> None:
    pre = ScBERT(ScBERTConfig(**TINY))
    clf = ScBERT(ScBERTConfig(**TINY, head="classifier", n_classes=3))
    clf.load_encoder_state(pre.state_dict())
    torch.testing.assert_close(clf.token_emb.weight, pre.token_emb.weight)
    other = ScBERT(ScBERTConfig(**{**TINY, "n_genes": 31}))
    with pytest.raises(ValueError, match="shape"):
        clf.load_encoder_state(other.state_dict())


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = ScBERT(ScBERTConfig(**TINY, head="classifier", n_classes=2)).eval()
    genes = [f"G{i}" for i in range(30)]
    path = tmp_path / "run" / "model.pt"
    save_checkpoint(path, m, genes, ["a", "b"], training={"lr": 1e-4, "path": Path("x"), "nan": float("nan")}, metrics={"accuracy": 0.5})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"], "no temporary files left behind"
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["format"] == "scbert-pytorch"
    ck = load_checkpoint(path)
    assert ck.genes == genes and ck.classes == ["a", "b"] and ck.metrics["accuracy"] == 0.5
    t = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(ck.build_model()(t), m(t))


def test_checkpoint_needs_names(tmp_path: Path) -> None:
    m = ScBERT(ScBERTConfig(**TINY, head="classifier", n_classes=2))
    with pytest.raises(ValueError, match="gene names"):
        save_checkpoint(tmp_path / "m.pt", m, ["G1"], ["a", "b"])
    with pytest.raises(ValueError, match="class name"):
        save_checkpoint(tmp_path / "m.pt", m, [f"G{i}" for i in range(30)], ["a"])
    assert not (tmp_path / "m.pt").exists()


class _Evil:
    def __reduce__(self):  # noqa: ANN204 - executed only if unpickled unsafely
        return (os.system, ("touch pwned_marker",))


def test_bad_checkpoints_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "good.pt"
    save_checkpoint(good, ScBERT(ScBERTConfig(**TINY)), [f"G{i}" for i in range(30)])
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(truncated)
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"format": "scbert-pytorch", "x": _Evil()}, f)
    with pytest.raises(CheckpointError):
        load_checkpoint(evil)
    assert not (tmp_path / "pwned_marker").exists()
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an scBERT checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
