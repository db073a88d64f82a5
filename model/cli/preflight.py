"""Checks of the paths and the label column a command names, made before the model stack is
imported (seconds of torch and anndata): a typo is reported at once. Run folders given for
``--model``, ``--pretrained`` or ``--vocab`` are replaced by their ``model.pt``. Light imports only."""

from __future__ import annotations

import argparse
from pathlib import Path

from data.errors import InputError
from data.paths import check_input, check_label_key, model_file


def _model(args: argparse.Namespace, attr: str, flag: str) -> None:
    value = getattr(args, attr, None)
    if value:
        try:
            setattr(args, attr, str(model_file(value)))
        except InputError as e:
            raise InputError(f"{flag}: {e}") from None


def _vocab(args: argparse.Namespace) -> None:
    value = getattr(args, "vocab", None)
    if value and Path(value).is_dir():
        _model(args, "vocab", "--vocab")
    elif value:
        check_input(value, "--vocab")


def check_paths(args: argparse.Namespace, stage: str) -> None:
    """The inputs of ``stage`` exist, its model flags name a model (a run folder: its model.pt), its
    --label-key is a column of an .h5ad input, and its --label-map exists."""
    data = args.data if isinstance(args.data, list) else [args.data]
    for path in data:
        check_input(path)
    if stage in ("predict", "attention"):
        _model(args, "model", "--model")
    if stage == "finetune":
        _model(args, "pretrained", "--pretrained")
    _vocab(args)
    key = getattr(args, "label_key", None)
    if key and stage != "pretrain":
        check_label_key(data[0], key)
    if getattr(args, "label_map", None):
        check_input(args.label_map, "--label-map")
