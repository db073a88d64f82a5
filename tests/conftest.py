"""Shared fixtures: small real data cut from the bundled PBMC3k file, tiny model sizes, a tiny run of
the stages shared by the tests that need a trained model; ``scbert_log``, pytest's log capture listening
on the stages' logger; and the ``slow`` marker (tests of several
seconds each: subprocesses, torchrun, compiling; skipped unless ``--run-slow`` or ``SCBERT_SLOW_TESTS=1``,
which ``.ci/run`` sets)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PBMC = REPO / "data" / "pbmc3k_labeled.h5ad"
TINY_MODEL = ["--dim", "16", "--depth", "2", "--heads", "2", "--dim-head", "8"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="also run the tests marked slow (CI runs them)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow") or os.environ.get("SCBERT_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow or SCBERT_SLOW_TESTS=1 (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def scbert_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """``caplog`` with its handler on the ``scbert`` logger itself: once a stage has configured that
    logger it no longer propagates to the root, where ``caplog`` listens. Propagation is off while the
    handler is attached, so each record is captured once whichever tests ran before."""
    log = logging.getLogger("scbert")
    propagate = log.propagate
    log.addHandler(caplog.handler)
    log.propagate = False
    yield caplog
    log.removeHandler(caplog.handler)
    log.propagate = propagate


@pytest.fixture(scope="session")
def pbmc_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 raw-count PBMCs of 4 cell types (60 each) with all 32,738 genes, as an .h5ad."""
    adata = ad.read_h5ad(PBMC)
    rng = np.random.default_rng(0)
    keep = []
    for ct in ["B", "CD14+ Mono", "NK", "Naive CD4 T"]:
        idx = np.flatnonzero(adata.obs["celltype"].to_numpy() == ct)
        keep.extend(rng.choice(idx, 60, replace=False))
    small = adata[np.sort(keep)].copy()
    path = tmp_path_factory.mktemp("data") / "pbmc_small.h5ad"
    small.write_h5ad(path)
    return path


FAST = ["--batch-size", "16", "--lr", "1e-3", "--quiet", "--seed", "0"]


@pytest.fixture(scope="session")
def tiny_run(pbmc_small: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The stages run once on ``pbmc_small`` with a tiny model, shared by the tests that need a
    trained model: ``prep`` (300 most variable genes), ``pre`` (pretrained 2 epochs, gradient
    checkpointing) and ``ft`` (fine-tuned 3 epochs, novelty calibrated to reject 10%), each a run folder."""
    import finetune
    import preprocess
    import pretrain

    d = tmp_path_factory.mktemp("tiny_run")
    prep = d / "prep.h5ad"
    preprocess.main(["--data", str(pbmc_small), "--out", str(prep), "--n-top-genes", "300", "--quiet"])
    pretrain.main(["--data", str(prep), "--out", str(d / "pre"), *TINY_MODEL, "--epochs", "2", "--grad-checkpointing", *FAST])
    finetune.main(["--data", str(prep), "--label-key", "celltype", "--pretrained", str(d / "pre" / "model.pt"),
                   "--out", str(d / "ft"), "--epochs", "3", "--reject-rate", "0.1", *FAST])
    return {"prep": prep, "pre": d / "pre", "ft": d / "ft"}


def linked_run(tiny_run: dict[str, Path], folder: Path) -> Path:
    """``folder`` with the shared run's ``prep.h5ad``, ``pre/`` and ``ft/`` linked into it, so that a
    test module writes its own outputs beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in (("prep.h5ad", tiny_run["prep"]), ("pre", tiny_run["pre"]), ("ft", tiny_run["ft"])):
        (folder / name).symlink_to(target)
    return folder


@pytest.fixture(scope="session")
def random_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``make(genes, classes)``: a classifier (``clf``) and a pretrained (``mlm``) checkpoint with random
    weights (dim 8, depth 1, 2 heads of 4, seed 0) on ``genes``, written once per gene and class list."""
    import torch

    from model.checkpoint import save_checkpoint
    from model.nn.config import ScBERTConfig
    from model.nn.network import ScBERT

    made: dict[tuple, dict[str, Path]] = {}
    root = tmp_path_factory.mktemp("random_checkpoints")

    def make(genes: list[str], classes: list[str]) -> dict[str, Path]:
        key = (tuple(genes), tuple(classes))
        if key not in made:
            d = root / str(len(made))
            d.mkdir()
            torch.manual_seed(0)
            for name, head in (("clf", "classifier"), ("mlm", "mlm")):
                cfg = ScBERTConfig(n_genes=len(genes), dim=8, depth=1, heads=2, dim_head=4, head=head,
                                   n_classes=len(classes) if head == "classifier" else None)
                save_checkpoint(d / f"{name}.pt", ScBERT(cfg), list(genes), list(classes) if head == "classifier" else None)
            made[key] = {"clf": d / "clf.pt", "mlm": d / "mlm.pt"}
        return made[key]

    return make


def v1_novelty(record: Any) -> dict[str, Any]:
    """A :class:`model.novelty.record.NoveltyRecord` as format version 1 stored it: class statistics
    with the expression PCA and the query density inside them (to remove parts from, as older files lack them)."""
    d = record.to_dict()

    def pca(p: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in p.items() if k != "class_statistics" and v is not None}
        if p["class_statistics"] is not None:
            out["stats"] = p["class_statistics"]
        return out

    stats = dict(d["class_statistics"] or {})
    if d["expression_pca"] is not None:
        stats["pca"] = pca(d["expression_pca"])
    if d["query_density"] is not None:
        stats["density"] = {**d["query_density"], "pcas": [pca(p) for p in d["query_density"]["pcas"]]}
    newer = ("crossfit_mahalanobis", "crossfit_knn", "crossfit_combined", "crossfit_feature_combined")  # scores version 1 never had
    cal = d["calibration"]
    if cal is not None:
        cal = {**cal, "thresholds": {k: v for k, v in cal["thresholds"].items() if k not in newer},
               "scores": {k: v for k, v in cal["scores"].items() if k not in newer}}
    default = "query_combined" if d["default"] in newer else d["default"]  # version 1's default
    return {"default": default, "stats": stats, "calibration": cal, "precision_error": d["precision_error"]}


def upgraded(v1: dict[str, Any]) -> Any:
    """A version-1 ``novelty`` entry read as the current record (what loading such a file gives)."""
    from model.checkpoint.upgrade import _novelty_v1
    from model.novelty import NoveltyRecord

    return NoveltyRecord.from_dict(_novelty_v1(v1))
