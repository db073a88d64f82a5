"""Older checkpoints, read as the current format: every format version's payload is upgraded to
the next one here, on load, and nowhere else (the pattern of scvi-tools' legacy loading). The
classes that use a checkpoint (:class:`model.checkpoint.format.Checkpoint`,
:class:`model.novelty.record.NoveltyRecord`) read only the current format.

Version 1 (until December 2026) covers several shapes, told apart by their keys:

- ``train_args`` (the command-line flags) instead of the ``training`` record; preprocessing
  settings missing (the defaults of the time apply);
- a ``novelty`` entry of ``stats`` (class statistics, with the expression ``pca`` and the query
  ``density`` inside them), ``calibration``, ``default`` and ``precision_error``, where the PCA,
  the density reference, the density's calibration cells, the calibration's ``combined`` score,
  the ``default`` score and the error's ``head`` record may each be missing (models fine-tuned
  before they existed).

Version 2 gained the cross-fitted expression statistics (``novelty.crossfit_pca``) in December
2026 as an optional entry: a version-2 record without it reads as None, and the rule falls back
to ``pca_mahalanobis`` (:func:`model.novelty.rule.choose_rule`); version-1 records get None here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

V1_DEFAULT_SCORE = "query_combined"  # what version-1 models without a recorded default used
# version-1 files may lack some preprocessing settings (the library size above all): these were meant
V1_PREPROCESSING = {"target_sum": 1e4, "log_base": 2.0, "min_genes": 200, "library_size": "all"}


def _class_statistics_v1(d: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not d:
        return None
    return {k: d[k] for k in ("class_means", "precision", "reference", "k")}


def _pca_v1(d: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A version-1 expression PCA; without ``scale`` it is the unscaled PCA of its time."""
    if not d:
        return None
    return {"mean": d["mean"], "components": d["components"], "class_statistics": _class_statistics_v1(d.get("stats")),
            "scale": d.get("scale"), "offset": d.get("offset") if d.get("scale") is not None else None}


def _novelty_v1(record: Mapping[str, Any]) -> dict[str, Any]:
    """A version-1 ``novelty`` entry in the current layout (see :class:`model.novelty.record.NoveltyRecord`)."""
    from model.novelty.calibration import Calibration

    stats = record.get("stats") or {}
    density = stats.get("density")
    if density and density.get("calibrations") is not None:  # without its calibration cells it cannot be used
        density = {"pcas": [_pca_v1(p) for p in density["pcas"]], "references": list(density["references"]),
                   "calibrations": list(density["calibrations"])}
    else:
        density = None
    calibration = record.get("calibration")
    if calibration:  # with the combined score, which models calibrated before it existed lack
        calibration = Calibration.from_dict(calibration).with_combined().to_dict()
    errors = {p: {**e, "head": e.get("head", p)} for p, e in (record.get("precision_error") or {}).items()}  # head: measured in the low precision
    return {"default": record.get("default", V1_DEFAULT_SCORE), "class_statistics": _class_statistics_v1(stats),
            "expression_pca": _pca_v1(stats.get("pca")), "crossfit_pca": None, "query_density": density, "calibration": calibration or None,
            "precision_error": errors}


def _v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in payload.items() if k != "train_args"}
    out["training"] = payload.get("training") or payload.get("train_args") or {}
    out["preprocessing"] = {**V1_PREPROCESSING, **(payload.get("preprocessing") or {})}
    if payload.get("novelty"):
        out["novelty"] = _novelty_v1(payload["novelty"])
    else:
        out.pop("novelty", None)
    out["format_version"] = 2
    return out


UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2}


def upgrade(payload: dict[str, Any], current: int) -> dict[str, Any]:
    """``payload`` (one of our checkpoints, as read) upgraded step by step to format ``current``."""
    version = int(payload.get("format_version", 1))
    while version < current:
        payload = UPGRADES[version](payload)
        version += 1
    return payload
