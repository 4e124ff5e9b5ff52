"""Baseline: k-means on raw pixels of the long-tailed set a config draws.

python benchmarks/kmeans_pixels.py --config configs/fashion_lt.yaml [--seeds 0 1 2]
Prints one JSON line per evaluated split with the metrics module's keys.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from sklearn.cluster import KMeans

from jdcl_ray import metrics
from jdcl_ray.config import load_config
from jdcl_ray.data import prepare_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    config = load_config(args.config)
    data = prepare_data(config)
    num_clusters = config.model.num_clusters
    pixels = data.train.images.flatten(1).float().numpy() / 255.0
    for seed in args.seeds:
        kmeans = KMeans(num_clusters, n_init=10, random_state=seed).fit(pixels)
        splits = {"train": (data.train.labels, kmeans.labels_)}
        if data.eval is not None and data.eval is not data.train:
            eval_pixels = data.eval.images.flatten(1).float().numpy() / 255.0
            splits["test"] = (data.eval.labels, kmeans.predict(eval_pixels))
        for split, (labels, clusters) in splits.items():
            scores = metrics.cluster_metrics(
                labels, clusters, num_clusters, class_order=data.class_order
            )
            row = {
                "seed": seed,
                "split": split,
                **{k: round(float(v), 4) for k, v in scores.items()},
            }
            row["predicted_sizes"] = sorted(
                np.bincount(clusters, minlength=num_clusters).tolist(), reverse=True
            )
            print(json.dumps(row))


if __name__ == "__main__":
    main()
