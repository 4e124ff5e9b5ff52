"""A clustering objective on the frozen backbone of a finished run (issue 17's screen).

Does an objective over-merge by itself, or only when the backbone moves with it? This embeds
the run's training set once, un-augmented and as ``--copies`` augmented copies, then trains a
fresh clustering head on those fixed features with the objective alone (``bench.blobs.fit_head``:
the engine's loop, refresh hook and statistics pooling, without the backbone), on the schedule
of the joint run (steps an epoch, epochs after the warm-up), for each ``--set`` variant and seed.

    taskset -c 1 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/research/frozen_head.py \
        --run runs/fashion_lt_head --variant base --variant tempered loss.size_prior_power=0.5

Prints and appends (``--jsonl``) one row a variant and seed: CAA, NMI, tail accuracy, sizes,
size L1 and empty clusters, beside k-means on the same features.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from jdcl_ray.assign import fit_centers
from jdcl_ray.augment import BatchAugment
from jdcl_ray.bench.blobs import fit_head
from jdcl_ray.checkpoint import load_model
from jdcl_ray.config import from_dict, merge, parse_overrides
from jdcl_ray.data.prepare import prepare_data
from jdcl_ray.metrics import cluster_metrics

HERE = Path(__file__).parent


@torch.no_grad()
def backbone_features(backbone: torch.nn.Module, views: torch.Tensor, batch: int = 1024):
    return torch.cat([backbone(views[s : s + batch]) for s in range(0, len(views), batch)])


def embedded_copies(run: str, copies: int, seed: int):
    trained = load_model(run)
    data = prepare_data(trained.config)
    images = data.train.images
    augment = BatchAugment(trained.config.augment)
    generator = torch.Generator().manual_seed(seed)
    backbone = trained.model.backbone.eval()
    clean = backbone_features(backbone, images.float() / 255)
    augmented = torch.stack(
        [backbone_features(backbone, augment(images, generator)) for _ in range(copies)], dim=1
    )
    return trained.config, data, clean, augmented


def sizes_l1(clusters: np.ndarray, labels: np.ndarray, k: int) -> float:
    """L1 between sorted predicted and sorted true size shares."""
    predicted = np.sort(np.bincount(clusters, minlength=k))[::-1] / len(clusters)
    true = np.sort(np.bincount(labels, minlength=k))[::-1] / len(labels)
    return float(np.abs(predicted - true).sum())


def row(clusters: np.ndarray, labels: np.ndarray, class_order, k: int) -> dict:
    metrics = cluster_metrics(labels, clusters, class_order=class_order)
    sizes = np.bincount(clusters, minlength=k)
    return {
        "caa": round(float(metrics["caa"]), 4),
        "nmi": round(float(metrics["nmi"]), 4),
        "tail_acc": round(float(metrics["tail_acc"]), 4),
        "size_l1": round(sizes_l1(clusters, labels, k), 4),
        "empty": int((sizes == 0).sum()),
        "sizes": sorted(sizes.tolist(), reverse=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/fashion_lt_head")
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=None, help="default: the run's, less warm-up")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--variant", nargs="+", action="append", required=True, metavar=("NAME", "KEY=VALUE")
    )
    parser.add_argument("--jsonl", type=Path, default=HERE / "frozen_head.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config, data, clean, augmented = embedded_copies(args.run, args.copies, seed=0)
    labels, order, k = data.train.labels, data.class_order, config.model.num_clusters
    epochs = args.epochs or config.run.epochs - config.loss.clustering_warmup_epochs
    steps_per_epoch = len(clean) // config.optim.batch_size
    km = fit_centers(torch.nn.functional.normalize(clean, dim=1).numpy(), k, 0)
    unit = torch.nn.functional.normalize(clean, dim=1).numpy()
    km_clusters = np.argmin(((unit[:, None] - km[None]) ** 2).sum(-1), axis=1)
    print(json.dumps({"kmeans_features": row(km_clusters, labels, order, k)}), flush=True)

    def views(rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        pick = torch.stack(
            [torch.randperm(args.copies, generator=generator)[:2] for _ in range(len(rows))]
        )
        return augmented[rows[:, None], pick]

    for name, *overrides in args.variant:
        for seed in args.seeds:
            changes = [*overrides, "loss.clustering_warmup_epochs=0", f"run.seed={seed}"]
            variant = from_dict(merge(config.to_dict(), parse_overrides(changes)))
            clusters = fit_head(
                clean, views, variant, epochs * steps_per_epoch, steps_per_epoch, variant.optim.lr
            ).numpy()
            line = {"run": args.run, "variant": name, "overrides": overrides, "seed": seed}
            line.update(row(clusters, labels, order, k))
            print(json.dumps(line), flush=True)
            with args.jsonl.open("a") as out:
                out.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
