"""Published checkpoints used directly by the stage scripts (--genes/--classes), without converting."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import finetune
import predict
from model.checkpoint import CheckpointError, load_checkpoint

FIX = Path(__file__).parent / "fixtures" / "scbert_reference"


@pytest.fixture()
def names(tmp_path: Path) -> tuple[Path, Path]:
    config = json.loads((FIX / "config.json").read_text())
    genes = tmp_path / "genes.txt"
    genes.write_text("".join(f"GENE{i:05d}\n" for i in range(config["n_genes"])))
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"{c}\n" for c in config["classes"]))
    return genes, classes


def test_load_checkpoint_needs_gene_names_for_published_files(names: tuple[Path, Path]) -> None:
    with pytest.raises(CheckpointError, match="--genes"):
        load_checkpoint(FIX / "pretrain.pth")
    genes = names[0].read_text().split()
    ck = load_checkpoint(FIX / "pretrain.pth", genes=genes)
    assert ck.config.dim == 32 and ck.genes == genes


def test_predict_with_a_published_finetuned_checkpoint(names: tuple[Path, Path], tmp_path: Path) -> None:
    genes, classes = names
    out = tmp_path / "pred.h5ad"
    predict.main(["--data", str(FIX / "input.h5ad"), "--model", str(FIX / "finetune.pth"), "--genes", str(genes),
                  "--classes", str(classes), "--out", str(out), "--threshold", "0", "--quiet", "--precision", "fp32"])  # the reference is fp32
    expected = np.load(FIX / "expected.npz")
    pred = ad.read_h5ad(out)
    np.testing.assert_allclose(pred.obsm["scbert_probabilities"], expected["finetune_prob"], atol=1e-4)
    assert pred.obs["scbert_celltype"].tolist() == expected["predicted"].tolist()


def test_finetune_from_a_published_pretrained_checkpoint(names: tuple[Path, Path], tmp_path: Path) -> None:
    data = ad.read_h5ad(FIX / "input.h5ad")
    data.obs["celltype"] = ["a", "b", "c"] * 8
    path = tmp_path / "labelled.h5ad"
    data.write_h5ad(path)
    finetune.main(["--data", str(path), "--label-key", "celltype", "--pretrained", str(FIX / "pretrain.pth"), "--genes", str(names[0]),
                   "--out", str(tmp_path / "ft"), "--epochs", "1", "--val-frac", "0.5", "--min-genes", "0", "--quiet"])
    ck = load_checkpoint(tmp_path / "ft" / "model.pt")
    assert ck.classes == ["a", "b", "c"] and ck.config.dim == 32 and ck.genes[0] == "GENE00000"


def test_pretrain_from_scratch_with_a_published_style_gene2vec_npy(names: tuple[Path, Path], tmp_path: Path) -> None:
    import pretrain

    vectors = np.load(FIX / "gene2vec.npy")
    n_genes = len(names[0].read_text().split())
    pretrain.main(["--data", str(FIX / "input.h5ad"), "--out", str(tmp_path / "pre"), "--vocab", str(names[0]),
                   "--gene2vec", str(FIX / "gene2vec.npy"), "--gene2vec-genes", str(names[0]), "--dim", str(vectors.shape[1]),
                   "--depth", "1", "--heads", "2", "--dim-head", "8", "--epochs", "1", "--min-genes", "0", "--quiet"])
    ck = load_checkpoint(tmp_path / "pre" / "model.pt")
    emb = ck.state_dict["pos_emb.emb.weight"].numpy()
    np.testing.assert_allclose(emb[:n_genes], vectors[:n_genes].astype(np.float32), rtol=1e-6)
    assert ck.metrics["val_masked_tokens"] > 0


def test_class_names_with_commas_survive_every_reader(names: tuple[Path, Path], tmp_path: Path) -> None:
    """One reader of class lists: predict.py --classes, the API and python -m model.convert keep
    'B cell, naive' whole (gene lists still take the first field of a line)."""
    from data.vocab import read_name_list
    from model import load_model
    from model.convert import main as convert_main

    genes, _ = names
    classes = ["B cell, naive", "T cell, CD4+", "delta", "gamma", "ductal"]
    class_file = tmp_path / "classes.txt"
    class_file.write_text("".join(f"{c}\n" for c in classes))
    table = tmp_path / "genes.tsv"
    table.write_text("".join(f"{g}\t{i}\n" for i, g in enumerate(genes.read_text().split())))
    assert read_name_list(class_file, "classes") == classes
    assert read_name_list(table, "genes") == genes.read_text().split()

    out = tmp_path / "pred.h5ad"
    predict.main(["--data", str(FIX / "input.h5ad"), "--model", str(FIX / "finetune.pth"), "--genes", str(genes),
                  "--classes", str(class_file), "--out", str(out), "--threshold", "0", "--quiet"])
    assert ad.read_h5ad(out).uns["scbert_classes"].tolist() == classes
    assert load_model(FIX / "finetune.pth", genes=genes, classes=class_file).classes == classes
    assert convert_main([str(FIX / "finetune.pth"), "--genes", str(table), "--classes", str(class_file), "--out", str(tmp_path / "c.pt")]) == 0
    assert load_checkpoint(tmp_path / "c.pt").classes == classes


def test_published_checkpoints_preprocess_as_published(names: tuple[Path, Path]) -> None:
    """A published checkpoint takes library sizes over its vocabulary (align, then normalise), so
    counts in genes it does not know (here 30 extra genes) change nothing; ours are taken over all genes."""
    from scipy import sparse

    genes = names[0].read_text().split()
    ckpt = load_checkpoint(FIX / "finetune.pth", genes=genes, classes=names[1].read_text().splitlines())
    assert ckpt.preprocessing["library_size"] == "vocab"
    cells = ad.read_h5ad(FIX / "input.h5ad")
    cells.var_names = genes
    rng = np.random.default_rng(0)
    extra = ad.AnnData(X=sparse.csr_matrix(rng.poisson(20.0, (cells.n_obs, 30)).astype(np.float32)))
    extra.var_names, extra.obs_names = [f"MT-X{i}" for i in range(30)], cells.obs_names
    wide = ad.concat([cells, extra], axis=1)
    X = cells.X.toarray().astype(np.float64)
    expected = np.log2(1 + X / X.sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(ckpt.prepare(wide)[0].X.toarray(), expected, rtol=1e-5, atol=1e-5)
    ckpt.preprocessing["library_size"] = "all"
    assert not np.allclose(ckpt.prepare(wide)[0].X.toarray(), expected, atol=1e-3)
