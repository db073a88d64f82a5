"""Majority voting: over-clusters of the cells, and the hard, soft and cautious votes within them."""

from __future__ import annotations

import numpy as np

from model.majority_voting import cautious_vote, expression_pcs, majority_vote, over_cluster, over_clustering_resolution, soft_vote


def test_majority_voting_on_a_toy_clustering() -> None:
    labels = ["T", "T", "B", "T", "B", "B", "NK"]
    clusters = [0, 0, 0, 0, 1, 1, 1]
    assert majority_vote(labels, clusters).tolist() == ["T", "T", "T", "T", "B", "B", "B"]
    assert over_clustering_resolution(3000) == 5 and over_clustering_resolution(50_000) == 20 and over_clustering_resolution(10**6) == 30


def test_soft_voting_blends_each_cell_with_its_cluster_mean() -> None:
    probs = np.array([[0.9, 0.1], [0.48, 0.52], [0.2, 0.8], [0.6, 0.4]])
    clusters = ["a", "a", "a", "b"]
    mean_a = probs[:3].mean(0)
    want = np.vstack([0.5 * probs[:3] + 0.5 * mean_a, probs[3:]])
    np.testing.assert_allclose(soft_vote(probs, clusters), want)
    # the unsure cell 1 follows cluster a's mean (class 0); the confident cells 0 and 2 keep their classes
    assert soft_vote(probs, clusters).argmax(1).tolist() == [0, 0, 1, 0]
    np.testing.assert_allclose(soft_vote(probs, clusters, weight=1.0)[:3], np.tile(mean_a, (3, 1)))


def test_over_clustering_keeps_torch_threads() -> None:
    """scanpy's kNN graph resets OpenMP's thread count; over_cluster puts torch's back (a benchmark
    run with --threads 1 ran its later folds on every core, oversubscribing the CPU)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pcs = expression_pcs(np.log1p(np.random.default_rng(0).poisson(0.5, (300, 200)).astype(np.float32)), n_pcs=10)
        over_cluster(pcs, resolution=1.0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_expression_over_clusters_follow_the_types() -> None:
    rng = np.random.default_rng(0)
    lam = np.ones((3, 30))
    for t in range(3):
        lam[t, 10 * t: 10 * t + 10] = 8.0
    X = np.log1p(np.vstack([rng.poisson(lam[t], size=(40, 30)) for t in range(3)]).astype(np.float32))
    pcs = expression_pcs(X, n_pcs=10)
    assert pcs.shape == (120, 10)
    np.testing.assert_allclose(pcs, expression_pcs(X, n_pcs=10))  # seeded
    clusters = over_cluster(pcs, resolution=1.0)
    truth = np.repeat(["x", "y", "z"], 40)
    # every over-cluster holds one type
    assert all(len(set(truth[clusters == c])) == 1 for c in set(clusters))


def test_cautious_voting_changes_only_unsure_cells_of_nearly_unanimous_clusters() -> None:
    probs = np.array([[0.9, 0.1, 0.0], [0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.85, 0.1, 0.05], [0.3, 0.45, 0.25],  # a: 4 of 5 say 0
                      [0.3, 0.4, 0.3], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.4, 0.6, 0.0]])  # b: 3 of 5 say 1
    clusters = np.array(["a"] * 5 + ["b"] * 5)
    out = cautious_vote(probs, clusters)
    # a's unsure dissenter (0.45) follows its cluster; b is too mixed for anything to change
    np.testing.assert_array_equal(out, [0, 0, 0, 0, 0, 1, 0, 1, 1, 1])
    np.testing.assert_array_equal(cautious_vote(probs, clusters, unsure=0.4), probs.argmax(1))  # 0.45 is sure enough
    # b at a 60% majority: its unsure cell (row 5, already 1) stays, its sure dissenter (row 6, 0.6) too
    np.testing.assert_array_equal(cautious_vote(probs, clusters, majority=0.6), out)
    np.testing.assert_array_equal(cautious_vote(probs, clusters, unsure=0.65, majority=0.6)[6], 1)

