"""Command-line parsing: booleans, published spellings, --help."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import finetune
import predict
import preprocess
import pretrain
from model.cli.args import str2bool

from .conftest import REPO, linked_run


@pytest.mark.parametrize("text,value", [("False", False), ("false", False), ("0", False), ("no", False), ("True", True), ("yes", True), ("1", True)])
def test_str2bool(text: str, value: bool) -> None:
    assert str2bool(text) is value


def test_str2bool_rejects_garbage() -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool("maybe")


def test_boolean_flags_read_false_as_false() -> None:
    base = ["--data", "x.h5ad", "--label-key", "celltype", "--out", "o"]
    p = finetune.build_parser()
    assert p.parse_args(base).class_weights is False
    assert p.parse_args([*base, "--class-weights"]).class_weights is True
    assert p.parse_args([*base, "--class-weights", "False"]).class_weights is False
    assert p.parse_args([*base, "--class-weights", "true"]).class_weights is True
    with pytest.raises(SystemExit):
        p.parse_args([*base, "--class-weights", "perhaps"])


def test_published_underscore_spellings() -> None:
    a = pretrain.build_parser().parse_args(
        ["--data_path", "a.h5ad", "--ckpt_dir", "o", "--bin_num", "7", "--gene_num", "16906", "--batch_size", "3",
         "--learning_rate", "2e-4", "--grad_acc", "60", "--mask_prob", "0.2", "--replace_prob", "0.8", "--pos_embed", "False",
         "--epoch", "4", "--local_rank", "0"]
    )
    assert (a.data, a.out, a.bin_num, a.gene_num, a.batch_size, a.lr, a.grad_acc) == (["a.h5ad"], "o", 7, 16906, 3, 2e-4, 60)
    assert (a.mask_prob, a.replace_prob, a.pos_embed, a.epochs) == (0.2, 0.8, False, 4)
    b = predict.build_parser().parse_args(
        ["--data_path", "q.h5ad", "--model_path", "m.pt", "--out", "p.h5ad", "--novel_type", "False", "--unassign_thres", "0.3"]
    )
    assert (b.data, b.model, b.novel_type, b.threshold) == ("q.h5ad", "m.pt", False, 0.3)
    c = finetune.build_parser().parse_args(["--data_path", "d", "--label_key", "ct", "--model_path", "p.pt", "--ckpt_dir", "o"])
    assert (c.data, c.label_key, c.pretrained, c.out) == ("d", "ct", "p.pt", "o")


@pytest.mark.parametrize("script", ["preprocess.py", "pretrain.py", "finetune.py", "predict.py"])
def test_help_shows_an_example(script: str) -> None:
    out = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "example:" in out.stdout and "--data" in out.stdout


def test_parsers_build() -> None:
    for mod in (preprocess, pretrain, finetune, predict):
        assert isinstance(mod.build_parser(), argparse.ArgumentParser)


@pytest.fixture(scope="module")
def calibrated(tiny_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return linked_run(tiny_run, tmp_path_factory.mktemp("cli"))


@pytest.mark.slow
@pytest.mark.parametrize("backed", ["false", "true"])
def test_predict_script_writes_everything_before_its_quick_exit(calibrated: Path, pbmc_small: Path, backed: str) -> None:
    """``python predict.py`` ends without the interpreter's teardown (exit_now): its h5ad, table and
    run record are complete, and equal to those of main() in this process."""
    import subprocess
    import sys

    args = ["--data", str(pbmc_small), "--model", str(calibrated / "ft" / "model.pt"), "--backed", backed, "--chunk-size", "50"]
    here, there = calibrated / f"here_{backed}", calibrated / f"there_{backed}"
    predict.main([*args, "--out", f"{here}.h5ad", "--csv", f"{here}.csv", "--quiet"])
    proc = subprocess.run([sys.executable, "predict.py", *args, "--out", f"{there}.h5ad", "--csv", f"{there}.csv"],
                          cwd=Path(predict.__file__).parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote" in proc.stderr
    a, b = ad.read_h5ad(f"{here}.h5ad"), ad.read_h5ad(f"{there}.h5ad")
    assert (a.obs["scbert_celltype"] == b.obs["scbert_celltype"]).all()
    assert (a.uns["scbert_annotation"]["embedding"], a.uns["scbert_annotation"]["embedding_key"]) == ("head", "X_scbert")  # streamed too
    np.testing.assert_allclose(a.obsm["scbert_probabilities"], b.obsm["scbert_probabilities"], rtol=1e-5, atol=1e-6)
    # the same table; numbers to float32 rounding (bf16 products differ in the last bits with the thread settings,
    # which earlier tests in this process change)
    t_here, t_there = pd.read_csv(f"{here}.csv", index_col=0), pd.read_csv(f"{there}.csv", index_col=0)
    assert list(t_here.columns) == list(t_there.columns) and list(t_here.index) == list(t_there.index)
    numbers = t_here.select_dtypes("number").columns
    pd.testing.assert_frame_equal(t_here.drop(columns=numbers), t_there.drop(columns=numbers))
    np.testing.assert_allclose(t_here[numbers].to_numpy(), t_there[numbers].to_numpy(), rtol=1e-5, atol=1e-6)
    log_lines = Path(f"{there}_run/log.txt").read_text().splitlines()
    assert "wrote" in log_lines[-1]  # the last message reached the file
    assert json.loads(Path(f"{there}_run/metrics.json").read_text())["n_cells"] == a.n_obs
