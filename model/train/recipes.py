"""Training recipes: our defaults, and the published scBERT code's settings, one flag away
(``--recipe published``). Each entry is a setting that differs between the two; README.md lists
them with the reason for ours."""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "ours": {
        "pretrain": {"epochs": 10, "batch_size": 8, "grad_acc": 1, "clip_norm": 1.0, "schedule": "ours",
                     "mask_rounding": "round", "masked_accuracy": "all_tokens"},
        "finetune": {"epochs": 20, "batch_size": 8, "grad_acc": 1, "clip_norm": 1.0, "schedule": "ours",
                     "patience": 5, "patience_rule": "ours", "head_init": "expression"},
    },
    "published": {
        "pretrain": {"epochs": 100, "batch_size": 3, "grad_acc": 60, "clip_norm": 100.0, "schedule": "published",
                     "mask_rounding": "ceil", "masked_accuracy": "expression_bins"},
        "finetune": {"epochs": 100, "batch_size": 3, "grad_acc": 60, "clip_norm": 1e6, "schedule": "published",
                     "patience": 10, "patience_rule": "published", "head_init": "random"},
    },
}
STAGES = ("pretrain", "finetune")


def recipe_settings(recipe: str, stage: str) -> dict[str, Any]:
    """The settings ``recipe`` (``ours`` or ``published``) gives the ``stage``."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {tuple(RECIPES)}, got {recipe!r}")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    return dict(RECIPES[recipe][stage])
