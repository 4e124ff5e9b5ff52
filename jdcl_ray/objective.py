"""The joint objective (method.md): L = L_dcl + clustering_weight · L_clustering.

The representation term is DCL with a fixed class prior, or the pooled per-anchor prior (ours).
The clustering term is one of the clustering objectives registered here, chosen by
``loss.clustering``: this is the one place a new one is added (see ``register``). Every term is a
pure function of the gathered global batch and of the pooled statistics it may read; updating
the statistics pooling block is the training step's job (``engine.train_step``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from jdcl_ray.config import Config, LossConfig
from jdcl_ray.errors import UserError
from jdcl_ray.losses import dcl_loss, ddc_loss, pooled_tau_plus
from jdcl_ray.models import PooledStatistics

JOINT_TERMS = ("total", "dcl", "clustering")  # reported as loss/<term>, before the objective's own


@dataclass(frozen=True)
class GlobalBatch:
    """Both views of the global batch, gathered across workers (row i: image i's two views)."""

    projections: Tensor  # (B, 2, D): the representation network's z
    assignments: Tensor  # (B, 2, K): the clustering network's softmax A
    hidden: Tensor  # (B, 2, H): the clustering head's hidden layer

    @staticmethod
    def anchors(pair: Tensor) -> Tensor:
        """(B, 2, ·) → (2B, ·): all first views, then all second views (dcl_loss's order)."""
        return torch.cat([pair[:, 0], pair[:, 1]])


# compute(batch, pooled, state, loss config) → the objective's terms, "total" among them.
ClusteringTerms = Callable[
    [GlobalBatch, PooledStatistics, dict[str, Tensor], LossConfig], dict[str, Tensor]
]


def _no_state(num_clusters: int, feature_dim: int) -> dict[str, Tensor]:
    return {}


@dataclass(frozen=True)
class ClusteringObjective:
    """A named clustering objective; ``terms`` are logged as loss/<name>_<term>.

    ``initial_state(num_clusters, feature_dim)`` declares the tensors it keeps between steps
    (e.g. centroids, a size prior): the engine holds them and every checkpoint carries them.
    """

    name: str
    compute: ClusteringTerms
    terms: tuple[str, ...]
    source: str  # the paper it follows, or "ours"
    initial_state: Callable[[int, int], dict[str, Tensor]] = field(default=_no_state)


CLUSTERING_OBJECTIVES: dict[str, ClusteringObjective] = {}


def register(objective: ClusteringObjective) -> ClusteringObjective:
    if objective.name in CLUSTERING_OBJECTIVES:
        raise ValueError(f"clustering objective {objective.name!r} is already registered")
    CLUSTERING_OBJECTIVES[objective.name] = objective
    return objective


def clustering_objective(name: str) -> ClusteringObjective:
    """The registered objective ``name``; an unknown name is a one-line error."""
    if name not in CLUSTERING_OBJECTIVES:
        known = ", ".join(repr(known) for known in sorted(CLUSTERING_OBJECTIVES))
        raise UserError(
            f"config key 'loss.clustering' = {name!r} is not a clustering objective: "
            f"expected one of {known}"
        )
    return CLUSTERING_OBJECTIVES[name]


def loss_terms(config: Config) -> tuple[str, ...]:
    """Every term the joint objective of ``config`` returns, in a fixed order."""
    objective = clustering_objective(config.loss.clustering)
    return JOINT_TERMS + tuple(f"{objective.name}_{term}" for term in objective.terms)


def initial_state(config: Config, feature_dim: int) -> dict[str, Tensor]:
    objective = clustering_objective(config.loss.clustering)
    return objective.initial_state(config.model.num_clusters, feature_dim)


def joint_objective(
    batch: GlobalBatch,
    pooled: PooledStatistics,
    state: dict[str, Tensor],
    config: Config,
    epoch: int,
) -> dict[str, Tensor]:
    """L = L_dcl + clustering_weight · L_clustering, each term by name (see ``loss_terms``).

    The prior and the clustering weight switch on after their warm-up epochs.
    """
    loss_cfg = config.loss
    anchors = batch.anchors(batch.assignments)
    if loss_cfg.prior == "pooled" and epoch >= loss_cfg.prior_warmup_epochs:
        tau_plus: float | Tensor = pooled_tau_plus(anchors, pooled.proportions)
    else:
        tau_plus = loss_cfg.tau_plus
    dcl = dcl_loss(batch.projections[:, 0], batch.projections[:, 1], loss_cfg.temperature, tau_plus)
    objective = clustering_objective(loss_cfg.clustering)
    terms = objective.compute(batch, pooled, state, loss_cfg)
    weight = loss_cfg.clustering_weight if epoch >= loss_cfg.clustering_warmup_epochs else 0.0
    return {
        "total": dcl + weight * terms["total"],
        "dcl": dcl,
        "clustering": terms["total"],
        **{f"{objective.name}_{term}": terms[term] for term in objective.terms},
    }


# --- the clustering objectives ----------------------------------------------------------------


def _ddc(
    batch: GlobalBatch, pooled: PooledStatistics, state: dict[str, Tensor], loss: LossConfig
) -> dict[str, Tensor]:
    """DDC on both views' anchors: L1 + L2 + L3 with the Cauchy–Schwarz divergence."""
    return ddc_loss(batch.anchors(batch.assignments), batch.anchors(batch.hidden))


register(
    ClusteringObjective(
        name="ddc",
        compute=_ddc,
        terms=("l1", "l2", "l3"),
        source='Kampffmeyer et al., "Deep Divergence-Based Approach to Clustering", 2019',
    )
)
