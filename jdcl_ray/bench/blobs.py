"""Does a clustering objective recover the small clusters of a long-tailed mixture?

``python -m jdcl_ray.bench blobs [OBJECTIVE ...] [--seeds 0 1 2] [--jsonl FILE]``

Ten Gaussian blobs in 16 dimensions with sizes 1000 … 10 (exponential profile, IR 100), centres
on a sphere of radius 6. A clustering head (Linear 16→32, ReLU, BN, Linear 32→10) trains on two
noisy views of batches of 256 for 300 steps with only the objective (no DCL), with the engine's
refresh hook every 50 steps ("epochs"), the statistics pooling block updated from the head.
Prints per blob: its majority cluster, recall, purity; and the sizes. The tests run it too.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch

from jdcl_ray import objective
from jdcl_ray.config import Config, from_dict
from jdcl_ray.models import ClusteringHead, StatisticsPooling

CLUSTERS, DIM, STEPS, EPOCH_STEPS, BATCH = 10, 16, 300, 50, 256


def blobs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sizes = [round(1000 * 100 ** (-c / (CLUSTERS - 1))) for c in range(CLUSTERS)]
    centres = torch.randn(CLUSTERS, DIM, generator=generator)
    centres = 6 * centres / centres.norm(dim=1, keepdim=True)
    points = [
        c + torch.randn(n, DIM, generator=generator) for c, n in zip(centres, sizes, strict=True)
    ]
    labels = [torch.full((n,), c) for c, n in enumerate(sizes)]
    return torch.cat(points), torch.cat(labels)


def fit_head(
    points: torch.Tensor,
    views: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    config: Config,
    steps: int,
    epoch_steps: int,
    lr: float,
    hidden: int = 100,
) -> torch.Tensor:
    """Train a clustering head on fixed ``points`` (N, F) with ``config``'s objective alone:
    ``views(rows, generator)`` gives the (B, 2, F) two views of a batch's rows; the objective's
    refresh every ``epoch_steps`` steps, the statistics pooling block updated from the head.
    Returns the clusters of ``points``: the engine's loop without the backbone."""
    num_clusters, dim = config.model.num_clusters, points.shape[1]
    torch.manual_seed(config.run.seed)
    head = ClusteringHead(dim, num_clusters, hidden)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    pooling = StatisticsPooling(num_clusters, dim, 0.1, reduce=lambda t: t)
    chosen = objective.clustering_objective(config.loss.clustering)
    state = chosen.initial_state(len(points), num_clusters, dim)
    generator = torch.Generator().manual_seed(config.run.seed)
    batch_size = config.optim.batch_size
    for step in range(steps):
        epoch = step // epoch_steps
        if step % epoch_steps == 0 and objective.refresh_due(config, epoch):
            with torch.no_grad():
                head.eval()
                everything = head(points)[0]
                head.train()
            refreshed = chosen.refresh(
                objective.TrainingSet(points, everything),
                state,
                pooling.statistics(),
                config,
                epoch,
            )
            state = refreshed.state
            if refreshed.pooled is not None:
                pooling.load_statistics(refreshed.pooled)
        rows = torch.randint(0, len(points), (batch_size,), generator=generator)
        pair = views(rows, generator)
        a, h = head(pair.reshape(2 * batch_size, dim))
        batch = objective.GlobalBatch(
            projections=pair,
            assignments=a.reshape(batch_size, 2, num_clusters),
            hidden=h.reshape(batch_size, 2, -1),
            features=pair,
            indices=rows,
        )
        terms = chosen.compute(batch, pooling.statistics(), state, config, epoch)
        pooling.update(a, pair.reshape(2 * batch_size, dim))
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
    with torch.no_grad():
        head.eval()
        return head(points)[0].argmax(1)


def train(name: str, seed: int) -> dict:
    x, y = blobs(seed)
    config = from_dict(
        {
            "model": {"num_clusters": CLUSTERS},
            "run": {"epochs": STEPS // EPOCH_STEPS, "seed": seed},
            "optim": {"batch_size": BATCH},
            "loss": {"clustering": name, "clustering_warmup_epochs": 0, "refresh_every": 1},
        },
    )

    def noisy(rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return x[rows][:, None] + 0.3 * torch.randn(len(rows), 2, DIM, generator=generator)

    clusters = fit_head(x, noisy, config, STEPS, EPOCH_STEPS, lr=1e-2, hidden=32)
    found = []
    for blob in range(CLUSTERS):
        members = clusters[y == blob]
        major = int(torch.bincount(members, minlength=CLUSTERS).argmax())
        recall = float((members == major).float().mean())
        purity = float((y[clusters == major] == blob).float().mean())
        found.append([major, round(recall, 2), round(purity, 2)])
    sizes = torch.bincount(clusters, minlength=CLUSTERS).tolist()
    # A blob is found when it has a cluster of its own: most of it there, most of that cluster it.
    recovered = sum(recall >= 0.8 and purity >= 0.8 for _, recall, purity in found)
    return {"objective": name, "seed": seed, "recovered": recovered, "sizes": sizes, "blobs": found}


def main(args: argparse.Namespace) -> int:
    """Every objective named (default: all) at every seed: a JSON line a run."""
    for name in args.objectives or objective.CLUSTERING_OBJECTIVES:
        objective.clustering_objective(name)  # an unknown name: the one-line error, first
    torch.set_num_threads(1)
    for name in args.objectives or objective.CLUSTERING_OBJECTIVES:
        for seed in args.seeds:
            line = json.dumps(train(name, seed))
            print(line, flush=True)
            if args.jsonl is not None:
                with args.jsonl.open("a") as out:
                    out.write(line + "\n")
    return 0
