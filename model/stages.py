"""What pretrain.py, finetune.py and predict.py do once their arguments are parsed."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.dataset import CellDataset
from data.io import InputError, check_writable, read_cells, record_dir, write_h5ad_atomic
from data.vocab import load_vocab
from model import distributed
from model.checkpoint import DEFAULT_PREPROCESSING, CheckpointError, load_checkpoint, save_checkpoint
from model.cli import fail, published_names, setup_logging, start_run, write_json
from model.config import ScBERTConfig
from model.pipeline import (
    annotate,
    check_labels,
    classification_metrics,
    gene_embedding,
    load_prepared,
    plot_confusion,
    plot_history,
    prediction_report,
)
from model.scbert import ScBERT
from model.training import (
    TrainConfig,
    balanced_class_weights,
    finetune,
    list_states,
    predict_distributed,
    pretrain,
    resolve_device,
    set_seed,
)

log = logging.getLogger("scbert")


def _train_config(args: argparse.Namespace, out: Path | None = None, sub: str = "", **extra: Any) -> TrainConfig:
    """The TrainConfig of the parsed flags; with ``out``, training states go to OUT/checkpoints[/sub]
    and ``--resume`` reads them from the same place of the run it names."""
    states: dict[str, Any] = {}
    if out is not None:
        states = {"checkpoint_dir": str(out / "checkpoints" / sub), "save_every": args.save_every, "keep_last": args.keep_last,
                  "resume_from": _resume_source(args, sub), "max_steps": args.max_steps}
    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, grad_acc=args.grad_acc, lr=args.lr, clip_norm=args.clip_norm,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, cycle_steps=args.cycle_steps, seed=args.seed, precision=args.precision,
        num_workers=args.num_workers, progress=not args.quiet and distributed.current().is_main, compile=args.compile,
        grad_checkpointing=args.grad_checkpointing, **states, **extra,
    )


def _resume_source(args: argparse.Namespace, sub: str = "") -> str | None:
    """Where ``--resume`` finds training states: a state file, or DIR/checkpoints[/sub] of a run."""
    if not getattr(args, "resume", None):
        return None
    p = Path(args.resume)
    if p.is_file():
        return str(p)
    if not p.is_dir() and p.resolve() != Path(args.out).resolve():
        raise InputError(f"--resume {p}: no such run folder; give the --out folder of the run to go on with")
    folder = (p / "checkpoints" if (p / "checkpoints").is_dir() else p) / sub
    if not sub and not list_states(folder) and distributed.current().is_main:
        log.warning("WARNING: --resume %s: no saved training state in %s; starting from the beginning", p, folder)
    return str(folder)


def _start(args: argparse.Namespace) -> tuple[Path, torch.device]:
    """Join the torchrun job if there is one; rank 0 creates the run folder and logs, the other
    ranks only report warnings and errors. Resuming into the run's own folder needs no --overwrite."""
    info, device = distributed.init_distributed(args.device)
    resuming_here = bool(args.resume) and Path(args.resume).resolve() in (Path(args.out).resolve(), (Path(args.out) / "checkpoints").resolve())
    if info.is_main:
        out = start_run(args.out, args, () if resuming_here else ("model.pt",))
    else:
        setup_logging(quiet=True)
        out = Path(args.out)
    distributed.barrier()
    if info.enabled:
        log.info("torchrun job: %d processes, backend %s, this one on %s; %d cells per step", info.world_size, info.backend,
                 device, args.batch_size * info.world_size * args.grad_acc)
    return out, device


def _gene2vec_spec(args: argparse.Namespace) -> str:
    return "none" if args.pos_embed is False else args.gene2vec


def _check_gene_num(args: argparse.Namespace, n_genes: int) -> None:
    if args.gene_num is not None and args.gene_num not in (n_genes, n_genes + 1):
        raise InputError(f"--gene_num {args.gene_num} does not match the vocabulary of {n_genes} genes; drop the flag or fix the data")


def _write_summary(out: Path, lines: list[str]) -> None:
    (out / "summary.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for line in lines:
        log.info(line)


def _pretrain_corpus(args: argparse.Namespace) -> tuple[Any, list[str], Any]:
    """The corpus (an in-memory CSR matrix, or with --backed an on-disk :class:`H5adCorpus`), its
    genes, and the cells gene2vec is trained on (with --backed a seeded sample of --gene2vec-cells)."""
    genes = load_vocab(args.vocab) if args.vocab else None
    if not getattr(args, "backed", False):
        adata, genes = load_prepared(args.data, genes, args.min_genes or None)
        return adata.X, genes, adata.X
    from data.corpus import H5adCorpus

    corpus = H5adCorpus(args.data, genes)
    for name, frac in corpus.coverage.items():
        if frac < 0.5:
            log.warning("WARNING: %s holds only %.0f%% of the %d vocabulary genes; the others are treated as not expressed",
                        name, 100 * frac, len(corpus.genes))
    log.info("reading %d cells from %d file(s) on disk, a batch at a time", corpus.shape[0], len(corpus.paths))
    sample = None
    if _gene2vec_spec(args) == "train" and distributed.current().is_main:  # other ranks get rank 0's vectors
        sample = corpus.sample(args.gene2vec_cells, args.seed)
    return corpus, corpus.genes, sample


def run_pretrain(args: argparse.Namespace) -> None:
    out, device = _start(args)
    info = distributed.current()
    try:
        set_seed(args.seed)
        X, genes, g2v_cells = _pretrain_corpus(args)
        _check_gene_num(args, len(genes))
        n_cells = X.shape[0]
        if n_cells < 2:
            raise InputError(f"pretraining needs at least 2 cells, the corpus has {n_cells}")
        spec = _gene2vec_spec(args)
        if spec == "train" and not info.is_main:
            # gene2vec is deterministic: rank 0 trains it and DDP copies rank 0's weights to every rank.
            mode, vectors, g2v = "gene2vec", None, {"source": "rank 0"}
        else:
            mode, vectors, g2v = gene_embedding(spec, args.gene2vec_genes, genes, g2v_cells, args.dim, args.seed, not args.quiet and info.is_main)
        config = ScBERTConfig(n_genes=len(genes), bin_num=args.bin_num, dim=args.dim, depth=args.depth, heads=args.heads,
                              dim_head=args.dim_head, gene_embedding=mode, head="mlm")
        model = ScBERT(config, vectors)
        perm = np.random.default_rng(args.seed).permutation(n_cells)
        n_val = min(n_cells - 1, max(1, round(args.val_frac * n_cells)))
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        train_ds = CellDataset(X, config.bin_num).subset(train_idx)
        val_ds = CellDataset(X, config.bin_num).subset(val_idx)
        log.info("pretraining on %d cells (%d held out), %d genes, model dim %d depth %d heads %d", len(train_idx), n_val, len(genes), args.dim, args.depth, args.heads)
        train_args = vars(args)

        def save_best(epoch: int, metrics: dict[str, float], improved: bool) -> None:
            if improved:
                save_checkpoint(out / "model.pt", model, genes, preprocessing=DEFAULT_PREPROCESSING, train_args=train_args, metrics=metrics)

        t0 = time.time()
        best, history = pretrain(model, train_ds, val_ds, _train_config(args, out), device, args.mask_prob, args.replace_prob, on_epoch=save_best)
        if not info.is_main:
            distributed.shutdown()
            return
        # the best weights, also when they predate a --resume into another folder
        save_checkpoint(out / "model.pt", model, genes, preprocessing=DEFAULT_PREPROCESSING, train_args=train_args, metrics=best)
        metrics = {
            **best,
            "beats_baseline": best["val_masked_accuracy"] > best["baseline_accuracy"],
            "n_cells_train": len(train_idx), "n_cells_val": n_val, "n_genes": len(genes),
            "seconds": round(time.time() - t0, 1), "gene2vec": g2v, "history": history,
        }
        write_json(out / "metrics.json", metrics)
        plot_history(history, ["train_loss", "val_loss", "val_masked_accuracy"], out / "training_curves.png", "pretraining")
        if args.export_gene2vec and vectors is not None:
            from data.gene2vec import save_word2vec_text

            save_word2vec_text(out / "gene2vec.txt", genes, model.gene_vectors().numpy())
    except (InputError, CheckpointError) as e:
        fail(str(e))
    _write_summary(out, [
        f"pretrained on {len(train_idx)} cells x {len(genes)} genes for {len(history)} epochs ({metrics['seconds']} s)",
        f"held-out masked-token accuracy {best['val_masked_accuracy']:.4f} (best epoch {best['epoch']}) vs "
        f"{best['baseline_accuracy']:.4f} for the most-common-bin baseline: {'beats' if metrics['beats_baseline'] else 'DOES NOT beat'} it",
        f"model: {out / 'model.pt'}",
    ])
    distributed.shutdown()


def _labels(adata: Any, key: str, source: str) -> np.ndarray:
    if key not in adata.obs:
        raise InputError(f"--label-key {key!r} is not a column of {source}; available columns: {list(adata.obs.columns)}")
    return adata.obs[key]


def run_finetune(args: argparse.Namespace) -> None:
    from sklearn.model_selection import StratifiedKFold, train_test_split

    out, device = _start(args)
    main = distributed.current().is_main
    try:
        set_seed(args.seed)
        pre = load_checkpoint(args.pretrained, **published_names(args)) if args.pretrained else None
        genes = pre.genes if pre else (load_vocab(args.vocab) if args.vocab else None)
        if pre and args.vocab and load_vocab(args.vocab) != pre.genes:
            raise InputError(f"--vocab {args.vocab} is not the vocabulary of --pretrained {args.pretrained}: a pretrained model "
                             f"reads its own genes; drop --vocab")
        adata, genes = load_prepared([args.data], genes, args.min_genes or None)
        _check_gene_num(args, len(genes))
        raw_labels = _labels(adata, args.label_key, args.data)
        known = raw_labels.notna().to_numpy()
        if not known.all():
            if main:
                log.warning("%d cells have no %s label and are left out", int((~known).sum()), args.label_key)
            adata = adata[known].copy()
        y_str = adata.obs[args.label_key].astype(str).to_numpy()
        classes, counts = check_labels(y_str, args.label_key, args.cv, args.val_frac)
        y = np.array([classes.index(c) for c in y_str])
        log.info("fine-tuning on %d cells, %d cell types: %s", len(y), len(classes), counts)

        if pre is None:
            mode, vectors, g2v = gene_embedding(_gene2vec_spec(args), args.gene2vec_genes, genes, adata.X, args.dim, args.seed, not args.quiet)
            base = ScBERTConfig(n_genes=len(genes), bin_num=args.bin_num, dim=args.dim, depth=args.depth, heads=args.heads,
                                dim_head=args.dim_head, gene_embedding=mode)
        else:
            vectors, g2v, base = None, {"source": f"pretrained:{args.pretrained}"}, pre.config
        config = base.replace(head="classifier", n_classes=len(classes), classifier_dropout=args.dropout)

        if args.cv:
            splits = list(StratifiedKFold(args.cv, shuffle=True, random_state=args.seed).split(np.zeros(len(y)), y))
        else:
            idx = np.arange(len(y))
            tr, va = train_test_split(idx, test_size=args.val_frac, stratify=y, random_state=args.seed)
            splits = [(np.sort(tr), np.sort(va))]

        folds: list[dict[str, Any]] = []
        best_fold, best_state = -1, None
        for k, (tr, va) in enumerate(splits):
            set_seed(args.seed + k)
            model = ScBERT(config, vectors)
            if pre is not None:
                model.load_encoder_state(pre.state_dict)
            if pre is None and args.head_only:
                raise InputError("--head-only needs a pretrained encoder (--pretrained): without one, only a random encoder would be kept")
            model.freeze_for_finetuning(train_all=(args.train_all or pre is None) and not args.head_only, head_only=args.head_only)
            weights = None
            if args.class_weights:
                try:
                    weights = balanced_class_weights(y[tr], len(classes))
                except ValueError as e:
                    raise InputError(str(e)) from None
            train_ds = CellDataset(adata.X[tr], config.bin_num, y[tr])
            val_ds = CellDataset(adata.X[va], config.bin_num, y[va])
            desc = f"fold {k + 1}/{len(splits)}" if args.cv else "finetune"
            cfg = _train_config(args, out, f"fold{k + 1}" if args.cv else "", patience=args.patience,
                                label_smoothing=args.label_smoothing, select=args.select)
            best, history = finetune(model, train_ds, val_ds, cfg, device, weights, desc, head_init=args.head_init)
            probs, _ = predict_distributed(model, val_ds, args.batch_size, device, args.precision, num_workers=args.num_workers)
            pred = np.asarray(classes)[probs.argmax(1)]
            m = classification_metrics(y_str[va], pred, classes)
            m.update(best_epoch=best["epoch"], n_train=len(tr), n_val=len(va), history=history)
            folds.append(m)
            fold_dir = out / f"fold{k + 1}" if args.cv else out
            if main:
                fold_dir.mkdir(exist_ok=True)
                plot_confusion(y_str[va], pred, fold_dir / "confusion_matrix.png", f"{desc}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}")
                plot_history(history, ["train_loss", "val_loss", "val_accuracy"], fold_dir / "training_curves.png", desc)
            if args.cv and main:
                save_checkpoint(fold_dir / "model.pt", model, genes, classes, DEFAULT_PREPROCESSING, vars(args), {k2: v for k2, v in m.items() if k2 != "history"})
            if best_fold < 0 or m["accuracy"] > folds[best_fold]["accuracy"]:
                best_fold, best_state = k, {k2: v.detach().clone() for k2, v in model.state_dict().items()}
            log.info("%s: accuracy %.4f, macro-F1 %.4f on %d validation cells", desc, m["accuracy"], m["macro_f1"], len(va))

        model.load_state_dict(best_state)
        summary_metrics = {"accuracy": folds[best_fold]["accuracy"], "macro_f1": folds[best_fold]["macro_f1"]}
        metrics: dict[str, Any] = {"classes": classes, "class_counts": counts, "gene2vec": g2v}
        if args.cv:
            acc = np.array([f["accuracy"] for f in folds])
            f1 = np.array([f["macro_f1"] for f in folds])
            metrics.update(accuracy=float(acc.mean()), accuracy_sd=float(acc.std(ddof=1)), macro_f1=float(f1.mean()),
                           macro_f1_sd=float(f1.std(ddof=1)), folds=folds, model_fold=best_fold + 1)
        else:
            metrics.update(folds[0])
        if not main:
            distributed.shutdown()
            return
        save_checkpoint(out / "model.pt", model, genes, classes, DEFAULT_PREPROCESSING, vars(args), {**summary_metrics, "cv": args.cv})
        write_json(out / "metrics.json", metrics)
    except (InputError, CheckpointError) as e:
        fail(str(e))
    if args.cv:
        lines = [f"{args.cv}-fold cross-validation on {len(y)} cells: accuracy {metrics['accuracy']:.4f} ± {metrics['accuracy_sd']:.4f}, "
                 f"macro-F1 {metrics['macro_f1']:.4f} ± {metrics['macro_f1_sd']:.4f}",
                 f"model.pt is the model of fold {best_fold + 1} (highest validation accuracy)"]
    else:
        lines = [f"validation ({len(splits[0][1])} cells): accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} (best epoch {metrics['best_epoch']})"]
    _write_summary(out, [*lines, f"model: {out / 'model.pt'}"])
    distributed.shutdown()


def run_predict(args: argparse.Namespace) -> None:
    setup_logging(args.quiet, level=getattr(args, "log_level", None))
    try:
        out = check_writable(args.out, args.overwrite)
        if args.csv:
            check_writable(args.csv, args.overwrite)
    except InputError as e:
        fail(str(e))
    run_dir = start_run(args.run_dir or record_dir(out), args, protected=("summary.txt",))
    try:
        ckpt = load_checkpoint(args.model, **published_names(args))
        adata = read_cells(args.data)
        if args.label_key:
            _labels(adata, args.label_key, args.data)
        threshold = 0.0 if args.novel_type is False else args.threshold
        t0 = time.time()
        annotated, rep = annotate(adata, ckpt, threshold, args.batch_size, resolve_device(args.device), args.precision,
                                  progress=not args.quiet, num_workers=args.num_workers, compile_model=args.compile)
        seconds = time.time() - t0
        metrics, lines = prediction_report(annotated, ckpt.classes, threshold, args.label_key, run_dir)
        lines.insert(0, f"annotated {annotated.n_obs} cells in {seconds:.1f} s ({annotated.n_obs / max(seconds, 1e-9):.1f} cells/s)")
        metrics.update(seconds=round(seconds, 2), model=str(args.model), data=str(args.data), preprocessing=rep)
        write_h5ad_atomic(annotated, out)
        if args.csv:
            import pandas as pd

            probs = pd.DataFrame(annotated.obsm["scbert_probabilities"], index=annotated.obs_names, columns=[f"p_{c}" for c in ckpt.classes])
            table = pd.concat([annotated.obs[["scbert_celltype", "scbert_confidence"]], probs], axis=1)
            tmp_csv = Path(args.csv).with_name(f".{Path(args.csv).name}.tmp")
            table.to_csv(tmp_csv, index_label="cell")
            tmp_csv.replace(args.csv)
        write_json(run_dir / "metrics.json", metrics)
    except (InputError, CheckpointError) as e:
        fail(str(e))
    lines.append(f"wrote {out}" + (f" and {args.csv}" if args.csv else "") + f"; run record in {run_dir}")
    (run_dir / "summary.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for line in lines:
        if line.startswith(("accuracy", "note:")):
            print(line)  # the result, on stdout
        else:
            log.info(line)
