"""Published scBERT checkpoints: conversion, numerical agreement with the published code, errors.

The reference outputs in tests/fixtures/scbert_reference were computed by the published scBERT
code itself on a tiny configuration (see the README there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from data.dataset import tokenize_rows
from data.preprocess import PUBLISHED_PREPROCESSING
from model.checkpoint import CheckpointError, load_checkpoint
from model.checkpoint.published import (
    convert_state_dict,
    infer_config,
    is_published_checkpoint,
    published_to_checkpoint,
    read_published,
)
from model.convert import main as convert_main
from model.nn.config import ScBERTConfig
from model.nn.network import ScBERT

REPO = Path(__file__).resolve().parents[1]


def load_published(path: Path, genes: list[str] | None = None, classes: list[str] | None = None):  # noqa: ANN201
    """A published file read safely and converted to our Checkpoint, as ``python -m model.convert`` does."""
    return published_to_checkpoint(read_published(path), genes, classes, source=str(path))
REF = Path(__file__).resolve().parent / "fixtures" / "scbert_reference"

# Observed max |ours - published| on CPU: encodings 1.0e-3, pretrain logits 3.9e-4, fine-tune logits
# 1.1e-5, probabilities 2.2e-6 (the pip Performer differs only in its numerical stabiliser).
ENC_ATOL = 5e-3
MLM_LOGIT_ATOL = 2e-3
CLF_LOGIT_ATOL = 1e-4
PROB_ATOL = 2e-5


class ShellCommand:
    """Unpickling this with plain pickle would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.command = f"touch '{marker}'"

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


class MarkerWriter:
    """Unpickling this with plain pickle would create ``marker``; safe loading must not."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """These models are tiny (or only built, never run): one thread is faster, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ref() -> dict:
    cfg = json.loads((REF / "config.json").read_text())
    expected = dict(np.load(REF / "expected.npz"))
    adata = ad.read_h5ad(REF / "input.h5ad")
    return {"config": cfg, "expected": expected, "adata": adata, "genes": list(map(str, adata.var_names))}


@pytest.fixture(scope="module")
def tokens(ref: dict) -> torch.Tensor:
    adata = ref["adata"]
    return tokenize_rows(adata.X, np.arange(adata.n_obs), ref["config"]["bin_num"])


def _max_diff(a: torch.Tensor, b: np.ndarray) -> float:
    return (a.float() - torch.from_numpy(b).float()).abs().max().item()


def test_tokens_match_published_binning(ref: dict, tokens: torch.Tensor) -> None:
    expected = ref["expected"]["tokens"]
    assert tokens.shape == expected.shape == (24, 121)
    assert np.array_equal(tokens.numpy(), expected)


def test_fixture_files_are_published_checkpoints() -> None:
    obj = torch.load(REF / "pretrain.pth", map_location="cpu", weights_only=True)  # no fallback needed
    assert set(obj) == {"epoch", "model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "losses"}
    assert is_published_checkpoint(obj) and is_published_checkpoint(obj["model_state_dict"])
    assert not is_published_checkpoint({"epoch": 1}) and not is_published_checkpoint([1, 2])
    assert not is_published_checkpoint({"model_state_dict": {"token_emb.weight": torch.zeros(7, 4)}})


def test_pretrained_checkpoint_reproduces_published_outputs(ref: dict, tokens: torch.Tensor) -> None:
    ckpt = load_published(REF / "pretrain.pth", genes=ref["genes"])
    c, cfg = ckpt.config, ref["config"]
    assert (c.n_genes, c.dim, c.depth, c.heads, c.dim_head, c.bin_num) == (
        cfg["n_genes"], cfg["dim"], cfg["depth"], cfg["heads"], cfg["dim_head"], cfg["bin_num"]
    )
    assert c.head == "mlm" and c.gene_embedding == "gene2vec" and ckpt.classes is None
    assert ckpt.preprocessing == PUBLISHED_PREPROCESSING and ckpt.genes == ref["genes"]
    assert ckpt.training["published_epoch"] == 3 and "published_last_loss" in ckpt.metrics
    assert all(v.dtype in (torch.float32, torch.int64) for v in ckpt.state_dict.values())
    model = ckpt.build_model()
    np.testing.assert_array_equal(model.gene_vectors().numpy(), np.load(REF / "gene2vec.npy").astype(np.float32))
    with torch.no_grad():
        enc = model.encode(tokens)
        logits = model.to_out(enc)
    assert _max_diff(enc, ref["expected"]["encodings"]) < ENC_ATOL
    assert _max_diff(logits, ref["expected"]["pretrain_logits"]) < MLM_LOGIT_ATOL


def test_finetuned_checkpoint_reproduces_published_predictions(ref: dict, tokens: torch.Tensor) -> None:
    classes = ref["config"]["classes"]
    ckpt = load_published(REF / "finetune.pth", genes=ref["genes"], classes=classes)
    c = ckpt.config
    assert c.head == "classifier" and c.n_classes == 5 and c.classifier_hidden == ref["config"]["classifier_h_dim"]
    assert ckpt.classes == classes == list(ref["expected"]["classes"])
    with torch.no_grad():
        logits = ckpt.build_model()(tokens)
    prob = logits.softmax(dim=-1)
    assert _max_diff(logits, ref["expected"]["finetune_logits"]) < CLF_LOGIT_ATOL
    assert _max_diff(prob, ref["expected"]["finetune_prob"]) < PROB_ATOL
    assert [classes[i] for i in prob.argmax(dim=-1)] == list(ref["expected"]["predicted"])


def _write_lists(tmp_path: Path, ref: dict) -> tuple[Path, Path]:
    genes, classes = tmp_path / "genes.txt", tmp_path / "classes.txt"
    genes.write_text("".join(f"{g}\n" for g in ref["genes"]))
    classes.write_text("".join(f"{c}\n" for c in ref["config"]["classes"]))
    return genes, classes


def test_convert_cli_round_trip(ref: dict, tokens: torch.Tensor, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    genes, classes = _write_lists(tmp_path, ref)
    out = tmp_path / "ours.pt"
    argv = [str(REF / "finetune.pth"), "--genes", str(genes), "--classes", str(classes), "--out", str(out)]
    assert convert_main(argv) == 0
    summary = capsys.readouterr().out.strip()
    assert "\n" not in summary and "5 classes" in summary and "120 genes" in summary and "dim 32" in summary

    ckpt = load_checkpoint(out)
    assert ckpt.genes == ref["genes"] and ckpt.classes == ref["config"]["classes"]
    assert ckpt.config.n_genes == 120 and ckpt.preprocessing["target_sum"] == 1e4
    with torch.no_grad():
        prob = ckpt.build_model()(tokens).softmax(dim=-1)
    assert _max_diff(prob, ref["expected"]["finetune_prob"]) < PROB_ATOL

    # an existing --out is kept unless --overwrite is given
    before = out.stat().st_mtime_ns
    assert convert_main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err and out.stat().st_mtime_ns == before
    assert convert_main([*argv, "--overwrite"]) == 0

    # a pretrained checkpoint converts without classes, and refuses them
    assert convert_main([str(REF / "pretrain.pth"), "--genes", str(genes), "--out", str(tmp_path / "pre.pt")]) == 0
    assert load_checkpoint(tmp_path / "pre.pt").config.head == "mlm"
    capsys.readouterr()
    assert convert_main([str(REF / "finetune.pth"), "--genes", str(genes), "--out", str(tmp_path / "y.pt")]) == 2
    assert "--classes" in capsys.readouterr().err
    assert not (tmp_path / "y.pt").exists()


def test_convert_cli_errors_are_one_line(ref: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    genes, _ = _write_lists(tmp_path, ref)
    short = tmp_path / "short.txt"
    short.write_text("".join(f"{g}\n" for g in ref["genes"][:100]))
    out = tmp_path / "o.pt"
    cases = {
        "100": [str(REF / "pretrain.pth"), "--genes", str(short), "--out", str(out)],
        "does not exist": [str(tmp_path / "nope.pth"), "--genes", str(genes), "--out", str(out)],
        "gene list": [str(REF / "pretrain.pth"), "--genes", str(tmp_path / "nope.txt"), "--out", str(out)],
        "folder": [str(REF / "pretrain.pth"), "--genes", str(genes), "--out", str(tmp_path)],
    }
    for expected, argv in cases.items():
        assert convert_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and expected in err
    assert not out.exists()


def test_convert_module_help() -> None:
    res = subprocess.run([sys.executable, "-m", "model.convert", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    assert "--genes" in res.stdout and "--classes" in res.stdout and "example" in res.stdout


def _published_shapes() -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    rows = []
    for line in (REF / "published_pretrain_checkpoint_keys.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        rows.append((key, dims, getattr(torch, dtype)))
    return rows


def test_full_size_published_layout_converts() -> None:
    rows = _published_shapes()
    assert len(rows) == 3 + 6 * 14 + 4
    pretrain = {key: torch.zeros(shape, dtype=dtype) for key, shape, dtype in rows}
    assert pretrain["pos_emb.emb.weight"].dtype == torch.float64

    c = infer_config(pretrain)
    assert (c.dim, c.depth, c.heads, c.dim_head, c.bin_num, c.n_genes, c.n_features) == (200, 6, 10, 64, 5, 16906, 266)
    assert c.head == "mlm" and c.gene_embedding == "gene2vec"
    assert c.to_dict() == ScBERTConfig(n_genes=16906, nb_features=266).to_dict()
    config, sd = convert_state_dict(pretrain)
    assert sd["pos_emb.emb.weight"].dtype == torch.float32
    ScBERT(ScBERTConfig(n_genes=16906)).load_state_dict(sd, strict=True)

    # the fine-tuned layout: to_out.* replaced by the classifier head (here 7 classes)
    finetune = {k: v for k, v in pretrain.items() if not k.startswith("to_out.")}
    finetune.update({
        "to_out.conv1.weight": torch.zeros(1, 1, 1, 200), "to_out.conv1.bias": torch.zeros(1),
        "to_out.fc1.weight": torch.zeros(512, 16907), "to_out.fc1.bias": torch.zeros(512),
        "to_out.fc2.weight": torch.zeros(128, 512), "to_out.fc2.bias": torch.zeros(128),
        "to_out.fc3.weight": torch.zeros(7, 128), "to_out.fc3.bias": torch.zeros(7),
    })
    del pretrain, sd
    config, sd = convert_state_dict(finetune)
    assert (config.head, config.n_classes, config.classifier_hidden, config.n_genes) == ("classifier", 7, 128, 16906)
    ScBERT(ScBERTConfig(n_genes=16906, head="classifier", n_classes=7)).load_state_dict(sd, strict=True)


def _small_state_dict(**overrides: object) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    config = ScBERTConfig(n_genes=20, dim=16, depth=2, heads=2, dim_head=8, **overrides)
    sd = ScBERT(config).state_dict()
    sd["performer.calls_since_last_redraw"] = sd.pop("performer.proj_updater.calls_since_last_redraw")
    return sd


def test_infer_config_variants() -> None:
    sd = _small_state_dict(gene_embedding="none", head="classifier", n_classes=3, classifier_hidden=32)
    c = infer_config(sd)  # n_genes from the classifier's fc1
    assert (c.n_genes, c.gene_embedding, c.head, c.n_classes, c.classifier_hidden) == (20, "none", "classifier", 3, 32)
    with pytest.raises(CheckpointError, match="20 genes but 19"):
        infer_config(sd, n_genes=19)

    mlm = _small_state_dict(gene_embedding="none")
    with pytest.raises(CheckpointError, match="cannot be read"):
        infer_config(mlm)
    assert infer_config(mlm, n_genes=20).n_genes == 20

    # a DistributedDataParallel "module." prefix is dropped
    wrapped = {f"module.{k}": v for k, v in _small_state_dict().items()}
    config, converted = convert_state_dict(wrapped)
    assert config.n_genes == 20 and "performer.proj_updater.calls_since_last_redraw" in converted


def test_convert_state_dict_rejects_unexpected_content() -> None:
    sd = _small_state_dict()
    with pytest.raises(CheckpointError, match="unknown keys extra.weight"):
        convert_state_dict({**sd, "extra.weight": torch.zeros(2)})
    missing = dict(sd)
    del missing["performer.net.layers.1.1.fn.fn.w2.bias"]
    with pytest.raises(CheckpointError, match="missing keys performer.net.layers.1.1.fn.fn.w2.bias"):
        convert_state_dict(missing)
    with pytest.raises(CheckpointError, match="inconsistent tensor shapes"):
        convert_state_dict({**sd, "performer.net.layers.0.1.fn.fn.w1.weight": torch.zeros(48, 16)})
    with pytest.raises(CheckpointError, match="not a multiple"):
        convert_state_dict({**sd, "performer.net.layers.0.0.fn.to_q.weight": torch.zeros(12, 16)})
    with pytest.raises(CheckpointError, match="NaN"):
        convert_state_dict({**sd, "norm.weight": torch.full((16,), float("nan"))})
    with pytest.raises(CheckpointError, match="not tensors"):
        convert_state_dict({**sd, "note": "hello"})


def test_load_published_refuses_bad_input(ref: dict, tmp_path: Path) -> None:
    genes, classes = ref["genes"], ref["config"]["classes"]
    with pytest.raises(CheckpointError, match="does not exist"):
        load_published(tmp_path / "missing.pth", genes)

    data = (REF / "pretrain.pth").read_bytes()
    for n in (0, 100, len(data) // 2, len(data) - 30):
        truncated = tmp_path / f"truncated{n}.pth"
        truncated.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match="truncated"):
            load_published(truncated, genes)

    other = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(3), "lr": 0.1}, other)
    with pytest.raises(CheckpointError, match="not a published scBERT checkpoint"):
        load_published(other, genes)
    torch.save({"epoch": 1, "model_state_dict": {"fc.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(CheckpointError, match="not of scBERT"):
        load_published(other, genes)

    with pytest.raises(CheckpointError, match="120 \\+ 1 rows") as err:
        load_published(REF / "pretrain.pth", genes[:100])
    assert "100" in str(err.value) and "120" in str(err.value)
    with pytest.raises(CheckpointError, match="--genes") as err:
        load_published(REF / "pretrain.pth")
    assert "panglao_10000.h5ad" in str(err.value)
    with pytest.raises(CheckpointError, match="duplicated"):
        load_published(REF / "pretrain.pth", genes[:-1] + genes[:1])

    with pytest.raises(CheckpointError, match="--classes") as err:
        load_published(REF / "finetune.pth", genes)
    assert "label_dict" in str(err.value)
    with pytest.raises(CheckpointError, match="4 class names given but .* 5 outputs"):
        load_published(REF / "finetune.pth", genes, classes[:4])
    with pytest.raises(CheckpointError, match="takes no classes"):
        load_published(REF / "pretrain.pth", genes, classes)


def test_bare_state_dict_is_accepted(ref: dict, tmp_path: Path) -> None:
    obj = torch.load(REF / "finetune.pth", map_location="cpu", weights_only=True)
    bare = tmp_path / "bare.pth"
    torch.save(obj["model_state_dict"], bare)
    ckpt = load_published(bare, ref["genes"], ref["config"]["classes"])
    assert ckpt.config.head == "classifier" and "published_epoch" not in ckpt.training
    assert published_to_checkpoint(obj, ref["genes"], ref["config"]["classes"]).training["published_epoch"] == 5


def test_pickled_code_is_never_run(ref: dict, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pth"
    torch.save({"payload": MarkerWriter(marker)}, evil)
    with pytest.raises(CheckpointError, match="not a published scBERT checkpoint"):
        load_published(evil, ref["genes"])
    torch.save(MarkerWriter(marker), evil)
    with pytest.raises(CheckpointError, match="not allowed to be loaded"):
        load_published(evil, ref["genes"])
    torch.save({"model_state_dict": {}, "payload": ShellCommand(marker)}, evil)
    with pytest.raises(CheckpointError, match="refusing to load it"):
        load_published(evil, ref["genes"])
    assert not marker.exists()

    # a published dict with foreign objects beside the weights: the weights are read, the objects are not run
    obj = torch.load(REF / "pretrain.pth", map_location="cpu", weights_only=True)
    obj["scheduler_state_dict"] = {"hook": MarkerWriter(marker)}
    obj["losses"], obj["epoch"] = np.float64(0.25), np.int64(9)
    mixed = tmp_path / "mixed.pth"
    torch.save(obj, mixed)
    ckpt = load_published(mixed, ref["genes"])
    assert not marker.exists()
    assert ckpt.training["published_epoch"] == 9 and ckpt.metrics["published_last_loss"] == 0.25
    assert ckpt.config.n_genes == 120


def test_numeric_class_lists_follow_the_published_label_dict(ref: dict) -> None:
    """np.unique sorts numeric labels as numbers: a list sorted as text would mis-map the outputs."""
    from model.checkpoint.published import check_label_dict_order

    check_label_dict_order(["1", "2", "10"])
    check_label_dict_order(["alpha", "beta"])
    with pytest.raises(CheckpointError, match=r"\['1', '2', '10'\]"):
        check_label_dict_order(["1", "10", "2"])
    with pytest.raises(CheckpointError, match="numerically"):
        load_published(REF / "finetune.pth", ref["genes"], ["0", "1", "10", "11", "2"])
    assert load_published(REF / "finetune.pth", ref["genes"], ["0", "1", "2", "10", "11"]).classes == ["0", "1", "2", "10", "11"]
