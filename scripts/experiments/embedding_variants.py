"""Which cell embedding separates cell types: a fine-tuned model's embeddings (the classifier's
penultimate features, ``head``; the final encodings averaged over all genes, ``mean``, or over
expressed genes, ``expressed``) against a PCA of the scaled expression, by the silhouette of the
known labels and by kNN label transfer (k = 15) from the model's training file to each query.

    python -m scripts.experiments.embedding_variants --model demo_out/finetune --train demo_out/pbmc_train.h5ad \\
        --data demo_out/pbmc_query.h5ad $M/pbmc4k_2170.h5ad:data/label_maps/pbmc3k_pbmc4k.tsv

A query may carry a label map after a colon (both sides renamed, ``-`` left out), for another lab's
type names. The expression PCA (50 components) is fitted on the training file's cells and the
queries projected into it, as the embeddings are.
"""

from __future__ import annotations

import argparse

import anndata as ad
import numpy as np
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score
from sklearn.neighbors import KNeighborsClassifier

from data.dataset import CellDataset
from data.labels import read_label_map
from model.checkpoint import load_checkpoint
from model.inference import InferenceOptions, predict_outputs
from model.novelty.expression import dense_rows, standardise

EMBEDDINGS = ("head", "mean", "expressed")


def representations(ckpt, net, path: str, label_key: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Known labels, the model's input matrix (dense) and every embedding of the cells of ``path``."""
    adata = ad.read_h5ad(path)
    prepared, _ = ckpt.prepare(adata, what=path)
    ds = CellDataset(prepared.X, ckpt.config.bin_num)
    opts = InferenceOptions(64, "cpu", progress=False)
    out = {}
    for pooling in ("mean", "expressed"):
        o = predict_outputs(net, ds, opts, embed=True, features=True, pooling=pooling)
        out[pooling], out["head"] = o["embedding"], o["features"]
    return adata.obs[label_key].astype(str).to_numpy(), dense_rows(prepared.X, np.arange(prepared.X.shape[0])), out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="fine-tuned checkpoint (or its run folder)")
    p.add_argument("--train", required=True, help="the model's training file (raw or log-normalised .h5ad with the labels)")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE[:MAP]", help="labelled query .h5ad file(s)")
    p.add_argument("--label-key", default="celltype")
    args = p.parse_args(argv)
    model = f"{args.model}/model.pt" if not args.model.endswith(".pt") else args.model
    ckpt = load_checkpoint(model)
    net = ckpt.build_model()
    y_train, X_train, train = representations(ckpt, net, args.train, args.label_key)
    mean, sd = X_train.mean(0), X_train.std(0) + 1e-8
    pca = PCA(50, random_state=0).fit(standardise(X_train, mean, sd))
    train["expression_pca"] = pca.transform(standardise(X_train, mean, sd))
    for spec in args.data:
        path, _, map_file = spec.partition(":")
        y, X, query = representations(ckpt, net, path, args.label_key)
        query["expression_pca"] = pca.transform(standardise(X, mean, sd))
        names = read_label_map(map_file) if map_file else {}
        y_tr = np.array([names.get(v, v) for v in y_train])
        y_q = np.array([names.get(v, v) for v in y])
        scored = (y_q != "-") & np.isin(y_q, y_tr)
        kept = y_tr != "-"
        print(f"\n{path}: {int(scored.sum())} cells of types the model knows")
        print("| embedding | silhouette of the known labels | kNN transfer accuracy |\n|---|---|---|")
        for name in (*EMBEDDINGS, "expression_pca"):
            knn = KNeighborsClassifier(15).fit(train[name][kept], y_tr[kept])
            sil = silhouette_score(query[name][scored], y_q[scored])
            print(f"| {name} | {sil:+.3f} | {(knn.predict(query[name][scored]) == y_q[scored]).mean():.4f} |", flush=True)


if __name__ == "__main__":
    main()
