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

import torch
from torch import nn

from jdcl_ray import objective
from jdcl_ray.config import from_dict
from jdcl_ray.models import StatisticsPooling

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


def train(name: str, seed: int) -> dict:
    x, y = blobs(seed)
    config = from_dict(
        {
            "model": {"num_clusters": CLUSTERS},
            "run": {"epochs": STEPS // EPOCH_STEPS},
            "loss": {"clustering": name, "clustering_warmup_epochs": 0, "refresh_every": 1},
        },
    )
    torch.manual_seed(seed)
    hidden = nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.BatchNorm1d(32))
    logits = nn.Linear(32, CLUSTERS)
    optimizer = torch.optim.Adam([*hidden.parameters(), *logits.parameters()], lr=1e-2)
    pooling = StatisticsPooling(CLUSTERS, DIM, 0.1, reduce=lambda t: t)
    chosen = objective.clustering_objective(name)
    state = chosen.initial_state(len(x), CLUSTERS, DIM)
    generator = torch.Generator().manual_seed(seed)
    for step in range(STEPS):
        epoch = step // EPOCH_STEPS
        if step % EPOCH_STEPS == 0 and objective.refresh_due(config, epoch):
            with torch.no_grad():
                hidden.eval()
                everything = torch.softmax(logits(hidden(x)), 1)
                hidden.train()
            refreshed = chosen.refresh(
                objective.TrainingSet(x, everything), state, pooling.statistics(), config, epoch
            )
            state = refreshed.state
            if refreshed.pooled is not None:
                pooling.load_statistics(refreshed.pooled)
        rows = torch.randint(0, len(x), (BATCH,), generator=generator)
        noise = torch.randn(BATCH, 2, DIM, generator=generator)
        views = x[rows][:, None] + 0.3 * noise
        h = hidden(views.reshape(2 * BATCH, DIM))
        a = torch.softmax(logits(h), 1)
        batch = objective.GlobalBatch(
            projections=views,
            assignments=a.reshape(BATCH, 2, CLUSTERS),
            hidden=h.reshape(BATCH, 2, -1),
            features=views,
            indices=rows,
        )
        terms = chosen.compute(batch, pooling.statistics(), state, config, epoch)
        pooling.update(a, views.reshape(2 * BATCH, DIM))
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
    with torch.no_grad():
        hidden.eval()
        clusters = logits(hidden(x)).argmax(1)
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
