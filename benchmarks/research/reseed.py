"""Screen: re-seed near-empty DDC clusters from the samples the statistics pooling block explains
worst (highest OOD score), once per epoch after the clustering warm-up.

.venv/bin/python benchmarks/research/reseed.py NAME IR SEED [threshold] [section.key=value ...]

A cluster k holding < threshold / K of the batch (argmax) is re-seeded: its logit row becomes a copy
of the row of the cluster j holding the worst-explained sample x, plus a step towards x's hidden
vector (and j's row a step away), so the samples near x move from j to k.
"""
import sys

import torch

import jdcl_ray.engine as E
from screen import overrides, screen

name, ir, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
over, rest = overrides(
    sys.argv[4:], {"loss": {"prior": "pooled", "temperature": 0.5}, "eval": {"assign": "head"}}
)
threshold = float(rest[0]) if rest else 0.2

original = E.joint_loss
seen_epochs = set()
reseeds = []


def joint_loss(model, pooling_source, views, config, epoch):
    if epoch >= config.loss.clustering_warmup_epochs and epoch not in seen_epochs:
        seen_epochs.add(epoch)
        with torch.no_grad():
            k_all = config.model.num_clusters
            out = pooling_source(views)
            # hard shares: the soft pooled n_k never gets near 0 while argmax counts do
            hard = torch.bincount(out.assignments.argmax(1), minlength=k_all) / len(views)
            dead = torch.nonzero(hard < threshold / k_all).flatten().tolist()
            if dead:
                score = pooling_source.pooling.ood_score(out.features)
                order = torch.argsort(score, descending=True)
                logits = pooling_source.clustering.logits
                for rank, k in enumerate(dead):
                    x = order[rank]
                    j = int(out.assignments[x].argmax())
                    direction = out.cluster_hidden[x] / out.cluster_hidden[x].norm().clamp_min(1e-6)
                    logits.weight[k] = logits.weight[j] + direction
                    logits.bias[k] = logits.bias[j]
                    logits.weight[j] -= direction
                    reseeds.append([epoch, k, j])
    return original(model, pooling_source, views, config, epoch)


E.joint_loss = joint_loss
screen(name, ir, seed, over, threshold=threshold, reseeds=reseeds)
