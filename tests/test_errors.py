"""Bad input through every stage script: a clean one-line error (exit code 2) or a reported
correction; never a traceback, never silent nonsense, never a half-written output.

Runs the real ``main([...])`` of each script in-process on tiny files (24 cells x 300 genes) and
tiny untrained checkpoints, so the whole module takes seconds.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pytest
import torch
from scipy import sparse

import attn_analysis
import finetune
import predict
import preprocess
import pretrain
from data.io import InputError
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.nn.config import ScBERTConfig
from model.nn.network import ScBERT

from .conftest import PBMC, REPO

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")

TYPES = ["B", "CD14+ Mono", "NK"]
TINY = ["--dim", "8", "--depth", "1", "--heads", "2", "--dim-head", "4", "--gene2vec", "none"]
QUICK = ["--epochs", "1", "--batch-size", "8", "--quiet", "--min-genes", "5"]
STAGES = ["preprocess", "pretrain", "finetune", "predict", "attn"]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, random_checkpoints: Any) -> dict[str, object]:
    """24 raw-count PBMCs (3 types x 8) x the 300 genes they express most, plus tiny checkpoints on those genes."""
    d = tmp_path_factory.mktemp("errors")
    full = ad.read_h5ad(PBMC)
    rng = np.random.default_rng(0)
    rows = np.sort(np.concatenate([rng.choice(np.flatnonzero(full.obs["celltype"] == t), 8, replace=False) for t in TYPES]))
    cells = full[rows]
    top = np.sort(np.argsort(-np.asarray(cells.X.sum(0)).ravel())[:300])
    raw = cells[:, top].copy()
    raw.obs = raw.obs[["celltype"]].astype(str)
    raw.var = raw.var[["gene_ids"]]
    raw.X = sparse.csr_matrix(raw.X, dtype=np.float32)
    genes = list(raw.var_names)
    raw.write_h5ad(d / "raw.h5ad")
    for name, path in random_checkpoints(genes, TYPES).items():
        (d / f"{name}.pt").symlink_to(path)
    return {"dir": d, "raw": raw, "genes": genes}


def _variant(base: dict, name: str, change: Callable[[ad.AnnData], ad.AnnData | None]) -> Path:
    path = base["dir"] / f"{name}.h5ad"
    if not path.exists():
        a = base["raw"].copy()
        changed = change(a)
        (a if changed is None else changed).write_h5ad(path)
    return path


def _set_first_value(v: float) -> Callable[[ad.AnnData], None]:
    def change(a: ad.AnnData) -> None:
        X = a.X.copy()
        X.data[0] = v
        a.X = X
    return change


def _rename(f: Callable[[list[str]], list[str]]) -> Callable[[ad.AnnData], None]:
    def change(a: ad.AnnData) -> None:
        a.var_names = f(list(a.var_names))
    return change


def _set_labels(f: Callable[[np.ndarray], np.ndarray]) -> Callable[[ad.AnnData], None]:
    def change(a: ad.AnnData) -> None:
        a.obs["celltype"] = f(a.obs["celltype"].to_numpy(dtype=object).copy())
    return change


def _data(base: dict, case: str) -> Path:
    """The input file of a bad-data case."""
    d = base["dir"]
    if case == "missing":
        return d / "nope.h5ad"
    if case == "empty file":
        (d / "empty.h5ad").write_bytes(b"")
        return d / "empty.h5ad"
    if case == "truncated":
        blob = (d / "raw.h5ad").read_bytes()
        (d / "truncated.h5ad").write_bytes(blob[: len(blob) // 2])
        return d / "truncated.h5ad"
    if case == "not h5ad":
        (d / "text.h5ad").write_text("gene,cell\nCD3E,1\n")
        return d / "text.h5ad"
    changes: dict[str, Callable[[ad.AnnData], ad.AnnData | None]] = {
        "zero cells": lambda a: a[:0].copy(),
        "zero genes": lambda a: a[:, :0].copy(),
        "nan": _set_first_value(np.nan),
        "inf": _set_first_value(np.inf),
        "negative": _set_first_value(-1.0),
        "no gene overlap": _rename(lambda g: [f"XYZ{i}" for i in range(len(g))]),
        "low gene overlap": _rename(lambda g: [f"XYZ{i}" if i % 3 else n for i, n in enumerate(g)]),
        "mouse symbols": _rename(lambda g: [n.capitalize() for n in g]),
        "ensembl ids": lambda a: a.var.set_index("gene_ids", drop=False).pipe(lambda v: ad.AnnData(a.X, obs=a.obs, var=v)),
        "duplicated genes": _rename(lambda g: [g[0], g[0], *g[2:]]),
        "single class": _set_labels(lambda y: np.full(len(y), "B", dtype=object)),
        "rare class": _set_labels(lambda y: np.array(["Platelet", *y[1:]], dtype=object)),
        "no labels": _set_labels(lambda y: np.full(len(y), np.nan)),
    }
    return _variant(base, case.replace(" ", "_"), changes[case])


def _argv(stage: str, base: dict, data: Path, out: Path, model: Path | None = None, label: str = "celltype") -> tuple[Callable, list[str]]:
    """The command line of ``stage`` on ``data``; ``model`` is the checkpoint, or the vocabulary for preprocess/pretrain."""
    d = base["dir"]
    if stage == "preprocess":
        return preprocess.main, ["--data", str(data), "--out", str(out), "--vocab", str(model or d / "clf.pt"), "--label-key", label,
                                 "--quiet", "--min-genes", "5"]
    if stage == "pretrain":
        return pretrain.main, ["--data", str(data), "--out", str(out), *TINY, *QUICK, *(["--vocab", str(model)] if model else [])]
    if stage == "finetune":
        return finetune.main, ["--data", str(data), "--label-key", label, "--out", str(out), *TINY, *QUICK,
                               *(["--pretrained", str(model)] if model else [])]
    if stage == "predict":
        return predict.main, ["--data", str(data), "--model", str(model or d / "clf.pt"), "--out", str(out), "--label-key", label,
                              "--quiet", "--csv", str(out.with_suffix(".csv"))]
    return attn_analysis.main, ["--data", str(data), "--model", str(model or d / "clf.pt"), "--out", str(out), "--label-key", label,
                                "--quiet", "--markers", "none", "--gmt", "none"]


def _out(tmp_path: Path, stage: str) -> Path:
    return tmp_path / ("out.h5ad" if stage in ("preprocess", "predict") else "run")


RESULTS = ("model.pt", "metrics.json", "attention_top_genes.csv", "summary.txt")


def _no_output(out: Path) -> None:
    """A failed run wrote no result: neither the output file nor a model/metrics in a run folder."""
    assert not out.is_file(), f"{out} was written by a failed run"
    assert not out.with_suffix(".csv").exists()
    for folder in (out, out.with_name(out.name.removesuffix(".h5ad") + "_run")):
        for name in RESULTS:
            assert not (folder / name).exists(), f"{folder / name} was written by a failed run"
    assert not list(out.parent.glob(".*.tmp")) and not list(out.parent.glob(".*.h5ad")), "temporary files left behind"


def expect_error(fn: Callable, argv: list[str], capsys: pytest.CaptureFixture, *fragments: str) -> str:
    """The run stops with exit code 2 and one ``error:`` line holding every fragment; no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        fn(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), lines[0]
    return lines[0]


def expect_success(fn: Callable, argv: list[str], capsys: pytest.CaptureFixture, *warnings: str) -> str:
    """The run finishes; every expected warning was shown (with --quiet, warnings still are)."""
    fn(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" not in err, err
    for w in warnings:
        assert w.lower() in err.lower(), err
    return err


# --------------------------------------------------------------------------- unreadable or unusable data
READ_ERRORS = {
    "missing": "does not exist",
    "empty file": "is empty",
    "truncated": "could not read",
    "not h5ad": "could not read",
    "zero cells": "0 cells",
    "zero genes": "0 genes",
    "nan": "NaN or infinite",
    "inf": "NaN or infinite",
    "negative": "negative values",
}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case", list(READ_ERRORS))
def test_unusable_data_is_refused_by_every_stage(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture, case: str, stage: str) -> None:
    out = _out(tmp_path, stage)
    fn, argv = _argv(stage, base, _data(base, case), out)
    expect_error(fn, argv, capsys, READ_ERRORS[case])
    _no_output(out)


@pytest.mark.parametrize("stage", ["preprocess", "pretrain", "finetune"])
def test_no_cell_left_after_filtering(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture, stage: str) -> None:
    out = _out(tmp_path, stage)
    fn, argv = _argv(stage, base, base["dir"] / "raw.h5ad", out)
    argv[argv.index("--min-genes") + 1] = "100000"
    expect_error(fn, argv, capsys, "no cell", "--min-genes")
    _no_output(out)


@pytest.mark.parametrize("stage", STAGES)
def test_no_gene_in_common_with_the_vocabulary(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture, stage: str) -> None:
    out = _out(tmp_path, stage)
    fn, argv = _argv(stage, base, _data(base, "no gene overlap"), out)
    msg = expect_error(fn, argv, capsys, "gene")
    assert ("none of the 300 vocabulary genes" in msg) or ("matches a human NCBI gene symbol" in msg)
    assert "XYZ0" in msg, "the message shows the user's gene names"
    _no_output(out)


# --------------------------------------------------------------------------- corrected, and reported
def _probs(path: Path) -> np.ndarray:
    return ad.read_h5ad(path).obsm["scbert_probabilities"]


def test_low_gene_overlap_warns_but_predicts(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fn, argv = _argv("predict", base, _data(base, "low gene overlap"), tmp_path / "p.h5ad")
    err = expect_success(fn, argv, capsys, "only 100 of 300 vocabulary genes")
    assert err.lower().count("only 100 of 300") == 1, "the warning is shown once"
    summary = (tmp_path / "p_run" / "summary.txt").read_text()
    assert "accuracy" in summary and (tmp_path / "p_run" / "metrics.json").is_file()


def test_ensembl_ids_are_mapped_to_symbols(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name, data in (("sym", base["dir"] / "raw.h5ad"), ("ens", _data(base, "ensembl ids"))):
        fn, argv = _argv("predict", base, data, tmp_path / f"{name}.h5ad")
        expect_success(fn, argv, capsys)
    report = ad.read_h5ad(tmp_path / "ens.h5ad").uns["scbert_annotation"]["preprocessing"]
    # The data name genes with 2014 symbols; some ids map to symbols renamed since, which this vocabulary lacks.
    assert report["symbols"]["n_ensembl"] >= 290 and report["vocab_present"] >= 270, report["symbols"]["summary"]
    np.testing.assert_allclose(_probs(tmp_path / "ens.h5ad"), _probs(tmp_path / "sym.h5ad"), atol=0.01)


@pytest.mark.parametrize("stage", ["preprocess", "predict", "finetune"])
def test_mouse_symbols_are_reported_and_mapped(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture, stage: str) -> None:
    out = _out(tmp_path, stage)
    fn, argv = _argv(stage, base, _data(base, "mouse symbols"), out)
    expect_success(fn, argv, capsys, "mouse symbols", "upper-casing")
    if stage == "predict":
        fn, argv = _argv(stage, base, base["dir"] / "raw.h5ad", tmp_path / "human.h5ad")
        expect_success(fn, argv, capsys)
        np.testing.assert_allclose(_probs(out), _probs(tmp_path / "human.h5ad"), atol=1e-4)


def test_mouse_mapping_can_be_refused(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fn, argv = _argv("preprocess", base, _data(base, "mouse symbols"), tmp_path / "o.h5ad")
    err = expect_success(fn, [*argv, "--species", "human"], capsys, "only 1 of 300 vocabulary genes")
    assert "mouse symbols" not in err


def _log_variants(a: ad.AnnData) -> dict[str, ad.AnnData]:
    X = a.X.toarray().astype(np.float64)
    norm = X / X.sum(1, keepdims=True) * 1e4
    out = {}
    for name, Y, marked in (("natural log", np.log1p(norm), False), ("log of counts", np.log1p(X), False), ("counts marked prepared", X, True)):
        b = a.copy()
        b.X = sparse.csr_matrix(Y.astype(np.float32))
        if marked:
            b.uns["scbert_preprocess"] = "{}"
        out[name] = b
    return out


@pytest.mark.parametrize("variant,warning", [("natural log", ""), ("log of counts", ""), ("counts marked prepared", "not log2-normalised")])
def test_value_scales_are_recognised(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture, variant: str, warning: str) -> None:
    path = tmp_path / "in.h5ad"
    _log_variants(base["raw"])[variant].write_h5ad(path)
    for name, data in (("raw", base["dir"] / "raw.h5ad"), ("other", path)):
        fn, argv = _argv("predict", base, data, tmp_path / f"{name}.h5ad")
        expect_success(fn, argv, capsys, *([warning] if warning and name == "other" else []))
    np.testing.assert_allclose(_probs(tmp_path / "other.h5ad"), _probs(tmp_path / "raw.h5ad"), atol=1e-4)


def test_duplicated_names_are_reported(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fn, argv = _argv("preprocess", base, _data(base, "duplicated genes"), tmp_path / "o.h5ad")
    expect_success(fn, argv, capsys, "1 duplicated gene names")
    a = base["raw"].copy()
    a.obs_names = [a.obs_names[0]] * 2 + list(a.obs_names[2:])
    path = tmp_path / "dupcells.h5ad"
    a.write_h5ad(path)
    fn, argv = _argv("predict", base, path, tmp_path / "p.h5ad")
    expect_success(fn, argv, capsys, "1 duplicated cell names")
    assert ad.read_h5ad(tmp_path / "p.h5ad").n_obs == a.n_obs, "every cell kept"


# --------------------------------------------------------------------------- labels
@pytest.mark.parametrize("stage", ["preprocess", "finetune", "predict", "attn"])
def test_missing_label_column_lists_the_available_ones(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture, stage: str) -> None:
    out = _out(tmp_path, stage)
    fn, argv = _argv(stage, base, base["dir"] / "raw.h5ad", out, label="cell_type")
    expect_error(fn, argv, capsys, "'cell_type' is not a column", "celltype")
    _no_output(out)


@pytest.mark.parametrize("case,extra,fragments", [
    ("single class", [], ("single cell type", "'B'")),
    ("rare class", [], ("fewer than 2 cells", "Platelet")),
    ("no labels", [], ("no cell has a label",)),
    (None, ["--cv", "10"], ("fewer than 10 cells", "fewer folds")),
    (None, ["--val-frac", "0.05"], ("validation fraction",)),
])
def test_labels_that_cannot_train_a_classifier(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture,
                                               case: str | None, extra: list[str], fragments: tuple[str, ...]) -> None:
    data = _data(base, case) if case else base["dir"] / "raw.h5ad"
    fn, argv = _argv("finetune", base, data, tmp_path / "run")
    expect_error(fn, [*argv, *extra], capsys, *fragments)
    _no_output(tmp_path / "run")


def test_unlabelled_query_predicts_without_accuracy(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fn, argv = _argv("predict", base, _data(base, "no labels"), tmp_path / "p.h5ad")
    expect_success(fn, argv, capsys, "no cell has a label")
    assert "accuracy" not in json.loads((tmp_path / "p_run" / "metrics.json").read_text())


# --------------------------------------------------------------------------- checkpoints
class _Payload:
    """Unpickling this runs ``command`` (it must never happen)."""

    def __init__(self, fn: Callable, *args: object) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple:
        return (self.fn, self.args)


def _crafted(d: Path, marker: Path) -> dict[str, Path]:
    """Checkpoints whose unpickling would create ``marker``: raw pickle and torch zip format, several callables."""
    files = {}
    cmd = f"touch {marker}"
    payloads = {
        "os.system": _Payload(os.system, cmd),
        "subprocess": _Payload(subprocess.call, ["touch", str(marker)]),
        "exec": _Payload(exec, f"open({str(marker)!r}, 'w').close()"),
    }
    for name, payload in payloads.items():
        obj = {"format": "scbert-pytorch", "config": {}, "state_dict": {"token_emb.weight": torch.zeros(7, 8)}, "evil": payload}
        files[f"{name} pickle"] = d / f"{name}.pkl.pt"
        with open(files[f"{name} pickle"], "wb") as f:
            pickle.dump(obj, f)
        files[f"{name} torch"] = d / f"{name}.zip.pt"
        torch.save(obj, files[f"{name} torch"])
    return files


def test_crafted_pickle_checkpoints_are_refused_and_never_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "PWNED"
    for name, path in _crafted(tmp_path, marker).items():
        with pytest.raises(CheckpointError, match="not allowed|must not contain|not an scBERT|could not be read"):
            load_checkpoint(path)
        assert not marker.exists(), f"{name}: loading ran code"
    path = tmp_path / "os.system.zip.pt"
    expect_error(predict.main, ["--data", str(PBMC), "--model", str(path), "--out", str(tmp_path / "p.h5ad"), "--quiet"], capsys)
    assert not marker.exists() and not (tmp_path / "p.h5ad").exists()


def _checkpoint(base: dict, case: str) -> Path:
    d = base["dir"]
    path = d / f"ckpt_{case.replace(' ', '_')}.pt"
    if path.exists() or case == "missing":
        return path
    if case == "not ours":
        torch.save({"weights": torch.zeros(3)}, path)
    elif case == "truncated":
        blob = (d / "clf.pt").read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
    elif case == "text file":
        path.write_text("this is not a checkpoint\n")
    elif case == "crafted pickle":
        with open(path, "wb") as f:
            pickle.dump({"format": "scbert-pytorch", "x": _Payload(os.system, f"touch {d / 'PWNED'}")}, f)
    elif case == "weights do not fit":
        obj = torch.load(d / "clf.pt", weights_only=True)
        obj["state_dict"] = torch.load(d / "mlm.pt", weights_only=True)["state_dict"]
        torch.save(obj, path)
    elif case == "other vocabulary":
        cfg = ScBERTConfig(n_genes=300, dim=8, depth=1, heads=2, dim_head=4, head="classifier", n_classes=3)
        save_checkpoint(path, ScBERT(cfg), [f"ZZ{i}" for i in range(300)], TYPES)
    return path


CKPT_ERRORS = {
    "missing": "does not exist",
    "not ours": "not an scBERT checkpoint",
    "truncated": "truncated",
    "text file": "could not be read",
    "crafted pickle": "not allowed",
    "other vocabulary": "none of the 300 vocabulary genes",
}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case", list(CKPT_ERRORS))
def test_bad_checkpoints_are_refused_by_every_stage(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture, case: str, stage: str) -> None:
    out = _out(tmp_path, stage)
    fn, argv = _argv(stage, base, base["dir"] / "raw.h5ad", out, model=_checkpoint(base, case))
    expect_error(fn, argv, capsys, CKPT_ERRORS[case])
    _no_output(out)
    assert not (base["dir"] / "PWNED").exists()


@pytest.mark.parametrize("stage", ["predict", "attn"])
def test_weights_that_do_not_fit_their_config(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture, stage: str) -> None:
    out = _out(tmp_path, stage)
    fn, argv = _argv(stage, base, base["dir"] / "raw.h5ad", out, model=_checkpoint(base, "weights do not fit"))
    expect_error(fn, argv, capsys, "damaged")
    _no_output(out)


def test_pretrained_model_cannot_annotate(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fn, argv = _argv("predict", base, base["dir"] / "raw.h5ad", tmp_path / "p.h5ad", model=base["dir"] / "mlm.pt")
    expect_error(fn, argv, capsys, "pretrained (not fine-tuned)")
    _no_output(tmp_path / "p.h5ad")


def test_vocabulary_that_contradicts_the_pretrained_model(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "genes.txt").write_text("CD3E\nLYZ\n")
    fn, argv = _argv("finetune", base, base["dir"] / "raw.h5ad", tmp_path / "run", model=base["dir"] / "mlm.pt")
    expect_error(fn, [*argv, "--vocab", str(tmp_path / "genes.txt")], capsys, "is not the vocabulary of --pretrained")


# --------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("stage", STAGES)
def test_existing_output_needs_overwrite(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture, stage: str) -> None:
    out = _out(tmp_path, stage)
    if out.suffix:
        out.write_text("precious")
    else:
        out.mkdir()
        for name in ("model.pt", "attention_top_genes.csv"):
            (out / name).write_text("precious")
    fn, argv = _argv(stage, base, base["dir"] / "raw.h5ad", out)
    expect_error(fn, argv, capsys, "--overwrite")
    kept = out if out.suffix else out / "model.pt"
    assert kept.read_text() == "precious"


@pytest.mark.parametrize("stage", STAGES)
def test_output_path_that_cannot_be_created(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture, stage: str) -> None:
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / ("o.h5ad" if stage in ("preprocess", "predict") else "run")
    fn, argv = _argv(stage, base, base["dir"] / "raw.h5ad", out)
    expect_error(fn, argv, capsys, "a_file")


# --------------------------------------------------------------------------- daily use
def test_predict_and_preprocess_keep_a_run_record(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fn, argv = _argv("predict", base, base["dir"] / "raw.h5ad", tmp_path / "p.h5ad")
    expect_success(fn, [*argv, "--plots", "true"], capsys)
    rec = tmp_path / "p_run"
    for name in ("config.json", "log.txt", "metrics.json", "summary.txt", "predictions.png", "confusion_matrix.png"):
        assert (rec / name).is_file(), name
    # --plots auto (the default) skips them for a query this small (24 cells) and says so
    expect_success(fn, [*argv, "--overwrite", "--run-dir", str(tmp_path / "q_run")], capsys)
    assert (tmp_path / "q_run" / "summary.txt").is_file() and not (tmp_path / "q_run" / "predictions.png").exists()
    assert "plots skipped" in (tmp_path / "q_run" / "log.txt").read_text()
    config = json.loads((rec / "config.json").read_text())
    assert config["args"]["model"].endswith("clf.pt") and "git_commit" in config["environment"]
    m = json.loads((rec / "metrics.json").read_text())
    assert m["n_cells"] == 24 and 0 <= m["accuracy"] <= 1 and sum(m["predicted_counts"].values()) == 24
    assert "cells/s" in (rec / "summary.txt").read_text()
    fn, argv = _argv("preprocess", base, base["dir"] / "raw.h5ad", tmp_path / "prep.h5ad")
    expect_success(fn, argv, capsys)
    for name in ("config.json", "log.txt", "metrics.json", "summary.txt", "genes_per_cell.png"):
        assert (tmp_path / "prep_run" / name).is_file(), name


def test_class_names_never_become_paths(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Labels like '../x' or 'a/b' name rows and plot labels, never files."""
    hostile = ["../../escaped", "a/b", "/tmp/abs"]
    path = _variant(base, "hostile_labels", _set_labels(lambda y: np.array([hostile[TYPES.index(t)] for t in y], dtype=object)))
    work = tmp_path / "work"
    work.mkdir()
    fn, argv = _argv("attn", base, path, work / "attn")
    expect_success(fn, argv, capsys)
    fn, argv = _argv("finetune", base, path, work / "ft")
    expect_success(fn, [*argv, "--cv", "2"], capsys)
    assert [p for p in tmp_path.rglob("*") if not p.is_relative_to(work)] == []
    assert not Path("/tmp/abs").exists()
    produced = {p.relative_to(work).parts[0] for p in work.rglob("*")}
    assert produced == {"attn", "ft"}
    assert all(".." not in p.parts and "escaped" not in p.name for p in work.rglob("*"))


@pytest.mark.parametrize("module", [preprocess, pretrain, finetune, predict, attn_analysis])
def test_help_gives_every_default_and_an_example(module: object) -> None:
    p = module.build_parser()
    text = p.format_help()
    assert "example:" in text and "--log-level" in text and "--quiet" in text
    for action in p._actions:
        if action.help in (None, "==SUPPRESS==") or action.required or action.default in (None, False, "==SUPPRESS=="):
            continue
        assert "default" in action.help, f"{module.__name__} {action.option_strings}: no default in the help"


def test_attn_analysis_help_runs_as_a_script() -> None:
    out = subprocess.run([sys.executable, "attn_analysis.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "example:" in out.stdout


def test_input_error_is_a_value_error() -> None:
    assert issubclass(InputError, ValueError) and issubclass(CheckpointError, ValueError)
