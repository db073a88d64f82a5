"""The methods the accuracy benchmark compares: scBERT and the strong, cheap baselines.

Every method has the same interface: ``fit(X, y, genes)`` on a log2-normalised cells x genes CSR
matrix and string labels, then ``predict_proba(X)`` -> (cells, classes) scores whose columns follow
``classes_``; the highest score is the prediction and, for the novel-type protocol, the confidence.
All of them see the same preprocessed matrix and the same split (see :mod:`scripts.benchmark.protocols`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from scipy import sparse

from data.dataset import CellDataset, bin_values
from model.checkpoint import Checkpoint
from model.inference import InferenceOptions, embed_cells, predict, predict_outputs
from model.nn.config import ExecutionOptions, ScBERTConfig
from model.nn.network import ScBERT
from model.novelty.crossfit import CrossFitPCA
from model.novelty.expression import ExpressionPCA
from model.novelty.query import QueryDensity
from model.novelty.record import NoveltyRecord, novelty_scores, output_scores
from model.runtime import set_seed
from model.train.config import TrainConfig
from model.train.finetuning import balanced_class_weights, finetune, finetune_heads, head_splits, stopping_split
from model.train.initialisation import gene_embedding, new_classifier
from model.train.recipes import finetune_parts

# finetune.py's default recipe: the scbert method runs exactly it unless a flag or preset says otherwise
RECIPE_TRAIN, RECIPE_REST = finetune_parts("ours")

log = logging.getLogger("scbert")


class Method(Protocol):
    name: str
    classes_: list[str]

    def fit(self, X: sparse.csr_matrix, y: np.ndarray, genes: Sequence[str]) -> None: ...

    def predict_proba(self, X: sparse.csr_matrix) -> np.ndarray: ...


class InputSpaceNovelty:
    """Novelty scores for a classifier on the expression matrix itself: softmax and energy of its
    logits (``decision_function``), Mahalanobis and kNN in a PCA of its training cells (the
    :class:`model.novelty.ExpressionPCA` that gives scBERT its ``pca_*`` scores)."""

    combined_parts = ("mahalanobis", "energy")  # the ``combined`` score's parts: here Mahalanobis is in the expression PCA

    def _fit_novelty(self, X: sparse.csr_matrix, codes: np.ndarray) -> None:
        self.codes_ = codes  # the training cells' class ids (the development scripts refit variants on them)
        self.pca_ = ExpressionPCA.fit(X, codes, len(self.classes_), max_cells=max(X.shape[0], 1))
        self.record_ = NoveltyRecord(classes=self.pca_.stats,  # Mahalanobis and kNN in the PCA of the expression
                                     crossfit=CrossFitPCA.fit(X, codes, len(self.classes_), max_cells=max(X.shape[0], 1)))
        self.query_density_ = QueryDensity.fit(X)  # the query_* scores: the same for every method on the same training cells

    def embedding(self, X: sparse.csr_matrix) -> np.ndarray:
        """The cells in the PCA of the training cells (for majority voting's over-clustering)."""
        return self.pca_.transform(X)

    def novelty_scores(self, X: sparse.csr_matrix) -> dict[str, np.ndarray]:
        z = self.pca_.transform(X)
        logits = self.model.decision_function(X)
        logits = logits[:, None] if logits.ndim == 1 else logits
        return novelty_scores(self.predict_proba(X), logits, z, z, self.record_, expression=X)


def _classes(y: np.ndarray) -> tuple[list[str], np.ndarray]:
    classes = sorted(set(map(str, y)))
    return classes, np.searchsorted(np.asarray(classes, dtype=object), np.asarray(y, dtype=object))


class LogisticL1(InputSpaceNovelty):
    """L1 logistic regression (one-vs-rest, liblinear) with C chosen by stratified inner CV on the
    training cells, as in the published baseline that matched scBERT on Zheng68K."""

    def __init__(self, Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0), inner_folds: int = 3, seed: int = 0, name: str = "logreg_l1") -> None:
        self.name, self.Cs, self.inner_folds, self.seed = name, tuple(Cs), inner_folds, seed
        self.C_: float | None = None

    def fit(self, X: sparse.csr_matrix, y: np.ndarray, genes: Sequence[str]) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import GridSearchCV, StratifiedKFold
        from sklearn.multiclass import OneVsRestClassifier

        self.classes_, codes = _classes(y)
        folds = max(2, min(self.inner_folds, int(np.bincount(codes).min())))
        import inspect

        # scikit-learn >= 1.8 spells the L1 penalty l1_ratio=1 (penalty= is deprecated)
        l1 = {"l1_ratio": 1.0} if inspect.signature(LogisticRegression).parameters["penalty"].default == "deprecated" else {"penalty": "l1"}
        base = OneVsRestClassifier(LogisticRegression(solver="liblinear", max_iter=1000, random_state=self.seed, **l1))
        if np.bincount(codes).min() >= 2:
            search = GridSearchCV(base, {"estimator__C": list(self.Cs)}, cv=StratifiedKFold(folds, shuffle=True, random_state=self.seed), n_jobs=1)
            search.fit(X, codes)
            self.model, self.C_ = search.best_estimator_, float(search.best_params_["estimator__C"])
        else:  # a type with one cell cannot be cross-validated: use the middle of the grid
            self.C_ = float(self.Cs[len(self.Cs) // 2])
            self.model = base.set_params(estimator__C=self.C_).fit(X, codes)
        self._fit_novelty(X, codes)

    def predict_proba(self, X: sparse.csr_matrix) -> np.ndarray:
        return self.model.predict_proba(X)


class LogisticL2(InputSpaceNovelty):
    """Multinomial L2 logistic regression at C = 1 (lbfgs)."""

    def __init__(self, C: float = 1.0, seed: int = 0, name: str = "logreg_l2") -> None:
        self.name, self.C, self.seed = name, C, seed

    def fit(self, X: sparse.csr_matrix, y: np.ndarray, genes: Sequence[str]) -> None:
        from sklearn.linear_model import LogisticRegression

        self.classes_, codes = _classes(y)
        self.model = LogisticRegression(C=self.C, max_iter=2000, random_state=self.seed).fit(X, codes)
        self._fit_novelty(X, codes)

    def predict_proba(self, X: sparse.csr_matrix) -> np.ndarray:
        return self.model.predict_proba(X)


class LogitAdjusted:
    """A baseline with post-hoc logit adjustment: its probabilities divided by the training share
    of each class and renormalised (log p - tau log prior, tau = 1), the correction scBERT's
    logit-adjusted loss makes during training; for a fair comparison on the imbalance protocol."""

    def __init__(self, base: Any, name: str) -> None:
        self.base, self.name = base, name

    def fit(self, X: sparse.csr_matrix, y: np.ndarray, genes: Sequence[str]) -> None:
        self.base.fit(X, y, genes)
        self.classes_ = self.base.classes_
        counts = np.array([np.sum(np.asarray(y, dtype=str) == c) for c in self.classes_], dtype=np.float64)
        self.prior_ = counts / counts.sum()

    def predict_proba(self, X: sparse.csr_matrix) -> np.ndarray:
        p = self.base.predict_proba(X) / self.prior_
        return p / p.sum(axis=1, keepdims=True)


class BinnedInput:
    """A baseline fitted on scBERT's input instead of the expression: every value truncated to its
    bin (0 .. ``bin_num``, :func:`data.dataset.bin_values`), the tokens scBERT sees. It measures how
    much accuracy the binning alone costs a linear model."""

    def __init__(self, base: Any, name: str, bin_num: int = ScBERTConfig.bin_num) -> None:
        self.base, self.name, self.bin_num = base, name, bin_num

    def _binned(self, X: sparse.csr_matrix) -> sparse.csr_matrix:
        X = sparse.csr_matrix(X, dtype=np.float32, copy=True)
        X.data = bin_values(X.data, self.bin_num).astype(np.float32)
        X.eliminate_zeros()
        return X

    def fit(self, X: sparse.csr_matrix, y: np.ndarray, genes: Sequence[str]) -> None:
        self.base.fit(self._binned(X), y, genes)
        self.classes_ = self.base.classes_

    def predict_proba(self, X: sparse.csr_matrix) -> np.ndarray:
        return self.base.predict_proba(self._binned(X))


class KNNReference:
    """Reference mapping in the spirit of Seurat/scmap-cell: PCA fitted on the reference (training)
    cells, query cells projected into it, label = vote of the k nearest reference cells (cosine)."""

    def __init__(self, n_pcs: int = 50, k: int = 15, seed: int = 0, name: str = "knn_pca") -> None:
        self.name, self.n_pcs, self.k, self.seed = name, n_pcs, k, seed

    def fit(self, X: sparse.csr_matrix, y: np.ndarray, genes: Sequence[str]) -> None:
        from sklearn.decomposition import PCA
        from sklearn.neighbors import KNeighborsClassifier

        self.classes_, codes = _classes(y)
        dense = np.asarray(X.todense()) if sparse.issparse(X) else np.asarray(X)
        self.pca = PCA(n_components=min(self.n_pcs, dense.shape[0] - 1, dense.shape[1]), random_state=self.seed).fit(dense)
        self.knn = KNeighborsClassifier(n_neighbors=min(self.k, dense.shape[0]), weights="distance", metric="cosine")
        self.knn.fit(self.pca.transform(dense), codes)

    def predict_proba(self, X: sparse.csr_matrix) -> np.ndarray:
        dense = np.asarray(X.todense()) if sparse.issparse(X) else np.asarray(X)
        probs = np.zeros((dense.shape[0], len(self.classes_)))
        probs[:, self.knn.classes_] = self.knn.predict_proba(self.pca.transform(dense))
        return probs


class CentroidCorrelation:
    """SingleR/scmap-cluster style: Spearman correlation of each query cell with the mean profile of
    each reference type; scores are a softmax of the correlations (temperature ``tau``)."""

    def __init__(self, tau: float = 0.05, name: str = "centroid_corr") -> None:
        self.name, self.tau = name, tau

    @staticmethod
    def _ranks(M: np.ndarray) -> np.ndarray:
        from scipy.stats import rankdata

        R = rankdata(M, axis=1)
        R -= R.mean(axis=1, keepdims=True)
        return R / np.maximum(np.linalg.norm(R, axis=1, keepdims=True), 1e-12)

    def fit(self, X: sparse.csr_matrix, y: np.ndarray, genes: Sequence[str]) -> None:
        self.classes_, codes = _classes(y)
        dense = np.asarray(X.todense()) if sparse.issparse(X) else np.asarray(X)
        centroids = np.stack([dense[codes == c].mean(axis=0) for c in range(len(self.classes_))])
        self.centroids = self._ranks(centroids)

    def predict_proba(self, X: sparse.csr_matrix) -> np.ndarray:
        dense = np.asarray(X.todense()) if sparse.issparse(X) else np.asarray(X)
        corr = self._ranks(dense) @ self.centroids.T
        z = (corr - corr.max(axis=1, keepdims=True)) / self.tau
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def _sklearn_version() -> tuple[int, int]:
    from sklearn import __version__

    major, minor = (__version__.split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


class CellTypist:
    """CellTypist (``pip install celltypist``), trained offline with ``celltypist.train`` on the
    training cells. CellTypist expects ln(1 + x) values; the log2 matrix is rescaled by ln 2.
    Scores are its per-type sigmoid probabilities, renormalised to sum to one. Trained with
    ``use_SGD=True`` (SGD logistic regression, CellTypist's mode for large references): its default
    ``LogisticRegression(multi_class='ovr')`` path fails on scikit-learn >= 1.8, which removed ``multi_class``."""

    def __init__(self, seed: int = 0, name: str = "celltypist", **train_kwargs: Any) -> None:
        self.name, self.seed = name, seed
        self.train_kwargs = {"feature_selection": False, "check_expression": False, "use_SGD": True, "n_jobs": 1, "max_iter": 1000,
                             "random_state": seed, **train_kwargs}
        if not self.train_kwargs["use_SGD"] and _sklearn_version() >= (1, 8):
            raise ValueError("celltypist's LogisticRegression path passes multi_class, which scikit-learn >= 1.8 removed: keep "
                             "use_SGD=True (the default here; tested with celltypist 1.7.1 and scikit-learn 1.9.1)")

    def fit(self, X: sparse.csr_matrix, y: np.ndarray, genes: Sequence[str]) -> None:
        try:
            import celltypist
        except ImportError as e:  # the benchmark CLI turns this into a message
            raise ImportError("the celltypist method needs the celltypist package: pip install -e '.[bench]' (or pip install celltypist)") from e
        self.classes_ = sorted(set(map(str, y)))
        np.random.seed(self.seed)
        logging.getLogger("celltypist").setLevel(logging.WARNING)
        self.model = celltypist.train(sparse.csr_matrix(X) * np.log(2.0), labels=np.asarray(y, dtype=str), genes=np.asarray(genes), **self.train_kwargs)
        # celltypist drops genes that no training cell expresses: keep the columns of the genes it kept
        position = {g: i for i, g in enumerate(genes)}
        self.columns = np.array([position[g] for g in self.model.features])

    def predict_proba(self, X: sparse.csr_matrix) -> np.ndarray:
        Xs = self.model.scaler.transform(np.asarray((sparse.csr_matrix(X)[:, self.columns] * np.log(2.0)).todense()))
        Xs[Xs > 10] = 10  # as celltypist.annotate clips scaled values
        _, probs, _ = self.model.predict_labels_and_prob(Xs)
        order = [list(self.model.classifier.classes_).index(c) for c in self.classes_]
        probs = probs[:, order]
        return probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)


@dataclass
class ScBERTMethod:
    """scBERT fine-tuned on the training cells, with early stopping on a ``val_frac`` of them taken
    per type (:func:`data.labels.holdout_per_class`; the test cells are never looked at). ``init``:

    - ``pretrained``: encoder from ``checkpoint``, published freezing policy (``train_all`` to train
      everything, ``head_only`` to train only the head);
    - ``random``: same architecture and the same (frozen) gene2vec vectors as ``checkpoint``, random
      encoder, every layer trained: the "no pretraining" ablation;
    - ``scratch``: no checkpoint; the model is built from ``model_args`` with gene2vec trained on the
      training cells (``gene2vec='train'``) or without gene embedding (``'none'``);
    - ``pretrain``: an encoder pretrained for this run alone, on ``pretrain_corpus`` (unlabelled
      cells on the same genes) plus the run's training cells, with ``pretrain_train`` (gene2vec
      from the same cells), then fine-tuned as ``pretrained``: no test cell is seen by pretraining.
    """

    name: str = "scbert"
    init: str = "pretrained"
    checkpoint: Checkpoint | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**RECIPE_TRAIN, progress=False))
    model_args: dict[str, Any] = field(default_factory=lambda: {"dim": 32, "depth": 2, "heads": 4, "dim_head": 8})
    gene2vec: str = "train"
    train_all: bool = RECIPE_REST["train_all"]
    dropout: float = RECIPE_REST["dropout"]  # classifier-head dropout
    head_only: bool = RECIPE_REST["head_only"]  # pretrained: train only the head on the frozen encoder
    class_weights: bool = False  # weight the loss by inverse class frequency (balanced)
    head_init: str = RECIPE_REST["head_init"]  # see model.train.finetuning.finetune
    keep_rare: int = RECIPE_REST["keep_rare"]  # types with fewer training cells give none to the stopping split
    redraw_features: bool = RECIPE_REST["redraw_features"]  # False: the pretrained FAVOR+ features are kept
    ensemble: int = RECIPE_REST["ensemble"]  # classifier heads, each on its own stopping split, logits averaged
    options: ExecutionOptions = field(default_factory=ExecutionOptions)  # precision and speed switches of the network
    val_frac: float = RECIPE_REST["val_frac"]
    device: str = "cpu"
    pretrain_corpus: sparse.csr_matrix | None = None  # init "pretrain": unlabelled cells added to the training cells
    pretrain_train: TrainConfig | None = None  # init "pretrain": the pretraining settings
    history: list[dict[str, float]] = field(default_factory=list)

    def _pretrain(self, genes: Sequence[str], X: sparse.csr_matrix) -> Checkpoint:
        """An encoder pretrained on the corpus plus the training cells ``X``."""
        from data.corpus import Corpus
        from model.nn.config import ModelSize
        from model.train.pretraining import PretrainingSettings, run_pretraining

        cells = X if self.pretrain_corpus is None else sparse.vstack([sparse.csr_matrix(self.pretrain_corpus), X], format="csr")
        settings = PretrainingSettings(size=ModelSize(**self.model_args), gene2vec=self.gene2vec, options=self.options,
                                       train=self.pretrain_train or TrainConfig(epochs=10, batch_size=16, lr=1e-3, progress=False))
        result = run_pretraining(Corpus(cells, list(genes), cells), settings, torch.device(self.device), progress=False)
        self.pretraining_ = {k: v for k, v in result.metrics.items() if k != "history"}
        return Checkpoint(config=result.model.config, genes=list(genes), state_dict=result.model.state_dict(), source=f"{self.name}: this run")

    def _build(self, n_classes: int, genes: Sequence[str], X: sparse.csr_matrix, members: int = 1) -> ScBERT:
        init = "pretrained" if self.init == "pretrain" else self.init  # (fit pretrained self.checkpoint for this run)
        if init in ("pretrained", "random"):
            if self.checkpoint is None:
                raise ValueError(f"{self.name}: init={self.init!r} needs a pretrained checkpoint")
            if list(genes) != list(self.checkpoint.genes):
                raise ValueError(f"{self.name}: the benchmark matrix is not on the checkpoint's gene vocabulary")
            if init == "pretrained":
                return new_classifier(self.checkpoint.config, n_classes, self.dropout, pretrained=self.checkpoint,
                                      train_all=self.train_all and not self.head_only, head_only=self.head_only, options=self.options,
                                      redraw_features=self.redraw_features, members=members)
            vectors = self.checkpoint.build_model().gene_vectors()
            return new_classifier(self.checkpoint.config, n_classes, self.dropout, gene_vectors=vectors, options=self.options,
                                  members=members)
        if init == "scratch":
            mode, vectors, _ = gene_embedding(self.gene2vec, None, genes, X, self.model_args["dim"], self.train.seed, progress=False)
            config = ScBERTConfig(n_genes=len(genes), gene_embedding=mode, **self.model_args)
            return new_classifier(config, n_classes, self.dropout, gene_vectors=vectors, options=self.options, members=members)
        raise ValueError(f"unknown init {self.init!r}: pretrained, random or scratch")

    def fit(self, X: sparse.csr_matrix, y: np.ndarray, genes: Sequence[str],
            val: tuple[sparse.csr_matrix, np.ndarray] | None = None) -> None:
        """Fine-tune on ``X``, ``y``; early stopping on ``val`` (cells and labels) when given (the
        novel protocol's calibration cells), else on a ``val_frac`` of the cells, per type."""
        self.classes_, codes = _classes(y)
        if val is not None:
            X_val, codes_val = val[0], np.searchsorted(np.asarray(self.classes_, dtype=object), np.asarray(val[1], dtype=object))
            X, X_all, codes_all = X, sparse.vstack([sparse.csr_matrix(X), sparse.csr_matrix(X_val)], format="csr"), np.r_[codes, codes_val]
        if self.init == "pretrain":  # pretrained on all of this run's training cells, labels unseen
            set_seed(self.train.seed)
            self.checkpoint = self._pretrain(genes, X)
        set_seed(self.train.seed)
        if val is None:
            # a type with fewer than keep_rare cells (at least 2) stays whole in the training part; no cell on both
            tr, va = stopping_split(codes, self.val_frac, self.train.seed, self.keep_rare)
        else:
            tr, va = np.arange(len(codes)), np.arange(len(codes), len(codes_all))
            X, codes = X_all, codes_all
        # as finetune.py: an ensemble's heads share a frozen pretrained encoder (other runs have one head); the first head
        # is the one-head run (its stopping cells calibrate the novelty scores), the others split the same cells their own way
        members = self.ensemble if self.head_only and self.init in ("pretrained", "pretrain") else 1
        heads = head_splits((tr, va), codes, members, self.val_frac, self.train.seed, self.keep_rare) if members > 1 else None
        self.split_ = (tr, va)
        weights = (lambda labels: balanced_class_weights(labels, len(self.classes_))) if self.class_weights else None
        if heads is not None:
            self.model, _, self.history = finetune_heads(lambda members: self._build(len(self.classes_), genes, X[tr], members), X, codes,
                                                         heads, self.train, torch.device(self.device), weights=weights, desc=self.name,
                                                         head_init=self.head_init, seed=self.train.seed)
        else:
            self.model = self._build(len(self.classes_), genes, X[tr])
            bin_num = self.model.config.bin_num
            _, self.history = finetune(self.model, CellDataset(X[tr], bin_num, codes[tr]), CellDataset(X[va], bin_num, codes[va]),
                                       self.train, torch.device(self.device), None if weights is None else weights(codes[tr]), desc=self.name,
                                       head_init=self.head_init)
        from model.train.finetuning import calibrate_novelty

        self.record_ = calibrate_novelty(self.model, X, codes, tr, va, len(self.classes_), 0.05, self.train.seed, self.train.batch_size,
                                         torch.device(self.device))
        self.query_density_ = self.record_.density

    @property
    def _options(self) -> InferenceOptions:
        return InferenceOptions(self.train.batch_size, self.device, progress=False)

    def embedding(self, X: sparse.csr_matrix) -> np.ndarray:
        """The scBERT cell embeddings (for majority voting's over-clustering)."""
        return embed_cells(self.model, CellDataset(X, self.model.config.bin_num), self._options)

    def novelty_scores(self, X: sparse.csr_matrix) -> dict[str, np.ndarray]:
        out = predict_outputs(self.model, CellDataset(X, self.model.config.bin_num), self._options, embed=True, features=True)
        return output_scores(out, self.record_, expression=X)

    def predict_proba(self, X: sparse.csr_matrix) -> np.ndarray:
        probs, _ = predict(self.model, CellDataset(X, self.model.config.bin_num), self._options)
        return probs


BASELINES = ("logreg_l1", "logreg_l2", "knn_pca", "centroid_corr", "celltypist")
ADJUSTED_BASELINES = ("logreg_l1_la", "logreg_l2_la")  # with post-hoc logit adjustment (LogitAdjusted)
BINNED_BASELINES = ("logreg_l1_bins", "logreg_l1_la_bins", "logreg_l2_bins", "logreg_l2_la_bins")  # on scBERT's bins (BinnedInput)
SCBERT_METHODS = ("scbert", "scbert_nopretrain", "scbert_nogene2vec")
ALL_METHODS = BASELINES + ADJUSTED_BASELINES + BINNED_BASELINES + SCBERT_METHODS

_PUB_TRAIN, _PUB_REST = finetune_parts("published")
PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: what the bundled data is benchmarked with (model size from the checkpoint or model_args);
    # fine-tuning: finetune.py's default recipe (model.train.recipes), nothing changed
    "cpu": {"train": dict(RECIPE_TRAIN), "model": {"dim": 32, "depth": 2, "heads": 4, "dim_head": 8}, **RECIPE_REST},
    # the benchmark's fine-tuning of 3 December (RESULTS.md "Current" before 7 December): for the ablation
    "dec3": {"train": {"epochs": 10, "batch_size": 16, "lr": 1e-4, "patience": 4, "weight_decay": 0.05},
             "model": {"dim": 32, "depth": 2, "heads": 4, "dim_head": 8}, "dropout": 0.3, "head_init": "expression",
             "keep_rare": 0, "redraw_features": True, "val_frac": 0.1, "head_only": False, "train_all": False,
             "ensemble": 1},
    # the published fine-tuning (batch 3 x 60 accumulation, lr 1e-4) and model size
    "published": {"train": dict(_PUB_TRAIN), "model": {"dim": 200, "depth": 6, "heads": 10, "dim_head": 64}, **_PUB_REST},
}


def method_factories(
    names: Sequence[str],
    pretrained: Checkpoint | None = None,
    pretrained_nogene2vec: Checkpoint | None = None,
    preset: str = "cpu",
    train_overrides: dict[str, Any] | None = None,
    train_all: bool | None = None,
    device: str = "cpu",
    progress: bool = False,
    head_only: bool | None = None,
    head_init: str | None = None,
    dropout: float | None = None,
    keep_rare: int | None = None,
    redraw_features: bool | None = None,
    class_weights: bool = False,
    pretrain_per_split: bool = False,
    pretrain_corpus: sparse.csr_matrix | None = None,
    pretrain_train: dict[str, Any] | None = None,
) -> list[tuple[str, Any]]:
    """``(name, factory(seed) -> method)`` for each method name. scBERT variants:

    - ``scbert``: fine-tunes ``pretrained``; with ``pretrain_per_split``, an encoder pretrained for
      each run on ``pretrain_corpus`` plus the run's training cells (``pretrain_train``: TrainConfig
      fields; model size from the preset), so no test cell is ever seen by pretraining or gene2vec;
    - ``scbert_nopretrain``: the same architecture and gene2vec as ``pretrained`` with a random
      encoder (without ``pretrained``: a ``preset``-sized model with gene2vec trained on the training cells);
    - ``scbert_nogene2vec``: fine-tunes ``pretrained_nogene2vec`` (a checkpoint pretrained with
      ``--gene2vec none``; with ``pretrain_per_split``: pretrained per run without gene embedding);
      without it, a ``preset``-sized model without gene embedding, not pretrained.
    """
    unknown = sorted(set(names) - set(ALL_METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(ALL_METHODS)}")
    cfg = PRESETS[preset]
    dropout = cfg.get("dropout", 0.0) if dropout is None else dropout
    head_init = cfg["head_init"] if head_init is None else head_init
    train_all = cfg["train_all"] if train_all is None else train_all
    head_only = cfg["head_only"] if head_only is None else head_only
    keep_rare = cfg["keep_rare"] if keep_rare is None else keep_rare
    redraw_features = cfg["redraw_features"] if redraw_features is None else redraw_features
    train_kw = {**cfg["train"], **{k: v for k, v in (train_overrides or {}).items() if v is not None}}

    pre_kw = {"epochs": 10, "batch_size": 16, "lr": 1e-3, **(pretrain_train or {})}

    def scbert(name: str, init: str, ckpt: Checkpoint | None, gene2vec: str = "train") -> Any:
        # head_only applies to pretrained encoders: an encoder without pretraining is always trained whole
        return lambda seed: ScBERTMethod(name=name, init=init, checkpoint=ckpt, gene2vec=gene2vec, train_all=train_all, device=device,
                                         head_only=head_only and init in ("pretrained", "pretrain"), head_init=head_init, dropout=dropout,
                                         keep_rare=keep_rare, redraw_features=redraw_features, val_frac=cfg["val_frac"],
                                         class_weights=class_weights, model_args=dict(cfg["model"]), train=TrainConfig(seed=seed, progress=progress, **train_kw),
                                         pretrain_corpus=pretrain_corpus if init == "pretrain" else None,
                                         pretrain_train=TrainConfig(seed=seed, progress=progress, **pre_kw) if init == "pretrain" else None)

    out: list[tuple[str, Any]] = []
    for name in names:
        if name == "logreg_l1":
            out.append((name, lambda seed: LogisticL1(seed=seed)))
        elif name == "logreg_l2":
            out.append((name, lambda seed: LogisticL2(seed=seed)))
        elif name == "logreg_l1_la":
            out.append((name, lambda seed: LogitAdjusted(LogisticL1(seed=seed), "logreg_l1_la")))
        elif name == "logreg_l2_la":
            out.append((name, lambda seed: LogitAdjusted(LogisticL2(seed=seed), "logreg_l2_la")))
        elif name in BINNED_BASELINES:
            base = {"logreg_l1": LogisticL1, "logreg_l2": LogisticL2}[name[:9]]
            adjusted = "_la_" in name
            out.append((name, lambda seed, base=base, adjusted=adjusted, name=name: BinnedInput(
                LogitAdjusted(base(seed=seed), name) if adjusted else base(seed=seed), name)))
        elif name == "knn_pca":
            out.append((name, lambda seed: KNNReference(seed=seed)))
        elif name == "centroid_corr":
            out.append((name, lambda seed: CentroidCorrelation()))
        elif name == "celltypist":
            out.append((name, lambda seed: CellTypist(seed=seed)))
        elif name == "scbert":
            if pretrain_per_split:
                out.append((name, scbert(name, "pretrain", None)))
            elif pretrained is None:
                raise ValueError("method scbert needs a pretrained checkpoint (--pretrained) or --pretrain-per-split; "
                                 "scbert_nopretrain runs without one")
            else:
                out.append((name, scbert(name, "pretrained", pretrained)))
        elif name == "scbert_nopretrain":
            out.append((name, scbert(name, "random", pretrained) if pretrained is not None else scbert(name, "scratch", None)))
        elif name == "scbert_nogene2vec":
            if pretrain_per_split:
                out.append((name, scbert(name, "pretrain", None, gene2vec="none")))
            elif pretrained_nogene2vec is not None:
                out.append((name, scbert(name, "pretrained", pretrained_nogene2vec)))
            else:
                out.append((name, scbert(name, "scratch", None, gene2vec="none")))
    return out
