"""Over-cluster (k-means, K' >> K) then merge the sub-clusters to K without an equal-size bias.

.venv/bin/python benchmarks/research/merge.py --features benchmarks/research/out/NAME.npz
.venv/bin/python benchmarks/research/merge.py --pixels benchmarks/research/fashion_ir10.yaml

Merges by agglomerative clustering of the sub-cluster centres (average, complete linkage), or of
their kNN-graph affinity (edges / sqrt(size_i size_j); average, single linkage), for K' = 30, 50.
One JSON line is appended to offline.jsonl beside this script (analyze.py's inputs and scores).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from analyze import HERE, knn_graph, load_input, score, unit
from sklearn.cluster import AgglomerativeClustering, KMeans


def overcluster_merge(
    x: np.ndarray,
    k: int,
    sub_clusters: int,
    link: str,
    graph: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    x = unit(x)
    kmeans = KMeans(sub_clusters, n_init=3, random_state=seed).fit(x)
    sub = kmeans.labels_
    if graph is None:
        centres = unit(kmeans.cluster_centers_)
        merged = AgglomerativeClustering(k, metric="cosine", linkage=link).fit(centres)
    else:  # kNN-graph affinity between sub-clusters: edges / sqrt(size_i size_j)
        edges = np.zeros((sub_clusters, sub_clusters))
        np.add.at(edges, (np.repeat(sub, graph.shape[1]), sub[graph.ravel()]), 1)
        edges = edges + edges.T
        sizes = np.bincount(sub, minlength=sub_clusters).astype(float)
        affinity = edges / np.sqrt(np.outer(sizes, sizes))
        np.fill_diagonal(affinity, 0)
        affinity = affinity / affinity.max()
        merged = AgglomerativeClustering(k, metric="precomputed", linkage=link).fit(1 - affinity)
    return merged.labels_[sub]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", type=Path, help="an .npz of --dump-features")
    source.add_argument("--pixels", type=Path, help="merge this config's LT pixels instead")
    parser.add_argument("--jsonl", type=Path, default=HERE / "offline.jsonl")
    args = parser.parse_args()
    d, name = load_input(args.features, args.pixels)
    labels = d["labels"]
    k = int(labels.max()) + 1
    prefix = "pix" if args.pixels is not None else "h"
    x = d["h"]
    graph = knn_graph(x, 20)
    result: dict[str, Any] = {"file": name}
    for sub_clusters in (30, 50):
        for link, on_graph in (
            ("average", False),
            ("complete", False),
            ("average", True),
            ("single", True),
        ):
            key = f"{prefix}_K{sub_clusters}_{'graph_' if on_graph else ''}{link}"
            clusters = overcluster_merge(x, k, sub_clusters, link, graph if on_graph else None)
            result[key] = score(labels, clusters)
            print(key, result[key], flush=True)
    with args.jsonl.open("a") as jsonl:
        jsonl.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
