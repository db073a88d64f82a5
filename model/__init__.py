"""scBERT in PyTorch. ``from model import annotate, embed, preprocess, load_model`` gives the
Python API (:mod:`model.api`), and ``from model import InputError, CheckpointError`` the errors it
raises (both ``ValueError``); they are imported on first use, so the stage scripts start fast."""

from __future__ import annotations

from typing import Any

__all__ = ["CheckpointError", "InputError", "annotate", "embed", "load_model", "preprocess"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from model import api

        return getattr(api, name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
