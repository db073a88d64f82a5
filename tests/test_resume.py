"""Resumable runs: SIGKILL at any moment, resume, and end with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune
import pretrain
from model.train.state import list_states

from .test_distributed import REPO, TINY, kill_when, max_diff, model_state, run_env, write_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_tiny(tmp_path_factory.mktemp("tiny_resume"))


def pretrain_args(tiny: tuple[Path, Path]) -> list[str]:
    return ["--data", str(tiny[0]), "--vocab", str(tiny[1]), *TINY, "--epochs", "3", "--gene2vec", "none", "--batch-size", "4",
            "--save-every", "1", "--keep-last", "3"]


def last_state(folder: Path) -> dict:
    return torch.load(list_states(folder / "checkpoints")[-1], weights_only=True)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """Killed (SIGKILL) in its second epoch, right after a state was written; resumed; the final
    weights equal those of a run never interrupted (tolerance 1e-6; in practice 0)."""
    args = pretrain_args(tiny)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(REPO / "pretrain.py"), *args, "--out", str(out)], cwd=REPO, env=run_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        kill_when(out / "checkpoints", lambda names: any(n.startswith("state-00001-") and not n.endswith("-00000000000.pt") for n in names), proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "metrics.json").exists()
    states = list_states(out / "checkpoints")
    assert 1 <= len(states) <= 4, states  # keep-last 3, plus a new one whose older ones were not yet removed
    for f in states:
        assert torch.load(f, weights_only=True)["format"] == "scbert-training-state"  # nothing half-written
    pretrain.main([*args, "--out", str(out), "--resume", str(out)])
    pretrain.main([*args, "--out", str(tmp_path / "whole")])
    assert max_diff(model_state(out / "model.pt"), model_state(tmp_path / "whole" / "model.pt")) <= 1e-6
    assert max_diff(last_state(out)["model"], last_state(tmp_path / "whole")["model"]) <= 1e-6
    m_res = json.loads((out / "metrics.json").read_text())
    m_all = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    for a, b in zip(m_res["history"], m_all["history"], strict=True):
        assert a == pytest.approx(b, rel=1e-6)


@pytest.mark.slow
def test_resume_from_any_state_of_a_finetune_run_with_early_stopping(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """Every saved state (mid-epoch and epoch ends) of a fine-tuning run with early stopping and
    gradient accumulation resumes to the same model, history and stopping epoch."""
    data, genes = tiny
    args = ["--data", str(data), "--label-key", "celltype", "--vocab", str(genes), *TINY, "--epochs", "8", "--patience", "2",
            "--gene2vec", "none", "--batch-size", "4", "--grad-acc", "2", "--save-every", "2", "--keep-last", "100", "--lr", "1e-2",
            "--fixed-budget-below", "0", "--select-metric", "accuracy"]
    # its few validation cells choose the epoch on accuracy and stop early (by default so few train the whole budget,
    # and macro-F1 ties go to a lower validation loss, which falls every epoch here)
    whole = tmp_path / "whole"
    finetune.main([*args, "--out", str(whole)])
    ref = json.loads((whole / "metrics.json").read_text())
    states = list_states(whole / "checkpoints")
    mid = [s for s in states if not s.name.endswith("-00000000000.pt")]
    ends = [s for s in states if s.name.endswith("-00000000000.pt")]
    assert len(ref["history"]) < 8 and len(mid) > 2 and len(ends) == len(ref["history"])  # stopped early
    for i, state in enumerate([mid[len(mid) // 2], ends[-2]]):
        out = tmp_path / f"r{i}"
        finetune.main([*args, "--out", str(out), "--resume", str(state)])
        got = json.loads((out / "metrics.json").read_text())
        for a, b in zip(got["history"], ref["history"], strict=True):
            assert a == pytest.approx(b, rel=1e-6)
        assert max_diff(model_state(out / "model.pt"), model_state(whole / "model.pt")) <= 1e-6


def test_unreadable_newest_state_falls_back_and_other_data_are_refused(tiny: tuple[Path, Path], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    args = [*pretrain_args(tiny)[:-4], "--epochs", "1"]
    out = tmp_path / "run"
    pretrain.main([*args, "--out", str(out)])
    bad = out / "checkpoints" / "state-99999-00000000000.pt"
    bad.write_bytes(b"not a checkpoint")
    pretrain.main([*args, "--out", str(out), "--resume", str(out), "--epochs", "2"])
    assert "cannot be read" in capsys.readouterr().err
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 2
    other, _ = write_tiny(tmp_path / "other", n_cells=30)
    shutil.rmtree(tmp_path / "run2", ignore_errors=True)
    with pytest.raises(SystemExit) as e:
        pretrain.main([*args, "--data", str(other), "--out", str(tmp_path / "run2"), "--resume", str(out)])
    assert e.value.code == 2
    assert "resume with the same data" in (tmp_path / "run2" / "log.txt").read_text()


@pytest.mark.slow
def test_an_ensemble_killed_in_its_second_head_resumes_to_the_uninterrupted_model(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """Head 1 resumes from the run's own states (finished), head 2 from ``head2/`` (mid-epoch)."""
    data, genes = tiny
    pretrain.main(["--data", str(data), "--vocab", str(genes), *TINY, "--epochs", "1", "--gene2vec", "none", "--batch-size", "4",
                   "--out", str(tmp_path / "pre")])
    args = ["--data", str(data), "--label-key", "celltype", "--pretrained", str(tmp_path / "pre" / "model.pt"), "--ensemble", "2",
            "--epochs", "3", "--min-steps", "0", "--batch-size", "4", "--save-every", "2", "--keep-last", "100", "--quiet"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(REPO / "finetune.py"), *args, "--out", str(out)], cwd=REPO, env=run_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        kill_when(out / "checkpoints" / "head2", lambda names: any(n.startswith("state-00001-") for n in names), proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "model.pt").exists()
    finetune.main([*args, "--out", str(out), "--resume", str(out)])
    finetune.main([*args, "--out", str(tmp_path / "whole")])
    assert max_diff(model_state(out / "model.pt"), model_state(tmp_path / "whole" / "model.pt")) <= 1e-6
