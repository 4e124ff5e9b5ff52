"""Metrics on hand-made cases, against hand arithmetic, brute force and sklearn."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

from jdcl_ray.metrics import (
    cluster_metrics,
    cluster_size_report,
    head_medium_tail_sizes,
    knn_accuracy,
    knn_modularity,
    match_clusters,
    ood_auroc,
    selection_score,
)


def agreement(labels: np.ndarray, clusters: np.ndarray, mapping: np.ndarray) -> int:
    return int(np.sum(mapping[clusters] == labels))


# --- matching and clustering metrics ---------------------------------------------------------


def test_permuted_perfect_clustering_scores_one() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 0, 1, 2])
    relabel = np.array([2, 0, 1])  # class c -> cluster relabel[c]
    clusters = relabel[labels]
    np.testing.assert_array_equal(match_clusters(labels, clusters), [1, 2, 0])
    metrics = cluster_metrics(labels, clusters)
    for key in ("acc", "caa", "macro_f1", "nmi", "ari", "head_acc", "medium_acc", "tail_acc"):
        assert metrics[key] == pytest.approx(1.0), key


def test_imbalanced_case_acc_and_caa_differ() -> None:
    # 6 head, 3 medium, 1 tail sample. Cluster 1 takes all of class 0, one of class 1 and the
    # tail sample; cluster 2 takes the other two of class 1; cluster 0 is empty.
    labels = np.array([0] * 6 + [1] * 3 + [2])
    clusters = np.array([1] * 6 + [2, 2, 1] + [1])
    # Contingency (rows clusters 0..2, columns classes 0..2): [0,0,0], [6,1,1], [0,2,0].
    # Best one-to-one: 1->0 (6) + 2->1 (2) + 0->2 (0) = 8; every other pairing scores less.
    np.testing.assert_array_equal(match_clusters(labels, clusters, 3), [2, 0, 1])
    metrics = cluster_metrics(labels, clusters, num_clusters=3)
    assert metrics["acc"] == pytest.approx(8 / 10)
    # Recalls: class 0 6/6, class 1 2/3, class 2 0/1 -> CAA = (1 + 2/3 + 0) / 3 = 5/9.
    assert metrics["caa"] == pytest.approx(5 / 9)
    # Predictions: class 0 -> 0 (6), class 1 -> 1, 1, 0, class 2 -> 0.
    # F1 class 0: P = 6/8, R = 1 -> 2·0.75/1.75 = 6/7; class 1: P = 2/2, R = 2/3 -> 4/5;
    # class 2: 0. Macro = (6/7 + 4/5 + 0) / 3 = (30/35 + 28/35) / 3 = 58/105.
    assert metrics["macro_f1"] == pytest.approx(58 / 105)
    # 3 classes split 1/1/1 in frequency order 0, 1, 2.
    assert metrics["head_acc"] == pytest.approx(1.0)
    assert metrics["medium_acc"] == pytest.approx(2 / 3)
    assert metrics["tail_acc"] == pytest.approx(0.0)
    assert metrics["nmi"] == pytest.approx(normalized_mutual_info_score(labels, clusters))
    assert metrics["ari"] == pytest.approx(adjusted_rand_score(labels, clusters))


def test_more_clusters_than_classes() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    clusters = np.array([0, 0, 1, 2, 2])
    # Contingency: cluster 0 [2,0], cluster 1 [1,0], cluster 2 [0,2]; cluster 1 and the empty
    # cluster 3 stay unmatched, so their samples are errors: ACC = 4/5.
    np.testing.assert_array_equal(match_clusters(labels, clusters, 4), [0, -1, 1, -1])
    metrics = cluster_metrics(labels, clusters, num_clusters=4)
    assert metrics["acc"] == pytest.approx(4 / 5)
    assert metrics["caa"] == pytest.approx((2 / 3 + 1) / 2)


def test_fewer_clusters_than_classes() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2, 2])
    clusters = np.array([0, 0, 0, 0, 0, 1, 1])
    # Cluster 0 holds [3,2,0], cluster 1 [0,0,2] -> 0->0, 1->2; class 1 gets no cluster.
    np.testing.assert_array_equal(match_clusters(labels, clusters), [0, 2])
    metrics = cluster_metrics(labels, clusters)
    assert metrics["acc"] == pytest.approx(5 / 7)
    assert metrics["caa"] == pytest.approx((1 + 0 + 1) / 3)


@pytest.mark.parametrize(("num_classes", "num_clusters"), [(4, 4), (5, 3), (3, 5)])
def test_matching_is_optimal_against_brute_force(num_classes: int, num_clusters: int) -> None:
    rng = np.random.default_rng(num_classes * 10 + num_clusters)
    labels = rng.integers(0, num_classes, 60)
    clusters = (labels + rng.integers(0, 2, 60)) % num_clusters  # correlated, not trivial
    best = 0
    for classes in itertools.permutations(range(num_classes), min(num_classes, num_clusters)):
        for chosen in itertools.permutations(range(num_clusters), len(classes)):
            mapping = np.full(num_clusters, -1)
            mapping[list(chosen)] = classes
            best = max(best, agreement(labels, clusters, mapping))
    mapping = match_clusters(labels, clusters)
    assert agreement(labels, clusters, mapping) == best
    matched = mapping[mapping >= 0]
    assert len(set(matched.tolist())) == len(matched) == min(num_classes, num_clusters)


def long_tailed_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """10 classes in the frequency order `order`, with 40, 36, ..., 4 samples by rank.

    Ranks 0-2 (head) are clustered perfectly; ranks 3-6 (medium) keep 3/4 of their samples
    (21/28, 18/24, 15/20, 12/16); ranks 7-9 (tail) lose one sample each (11/12, 7/8, 3/4).
    Each class c has its own cluster c; the lost samples share cluster 10, where no class has as
    many samples as in its own cluster, so matching is the identity and cluster 10 is unmatched.
    """
    order = np.array([3, 7, 0, 9, 1, 5, 2, 8, 4, 6])
    sizes = [40, 36, 32, 28, 24, 20, 16, 12, 8, 4]
    kept = [40, 36, 32, 21, 18, 15, 12, 11, 7, 3]
    labels, clusters = [], []
    for cls, size, keep in zip(order, sizes, kept, strict=True):
        labels += [cls] * size
        clusters += [cls] * keep + [10] * (size - keep)
    return np.array(labels), np.array(clusters), order


def test_head_medium_tail_with_derived_order() -> None:
    labels, clusters, _ = long_tailed_case()
    metrics = cluster_metrics(labels, clusters)
    assert metrics["head_acc"] == pytest.approx(1.0)
    assert metrics["medium_acc"] == pytest.approx(0.75)
    # (11/12 + 7/8 + 3/4) / 3 = (22/24 + 21/24 + 18/24) / 3 = 61/72
    assert metrics["tail_acc"] == pytest.approx(61 / 72)
    # CAA: (3·1 + 4·0.75 + 61/24) / 10 = (6 + 61/24) / 10 = 205/240
    assert metrics["caa"] == pytest.approx(205 / 240)


def test_head_medium_tail_with_given_order() -> None:
    labels, clusters, order = long_tailed_case()
    metrics = cluster_metrics(labels, clusters, class_order=order[::-1])
    assert metrics["head_acc"] == pytest.approx(61 / 72)
    assert metrics["medium_acc"] == pytest.approx(0.75)
    assert metrics["tail_acc"] == pytest.approx(1.0)


def test_balanced_split_uses_given_order_and_breaks_ties_by_id() -> None:
    # Balanced evaluation split, 4 samples per class: classes 0-2 all in their own cluster,
    # classes 3-9 with 3 in their own cluster and 1 in the shared cluster 10 (recall 3/4;
    # cluster 10 holds 1 < 3 of any class, so matching stays the identity).
    labels = np.repeat(np.arange(10), 4)
    keep = np.array([4, 4, 4, 3, 3, 3, 3, 3, 3, 3])
    clusters = np.concatenate([[c] * k + [10] * (4 - k) for c, k in enumerate(keep)])
    derived = cluster_metrics(labels, clusters)
    assert derived["head_acc"] == pytest.approx(1.0)  # ties -> ids 0, 1, 2 are the head
    assert derived["tail_acc"] == pytest.approx(0.75)
    train_order = np.arange(10)[::-1]  # the long-tailed train set had class 9 most frequent
    given = cluster_metrics(labels, clusters, class_order=train_order)
    assert given["head_acc"] == pytest.approx(0.75)
    assert given["tail_acc"] == pytest.approx(1.0)
    assert given["caa"] == derived["caa"]


@pytest.mark.parametrize(
    ("num_classes", "sizes"),
    [
        (1, (1, 0, 0)),
        (2, (1, 0, 1)),
        (3, (1, 1, 1)),
        (4, (1, 2, 1)),
        (5, (1, 3, 1)),  # 1.5 rounds down: the tie goes to medium
        (6, (2, 2, 2)),  # 1.8 rounds up
        (10, (3, 4, 3)),
        (20, (6, 8, 6)),
        (100, (30, 40, 30)),
    ],
)
def test_head_medium_tail_sizes(num_classes: int, sizes: tuple[int, int, int]) -> None:
    assert head_medium_tail_sizes(num_classes) == sizes


def test_class_order_must_cover_labels() -> None:
    with pytest.raises(ValueError, match=r"lacks classes \[2\]"):
        cluster_metrics([0, 1, 2], [0, 1, 2], class_order=[1, 0])
    with pytest.raises(ValueError, match="repeats"):
        cluster_metrics([0, 1, 2], [0, 1, 2], class_order=[1, 0, 2, 1])


def test_class_order_may_name_classes_absent_from_the_split() -> None:
    # Class 3 has no samples here: it is skipped in group means instead of scoring 0.
    metrics = cluster_metrics([0, 1, 2, 2], [0, 1, 2, 1], class_order=[3, 0, 1, 2])
    # Groups of 4 classes: head [3] (no samples -> NaN), medium [0, 1], tail [2] with recall 1/2.
    assert np.isnan(metrics["head_acc"])
    assert metrics["medium_acc"] == pytest.approx(1.0)
    assert metrics["tail_acc"] == pytest.approx(0.5)
    assert metrics["caa"] == pytest.approx((1 + 1 + 0.5) / 3)


def test_cluster_size_report_by_hand() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 2])  # true sizes 4, 2, 1
    clusters = np.array([0, 0, 0, 1, 1, 1, 1])  # predicted 3, 4 and two empty clusters
    report = cluster_size_report(labels, clusters, num_clusters=4)
    assert report["true_sizes"] == [4, 2, 1]
    assert report["predicted_sizes"] == [4, 3, 0, 0]
    # |4-4| + |3-2| + |0-1| + |0-0| = 2 -> 0.5 · 2 / 7
    assert report["size_l1"] == pytest.approx(1 / 7)


def test_torch_input_matches_numpy() -> None:
    labels, clusters, _ = long_tailed_case()
    as_numpy = cluster_metrics(labels, clusters)
    as_torch = cluster_metrics(torch.from_numpy(labels), torch.from_numpy(clusters))
    assert as_torch == as_numpy


# --- kNN --------------------------------------------------------------------------------------


def blobs(n_per_class: int, num_classes: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    centers = np.eye(16)[:num_classes] * 5
    labels = np.repeat(np.arange(num_classes), n_per_class)
    return centers[labels] + noise * rng.normal(size=(len(labels), 16)), labels


def naive_knn_accuracy(train, train_labels, test, test_labels, k, temperature) -> float:
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    correct = 0
    for x, y in zip(test, test_labels, strict=True):
        sims = train @ x
        votes: dict[int, float] = {}
        for j in np.argsort(-sims)[:k]:
            votes[train_labels[j]] = votes.get(train_labels[j], 0.0) + np.exp(sims[j] / temperature)
        correct += max(votes, key=votes.get) == y
    return correct / len(test)


def test_knn_separable_blobs_score_one() -> None:
    train, train_labels = blobs(20, 3, 0.5, seed=0)
    test, test_labels = blobs(10, 3, 0.5, seed=1)
    assert knn_accuracy(train, train_labels, test, test_labels, k=5) == 1.0


def test_knn_random_labels_score_chance() -> None:
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(2000, 16)), rng.normal(size=(1000, 16))
    train_labels, test_labels = rng.integers(0, 4, 2000), rng.integers(0, 4, 1000)
    assert knn_accuracy(train, train_labels, test, test_labels) == pytest.approx(0.25, abs=0.05)


@pytest.mark.parametrize("batch_size", [1, 7, 1024])
def test_knn_matches_naive_loop(batch_size: int) -> None:
    train, train_labels = blobs(30, 4, 4.0, seed=2)  # overlapping: accuracy well below 1
    test, test_labels = blobs(15, 4, 4.0, seed=3)
    expected = naive_knn_accuracy(train, train_labels, test, test_labels, k=7, temperature=0.1)
    assert 0.3 < expected < 0.95
    got = knn_accuracy(
        torch.from_numpy(train),
        torch.from_numpy(train_labels),
        test,
        test_labels,
        k=7,
        temperature=0.1,
        batch_size=batch_size,
    )
    assert got == pytest.approx(expected)


def test_knn_exclude_self_changes_the_answer() -> None:
    # Unit vectors 10° apart with alternating labels: each point's nearest other points carry
    # the other label, so with itself excluded 1-NN is always wrong, with itself always right.
    angles = np.deg2rad(np.arange(8) * 10)
    features = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    labels = np.arange(8) % 2
    assert knn_accuracy(features, labels, features, labels, k=1) == 1.0
    assert knn_accuracy(features, labels, features, labels, k=1, exclude_self=True) == 0.0
    assert (
        knn_accuracy(features, labels, features, labels, k=1, batch_size=3, exclude_self=True)
        == 0.0
    )


def test_knn_low_temperature_stays_finite_and_tends_to_1nn() -> None:
    # exp(1 / 0.001) overflows float64; the vote must still be the nearest neighbour's label.
    train, train_labels = blobs(30, 4, 4.0, seed=2)
    test, test_labels = blobs(15, 4, 4.0, seed=3)
    with np.errstate(over="raise", invalid="raise"):
        cold = knn_accuracy(train, train_labels, test, test_labels, k=7, temperature=1e-3)
    assert cold == knn_accuracy(train, train_labels, test, test_labels, k=1)


def test_knn_clamps_k_to_the_train_set() -> None:
    train, train_labels = blobs(5, 2, 3.0, seed=4)
    test, test_labels = blobs(5, 2, 3.0, seed=5)
    assert knn_accuracy(train, train_labels, test, test_labels, k=100) == knn_accuracy(
        train, train_labels, test, test_labels, k=10
    )


# --- OOD and selection ------------------------------------------------------------------------


def naive_auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(out > in) + P(out = in) / 2 over all pairs (Mann-Whitney)."""
    pairs = outside[:, None] - inside[None, :]
    return float(np.mean(pairs > 0) + 0.5 * np.mean(pairs == 0))


def test_ood_auroc_limits_and_naive() -> None:
    inside, outside = np.array([0.0, 1.0, 2.0]), np.array([3.0, 4.0])
    assert ood_auroc(inside, outside) == 1.0
    assert ood_auroc(outside, inside) == 0.0
    assert ood_auroc([1.0, 1.0], [1.0, 1.0]) == 0.5
    rng = np.random.default_rng(0)
    inside, outside = rng.integers(0, 5, 40).astype(float), rng.integers(1, 6, 30).astype(float)
    assert ood_auroc(torch.from_numpy(inside), outside) == pytest.approx(
        naive_auroc(inside, outside)
    )


def test_selection_score_prefers_separated_clusters() -> None:
    features, labels = blobs(30, 3, 0.5, seed=0)
    random_clusters = np.random.default_rng(0).integers(0, 3, len(labels))
    good, bad = selection_score(features, labels), selection_score(features, random_clusters)
    assert good > 0.5 > bad
    assert good == pytest.approx(silhouette_score(features, labels, metric="cosine"), rel=1e-6)


def test_selection_score_subsample_is_seeded_and_collapse_is_worst() -> None:
    features, labels = blobs(100, 3, 2.0, seed=1)
    first = selection_score(features, labels, sample_size=50, seed=3)
    assert first == selection_score(features, labels, sample_size=50, seed=3)
    assert first != selection_score(features, labels, sample_size=50, seed=4)
    assert selection_score(features, np.zeros(len(labels), dtype=int)) == -1.0


def unequal_blobs(sizes: tuple[int, ...], noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.eye(16)[labels] * 5 + noise * rng.normal(size=(len(labels), 16)), labels


def naive_knn_modularity(features: np.ndarray, clusters: np.ndarray, neighbours: int) -> float:
    """Newman & Girvan's Q = 1/2m Σ_ab [A_ab − d_a d_b / 2m] δ(c_a, c_b), written out densely."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    adjacency = np.zeros_like(similarity)
    for a, row in enumerate(similarity):
        adjacency[a, np.argsort(-row, kind="stable")[:neighbours]] = 1
    adjacency = np.maximum(adjacency, adjacency.T)
    degree, twice_edges = adjacency.sum(1), adjacency.sum()
    same = clusters[:, None] == clusters[None, :]
    return float(((adjacency - np.outer(degree, degree) / twice_edges) * same).sum() / twice_edges)


@pytest.mark.parametrize("neighbours", [1, 5, 10])
def test_knn_modularity_matches_the_dense_formula(neighbours: int) -> None:
    features, labels = unequal_blobs((40, 25, 10), 1.5, seed=2)
    clusters = np.where(np.random.default_rng(0).random(len(labels)) < 0.2, 0, labels)
    assert knn_modularity(features, clusters, neighbours) == pytest.approx(
        naive_knn_modularity(features, clusters, neighbours), abs=1e-9
    )


def test_knn_modularity_peaks_at_the_true_number_of_clusters() -> None:
    """Long-tailed blobs (5 groups, 200 to 15 points): k-means for K = 2..10, scored without
    labels, is best at K = 5; fewer clusters (merged groups) and more (split groups) score lower."""
    from sklearn.cluster import KMeans

    for seed in range(3):
        features, _ = unequal_blobs((200, 120, 60, 30, 15), 1.0, seed)
        scores = {
            k: knn_modularity(
                features, KMeans(k, n_init=10, random_state=seed).fit_predict(features)
            )
            for k in range(2, 11)
        }
        assert max(scores, key=scores.get) == 5, scores
        assert scores[5] > scores[3] + 0.02 and scores[5] > scores[8] + 0.02, scores


def test_knn_modularity_of_one_cluster_and_of_random_labels_is_zero() -> None:
    features, labels = unequal_blobs((60, 40, 20), 1.0, seed=0)
    truth = knn_modularity(features, labels)
    assert truth > 0.5
    assert knn_modularity(features, np.zeros(len(labels), dtype=int)) == pytest.approx(0.0)
    for k in (3, 10):
        shuffled = np.random.default_rng(k).integers(0, k, len(labels))
        assert abs(knn_modularity(features, shuffled)) < 0.05
    # Splitting every true group in two at random cuts its neighbour edges: much worse.
    halves = labels * 2 + np.random.default_rng(1).integers(0, 2, len(labels))
    assert knn_modularity(features, halves) < truth - 0.2


def test_knn_modularity_subsample_is_seeded() -> None:
    features, labels = unequal_blobs((300, 200, 100), 3.0, seed=4)
    first = knn_modularity(features, labels, sample_size=200, seed=3)
    assert first == knn_modularity(features, labels, sample_size=200, seed=3)
    assert first != knn_modularity(features, labels, sample_size=200, seed=4)
    assert knn_modularity(torch.from_numpy(features), torch.from_numpy(labels)) == pytest.approx(
        knn_modularity(features, labels)
    )


# --- input checks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: match_clusters([0, 1, 1], [0, 1]),
        lambda: cluster_metrics([0, 1, 1], [0, 1]),
        lambda: cluster_size_report([0, 1, 1], [0, 1], 2),
        lambda: knn_accuracy(np.ones((3, 2)), [0, 1], np.ones((2, 2)), [0, 1]),
        lambda: selection_score(np.ones((3, 2)), [0, 1]),
        lambda: knn_modularity(np.ones((3, 2)), [0, 1]),
    ],
)
def test_mismatched_lengths_name_both(call) -> None:
    with pytest.raises(ValueError, match=r"has 3.*has 2"):
        call()


def test_bad_ids_are_rejected() -> None:
    with pytest.raises(ValueError, match="integer ids"):
        cluster_metrics([0.0, 1.0], [0, 1])
    with pytest.raises(ValueError, match="non-negative"):
        match_clusters([0, -1], [0, 1])
    with pytest.raises(ValueError, match="num_clusters is 2"):
        match_clusters([0, 1, 2], [0, 1, 2], num_clusters=2)
