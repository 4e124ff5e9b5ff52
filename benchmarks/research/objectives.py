"""Research clustering objectives: DDC with its cluster-size term (L2) re-weighted or dropped.

Registered with ``jdcl_ray.objective.register`` when a variants file of the quality suite's
screening mode names this file under ``plugins:`` (``ddc_l2.yaml``); never in the product's
registry. What they showed: README.md, finding 2.

DDC's L2 is Σ_{a≠b} Σ_k w_k A_ak A_bk / (n(n−1)) = Σ_k w_k (n_k² − Σ_a A_ak²) / (n(n−1)) with
n_k = Σ_a A_ak; DDC has w_k = 1, whose optimum is equal cluster sizes. Weighted by the pooled
prior π (floored at 0.01 and renormalised, detached), w_k = (K·π_k)^(−γ): γ = 1 moves the
optimum to n_k ∝ π_k. ``ddc_no_l2`` keeps L1 + L3 only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from jdcl_ray.config import Config
from jdcl_ray.losses import bounded_prior, ddc_loss
from jdcl_ray.models import PooledStatistics
from jdcl_ray.objective import ClusteringObjective, GlobalBatch, State, register

MIN_PROPORTION = 0.01  # π_k floor before the weights: an empty cluster keeps a finite weight


def weighted_l2(assignments: Tensor, weights: Tensor) -> Tensor:
    """(n, K) assignments, (K,) column weights → Σ_k w_k (n_k² − Σ_a A_ak²) / (n(n−1))."""
    a = assignments.float()
    n = a.shape[0]
    return (weights.to(a) * (a.sum(0).square() - a.square().sum(0))).sum() / (n * (n - 1))


def prior_weights(proportions: Tensor, gamma: float) -> Tensor:
    """w_k = (K·π_k)^(−γ) of (K,) cluster proportions π, floored and renormalised, detached."""
    k = len(proportions)
    return (k * bounded_prior(proportions.float(), MIN_PROPORTION * k)) ** (-gamma)


def ddc_terms(assignments: Tensor, hidden: Tensor, l2_weights: Tensor | None) -> dict[str, Tensor]:
    """DDC (``jdcl_ray.losses.ddc_loss``) with its L2 weighted by ``l2_weights``, or without
    L2 when None: {"l1", "l2", "l3", "total"}."""
    terms = ddc_loss(assignments, hidden)
    with torch.autocast(assignments.device.type, enabled=False):
        if l2_weights is None:
            l2 = torch.zeros_like(terms["l2"])
        else:
            l2 = weighted_l2(assignments, l2_weights)
    return {"l1": terms["l1"], "l2": l2, "l3": terms["l3"], "total": terms["l1"] + l2 + terms["l3"]}


def _objective(name: str, gamma: float | None) -> ClusteringObjective:
    """DDC on both views' anchors with the L2 of ``gamma`` (None: no L2)."""

    def compute(
        batch: GlobalBatch, pooled: PooledStatistics, state: State, config: Config, epoch: int
    ) -> dict[str, Tensor]:
        weights = None if gamma is None else prior_weights(pooled.proportions, gamma)
        return ddc_terms(batch.anchors(batch.assignments), batch.anchors(batch.hidden), weights)

    what = "no L2" if gamma is None else f"L2 weighted by (K·π_k)^(−{gamma:g})"
    return ClusteringObjective(
        name=name,
        compute=compute,
        terms=("l1", "l2", "l3"),
        source=f"research (benchmarks/research/objectives.py): DDC with {what}",
    )


for _name, _gamma in (("ddc_prior_l2", 1.0), ("ddc_prior_l2_g05", 0.5), ("ddc_no_l2", None)):
    register(_objective(_name, _gamma))


# --- neighbours whose first targets are k-means clusters (issue 17) --------------------------


def _kmeans_start_refresh(training_set, state, pooled, config, epoch):
    """As ``neighbours``' refresh, except that the first one (the bank still uniform: the head
    has learnt nothing) takes k-means++ on the features as the targets, not the random head."""
    from jdcl_ray.objective import Refreshed, kmeans_plus_plus, mine_neighbours, reseed_targets

    features = training_set.features
    k = config.model.num_clusters
    if torch.allclose(state["bank"], torch.full_like(state["bank"], 1.0 / k)):
        unit = torch.nn.functional.normalize(features.float(), dim=1)
        start = torch.nn.functional.one_hot(kmeans_plus_plus(unit, k, config.run.seed), k)
    else:
        start = training_set.assignments
    bank = reseed_targets(features, start.float(), config.loss.size_prior_floor)
    return Refreshed(
        {"neighbours": mine_neighbours(features, config.loss.neighbours), "bank": bank}
    )


def _with_refresh(name: str, base: str, refresh, what: str) -> ClusteringObjective:
    from dataclasses import replace

    from jdcl_ray.objective import clustering_objective

    return replace(
        clustering_objective(base), name=name, refresh=refresh, source=f"research: {what}"
    )


register(
    _with_refresh(
        "neighbours_kmeans_start",
        "neighbours",
        _kmeans_start_refresh,
        "neighbours with k-means++ clusters as the first targets",
    )
)
