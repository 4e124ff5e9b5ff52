"""The pictures people look at after a run: cluster sizes, confusion after matching, per-class
accuracy. Plain matplotlib (Agg) from an assignments table, so they can be drawn anywhere."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import confusion_matrix

from jdcl_ray.metrics import match_clusters


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_cluster_sizes(
    clusters: np.ndarray, labels: np.ndarray | None, num_clusters: int, path: Path
) -> Path:
    """Cluster sizes sorted largest first, beside the true class sizes when labels exist."""
    figure, axis = plt.subplots(figsize=(6.4, 3.6))
    predicted = np.sort(np.bincount(clusters, minlength=num_clusters))[::-1]
    rank = np.arange(len(predicted))
    width = 0.4 if labels is not None else 0.8
    axis.bar(rank - (width / 2 if labels is not None else 0), predicted, width, label="clusters")
    if labels is not None:
        true = np.sort(np.unique(labels, return_counts=True)[1])[::-1]
        axis.bar(np.arange(len(true)) + width / 2, true, width, label="true classes")
        axis.legend()
    axis.set_xlabel("rank (largest first)")
    axis.set_ylabel("images")
    axis.set_title("Cluster sizes vs class sizes")
    return _save(figure, path)


def plot_confusion(labels: np.ndarray, clusters: np.ndarray, num_clusters: int, path: Path) -> Path:
    """Rows: true classes (most frequent first); columns: clusters mapped to classes."""
    mapping = match_clusters(labels, clusters, num_clusters)
    predicted = mapping[clusters]
    classes, counts = np.unique(labels, return_counts=True)
    order = classes[np.argsort(-counts, kind="stable")]
    matrix = confusion_matrix(labels, predicted, labels=order, normalize="true")
    figure, axis = plt.subplots(figsize=(5.2, 4.6))
    image = axis.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    axis.set_xticks(range(len(order)), [str(c) for c in order])
    axis.set_yticks(range(len(order)), [str(c) for c in order])
    axis.set_xlabel("matched cluster")
    axis.set_ylabel("true class (most frequent first)")
    axis.set_title("Confusion after Hungarian matching")
    figure.colorbar(image, ax=axis, fraction=0.046)
    return _save(figure, path)


def plot_class_accuracy(
    labels: np.ndarray, clusters: np.ndarray, num_clusters: int, path: Path
) -> Path:
    """Recall of each class after matching, classes from most to least frequent."""
    predicted = match_clusters(labels, clusters, num_clusters)[clusters]
    classes, counts = np.unique(labels, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    recall = [float(np.mean(predicted[labels == c] == c)) for c in classes[order]]
    figure, axis = plt.subplots(figsize=(6.4, 3.6))
    axis.bar(range(len(order)), recall)
    axis.set_xticks(
        range(len(order)),
        [f"{c}\n({n})" for c, n in zip(classes[order], counts[order], strict=True)],
    )
    axis.set_ylim(0, 1)
    axis.set_xlabel("class (images), most frequent first")
    axis.set_ylabel("accuracy after matching")
    axis.set_title("Per-class accuracy")
    return _save(figure, path)


def assignment_plots(
    assignments: dict[str, np.ndarray], num_clusters: int, folder: Path
) -> list[Path]:
    """Every plot an assignments table supports (the label-based ones need a label column)."""
    folder.mkdir(parents=True, exist_ok=True)
    clusters = assignments["cluster"]
    labels = assignments.get("label")
    paths = [plot_cluster_sizes(clusters, labels, num_clusters, folder / "cluster_sizes.png")]
    if labels is not None:
        paths.append(plot_confusion(labels, clusters, num_clusters, folder / "confusion.png"))
        paths.append(
            plot_class_accuracy(labels, clusters, num_clusters, folder / "class_accuracy.png")
        )
    return paths
