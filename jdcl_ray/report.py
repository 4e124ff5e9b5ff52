"""The pictures people look at after a run: cluster sizes, confusion after matching, per-class
accuracy, a 2-D map of the embeddings, example images per cluster and the OOD score histogram.
Plain matplotlib (Agg), so they can be drawn anywhere.

``python -m jdcl_ray.report --run RUN_ID|RUN_FOLDER [--output DIR]`` draws them all for a
run's final checkpoint (its training images embedded again) and, for an MLflow run, logs them
to the run under ``report/``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.manifold import TSNE
from sklearn.metrics import confusion_matrix

from jdcl_ray import cli, storage, tracking
from jdcl_ray.checkpoint import ASSIGNMENTS_FILE, load_model, read_assignments
from jdcl_ray.data import prepare_data
from jdcl_ray.engine import Chunk, embed_all, set_chunks
from jdcl_ray.errors import UserError, run_cli
from jdcl_ray.metrics import match_clusters

MAP_POINTS = 2000  # t-SNE is quadratic-ish: a seeded subsample keeps it to seconds


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


def plot_embedding_map(
    features: np.ndarray, clusters: np.ndarray, labels: np.ndarray | None, path: Path
) -> Path:
    """t-SNE of (at most MAP_POINTS of) the features, coloured by cluster and by true class."""
    rng = np.random.default_rng(0)
    keep = np.sort(rng.permutation(len(features))[:MAP_POINTS])
    points = TSNE(
        2, perplexity=min(30.0, len(keep) - 1.0), init="pca", random_state=0
    ).fit_transform(features[keep])
    colourings = [("cluster", clusters)] + ([("true class", labels)] if labels is not None else [])
    figure, axes = plt.subplots(1, len(colourings), figsize=(5.2 * len(colourings), 4.8))
    for axis, (name, values) in zip(np.atleast_1d(axes), colourings, strict=True):
        values = values[keep]
        cmap = "tab10" if values.max() < 10 else "tab20" if values.max() < 20 else "nipy_spectral"
        dots = axis.scatter(points[:, 0], points[:, 1], c=values, cmap=cmap, s=6, linewidths=0)
        handles, names = dots.legend_elements(num=None)  # one entry per cluster / class
        axis.legend(handles, names, title=name, fontsize=6, title_fontsize=7, loc="best")
        axis.set_title(f"t-SNE of the features, by {name}")
        axis.set_xticks([])
        axis.set_yticks([])
    return _save(figure, path)


def example_positions(
    clusters: np.ndarray, confidence: np.ndarray, num_clusters: int, per_side: int = 8
) -> dict[int, np.ndarray]:
    """Each non-empty cluster's images to show, largest cluster first: its ``per_side`` most
    confident, then its ``per_side`` least."""
    sizes = np.bincount(clusters, minlength=num_clusters)
    shown = {}
    for cluster in (k for k in np.argsort(-sizes, kind="stable") if sizes[k]):
        members = np.flatnonzero(clusters == cluster)
        ranked = members[np.argsort(-confidence[members], kind="stable")]
        shown[int(cluster)] = np.concatenate([ranked[:per_side], ranked[-per_side:]])
    return shown


def kept(chunks: Iterable[Chunk], wanted: set[int], into: dict[int, np.ndarray]) -> Iterator[Chunk]:
    """``chunks`` passed on, the images at the ``wanted`` positions copied ``into`` a dict."""
    for images, positions in chunks:
        for row, position in enumerate(positions.tolist()):
            if position in wanted:
                into[position] = images[row].numpy()
        yield images, positions


def plot_examples(
    images: dict[int, np.ndarray], shown: dict[int, np.ndarray], sizes: np.ndarray, path: Path
) -> Path:
    """One row per cluster (``example_positions``): its most confident images, a gap, its least."""
    channels, height, width = next(iter(images.values())).shape
    order = list(shown)
    per_side = max(len(positions) for positions in shown.values()) // 2
    mosaic = np.full(
        (len(order) * (height + 1), (2 * per_side + 1) * (width + 1), channels), 255, np.uint8
    )
    for row, cluster in enumerate(order):
        positions = shown[cluster]
        half = len(positions) // 2
        slots = [
            *enumerate(positions[:half]),
            *((per_side + 1 + j, i) for j, i in enumerate(positions[half:])),
        ]
        for column, index in slots:
            top, left = row * (height + 1), column * (width + 1)
            mosaic[top : top + height, left : left + width] = images[int(index)].transpose(1, 2, 0)
    figure, axis = plt.subplots(figsize=(8, max(2.0, 0.5 * len(order))))
    axis.imshow(mosaic.squeeze(-1) if channels == 1 else mosaic, cmap="gray")
    axis.set_yticks(
        [(row + 0.5) * (height + 1) for row in range(len(order))],
        [f"{k} ({sizes[k]})" for k in order],
    )
    half = per_side * (width + 1) / 2
    axis.set_xticks([half, mosaic.shape[1] - half], ["most confident", "least confident"])
    axis.set_ylabel("cluster (images)")
    axis.set_title("Examples per cluster")
    return _save(figure, path)


def plot_ood_histogram(scores: np.ndarray, threshold: float, path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(6.4, 3.6))
    axis.hist(scores, bins=50)
    axis.axvline(threshold, color="red", linestyle="--", label=f"OOD threshold {threshold:.3g}")
    axis.set_xlabel("OOD score (distance to the nearest cluster)")
    axis.set_ylabel("training images")
    axis.set_title("OOD scores of the training images")
    axis.legend()
    return _save(figure, path)


def run_report(run_id: str, tracking_uri: str, folder: Path) -> list[Path]:
    """Every plot of the run's final checkpoint, written to ``folder``; logged to the run when
    ``run_id`` is an MLflow run id (it may also be a run or checkpoint folder)."""
    checkpoint = tracking.resolve_checkpoint(run_id, tracking_uri, "--run")
    table = storage.join(checkpoint, ASSIGNMENTS_FILE)
    if not storage.exists(table):
        raise UserError(
            f"run {run_id}'s checkpoint {checkpoint} has no {ASSIGNMENTS_FILE}: expected the "
            "final checkpoint of a finished run"
        )
    assignments = read_assignments(storage.open_bytes(table))
    trained = load_model(checkpoint)
    config = trained.config
    # The plots show the training images themselves: the one step here that needs the data.
    train = prepare_data(config).train
    if not np.array_equal(assignments["index"], trained.lt_indices):
        raise UserError(f"{table} does not list the training images of {checkpoint}")
    scores = assignments["ood_score"]
    threshold = trained.ood_threshold
    clusters, num_clusters = assignments["cluster"], config.model.num_clusters
    confidence = assignments["confidence"]
    # One pass over the images (a streamed set is read chunk by chunk): embed every one, keep
    # the few the examples plot shows.
    shown = example_positions(clusters, confidence, num_clusters)
    examples: dict[int, np.ndarray] = {}
    chunks = kept(set_chunks(train), set(np.concatenate(list(shown.values())).tolist()), examples)
    out = embed_all(trained.model, chunks, len(train), torch.device("cpu"))
    features = torch.nn.functional.normalize(out["features"], dim=1).numpy()
    paths = assignment_plots(assignments, num_clusters, folder)
    paths += [
        plot_embedding_map(
            features, clusters, assignments.get("label"), folder / "embedding_map.png"
        ),
        plot_examples(
            examples, shown, np.bincount(clusters, minlength=num_clusters), folder / "examples.png"
        ),
        plot_ood_histogram(scores, threshold, folder / "ood_histogram.png"),
    ]
    if tracking.RUN_ID.match(run_id) and not storage.exists(storage.resolve(run_id)):
        client = tracking.connect(tracking_uri)
        for path in paths:
            client.log_artifact(run_id, str(path), artifact_path="report")
    return paths


def main(argv: list[str] | None = None) -> int:
    return run(cli.parse("report", argv))


def run(args: argparse.Namespace) -> int:
    folder = args.output or Path(f"report-{Path(args.run).name[:8]}")
    uri = args.tracking_uri or tracking.default_tracking_uri()
    paths = run_report(args.run, uri, folder)
    logged = f", logged to run {args.run} under report/" if tracking.RUN_ID.match(args.run) else ""
    print(f"{len(paths)} plots in {folder}{logged}")
    return 0


if __name__ == "__main__":
    run_cli(main)
