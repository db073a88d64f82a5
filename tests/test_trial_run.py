"""What a new user met on another lab's data (issue 35): label maps, the preprocessing report, natural-log
input, Ctrl-C, memory, defaults, early checks, run folders as paths, the API's names and errors."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import finetune
import predict
import preprocess
from data.labels import read_label_map
from data.preprocess import prepare
from model import CheckpointError, InputError, annotate

from .conftest import REPO, linked_run

RENAMED = {"B": "B cells", "CD14+ Mono": "CD14 monocytes", "NK": "NK cells", "Naive CD4 T": "CD4 naive"}


@pytest.fixture(scope="module")
def trial(tiny_run: dict[str, Path], pbmc_small: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shared tiny run, a query whose types are named otherwise, and a label map back to the model's names."""
    d = linked_run(tiny_run, tmp_path_factory.mktemp("trial"))
    query = ad.read_h5ad(pbmc_small)
    query.obs["celltype"] = query.obs["celltype"].astype(str).map(RENAMED)
    query.write_h5ad(d / "renamed.h5ad")
    (d / "map.tsv").write_text("# query label\tmodel class\n" + "".join(f"{v}\t{k}\n" for k, v in RENAMED.items()))
    return {"dir": d, "query": d / "renamed.h5ad", "map": d / "map.tsv", "small": pbmc_small}


def _predict(trial: dict, out: Path, *extra: str) -> None:
    predict.main(["--data", str(trial["query"]), "--model", str(trial["dir"] / "ft"), "--out", str(out), "--quiet", "--label-key",
                  "celltype", "--precision", "fp32", *extra])


def test_label_map_scores_renamed_types_and_the_csv_holds_the_true_labels(trial: dict, capsys: pytest.CaptureFixture) -> None:
    d = trial["dir"]
    _predict(trial, d / "plain.h5ad", "--plots", "true")
    plain = capsys.readouterr().out
    assert "accuracy not computed: none of the 4 labels of column 'celltype'" in plain and "accuracy 0." not in plain
    assert (d / "plain_run" / "confusion_matrix.png").is_file()
    _predict(trial, d / "mapped.h5ad", "--label-map", str(trial["map"]), "--csv", str(d / "mapped.csv"))
    mapped = capsys.readouterr().out
    accuracy = float(mapped.split("accuracy ")[1].split()[0])
    assert accuracy > 0.5, mapped
    summary = (d / "mapped_run" / "summary.txt").read_text()
    assert "label map: 4 query labels renamed (B cells -> B" in summary
    table = pd.read_csv(d / "mapped.csv", index_col=0)
    assert list(table.columns[:3]) == ["celltype", "celltype_mapped", "scbert_celltype"]
    assert set(table["celltype"]) == set(RENAMED.values()) and set(table["celltype_mapped"]) == set(RENAMED)
    # the API: the same accuracy, recorded in uns as a dict
    a = annotate(ad.read_h5ad(trial["query"]), d / "ft", label_key="celltype", label_map=trial["map"], progress=False, precision="fp32")
    assert a.uns["scbert_annotation"]["evaluation"]["accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert isinstance(a.uns["scbert_novelty"], dict)
    a.write_h5ad(d / "api.h5ad")
    assert ad.read_h5ad(d / "api.h5ad").uns["scbert_novelty"]["score"] == a.uns["scbert_novelty"]["score"]


def test_a_coarse_label_map_renames_the_model_classes_for_scoring(trial: dict, tmp_path: Path) -> None:
    """Another lab's coarse types (two model classes -> one name): the map renames predictions and
    known labels alike, so the score compares like with like, as the benchmark's cross protocol does."""
    from model.annotation import label_report
    from model.evaluation import scored_predictions
    from model.novelty.rule import PUBLISHED_RULE

    coarse = {"Naive CD4 T": "CD4 T", "Memory CD4 T": "CD4 T", "CD4 T": "CD4 T", "Platelet": "-"}
    classes = ["B", "Memory CD4 T", "Naive CD4 T", "Platelet"]
    labels = np.array(["Naive CD4 T", "Memory CD4 T", "B", "Platelet", "Unassigned"])
    truth = pd.Series(["CD4 T", "CD4 T", "B", "B", "CD4 T"], name="celltype")
    pred, scored = scored_predictions(labels, classes, coarse)
    assert list(pred) == ["CD4 T", "CD4 T", "B", "Platelet", "Unassigned"] and scored == ["B", "CD4 T", "Platelet"]
    metrics, lines = label_report(labels, np.ones(5), classes, PUBLISHED_RULE, truth, label_map=coarse)
    assert metrics["accuracy"] == pytest.approx(3 / 5)  # the platelet call and the Unassigned cell are wrong
    assert metrics["label_map"]["model_classes_renamed"] == {"Naive CD4 T": "CD4 T", "Memory CD4 T": "CD4 T"}
    assert any("also renames 2 of the model's classes" in line for line in lines)
    assert metrics["predicted_counts"]["Naive CD4 T"] == 1  # the counts stay in the model's own names
    # a map of query labels only leaves the predictions alone
    assert list(scored_predictions(labels, classes, {"B cells": "B"})[0]) == list(labels)


def test_label_map_has_one_reader(tmp_path: Path) -> None:
    from scripts.benchmark import cli, report

    assert report.read_label_map is read_label_map and cli.read_label_map is read_label_map
    (tmp_path / "bad.tsv").write_text("only one column\n")
    with pytest.raises(InputError, match="line 1: expected two columns"):
        read_label_map(tmp_path / "bad.tsv")


def test_predict_reports_what_happened_to_the_input(trial: dict, capsys: pytest.CaptureFixture) -> None:
    out = trial["dir"] / "report.h5ad"
    predict.main(["--data", str(trial["small"]), "--model", str(trial["dir"] / "ft" / "model.pt"), "--out", str(out), "--precision", "fp32"])
    err = capsys.readouterr().err
    for where in (err, (trial["dir"] / "report_run" / "log.txt").read_text(), (trial["dir"] / "report_run" / "summary.txt").read_text()):
        assert "values: raw counts: normalised to 10000 per cell" in where
        assert "model genes present in the query: 300 of 300 (100.0%)" in where
        assert "cells kept: 240 of 240" in where


def test_preprocess_says_how_many_cells_min_genes_dropped(trial: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    preprocess.main(["--data", str(trial["small"]), "--out", str(tmp_path / "p.h5ad"), "--vocab", str(trial["dir"] / "ft"),
                     "--min-genes", "800"])
    n_out = ad.read_h5ad(tmp_path / "p.h5ad").n_obs
    assert 0 < n_out < 240
    summary = (tmp_path / "p_run" / "summary.txt").read_text()
    assert f"cells: kept {n_out:,} of 240; {240 - n_out:,} expressed fewer than 800 genes (--min-genes 800)" in summary


def _natural_log(path: Path, out: Path, keep_record: bool = True) -> ad.AnnData:
    """Cells normalised to 1e4, ln(1 + x) as scanpy's log1p, then cut to their first 8,000 genes (totals no longer checkable)."""
    import scanpy as sc

    a = ad.read_h5ad(path)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    a = a[:, :8000].copy()
    if not keep_record:
        del a.uns["log1p"]
    a.write_h5ad(out)
    return a


def test_natural_log_input_is_read_in_its_base(trial: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = _natural_log(trial["small"], tmp_path / "ln.h5ad")
    genes = list(a.var_names[:2000])
    out, rep = prepare(ad.read_h5ad(tmp_path / "ln.h5ad"), genes=genes, min_genes=None)
    assert rep.normalisation.startswith("loge(1 + x) values")
    np.testing.assert_allclose(out.X.toarray(), a[:, genes].X.toarray() / math.log(2), atol=1e-5)
    bare = _natural_log(trial["small"], tmp_path / "ln_bare.h5ad", keep_record=False)
    assert "assumed log2" in prepare(bare, genes=genes, min_genes=None)[1].normalisation
    preprocess.main(["--data", str(tmp_path / "ln_bare.h5ad"), "--out", str(tmp_path / "flag.h5ad"), "--vocab", str(trial["dir"] / "ft"),
                     "--log-base", "e", "--quiet"])
    assert "loge(1 + x) values" in (tmp_path / "flag_run" / "summary.txt").read_text()


@pytest.mark.slow
def test_ctrl_c_ends_predict_and_training_with_one_line(trial: dict, tmp_path: Path) -> None:
    def interrupt(argv: list[str], ready: Any) -> subprocess.CompletedProcess:
        # SIGINT back to its default in the child: a suite started in the background (bash ignores SIGINT there) would
        # pass the ignore on, and Python then never raises KeyboardInterrupt
        proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 240
        while not ready() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    out = tmp_path / "p.h5ad"
    log = tmp_path / "p_run" / "log.txt"
    cells = ad.read_h5ad(trial["small"])
    many = ad.concat([cells] * 20, index_unique="-")  # ~20 s of work: the interrupt lands inside it, not after it (240 cells take ~1 s)
    many.write_h5ad(tmp_path / "many.h5ad")
    done = interrupt(["predict.py", "--data", str(tmp_path / "many.h5ad"), "--model", str(trial["dir"] / "ft"), "--out", str(out), "--batch-size", "1"],
                     lambda: log.exists() and f"annotating {many.n_obs} cells" in log.read_text())
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("error")] == ["error: interrupted; nothing written"]
    assert not out.exists() and "interrupted; nothing written" in log.read_text()
    ft = tmp_path / "ft"
    done = interrupt(["finetune.py", "--data", str(trial["dir"] / "prep.h5ad"), "--label-key", "celltype", "--pretrained", str(trial["dir"] / "pre"),
                      "--out", str(ft), "--epochs", "50", "--batch-size", "16", "--quiet",
                      # the encoder in every epoch and no early stop: the head alone on stored encodings would finish before the interrupt
                      "--head-only", "false", "--patience", "0"], lambda: bool(list(ft.glob("checkpoints/state-00001-*"))))
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr
    line = [x for x in done.stderr.splitlines() if x.startswith("error")]
    assert len(line) == 1 and line[0].startswith("error: interrupted after epoch ") and line[0].endswith(f"continue with --resume {ft}")
    again = subprocess.run([sys.executable, "finetune.py", "--data", str(trial["dir"] / "prep.h5ad"), "--label-key", "celltype", "--pretrained",
                            str(trial["dir"] / "pre"), "--out", str(ft), "--epochs", "50", "--quiet"], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 2 and f"continue it with --resume {ft}" in again.stderr


def test_a_rerun_beside_resumable_states_is_refused(trial: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ft"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "state-00003-00000000000.pt").write_bytes(b"x")
    argv = ["--data", str(trial["dir"] / "prep.h5ad"), "--label-key", "celltype", "--pretrained", str(trial["dir"] / "pre"), "--out", str(out),
            "--epochs", "1", "--quiet"]
    with pytest.raises(SystemExit) as e:
        finetune.main(argv)
    assert e.value.code == 2
    assert "did not finish (it stopped after epoch 3): continue it with --resume" in capsys.readouterr().err


def test_memory_guard_refuses_a_batch_before_the_first_step(trial: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        predict.main(["--data", str(trial["small"]), "--model", str(trial["dir"] / "ft"), "--out", str(tmp_path / "p.h5ad"), "--quiet",
                      "--batch-size", "64", "--memory-limit", "0.00002"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--batch-size 64 needs about" in err and "are allowed (--memory-limit)" in err and not (tmp_path / "p.h5ad").exists()
    with pytest.raises(SystemExit):
        finetune.main(["--data", str(trial["dir"] / "prep.h5ad"), "--label-key", "celltype", "--pretrained", str(trial["dir"] / "pre"),
                       "--out", str(tmp_path / "ft"), "--batch-size", "64", "--memory-limit", "0.005", "--quiet"])
    err = capsys.readouterr().err
    assert "one training step" in err and "use --batch-size" in err and "--grad-acc" in err
    assert "error: --batch-size 64" in (tmp_path / "ft" / "log.txt").read_text(), "the failed run records its error"


def test_paths_and_label_column_are_checked_before_the_model_stack() -> None:
    code = ("import sys, predict\ntry:\n    predict.main(['--data', 'data/pbmc3k_labeled.h5ad', '--model', 'nowhere', '--out', '/tmp/x.h5ad'])\n"
            "except SystemExit as e:\n    assert e.code == 2\nassert 'torch' not in sys.modules\n"
            "try:\n    predict.main(['--data', 'data/pbmc3k_labeled.h5ad', '--model', 'data', '--out', '/tmp/x.h5ad', '--label-key', 'typo'])\n"
            "except SystemExit as e:\n    assert e.code == 2\nassert 'torch' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "error: --model: checkpoint nowhere does not exist" in done.stderr
    assert "--model: data is a folder without a model.pt" in done.stderr


def test_run_folders_h5ad_and_fine_tuned_models_as_model_paths(trial: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        predict.main(["--data", str(trial["small"]), "--model", str(trial["small"]), "--out", str(tmp_path / "p.h5ad")])
    err = capsys.readouterr().err
    assert "is a file of cells (HDF5, such as .h5ad), not a model" in err and "weights_only" not in err
    assert not (tmp_path / "p_run").exists(), "a run refused by the early checks leaves no run folder"
    with pytest.raises(CheckpointError, match="not a model"):
        annotate(ad.read_h5ad(trial["small"]), trial["small"])
    finetune.main(["--data", str(trial["dir"] / "prep.h5ad"), "--label-key", "celltype", "--pretrained", str(trial["dir"] / "ft"),
                   "--out", str(tmp_path / "again"), "--epochs", "1", "--max-steps", "1", "--batch-size", "16", "--precision-check-cells", "0"])
    err = capsys.readouterr().err
    assert "is a fine-tuned classifier (of B, CD14+ Mono, NK, Naive CD4 T): its encoder is the start" in err
    assert "memory: a batch of 16 cells needs about" in err and "takes roughly" in err
    assert "the frozen encoder's pass over" in err and "each epoch then trains the head alone" in err  # head-only by default


def test_api_names_keyword_arguments_and_returns_the_embedding(trial: dict) -> None:
    cells = ad.read_h5ad(trial["small"])
    with pytest.raises(InputError) as e:
        annotate(cells, trial["dir"] / "ft", use_raw=True, progress=False)
    assert "use_raw=True" in str(e.value) and "--use-raw" not in str(e.value)
    with pytest.raises(InputError, match='label_key="cell_type" is not a column'):
        annotate(cells, trial["dir"] / "ft", label_key="cell_type", progress=False)
    a = annotate(cells.copy(), trial["dir"] / "ft", embedding="X_expr", pooling="expressed", progress=False, precision="fp32")
    assert "X_expr" in a.obsm and "X_scbert" not in a.obsm and a.obsm["X_expr"].shape[0] == cells.n_obs


def test_precision_auto_picks_bf16_only_where_it_is_known_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    from model import runtime

    cpu = torch.device("cpu")
    for vendor, flags, expected in (("AuthenticAMD", {"avx512_bf16"}, "bf16"), ("GenuineIntel", {"amx_bf16", "avx512_bf16"}, "bf16"),
                                    ("GenuineIntel", {"avx512_bf16"}, "fp32"), ("AuthenticAMD", {"avx2"}, "fp32")):
        monkeypatch.setattr(runtime, "_cpu_flags", lambda v=vendor, f=flags: (v, f))
        assert runtime.resolve_precision("auto", cpu)[0] == expected, (vendor, flags)
    assert runtime.resolve_precision("fp32", cpu) == ("fp32", "as asked")


def test_size_small_is_the_cpu_default() -> None:
    from model.cli.args import model_size

    args = SimpleNamespace(size="auto", dim=None, depth=None, heads=None, dim_head=None, bin_num=5)
    assert (model_size(args, torch.device("cpu")).dim, model_size(args, torch.device("cpu")).depth) == (32, 2)
    assert model_size(SimpleNamespace(**{**vars(args), "size": "published", "depth": 3})).depth == 3
    assert model_size(SimpleNamespace(**{**vars(args), "size": "published"})).dim == 200


def test_training_curves_mark_the_kept_epoch_and_the_baseline(tmp_path: Path) -> None:
    from model.plots import plot_history

    history = [{"epoch": e, "train_loss": 1 / e, "val_masked_accuracy": 0.5 + e / 10, "baseline_accuracy": 0.6} for e in (1, 2, 3)]
    plot_history(history, ["train_loss", "val_masked_accuracy"], tmp_path / "c.png", "t", chosen_epoch=2,
                 baselines={"val_masked_accuracy": "baseline_accuracy"})
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_celltypist_baseline_with_this_scikit_learn() -> None:
    pytest.importorskip("celltypist")
    from scipy import sparse

    from scripts.benchmark.methods import CellTypist

    rng = np.random.default_rng(0)
    X = sparse.csr_matrix(rng.poisson(1.0, (60, 30)).astype(np.float32))
    y = np.repeat(["a", "b", "c"], 20)
    X[y == "b", :5] *= 6
    X[y == "c", 5:10] *= 6
    m = CellTypist(seed=0)
    m.fit(sparse.csr_matrix(np.log2(1 + X.toarray())), y, [f"g{i}" for i in range(30)])
    p = m.predict_proba(sparse.csr_matrix(np.log2(1 + X.toarray())))
    assert p.shape == (60, 3) and np.allclose(p.sum(1), 1) and (np.array(m.classes_)[p.argmax(1)] == y).mean() > 0.8


def test_celltypist_refuses_the_path_scikit_learn_removed() -> None:
    from scripts.benchmark.methods import CellTypist, _sklearn_version

    if _sklearn_version() < (1, 8):
        pytest.skip("scikit-learn < 1.8 still has multi_class")
    with pytest.raises(ValueError, match="multi_class"):
        CellTypist(use_SGD=False)
