"""Where users' data is: counts in layers or .raw, .zarr and .loom stores, gene names in a var column,
and .h5ad queries annotated a chunk at a time (alone and under torchrun) with the outputs of the
in-memory run."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

import finetune
import predict
import preprocess
import pretrain
from data.dataset import CellDataset
from data.io import CellSource, InputError, read_cells
from model import annotate, embed
from model import preprocess as api_preprocess
from model.checkpoint import load_checkpoint, save_checkpoint
from model.inference import InferenceOptions, predict_outputs
from model.novelty import ClassStatistics, NoveltyRecord, calibrate, novelty_scores

from .conftest import PBMC, REPO
from .test_distributed import run_env, torchrun_cmd
from .test_errors import expect_error

TYPES = ["B", "CD14+ Mono", "NK"]


def scaled(counts: sparse.csr_matrix) -> np.ndarray:
    """What sc.pp.scale leaves in X: per-gene z-scores, negative for most entries."""
    dense = np.log1p(counts.toarray())
    return ((dense - dense.mean(0)) / (dense.std(0) + 1e-6)).astype(np.float32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, random_checkpoints: Any) -> dict:
    """39 raw PBMCs x their 300 most expressed genes in several on-disk forms, and a tiny classifier
    with a novelty calibration on those genes."""
    d = tmp_path_factory.mktemp("inputs")
    full = ad.read_h5ad(PBMC)
    rows = np.sort(np.concatenate([np.flatnonzero(full.obs["celltype"] == t)[:13] for t in TYPES]))
    cells = full[rows]
    top = np.sort(np.argsort(-np.asarray(cells.X.sum(0)).ravel())[:300])
    plain = cells[:, top].copy()
    plain.obs = plain.obs[["celltype"]].astype(str)
    plain.X = sparse.csr_matrix(plain.X, dtype=np.float32)
    plain.write_h5ad(d / "plain.h5ad")
    # a scanpy workflow's leftovers: scaled values in X, counts in layers['counts'] and in .raw
    both = plain.copy()
    both.layers["counts"] = plain.X.copy()
    both.raw = plain.copy()
    both.X = scaled(plain.X)
    both.write_h5ad(d / "layers_and_raw.h5ad")
    layer_only = both.copy()
    del layer_only.raw
    layer_only.write_h5ad(d / "layer.h5ad")
    # Ensembl ids as var_names, symbols in a column
    ens = plain.copy()
    ens.var["symbol"] = list(plain.var_names)
    ens.var_names = [str(g) for g in plain.var["gene_ids"]]
    ens.write_h5ad(d / "ensembl.h5ad")

    genes = list(plain.var_names)
    (d / "plain_clf.pt").symlink_to(random_checkpoints(genes, TYPES)["clf"])
    ck = load_checkpoint(d / "plain_clf.pt")
    net = ck.build_model()
    prepared, _ = ck.prepare(plain)
    out = predict_outputs(net, CellDataset(prepared.X, ck.config.bin_num), InferenceOptions(8, progress=False), embed=True, features=True)
    y = np.array([TYPES.index(t) for t in plain.obs["celltype"]])
    record = NoveltyRecord(classes=ClassStatistics.fit(out["features"], out["embedding"], y, 3, k=3))
    record.calibration = calibrate(novelty_scores(out["probs"], out["logits"], out["features"], out["embedding"], record), 0.1)
    save_checkpoint(d / "clf.pt", net, genes, TYPES, novelty=record)
    return {"dir": d, "plain": plain, "genes": genes}


# --- choosing the matrix --------------------------------------------------------------------


def test_layer_and_raw_read_the_counts(setup: dict) -> None:
    d, plain = setup["dir"], setup["plain"]
    for source in (CellSource(layer="counts"), CellSource(use_raw=True)):
        got = read_cells(d / "layers_and_raw.h5ad", source=source)
        assert (got.X != plain.X).nnz == 0 and list(got.var_names) == list(plain.var_names)
        assert list(got.obs_names) == list(plain.obs_names) and "celltype" in got.obs


def test_a_scaled_x_with_one_usable_matrix_is_replaced_with_a_message(setup: dict, scbert_log: pytest.LogCaptureFixture) -> None:
    with scbert_log.at_level(logging.WARNING, logger="scbert"):
        got = read_cells(setup["dir"] / "layer.h5ad")
    assert (got.X != setup["plain"].X).nnz == 0
    assert "layers['counts'] instead" in scbert_log.text and "--layer counts" in scbert_log.text


def test_a_scaled_x_with_several_usable_matrices_names_their_flags(setup: dict) -> None:
    with pytest.raises(InputError, match=r"--layer counts or --use-raw"):
        read_cells(setup["dir"] / "layers_and_raw.h5ad")


def test_zarr_and_loom_stores_read_like_h5ad(setup: dict) -> None:
    d, plain = setup["dir"], setup["plain"]
    plain.write_zarr(d / "cells.zarr")
    plain.write_loom(d / "cells.loom")
    for path in (d / "cells.zarr", d / "cells.loom"):
        got = read_cells(path)
        assert (got.X != plain.X).nnz == 0, path
        assert list(got.var_names) == list(plain.var_names) and list(got.obs_names) == list(plain.obs_names)
        assert list(got.obs["celltype"]) == list(plain.obs["celltype"])


def test_gene_symbols_column_both_ways(setup: dict) -> None:
    d, plain, genes = setup["dir"], setup["plain"], setup["genes"]
    ens = read_cells(d / "ensembl.h5ad", source=CellSource(gene_symbols="symbol"))
    assert list(ens.var_names) == genes
    # the reverse: symbols as var_names, Ensembl ids (revised to current symbols) from the column
    a = api_preprocess(plain, genes, gene_symbols="gene_ids", min_genes=None)
    b = api_preprocess(plain, genes, min_genes=None)
    same = np.asarray((a.X != b.X).sum(0)).ravel() == 0
    # 22 of 300 differ: outdated hg19 symbols (GNB2L1 -> RACK1, not in this vocabulary), Ensembl ids
    # of an older release than NCBI's (TXNIP), and NCBI's mitochondrial symbols (ND1, not MT-ND1)
    assert same.mean() > 0.9
    with pytest.raises(InputError, match="not a column of the genes"):
        read_cells(d / "ensembl.h5ad", source=CellSource(gene_symbols="nope"))


def test_bad_choices_are_one_line_errors(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = setup["dir"]
    base = ["--model", str(d / "clf.pt"), "--out", str(tmp_path / "p.h5ad"), "--quiet"]
    expect_error(predict.main, ["--data", str(d / "layers_and_raw.h5ad"), "--layer", "nope", *base], capsys, "no layer 'nope'",
                 "layers['counts']")
    expect_error(predict.main, ["--data", str(d / "plain.h5ad"), "--use-raw", *base], capsys, "has no .raw")
    bad = ad.read_h5ad(d / "layer.h5ad")
    bad.layers["scaled"] = bad.X.copy()
    bad.write_h5ad(tmp_path / "bad.h5ad")
    expect_error(predict.main, ["--data", str(tmp_path / "bad.h5ad"), "--layer", "scaled", *base], capsys, "negative values")
    expect_error(preprocess.main, ["--data", str(d / "plain.h5ad"), "--out", str(tmp_path / "x.h5ad"), "--gene-symbols", "nope"], capsys,
                 "not a column")
    expect_error(predict.main, ["--data", str(d / "plain.h5ad"), "--backed", "--majority-voting", *base], capsys, "--majority-voting")


def test_every_stage_reads_a_layer(setup: dict, tmp_path: Path) -> None:
    d, plain = setup["dir"], setup["plain"]
    preprocess.main(["--data", str(d / "layers_and_raw.h5ad"), "--layer", "counts", "--out", str(tmp_path / "a.h5ad"), "--quiet"])
    preprocess.main(["--data", str(d / "plain.h5ad"), "--out", str(tmp_path / "b.h5ad"), "--quiet"])
    a, b = ad.read_h5ad(tmp_path / "a.h5ad"), ad.read_h5ad(tmp_path / "b.h5ad")
    assert (a.X != b.X).nnz == 0 and list(a.var_names) == list(b.var_names)
    finetune.main(["--data", str(d / "layers_and_raw.h5ad"), "--use-raw", "true", "--label-key", "celltype", "--out", str(tmp_path / "ft"),
                   "--dim", "8", "--depth", "1", "--heads", "2", "--dim-head", "4", "--epochs", "1", "--gene2vec", "none",
                   "--min-genes", "0", "--device", "cpu", "--quiet"])
    assert (tmp_path / "ft" / "model.pt").is_file()
    pretrain.main(["--data", str(d / "layers_and_raw.h5ad"), "--layer", "counts", "--out", str(tmp_path / "pre"), "--dim", "8", "--depth", "1",
                   "--heads", "2", "--dim-head", "4", "--epochs", "1", "--gene2vec", "none", "--min-genes", "0", "--device", "cpu", "--quiet"])
    m = json.loads((tmp_path / "pre" / "metrics.json").read_text())
    assert m["n_cells_train"] + m["n_cells_val"] == plain.n_obs
    predict.main(["--data", str(d / "layers_and_raw.h5ad"), "--use-raw", "--model", str(d / "clf.pt"), "--out", str(tmp_path / "p1.h5ad"),
                  "--quiet"])
    predict.main(["--data", str(d / "plain.h5ad"), "--model", str(d / "clf.pt"), "--out", str(tmp_path / "p2.h5ad"), "--quiet"])
    p1, p2 = ad.read_h5ad(tmp_path / "p1.h5ad"), ad.read_h5ad(tmp_path / "p2.h5ad")
    np.testing.assert_array_equal(p1.obsm["scbert_probabilities"], p2.obsm["scbert_probabilities"])
    assert "counts" in p1.layers and p1.raw is not None and p1.X.min() < 0, "the output keeps the input as it was"
    assert plain.n_obs == p1.n_obs


def test_api_takes_layer_and_use_raw(setup: dict) -> None:
    d, plain = setup["dir"], setup["plain"]
    both = ad.read_h5ad(d / "layers_and_raw.h5ad")
    ref = annotate(plain.copy(), d / "clf.pt", progress=False, precision="fp32")  # fp32: bf16 re-checks some cells, which embed does not
    for kwargs in ({"layer": "counts"}, {"use_raw": True}):
        got = annotate(both.copy(), d / "clf.pt", progress=False, precision="fp32", **kwargs)
        np.testing.assert_array_equal(got.obsm["scbert_probabilities"], ref.obsm["scbert_probabilities"])
        assert list(got.obs["scbert_celltype"]) == list(ref.obs["scbert_celltype"])
    e1 = embed(both.copy(), d / "clf.pt", layer="counts", progress=False, precision="fp32").obsm["X_scbert"]
    np.testing.assert_array_equal(e1, ref.obsm["X_scbert"])
    with pytest.raises(InputError, match="no layer"):
        annotate(both.copy(), d / "clf.pt", layer="nope", progress=False)


# --- a chunk at a time -------------------------------------------------------------------------


def assert_same_outputs(a_path: Path, b_path: Path, atol: float = 0.0) -> None:
    """Two predict.py outputs hold the same cells, matrices, annotation and uns entries."""
    a, b = ad.read_h5ad(a_path), ad.read_h5ad(b_path)
    assert list(a.obs_names) == list(b.obs_names) and list(a.obs.columns) == list(b.obs.columns)
    assert (sparse.csr_matrix(a.X) != sparse.csr_matrix(b.X)).nnz == 0
    assert set(a.layers) == set(b.layers) and (a.raw is None) == (b.raw is None)
    for col in a.obs.columns:
        if a.obs[col].dtype.kind == "f":
            # the novelty score is stored in float64 (so "score > cutoff" reads back the labels): the two paths sum in other orders
            np.testing.assert_allclose(a.obs[col], b.obs[col], atol=atol, rtol=1e-6 if a.obs[col].dtype == np.float64 else 0, err_msg=col)
        else:
            assert list(a.obs[col].astype(str)) == list(b.obs[col].astype(str)), col
            if a.obs[col].dtype.name == "category":
                assert list(a.obs[col].cat.categories) == list(b.obs[col].cat.categories), col
    assert set(a.obsm) == set(b.obsm)
    for key in a.obsm:
        np.testing.assert_allclose(a.obsm[key], b.obsm[key], atol=atol, rtol=0, err_msg=key)
    assert set(a.uns) == set(b.uns)
    for key in ("scbert_novelty", "scbert_annotation"):
        assert json.dumps(a.uns[key], default=lambda o: o.tolist(), sort_keys=True) == json.dumps(b.uns[key], default=lambda o: o.tolist(), sort_keys=True), key
    assert list(a.uns["scbert_classes"]) == list(b.uns["scbert_classes"]) and a.uns["scbert_threshold"] == b.uns["scbert_threshold"]


def test_backed_prediction_equals_the_in_memory_one(setup: dict, tmp_path: Path) -> None:
    d = setup["dir"]
    for name, extra in (("plain", []), ("layer", ["--layer", "counts"])):
        data = d / f"{name}.h5ad"
        # fp32: in bf16 the cells near a decision are re-scored in float32 in batches of their own, whose composition
        # (and so the last bits) differs between a whole query and its chunks
        common = ["--data", str(data), "--model", str(d / "clf.pt"), "--quiet", "--batch-size", "4", "--label-key", "celltype", "--plots", "true",
                  "--precision", "fp32", *extra]
        predict.main([*common, "--out", str(tmp_path / f"{name}_mem.h5ad"), "--csv", str(tmp_path / f"{name}_mem.csv"), "--backed", "false"])
        predict.main([*common, "--out", str(tmp_path / f"{name}_str.h5ad"), "--csv", str(tmp_path / f"{name}_str.csv"), "--backed",
                      "--chunk-size", "6"])
        assert_same_outputs(tmp_path / f"{name}_mem.h5ad", tmp_path / f"{name}_str.h5ad")
        mem, streamed = pd.read_csv(tmp_path / f"{name}_mem.csv", index_col=0), pd.read_csv(tmp_path / f"{name}_str.csv", index_col=0)
        pd.testing.assert_frame_equal(mem, streamed)
        m1 = json.loads((tmp_path / f"{name}_mem_run" / "metrics.json").read_text())
        m2 = json.loads((tmp_path / f"{name}_str_run" / "metrics.json").read_text())
        assert m1["accuracy"] == m2["accuracy"] and m2["backed"] and not m1["backed"]
        assert (tmp_path / f"{name}_str_run" / "confusion_matrix.png").is_file()


@pytest.mark.slow
def test_torchrun_processes_share_the_chunks(setup: dict, tmp_path: Path) -> None:
    d = setup["dir"]
    common = ["--data", str(d / "plain.h5ad"), "--model", str(d / "clf.pt"), "--quiet", "--batch-size", "4", "--device", "cpu", "--precision", "fp32"]
    predict.main([*common, "--out", str(tmp_path / "mem.h5ad"), "--backed", "false"])
    cmd = torchrun_cmd(REPO / "predict.py", [*common, "--out", str(tmp_path / "tr.h5ad"), "--chunk-size", "5", "--csv", str(tmp_path / "tr.csv")])
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_outputs(tmp_path / "mem.h5ad", tmp_path / "tr.h5ad", atol=1e-5)  # 1 thread per process: float sums in another order
    assert not (tmp_path / "tr.h5ad.parts").exists()
    assert len(pd.read_csv(tmp_path / "tr.csv")) == setup["plain"].n_obs
    summary = (tmp_path / "tr_run" / "summary.txt").read_text()
    assert "2 processes" in summary


def test_backed_fine_tuning_equals_the_in_memory_one(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = setup["dir"]
    prep = tmp_path / "prep.h5ad"
    preprocess.main(["--data", str(d / "plain.h5ad"), "--out", str(prep), "--quiet", "--min-genes", "0"])
    tiny = ["--data", str(prep), "--label-key", "celltype", "--dim", "8", "--depth", "1", "--heads", "2", "--dim-head", "4", "--epochs", "2",
            "--gene2vec", "train", "--min-genes", "0", "--device", "cpu", "--quiet", "--batch-size", "4"]
    finetune.main([*tiny, "--out", str(tmp_path / "mem")])
    finetune.main([*tiny, "--out", str(tmp_path / "disk"), "--backed"])
    a, b = load_checkpoint(tmp_path / "mem" / "model.pt"), load_checkpoint(tmp_path / "disk" / "model.pt")
    for k in a.state_dict:
        torch.testing.assert_close(a.state_dict[k], b.state_dict[k], rtol=0, atol=1e-6, msg=k)
    m1, m2 = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("mem", "disk"))
    assert m1["accuracy"] == m2["accuracy"] and m1["novelty"]["thresholds"] == pytest.approx(m2["novelty"]["thresholds"])
    expect_error(finetune.main, [*tiny, "--out", str(tmp_path / "x"), "--backed", "--label-key", "nope"], capsys, "'nope' is not a column of")
    expect_error(finetune.main, [*tiny, "--out", str(tmp_path / "y"), "--backed", "--layer", "counts"], capsys, "preprocess.py")


def test_backed_attention_reads_only_the_scored_cells_and_gives_the_same_scores(setup: dict, tmp_path: Path) -> None:
    import attn_analysis

    d = setup["dir"]
    common = ["--data", str(d / "plain.h5ad"), "--model", str(d / "clf.pt"), "--label-key", "celltype", "--max-cells-per-type", "5",
              "--device", "cpu", "--quiet", "--gmt", "none"]
    attn_analysis.main([*common, "--out", str(tmp_path / "mem")])
    attn_analysis.main([*common, "--out", str(tmp_path / "disk"), "--backed"])
    a = pd.read_csv(tmp_path / "mem" / "attention_by_celltype.csv", index_col=0)
    b = pd.read_csv(tmp_path / "disk" / "attention_by_celltype.csv", index_col=0)
    pd.testing.assert_frame_equal(a, b, rtol=0, atol=1e-9)
    m1, m2 = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("mem", "disk"))
    assert m1["n_cells_scored"] == m2["n_cells_scored"] and m1["n_cells_total"] == m2["n_cells_total"] == setup["plain"].n_obs
