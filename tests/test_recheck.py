"""The float32 re-check after a bf16 pass: which cells are near a decision, the labels it restores,
the error fine-tuning measures for it, and the margin that follows."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from data.io import InputError
from model.annotation import annotate
from model.checkpoint import load_checkpoint
from model.checkpoint.card import card_text, checkpoint_card
from model.inference import InferenceOptions, predict_outputs
from model.nn.config import ExecutionOptions
from model.novelty import NoveltyRule
from model.recheck import RECHECK_FLOOR, RECHECK_MARGIN, RECHECK_SAFETY, auto_recheck_margin, near_decision, resolve_recheck_margin

from .conftest import linked_run, upgraded, v1_novelty

QUIET = InferenceOptions(progress=False)
BF16 = ExecutionOptions(precision="bf16")


@pytest.fixture(scope="module")
def calibrated(tiny_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared tiny run (fine-tuned with novelty calibrated to reject 10%), with a folder of this module's own."""
    return linked_run(tiny_run, tmp_path_factory.mktemp("novelty"))


def test_near_decision_finds_close_calls() -> None:
    probs = np.array([[0.50, 0.48, 0.02], [0.90, 0.05, 0.05], [0.60, 0.30, 0.10], [0.52, 0.40, 0.08]])
    assert near_decision(probs, None, None, 0.05).tolist() == [True, False, False, False]
    published = NoveltyRule.published(0.5)  # softmax score 1 - top, cutoff 0.5: absolute band
    assert near_decision(probs, published, None, 0.05).tolist() == [True, False, False, True]
    rule = NoveltyRule("mahalanobis", 100.0)  # relative band: 95..105
    assert near_decision(probs, rule, np.array([10.0, 96.0, 104.9, 200.0]), 0.05).tolist() == [True, True, True, False]
    # a score of the input expression is the same in any precision: only the top-two gap counts
    pca_rule = NoveltyRule("pca_mahalanobis", 100.0)
    assert near_decision(probs, pca_rule, np.array([10.0, 96.0, 104.9, 200.0]), 0.05).tolist() == [True, False, False, False]


def test_bf16_recheck_gives_the_fp32_labels(calibrated: Path, pbmc_small: Path) -> None:
    ckpt = load_checkpoint(calibrated / "ft" / "model.pt")
    adata = ad.read_h5ad(pbmc_small)
    ref = annotate(adata, ckpt, options=QUIET)
    assert ref.rechecked is None
    every = annotate(adata, ckpt, options=QUIET.replace(execution=BF16, fp32_recheck=1.0))
    assert every.rechecked == adata.n_obs  # a margin of 1 re-scores every cell: the float32 outputs, batch rounding aside
    np.testing.assert_allclose(every.probabilities, ref.probabilities, atol=1e-5)
    np.testing.assert_allclose(every.novelty_score, ref.novelty_score, rtol=1e-4)
    assert (every.labels == ref.labels).all()
    off = annotate(adata, ckpt, options=QUIET.replace(execution=BF16, fp32_recheck=0))
    assert off.rechecked is None and not np.array_equal(off.probabilities, ref.probabilities)
    default = annotate(adata, ckpt, options=QUIET.replace(execution=BF16))
    assert 0 <= default.rechecked < adata.n_obs
    assert default.report()[0]["rechecked_fp32"] == default.rechecked


def test_fine_tuning_measures_the_bf16_error_for_the_recheck(calibrated: Path) -> None:
    """Fine-tuning stores how much bf16 moves the model's outputs on its validation cells; the
    figures are those of one float32 and one bf16 pass over them, and "auto" turns them into the margin."""
    from data.dataset import CellDataset
    from data.labels import stratified_holdout

    ckpt = load_checkpoint(calibrated / "ft" / "model.pt")
    err = ckpt.novelty.precision_error["bf16"]
    assert err["n_cells"] == 48 and err["precision"] == "bf16" and set(err["scores"]) == {"energy", "mahalanobis", "knn"}
    assert err["head"] == "float32"
    prep = ad.read_h5ad(calibrated / "prep.h5ad")
    y = prep.obs["celltype"].astype(str).to_numpy()
    _, val = stratified_holdout(np.array([ckpt.classes.index(c) for c in y]), 0.2, 0)
    ds = CellDataset(ckpt.prepare(prep[val])[0].X, ckpt.config.bin_num)
    probs = {p: predict_outputs(ckpt.build_model(ExecutionOptions(precision=p)), ds, QUIET)["probs"]
             for p in ("fp32", "bf16")}
    assert err["probs"] == pytest.approx(np.abs(probs["bf16"].astype(np.float64) - probs["fp32"]).max(), rel=1e-5, abs=1e-7)
    assert err["probs"] > 0  # bf16 does move them
    rule = NoveltyRule("mahalanobis", 10.0)
    assert auto_recheck_margin(err, rule) == max(RECHECK_FLOOR, RECHECK_SAFETY * max(2 * err["probs"], err["scores"]["mahalanobis"]))
    assert "bf16 error on 48 validation cells" in card_text(checkpoint_card(ckpt))


def test_auto_recheck_margin() -> None:
    err = {"n_cells": 100, "probs": 0.002, "scores": {"energy": 0.001, "mahalanobis": 0.03}}
    assert auto_recheck_margin(None, NoveltyRule("energy", -3.0)) == RECHECK_MARGIN  # not measured: the fixed margin
    assert auto_recheck_margin(err, NoveltyRule("energy", -3.0)) == pytest.approx(4 * 0.004)  # the top-two gap moves by 2 x 0.002
    assert auto_recheck_margin(err, NoveltyRule("mahalanobis", 50.0)) == pytest.approx(4 * 0.03)
    assert auto_recheck_margin(err, NoveltyRule("knn", 1.0)) == RECHECK_MARGIN  # the rule's score was not measured
    assert auto_recheck_margin(err, NoveltyRule("pca_knn", 1.0)) == pytest.approx(0.016)  # the precision cannot move a pca_* score
    assert auto_recheck_margin({"probs": 1e-5, "scores": {}}, NoveltyRule.published(0.5)) == 0.005  # the floor


def test_recheck_margin_auto_and_given(calibrated: Path, pbmc_small: Path, scbert_log: pytest.LogCaptureFixture) -> None:
    ckpt = load_checkpoint(calibrated / "ft" / "model.pt")
    bf16 = ExecutionOptions(precision="bf16")
    rule = NoveltyRule("energy", -1.0)
    assert resolve_recheck_margin("auto", ckpt.novelty, ExecutionOptions(), rule) is None  # fp32: nothing to re-check
    assert resolve_recheck_margin(0.2, ckpt.novelty, bf16, rule) == 0.2
    auto = resolve_recheck_margin("auto", ckpt.novelty, bf16, rule)
    assert 0.005 <= auto < RECHECK_MARGIN  # a tiny model moves little under bf16
    old = dataclasses.replace(ckpt.novelty, precision_error={})
    assert resolve_recheck_margin("auto", old, bf16, rule) == RECHECK_MARGIN
    # measured before the head ran in float32 (a version-1 record without "head"): the same margin, and a word that it is cautious
    err = {k: v for k, v in ckpt.novelty.precision_error["bf16"].items() if k != "head"}
    before = upgraded({**v1_novelty(ckpt.novelty), "precision_error": {"bf16": {**err, "probs": 0.01}}})
    with scbert_log.at_level(logging.INFO, logger="scbert"):
        assert resolve_recheck_margin("auto", before, bf16, rule) == pytest.approx(max(0.08, 4 * err["scores"]["energy"]))
    assert "head still ran in bf16" in scbert_log.text
    with pytest.raises(InputError, match="re-check margin"):
        resolve_recheck_margin("sometimes", ckpt.novelty, bf16, rule)
    adata = ad.read_h5ad(pbmc_small)
    res = annotate(adata, ckpt, options=QUIET.replace(execution=bf16))
    assert res.recheck_margin == resolve_recheck_margin("auto", ckpt.novelty, bf16, res.rule)
    assert res.to_adata(adata.copy()).uns["scbert_annotation"]["recheck_margin"] == res.recheck_margin
    assert res.report()[0]["recheck_margin"] == res.recheck_margin

