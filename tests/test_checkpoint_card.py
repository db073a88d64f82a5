"""python -m model.info: what a checkpoint holds, as text and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import linked_run

LEGACY = Path(__file__).parent / "fixtures" / "legacy_v1"


@pytest.fixture(scope="module")
def calibrated(tiny_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared tiny run (fine-tuned with novelty calibrated to reject 10%), with a folder of this module's own."""
    return linked_run(tiny_run, tmp_path_factory.mktemp("novelty"))


def test_checkpoint_card(calibrated: Path, capsys: pytest.CaptureFixture) -> None:
    """python -m model.info: what a checkpoint holds, as text and JSON."""
    from model.cli.info import main as info_main

    assert info_main([str(calibrated / "ft" / "model.pt")]) == 0
    text = capsys.readouterr().out
    assert "fine-tuned classifier, this package" in text and "B (60 cells)" in text
    assert "novelty: default score" in text and "rejecting 10% of 48 validation cells" in text and "git commit" in text
    assert "novelty kNN reference: the classifier's penultimate features" in text
    assert info_main([str(calibrated / "ft" / "model.pt"), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["model"]["genes"] == 300 and card["recipe"] == "ours" and card["training"]["stage"] == "finetune"
    assert {c["name"] for c in card["classes"]} == {"B", "CD14+ Mono", "NK", "Naive CD4 T"} and all(c["training_cells"] for c in card["classes"])
    assert card["provenance"]["package"] == "scbert-pytorch"
    assert info_main([str(LEGACY / "classifier.pt")]) == 0
    assert "no calibration" in capsys.readouterr().out
    assert info_main([str(calibrated / "missing.pt")]) == 2

