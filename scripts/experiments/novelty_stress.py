"""The shipped decision path on the stress cases of issue 34 (RESULTS.md, "Novel cell types"):
``finetune.py`` with its defaults on a part of PBMC3k without one type, then ``model.api.annotate``
(what ``predict.py`` runs: guard, fallbacks and report included) on queries built from the rest,
for the default rule and the others a user can pick.

Cases: the held-out test cells (known types + the left-out type) whole, in 4 parts, in parts of 10
cells and one cell at a time; duplicated; with only 5 or 20 cells of the new type; with one known
type making half of the query; the whole training file; another lab's cells (pbmc4k, coarse types
by ``data/label_maps/pbmc3k_pbmc4k.tsv``, or ``--other-map``) alone and mixed into the test cells. Per case and rule:
the share of known cells Unassigned, the share of new-type cells Unassigned (recall), how many
test cells changed label against the whole-test annotation, and the warnings the run printed.

    python -m scripts.experiments.novelty_stress --data ../shared/data/pbmc3k_labeled.h5ad \\
        --other ../shared/data/more/pbmc4k_2170.h5ad --pretrained ../runs/enc/pre_main/model.pt --out ../runs/stress
    # then the sorted PBMCs as the other lab, with the same model
    python -m scripts.experiments.novelty_stress ... --other ../shared/data/more/pbmc_sorted_2140.h5ad \
        --other-map data/label_maps/pbmc3k_sorted.tsv --only-other --out ../runs/stress
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anndata as ad
import numpy as np

from data.labels import stratified_holdout
from model.api import annotate, load_model
from model.novelty.rule import UNASSIGNED

RULES = {"auto (the default)": {"novelty": "auto"}, "crossfit_combined": {"novelty": "crossfit_combined"}, "pca_mahalanobis": {"novelty": "pca_mahalanobis"},
         "query_combined (opt-in)": {"novelty": "query_combined"}, "published (top probability < 0.5)": {"novelty": "softmax", "threshold": 0.5}}
LABEL_MAP = Path(__file__).resolve().parents[2] / "data" / "label_maps" / "pbmc3k_pbmc4k.tsv"


@contextmanager
def warnings_of(logger: str = "scbert") -> Iterator[list[str]]:
    """The WARNING (and worse) messages the package logs inside the block."""
    seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Catch(logging.WARNING)
    log = logging.getLogger(logger)
    log.addHandler(handler)
    try:
        yield seen
    finally:
        log.removeHandler(handler)


def labels_of(query: ad.AnnData, model: object, rule: dict[str, object], warnings: list[str]) -> np.ndarray:
    with warnings_of() as seen:
        out = annotate(query.copy(), model, progress=False, device="cpu", precision="fp32", embedding=False, **rule)
    warnings.extend(seen)
    return out.obs["scbert_celltype"].astype(str).to_numpy()


def in_parts(query: ad.AnnData, model: object, rule: dict[str, object], size: int, warnings: list[str]) -> np.ndarray:
    return np.concatenate([labels_of(query[i:i + size], model, rule, warnings) for i in range(0, query.n_obs, size)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="labelled .h5ad (raw counts), PBMC3k")
    p.add_argument("--other", required=True, help="another lab's labelled .h5ad of the same tissue (pbmc4k)")
    p.add_argument("--pretrained", required=True, help="encoder checkpoint whose corpus holds neither file's test cells")
    p.add_argument("--other-map", default=str(LABEL_MAP), help="label map of both files onto shared names (default: PBMC3k / pbmc4k)")
    p.add_argument("--only-other", action="store_true", help="only the cases of the other lab (the model of an earlier run in --out is reused)")
    p.add_argument("--hold-out", default="B", help="the type left out of training (default: B)")
    p.add_argument("--label-key", default="celltype")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    full = ad.read_h5ad(args.data)
    y = full.obs[args.label_key].astype(str).to_numpy()
    train_idx, test_idx = stratified_holdout(y, 0.4, args.seed)
    train_idx = train_idx[y[train_idx] != args.hold_out]
    model_path = out / "model" / "model.pt"
    if not model_path.exists():  # finetune.py with its defaults, as a user runs it
        full[np.sort(train_idx)].copy().write_h5ad(out / "train.h5ad")
        subprocess.run([sys.executable, "finetune.py", "--data", str(out / "train.h5ad"), "--label-key", args.label_key,
                        "--pretrained", args.pretrained, "--out", str(out / "model"), "--quiet"], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    model = load_model(model_path)
    test = full[np.sort(test_idx)].copy()
    yt = test.obs[args.label_key].astype(str).to_numpy()
    novel, known = yt == args.hold_out, yt != args.hold_out
    rng = np.random.default_rng(args.seed)
    mono = np.flatnonzero(known & (yt == "CD14+ Mono"))
    others = rng.choice(np.flatnonzero(known & (yt != "CD14+ Mono")), len(mono), replace=False)
    other = ad.read_h5ad(args.other)
    names = dict(line.split("\t")[:2] for line in Path(args.other_map).read_text().splitlines() if line and not line.startswith("#"))
    yo = np.array([names.get(v, v) for v in other.obs[args.label_key].astype(str)])
    coarse_out = names.get(args.hold_out, args.hold_out)
    keep_o = (yo != "?") & (yo != "-")
    other = other[keep_o].copy()
    yo = yo[keep_o]
    mixed = ad.concat([test[known], other[yo != coarse_out]], join="outer", index_unique="-")
    mixed.obs_names_make_unique()
    one_at_a_time = np.sort(rng.choice(test.n_obs, 60, replace=False))
    cases = [("test cells, whole", test), ("duplicated (test + a copy)", None), ("in 4 parts", None), ("in parts of 10", None),
             ("one at a time (60 cells)", None), ("known + 5 new-type cells", None), ("known + 20 new-type cells", None),
             ("CD14+ Mono half of the query", None), ("the training file (all cells)", full), (f"another lab ({Path(args.other).stem})", other),
             ("test known + another lab's known", mixed)]
    if args.only_other:
        cases = [c for c in cases if c[0].startswith(("another lab", "test known + another"))]
    rows = []
    for rule_name, rule in RULES.items():
        warn: list[str] = []
        whole = labels_of(test, model, rule, warn)
        ref_warn = len(warn)
        for case, _ in cases:
            warn = []
            sel = np.arange(test.n_obs)  # test cells the case holds, in the order of its labels
            if case == "test cells, whole":
                labels, warn = whole, ["x"] * ref_warn
            elif case.startswith("duplicated"):
                both = ad.concat([test, test], index_unique="-")
                labels = labels_of(both, model, rule, warn)[:test.n_obs]
            elif case == "in 4 parts":
                labels = in_parts(test, model, rule, -(-test.n_obs // 4), warn)
            elif case == "in parts of 10":
                labels = in_parts(test, model, rule, 10, warn)
            elif case.startswith("one at a time"):
                sel = one_at_a_time
                labels = in_parts(test[sel], model, rule, 1, warn)
            elif case.startswith("known +"):
                k = int(case.split()[2])
                sel = np.sort(np.concatenate([np.flatnonzero(known), rng.choice(np.flatnonzero(novel), k, replace=False)]))
                labels = labels_of(test[sel], model, rule, warn)
            elif case.startswith("CD14+"):
                sel = np.sort(np.concatenate([mono, others]))
                labels = labels_of(test[sel], model, rule, warn)
            elif case.startswith("the training file"):
                labels = labels_of(full, model, rule, warn)
                fit = np.setdiff1d(np.arange(full.n_obs), test_idx)
                fit = fit[y[fit] != args.hold_out]
                rows.append((rule_name, case, len(labels), np.mean(labels[fit] == UNASSIGNED), float("nan"),
                             int(np.sum(labels[np.sort(test_idx)] != whole)), len(warn)))
                continue
            elif case.startswith("another lab"):
                labels = labels_of(other, model, rule, warn)
                is_new = yo == coarse_out
                rows.append((rule_name, case, len(labels), np.mean(labels[~is_new] == UNASSIGNED), np.mean(labels[is_new] == UNASSIGNED),
                             -1, len(warn)))
                continue
            else:  # mixed: the two parts' rows
                labels = labels_of(mixed, model, rule, warn)
                n_test = int(known.sum())
                changed = int(np.sum(labels[:n_test] != whole[known]))
                rows.append((rule_name, case + ": PBMC3k part", n_test, np.mean(labels[:n_test] == UNASSIGNED), float("nan"), changed, len(warn)))
                rows.append((rule_name, case + ": other lab's part", len(labels) - n_test, np.mean(labels[n_test:] == UNASSIGNED), float("nan"), -1,
                             len(warn)))
                continue
            is_new = novel[sel]
            rows.append((rule_name, case, len(labels), np.mean(labels[~is_new] == UNASSIGNED),
                         np.mean(labels[is_new] == UNASSIGNED) if is_new.any() else float("nan"),
                         int(np.sum(labels != whole[sel])), len(warn)))
            print(f"{rule_name} | {case}: {rows[-1][2:]}", flush=True)
        for line in sorted(set(warn))[:3]:
            print(f"  last case's warning: {line[:200]}")
    table = ["| rule | case | cells | known Unassigned | new type Unassigned | test labels changed | warnings |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        new = "" if np.isnan(r[4]) else f"{r[4]:.3f}"
        changed = "" if r[5] < 0 else str(r[5])
        table.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.3f} | {new} | {changed} | {r[6]} |")
    (out / f"table_{Path(args.other).stem}{'_other' if args.only_other else ''}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
