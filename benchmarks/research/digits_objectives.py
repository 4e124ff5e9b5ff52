"""Every clustering objective on long-tailed digits, as shipped (configs/digits_lt.yaml), 3 seeds:

.venv/bin/python benchmarks/research/digits_objectives.py [--seeds 0 1 2] [--jsonl FILE]

Per run: the head's CAA, NMI, tail accuracy, cluster-size L1 and empty clusters; k-means on the
same features (train/kmeans_caa); k-means on the pixels of the same long-tailed draw.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from jdcl_ray import metrics, objective
from jdcl_ray.assign import fit_centers
from jdcl_ray.config import load_config
from jdcl_ray.data import prepare_data
from jdcl_ray.engine import WorkerContext, fit

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("train/caa", "train/kmeans_caa", "pixel_kmeans_caa", "train/nmi", "train/tail_acc")


def run(name: str, seed: int) -> dict:
    config = load_config(
        ROOT / "configs" / "digits_lt.yaml",
        {"loss": {"clustering": name}, "run": {"seed": seed}, "data": {"seed": seed}},
    )
    data = prepare_data(config)
    last = fit(
        config, data, WorkerContext(0, 1, torch.device("cpu")), lambda *_: None, log=lambda _: None
    )
    pixels = data.train.images.flatten(1).float().numpy() / 255.0
    k = config.model.num_clusters
    centres = fit_centers(pixels, k, seed)
    on_pixels = ((centres**2).sum(1)[None] - 2 * pixels @ centres.T).argmin(1)
    pixel_caa = metrics.cluster_metrics(data.train.labels, on_pixels, k, data.class_order)["caa"]
    row = {key: last[key] for key in KEYS if key in last}
    row.update(
        objective=name,
        seed=seed,
        pixel_kmeans_caa=pixel_caa,
        size_l1=last["cluster_size_l1"],
        empty=last["empty_clusters"],
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--jsonl", type=Path, default=ROOT / "benchmarks/research/digits_objectives.jsonl"
    )
    args = parser.parse_args()
    rows = []
    with args.jsonl.open("a") as out:
        for name in objective.CLUSTERING_OBJECTIVES:
            for seed in args.seeds:
                rows.append(run(name, seed))
                out.write(json.dumps(rows[-1]) + "\n")
    for name in objective.CLUSTERING_OBJECTIVES:
        mine = [row for row in rows if row["objective"] == name]
        cells = []
        for key in (*KEYS, "size_l1", "empty"):
            values = [row[key] for row in mine]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
        print(f"| `{name}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
