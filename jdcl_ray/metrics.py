"""Evaluation metrics for clustering long-tailed image sets.

Accuracy after Hungarian matching hides the tail: on a 100:1 set, a clustering that merges every
tail class into a head cluster still scores a high ACC. The imbalance-aware numbers here
(class-averaged accuracy, macro-F1, head/medium/tail recall, the cluster-size histogram) make that
visible; `knn_accuracy` rates the representation without any matching, `ood_auroc` rates the
statistics-pooling OOD score, `selection_score` lets Tune choose trials without labels, and
`knn_modularity` lets it choose the number of clusters without labels.

Every function accepts NumPy arrays or torch tensors (on any device) and returns plain Python values.
Plain NumPy / SciPy / scikit-learn on purpose: metrics run on the driver, outside the training loop.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import numpy.typing as npt
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import (
    adjusted_rand_score,
    f1_score,
    normalized_mutual_info_score,
    recall_score,
    roc_auc_score,
    silhouette_score,
)
from sklearn.neighbors import NearestNeighbors

if TYPE_CHECKING:
    import torch

# torch is not imported here: the search-space parser reads CLUSTER_METRIC_KEYS without it.
Array: TypeAlias = "npt.ArrayLike | torch.Tensor"
# The keys `cluster_metrics` returns.
CLUSTER_METRIC_KEYS = ("acc", "caa", "macro_f1", "nmi", "ari", "head_acc", "medium_acc", "tail_acc")


def _to_numpy(x: Array) -> np.ndarray:
    """Tensors may sit on a GPU, carry gradients or be half precision; metrics need only values."""
    torch = sys.modules.get("torch")  # a tensor means torch is already imported
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _ids(x: Array, name: str) -> np.ndarray:
    """Class and cluster ids index count matrices, so they must be non-negative integers."""
    ids = _to_numpy(x)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"{name} must be a 1-D array of integer ids, got shape {ids.shape} dtype {ids.dtype}"
        )
    if ids.size and ids.min() < 0:
        raise ValueError(f"{name} must hold non-negative ids, got {ids.min()}")
    return ids.astype(np.int64, copy=False)


def _features(x: Array, name: str) -> np.ndarray:
    features = _to_numpy(x)
    if features.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (samples × dims), got shape {features.shape}")
    return features


def _scores(x: Array, name: str) -> np.ndarray:
    scores = _to_numpy(x)
    if scores.ndim != 1 or not scores.size:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {scores.shape}")
    return scores


def _check_lengths(**arrays: np.ndarray) -> None:
    """Paired inputs of different lengths mean a mix-up upstream; fail rather than truncate."""
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{name} has {length}" for name, length in lengths.items())
        raise ValueError(f"inputs must be the same length: {described} entries")
    if 0 in lengths.values():
        raise ValueError(f"inputs are empty: {', '.join(lengths)}")


def _labels_and_clusters(
    labels: Array, clusters: Array, num_clusters: int | None
) -> tuple[np.ndarray, np.ndarray, int]:
    labels, clusters = _ids(labels, "labels"), _ids(clusters, "clusters")
    _check_lengths(labels=labels, clusters=clusters)
    used = int(clusters.max()) + 1
    if num_clusters is None:
        return labels, clusters, used
    if num_clusters < used:
        raise ValueError(f"clusters holds id {used - 1} but num_clusters is {num_clusters}")
    return labels, clusters, num_clusters


def _match(labels: np.ndarray, clusters: np.ndarray, num_clusters: int) -> np.ndarray:
    num_classes = int(labels.max()) + 1
    counts = np.bincount(clusters * num_classes + labels, minlength=num_clusters * num_classes)
    rows, cols = linear_sum_assignment(counts.reshape(num_clusters, num_classes), maximize=True)
    mapping = np.full(num_clusters, -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def match_clusters(labels: Array, clusters: Array, num_clusters: int | None = None) -> np.ndarray:
    """One-to-one map of clusters to classes maximising agreement (Hungarian), as ACC needs.

    Returns ``mapping`` with ``mapping[k]`` = the class of cluster k. With more clusters than
    classes the unmatched clusters map to -1, so their samples count as errors; with fewer, the
    unmatched classes receive no cluster (recall 0). Classes are the ids 0..max(labels).
    """
    return _match(*_labels_and_clusters(labels, clusters, num_clusters))


def head_medium_tail_sizes(num_classes: int) -> tuple[int, int, int]:
    """Group sizes for the 30/40/30% head/medium/tail split of classes sorted by frequency.

    head = tail = round(0.3 · C) with .5 rounded down (ties go to the medium group), at least 1;
    medium takes the rest. Every group gets ≥ 1 class when C ≥ 3 (3 → 1/1/1, 4 → 1/2/1,
    5 → 1/3/1, 10 → 3/4/3, 100 → 30/40/30); C = 2 gives 1/0/1 and C = 1 gives 1/0/0.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    edge = max(1, (3 * num_classes + 4) // 10)
    tail = min(edge, num_classes - edge)
    return edge, num_classes - edge - tail, tail


def _class_order(labels: np.ndarray, class_order: Array | None) -> np.ndarray:
    present, counts = np.unique(labels, return_counts=True)
    if class_order is None:
        return present[np.argsort(-counts, kind="stable")]
    order = _ids(class_order, "class_order")
    if len(np.unique(order)) != len(order):
        raise ValueError(f"class_order repeats a class: {order.tolist()}")
    missing = np.setdiff1d(present, order)
    if missing.size:
        raise ValueError(f"class_order lacks classes {missing.tolist()} that occur in labels")
    return order


def _mean_defined(values: np.ndarray) -> float:
    """Mean over the classes that have samples (recall is NaN elsewhere); NaN for none."""
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")


def cluster_metrics(
    labels: Array,
    clusters: Array,
    num_clusters: int | None = None,
    class_order: Array | None = None,
) -> dict[str, float]:
    """ACC, NMI and ARI, plus the imbalance-aware numbers that ACC hides on long-tailed sets.

    ``caa`` (class-averaged accuracy, mACC) is the mean per-class recall after matching and
    ``macro_f1`` the macro F1 over the classes present in ``labels``. ``head_acc``,
    ``medium_acc`` and ``tail_acc`` are mean recalls over the groups of
    `head_medium_tail_sizes`, taken along ``class_order`` (class ids, most frequent first). Pass
    the long-tailed train set's order when evaluating a balanced split, where frequencies tell
    nothing; by default classes are ordered by frequency in ``labels``, ties by class id. Classes
    of ``class_order`` absent from ``labels`` are left out of group means; a group with no such
    class scores NaN.
    """
    labels, clusters, num_clusters = _labels_and_clusters(labels, clusters, num_clusters)
    predicted = _match(labels, clusters, num_clusters)[clusters]
    order = _class_order(labels, class_order)
    recall = recall_score(labels, predicted, labels=order, average=None, zero_division=np.nan)
    head, medium, _ = head_medium_tail_sizes(len(order))
    macro_f1 = f1_score(
        labels, predicted, labels=np.unique(labels), average="macro", zero_division=0.0
    )
    return {
        "acc": float(np.mean(predicted == labels)),
        "caa": _mean_defined(recall),
        "macro_f1": float(macro_f1),
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "ari": float(adjusted_rand_score(labels, clusters)),
        "head_acc": _mean_defined(recall[:head]),
        "medium_acc": _mean_defined(recall[head : head + medium]),
        "tail_acc": _mean_defined(recall[head + medium :]),
    }


def cluster_size_report(
    labels: Array, clusters: Array, num_clusters: int | None
) -> dict[str, list[int] | float]:
    """Compare the predicted cluster-size histogram with the true class sizes, by rank.

    Needs no matching: ``size_l1`` = 0.5 · Σ |p_r − t_r| / n over sizes sorted descending
    (the shorter list padded with zeros) is 0 when the clustering reproduces the imbalance
    profile and approaches 1 when, e.g., everything falls into one cluster of a flat set.
    Empty clusters (up to ``num_clusters``) are listed with size 0.
    """
    labels, clusters, num_clusters = _labels_and_clusters(labels, clusters, num_clusters)
    true_sizes = np.sort(np.unique(labels, return_counts=True)[1])[::-1]
    predicted_sizes = np.sort(np.bincount(clusters, minlength=num_clusters))[::-1]
    width = max(len(true_sizes), len(predicted_sizes))
    gap = np.abs(
        np.pad(predicted_sizes, (0, width - len(predicted_sizes)))
        - np.pad(true_sizes, (0, width - len(true_sizes)))
    ).sum()
    return {
        "true_sizes": true_sizes.tolist(),
        "predicted_sizes": predicted_sizes.tolist(),
        "size_l1": 0.5 * float(gap) / len(labels),
    }


def _unit_rows(features: np.ndarray) -> np.ndarray:
    features = features.astype(np.float32, copy=False)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def knn_accuracy(
    train_features: Array,
    train_labels: Array,
    test_features: Array,
    test_labels: Array,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 1024,
    exclude_self: bool = False,
) -> float:
    """Weighted cosine kNN accuracy (InstDisc, Wu et al. 2018), which rates h with no matching.

    Each of the k training samples most cosine-similar to a test sample votes for its label with
    weight exp(sim / temperature). Similarities are taken ``batch_size`` test rows at a time, so
    memory stays at batch_size × n_train. Set ``exclude_self`` when the test set is the train set:
    each sample's match with itself (by index) would otherwise always win. k is clamped to the
    number of candidates, so small sets work with the default.
    """
    if k < 1 or temperature <= 0 or batch_size < 1:
        raise ValueError(
            f"need k >= 1, temperature > 0 and batch_size >= 1, "
            f"got k={k}, temperature={temperature}, batch_size={batch_size}"
        )
    train = _features(train_features, "train_features")
    test = _features(test_features, "test_features")
    train_labels, test_labels = _ids(train_labels, "train_labels"), _ids(test_labels, "test_labels")
    _check_lengths(train_features=train, train_labels=train_labels)
    _check_lengths(test_features=test, test_labels=test_labels)
    if exclude_self:
        _check_lengths(train_features=train, test_features=test)
    if train.shape[1] != test.shape[1]:
        raise ValueError(
            f"train_features have {train.shape[1]} dims but test_features have {test.shape[1]}"
        )
    train, test = _unit_rows(train), _unit_rows(test)
    classes, train_class = np.unique(train_labels, return_inverse=True)
    k = min(k, len(train) - int(exclude_self))
    if k < 1:
        raise ValueError("exclude_self needs at least 2 training samples")
    correct = 0
    for start in range(0, len(test), batch_size):
        sim = test[start : start + batch_size] @ train.T
        rows = np.arange(len(sim))
        if exclude_self:
            sim[rows, start + rows] = -np.inf
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        top_sim = np.take_along_axis(sim, top, axis=1)
        # Shifting by the row maximum leaves the vote unchanged and keeps exp() finite at low t.
        weights = np.exp((top_sim - top_sim.max(axis=1, keepdims=True)) / temperature)
        votes = np.zeros((len(sim), len(classes)))
        np.add.at(votes, (rows[:, None], train_class[top]), weights)
        predicted = classes[votes.argmax(axis=1)]
        correct += int(np.sum(predicted == test_labels[start : start + batch_size]))
    return correct / len(test)


def ood_auroc(scores_in: Array, scores_out: Array) -> float:
    """AUROC of an OOD score, OOD as the positive class (higher score = more likely OOD)."""
    inside, outside = _scores(scores_in, "scores_in"), _scores(scores_out, "scores_out")
    is_ood = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return float(roc_auc_score(is_ood, np.r_[inside, outside]))


def _sampled(
    features: Array, clusters: Array, sample_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The rows, checked, and a seeded subsample of ``sample_size`` of them when there are more
    (the same draw for every trial on the same data, so that trials stay comparable)."""
    features = _features(features, "features")
    clusters = _ids(clusters, "clusters")
    _check_lengths(features=features, clusters=clusters)
    if len(features) > sample_size:
        keep = np.random.default_rng(seed).choice(len(features), sample_size, replace=False)
        features, clusters = features[keep], clusters[keep]
    return features, clusters


def selection_score(
    features: Array, clusters: Array, sample_size: int = 2000, seed: int = 0
) -> float:
    """Label-free model-selection criterion: cosine silhouette of the clusters (higher is better).

    Silhouette costs O(n²), so it is taken on a seeded subsample of ``sample_size`` points, which
    also makes trials comparable. Fewer than 2 clusters in the sample give -1.0 (the worst
    silhouette), so a collapsed clustering never wins; all-singleton clusters give 0.0, a
    singleton's silhouette by definition (Rousseeuw 1987).
    """
    features, clusters = _sampled(features, clusters, sample_size, seed)
    used = len(np.unique(clusters))
    if used < 2:
        return -1.0
    if used == len(clusters):
        return 0.0
    return float(silhouette_score(features, clusters, metric="cosine"))


def knn_modularity(
    features: Array,
    clusters: Array,
    neighbours: int = 10,
    sample_size: int = 2000,
    seed: int = 0,
) -> float:
    """Label-free score of a partition that is comparable across numbers of clusters K (higher
    is better): its modularity (Newman & Girvan 2004) on the cosine k-nearest-neighbour graph.

    The graph links each point to its ``neighbours`` nearest points (cosine), made undirected;
    with m edges, e_c of them inside cluster c and d_c the summed degree of c's points,
    Q = Σ_c [e_c / m − (d_c / 2m)²]. The second term is the share of edges that c would hold in
    a random graph with the same degrees, so one cluster and a random partition score 0 whatever
    K is. Splitting a real group cuts many of its edges (Q falls); merging two groups adds their
    degree products (Q falls too): Q peaks where the partition follows the graph's groups. The
    graph does not depend on K, which is what makes trials with different K comparable; a
    silhouette does not penalise splitting the same way. Known limit (Fortunato & Barthélemy
    2007): groups much smaller than √(2m) edges cannot be resolved, so very small tail classes
    tend to be merged. The graph is built on a seeded subsample of ``sample_size`` points
    (O(n²) neighbour search), the same for every trial on the same data.
    """
    if neighbours < 1:
        raise ValueError(f"neighbours must be at least 1, got {neighbours}")
    features, clusters = _sampled(features, clusters, sample_size, seed)
    n = len(features)
    if n < 2:
        return 0.0
    neighbours = min(neighbours, n - 1)
    found = NearestNeighbors(n_neighbors=neighbours + 1, metric="cosine").fit(features)
    nearest = found.kneighbors(features, return_distance=False)
    # Drop each point's match with itself (first unless duplicates tie with it), keep k others.
    others = np.array([row[row != i][:neighbours] for i, row in enumerate(nearest)])
    rows = np.repeat(np.arange(n), neighbours)
    graph = sparse.coo_matrix((np.ones(n * neighbours), (rows, others.ravel())), shape=(n, n))
    graph = graph.tocsr()
    graph = graph.maximum(graph.T).tocoo()  # undirected: an edge when either lists the other
    twice_edges = graph.data.sum()
    inside = graph.data[clusters[graph.row] == clusters[graph.col]].sum()
    degree = np.bincount(graph.row, weights=graph.data, minlength=n)
    cluster_degree = np.bincount(clusters, weights=degree)
    return float(inside / twice_edges - np.sum((cluster_degree / twice_edges) ** 2))
