"""Predicted cluster sizes against the true class sizes of a finished run: the head's clusters,
k-means on the same features, and k-means on the pixels of the same long-tailed draw.

python benchmarks/cluster_sizes.py --run runs/fashion_lt --output benchmarks/results/fashion_lt_sizes.png

Prints one JSON line per assignment (CAA, NMI, size L1, empty clusters, sizes largest first).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans

from jdcl_ray import metrics
from jdcl_ray.assign import assign, fit_centers
from jdcl_ray.bench.common import pyplot, save_figure
from jdcl_ray.checkpoint import find_checkpoint, load_model
from jdcl_ray.data import prepare_data
from jdcl_ray.engine import embed, pixel_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a train output folder or checkpoint")
    parser.add_argument("--output", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args()
    trained = load_model(find_checkpoint(args.run, "--run"))
    config = trained.config
    data = prepare_data(config)
    train = data.train
    if train.labels is None:
        raise SystemExit(f"{args.run}: its data has no labels, so there are no true sizes")
    k, seed = config.model.num_clusters, config.run.seed
    out = embed(trained.model, train.images, torch.device("cpu"))
    features = torch.nn.functional.normalize(out["features"], dim=1).numpy()
    probabilities = out["assignments"].numpy()
    centres = fit_centers(features, k, seed)
    on_features, _ = assign(features, probabilities, centres, config.loss.temperature)
    clustered = {
        f"head ({config.loss.clustering})": probabilities.argmax(1),
        "k-means on the same features": on_features,
        "k-means on pixels": KMeans(k, n_init=10, random_state=seed).fit_predict(
            pixel_rows(train.images)
        ),
    }
    true = np.sort(np.bincount(train.labels))[::-1]
    figure, axis = pyplot().subplots(figsize=(6.4, 4))
    axis.bar(np.arange(len(true)), true, color="lightgrey", label="true classes")
    for name, clusters in clustered.items():
        sizes = np.sort(np.bincount(clusters, minlength=k))[::-1]
        scores = metrics.cluster_metrics(train.labels, clusters, k, class_order=data.class_order)
        report = metrics.cluster_size_report(train.labels, clusters, k)
        row = {"assignment": name, "caa": scores["caa"], "nmi": scores["nmi"]}
        row.update(size_l1=report["size_l1"], empty=int((sizes == 0).sum()), sizes=sizes.tolist())
        print(json.dumps(row))
        axis.plot(np.arange(k), sizes, marker="o", label=f"{name}: CAA {scores['caa']:.3f}")
    axis.set_xlabel("rank (largest first)")
    axis.set_ylabel("images")
    axis.set_title(f"{config.run.name}: cluster sizes vs class sizes")
    axis.legend(fontsize=7)
    save_figure(figure, args.output)


if __name__ == "__main__":
    main()
