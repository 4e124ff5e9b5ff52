"""The joint objective (method.md): L = L_dcl + clustering_weight · L_clustering.

The representation term is DCL with a fixed class prior, or the pooled per-anchor prior (ours).
The clustering term is one of the clustering objectives registered here, chosen by
``loss.clustering``: this is the one place a new one is added (see ``register``). Every term is a
pure function of the gathered global batch and of the pooled statistics it may read. What an
objective keeps between steps is its declared state, changed only by its ``refresh`` hook
(every ``loss.refresh_every`` epochs, from the whole training set), which the training loop
calls; updating the statistics pooling block is the training step's job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from jdcl_ray.config import Config
from jdcl_ray.errors import UserError
from jdcl_ray.losses import (
    bounded_prior,
    dcl_terms,
    ddc_loss,
    mixture_responsibilities,
    neighbour_consistency,
    pooled_tau_plus,
    relaxed_transport,
    size_prior_kl,
    weighted_cross_entropy,
)
from jdcl_ray.models import PooledStatistics

JOINT_TERMS = (
    "total",
    "dcl",
    "clustering",
    "dcl_floor_frac",
)  # reported as loss/<term>, before the objective's own
State = dict[str, Tensor]


@dataclass(frozen=True)
class GlobalBatch:
    """Both views of the global batch, gathered across workers (row i: image i's two views)."""

    projections: Tensor  # (B, 2, D): the representation network's z
    assignments: Tensor  # (B, 2, K): the clustering network's softmax A
    hidden: Tensor  # (B, 2, H): the clustering head's hidden layer
    features: Tensor | None  # (B, 2, F): the backbone's h, gathered for objectives that read it
    indices: Tensor  # (B,): each image's row in the training set
    # this worker's images, whose views are its DCL anchors (distributed.own_rows)
    own: slice = field(default_factory=lambda: slice(None))

    @staticmethod
    def anchors(pair: Tensor) -> Tensor:
        """(B, 2, ·) → (2B, ·): all first views, then all second views (dcl_loss's order)."""
        return torch.cat([pair[:, 0], pair[:, 1]])


@dataclass(frozen=True)
class TrainingSet:
    """The whole training set through the model (eval mode, no augmentation), for ``refresh``."""

    features: Tensor  # (N, F) backbone features
    assignments: Tensor  # (N, K)


@dataclass(frozen=True)
class Refreshed:
    """What a refresh returns: the new state, and statistics to load into the pooling block."""

    state: State
    pooled: PooledStatistics | None = None


def _no_state(num_images: int, num_clusters: int, feature_dim: int) -> State:
    return {}


@dataclass(frozen=True)
class ClusteringObjective:
    """A named clustering objective; ``terms`` are logged as loss/<name>_<term>.

    ``compute(batch, pooled, state, config, epoch)`` returns the terms and "total".
    ``initial_state(num_images, num_clusters, feature_dim)`` declares the tensors it keeps (the
    engine holds them and every checkpoint carries them);
    ``refresh(training_set, state, pooled, config, epoch)`` returns the next state.
    ``reads_features``: the batch must carry the backbone features (a bigger gather each step).
    """

    name: str
    compute: Callable[[GlobalBatch, PooledStatistics, State, Config, int], dict[str, Tensor]]
    terms: tuple[str, ...]
    source: str  # the paper it follows, or "ours"
    initial_state: Callable[[int, int, int], State] = field(default=_no_state)
    refresh: Callable[[TrainingSet, State, PooledStatistics, Config, int], Refreshed] | None = None
    reads_features: bool = False


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


def initial_state(config: Config, num_images: int, feature_dim: int) -> State:
    objective = clustering_objective(config.loss.clustering)
    return objective.initial_state(num_images, config.model.num_clusters, feature_dim)


def refresh_due(config: Config, epoch: int) -> bool:
    """Whether the objective refreshes its state at the start of ``epoch``: every
    ``loss.refresh_every`` epochs from the first epoch its weight is on."""
    loss = config.loss
    if clustering_objective(loss.clustering).refresh is None:
        return False
    since = epoch - loss.clustering_warmup_epochs
    return since >= 0 and since % loss.refresh_every == 0


def joint_objective(
    batch: GlobalBatch, pooled: PooledStatistics, state: State, config: Config, epoch: int
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
    dcl, floor_frac = dcl_terms(
        batch.projections[:, 0], batch.projections[:, 1], loss_cfg.temperature, tau_plus, batch.own
    )
    objective = clustering_objective(loss_cfg.clustering)
    terms = objective.compute(batch, pooled, state, config, epoch)
    weight = loss_cfg.clustering_weight if epoch >= loss_cfg.clustering_warmup_epochs else 0.0
    return {
        "total": dcl + weight * terms["total"],
        "dcl": dcl,
        "clustering": terms["total"],
        "dcl_floor_frac": floor_frac,  # anchors whose debiased negative estimate is floored
        **{f"{objective.name}_{term}": terms[term] for term in objective.terms},
    }


# --- ddc, the paper's; ddc_flipped ------------------------------------------------------------


def _ddc(batch: GlobalBatch, pooled: PooledStatistics, state: State, config: Config, epoch: int):
    """DDC on both views' anchors: L1 + L2 + L3 with the Cauchy–Schwarz divergence."""
    return ddc_loss(batch.anchors(batch.assignments), batch.anchors(batch.hidden))


def _size_prior(batch: GlobalBatch, pooled: PooledStatistics, config: Config) -> Tensor:
    loss = config.loss
    prior = bounded_prior(pooled.proportions, loss.size_prior_floor, loss.size_prior_ceiling)
    return size_prior_kl(batch.anchors(batch.assignments), prior)


def _ddc_flipped(
    batch: GlobalBatch, pooled: PooledStatistics, state: State, config: Config, epoch: int
):
    """DDC with the column-orthogonality L2, plus the self-prior on sizes."""
    terms = ddc_loss(batch.anchors(batch.assignments), batch.anchors(batch.hidden), flipped=True)
    size_prior = _size_prior(batch, pooled, config)
    total = terms["total"] + config.loss.size_prior_weight * size_prior
    return {**terms, "size_prior": size_prior, "total": total}


# --- neighbours: SCAN with a self-prior on sizes ----------------------------------------------


def _neighbours_state(num_images: int, num_clusters: int, feature_dim: int) -> State:
    return {
        # Until the first refresh every image is its own (only) neighbour.
        "neighbours": torch.arange(num_images)[:, None],
        "bank": torch.full((num_images, num_clusters), 1.0 / num_clusters),
    }


def _neighbours(
    batch: GlobalBatch, pooled: PooledStatistics, state: State, config: Config, epoch: int
):
    """SCAN's consistency with each image's mined neighbours (their last assignments, from the
    bank), with the entropy term replaced by KL(Ā ‖ π̃) on the head's own floored sizes."""
    targets = state["bank"][state["neighbours"][batch.indices]]  # (B, k, K)
    consistency = neighbour_consistency(
        batch.anchors(batch.assignments), torch.cat([targets, targets])
    )
    size_prior = _size_prior(batch, pooled, config)
    total = consistency + config.loss.size_prior_weight * size_prior
    return {"consistency": consistency, "size_prior": size_prior, "total": total}


def mine_neighbours(features: Tensor, k: int, chunk: int = 2048) -> Tensor:
    """(N, k) indices of each row's k most cosine-similar other rows."""
    unit = torch.nn.functional.normalize(features.float(), dim=1)
    k = min(k, len(unit) - 1)
    rows = []
    for start in range(0, len(unit), chunk):
        similarity = unit[start : start + chunk] @ unit.T
        own = torch.arange(start, start + len(similarity), device=unit.device)
        similarity[torch.arange(len(similarity)), own] = -torch.inf
        rows.append(similarity.topk(k, dim=1).indices)
    return torch.cat(rows)


def split_farthest(features: Tensor, iterations: int = 10) -> Tensor:
    """Two-means of ``features`` (m, F) started from their centroid and the member farthest
    from it, so that a small far group inside a cluster is split off before the bulk is halved
    (k-means' own split halves the bulk). Returns a (m,) bool mask of the far side."""
    centres = torch.stack(
        [features.mean(0), features[(features - features.mean(0)).norm(dim=1).argmax()]]
    )
    far = torch.zeros(len(features), dtype=torch.bool)
    for _ in range(iterations):
        far = torch.cdist(features, centres).argmin(1) == 1
        if far.all() or not far.any():
            break
        centres = torch.stack([features[~far].mean(0), features[far].mean(0)])
    return far


def split_gain(features: Tensor) -> tuple[float, Tensor]:
    """The relative drop in squared error when ``split_farthest`` splits these features, and
    its mask: halving one Gaussian blob gains ~2/(π·F), splitting off a distinct group far more."""
    if len(features) < 4:
        return 0.0, torch.zeros(len(features), dtype=torch.bool)
    far = split_farthest(features)
    if far.all() or not far.any():
        return 0.0, far
    before = (features - features.mean(0)).square().sum()
    after = sum((part - part.mean(0)).square().sum() for part in (features[far], features[~far]))
    return float(1.0 - after / before.clamp_min(1e-12)), far


def reseed_targets(features: Tensor, targets: Tensor, floor: float) -> Tensor:
    """Every cluster holding fewer than floor · N / K images (by argmax) takes, as its targets,
    the far side of the cluster whose split gains most (ours): the head cannot follow an empty
    cluster back to life, but it follows its targets."""
    targets = targets.clone()
    n, k = targets.shape
    unit = torch.nn.functional.normalize(features.float(), dim=1)
    for small in range(k):
        clusters = targets.argmax(1)
        if int((clusters == small).sum()) >= floor * n / k:
            continue
        members = [torch.nonzero(clusters == c).flatten() for c in range(k)]
        splits = [split_gain(unit[m]) if c != small else (0.0, None) for c, m in enumerate(members)]
        best = max(range(k), key=lambda c: splits[c][0])
        moved = members[best][splits[best][1]]
        targets[moved] = torch.nn.functional.one_hot(torch.tensor(small), k).to(targets)
    return targets


def _neighbours_refresh(
    training_set: TrainingSet, state: State, pooled: PooledStatistics, config: Config, epoch: int
) -> Refreshed:
    """Neighbours re-mined; the bank restarts from the head's assignments, re-seeded."""
    features = training_set.features
    bank = reseed_targets(features, training_set.assignments.float(), config.loss.size_prior_floor)
    return Refreshed(
        {"neighbours": mine_neighbours(features, config.loss.neighbours), "bank": bank}
    )


def _cross_view_cross_entropy(
    batch: GlobalBatch, label: Callable[[int], tuple[Tensor, Tensor]]
) -> Tensor:
    """Mean over both views of the weighted cross-entropy between the head's assignments of
    one view and ``label(other view)`` = (targets, weights), so that a view never sets its own
    target."""
    losses = [
        weighted_cross_entropy(*label(source), batch.assignments[:, 1 - source])
        for source in (0, 1)
    ]
    return (losses[0] + losses[1]) / 2


# --- relaxed_ot: self-labelling with partial transport, sizes relaxed -------------------------


def transported_mass(config: Config, epoch: int) -> float:
    """ρ grows linearly from ``loss.ot_initial_mass`` at the first clustering epoch to 1 at the
    last epoch (P²OT's progressive schedule)."""
    loss = config.loss
    first, last = loss.clustering_warmup_epochs, config.run.epochs - 1
    progress = min(max((epoch - first) / max(last - first, 1), 0.0), 1.0)
    return loss.ot_initial_mass + (1.0 - loss.ot_initial_mass) * progress


def _relaxed_ot(
    batch: GlobalBatch, pooled: PooledStatistics, state: State, config: Config, epoch: int
):
    """Each view's head is trained towards the transport plan of the other view's assignments,
    each image weighted by the mass it sends to real clusters."""
    loss = config.loss
    mass = transported_mass(config, epoch)
    n = batch.assignments.shape[0]

    def label(view: int) -> tuple[Tensor, Tensor]:
        log_p = batch.assignments[:, view].detach().clamp_min(1e-12).log()
        plan = relaxed_transport(log_p, mass, loss.ot_penalty, loss.ot_epsilon)
        sent = plan.sum(1)
        return plan / sent.clamp_min(1e-12)[:, None], sent * n

    self_labelling = _cross_view_cross_entropy(batch, label)
    return {"self_labelling": self_labelling, "total": self_labelling}


# --- pooled_mixture (ours): the statistics pooling block as the clustering network ------------


def _pooled_mixture(
    batch: GlobalBatch, pooled: PooledStatistics, state: State, config: Config, epoch: int
):
    """The head follows the pooled mixture's responsibilities: each view's target is computed
    from the other view's features."""
    loss = config.loss

    assert batch.features is not None  # reads_features: the engine gathers them

    def label(view: int) -> tuple[Tensor, Tensor]:
        targets = mixture_responsibilities(
            batch.features[:, view],
            pooled.mean,
            pooled.var,
            pooled.proportions,
            loss.mixture_sharpen,
        )
        return targets, torch.ones(len(targets), device=targets.device)

    follow = _cross_view_cross_entropy(batch, label)
    return {"follow": follow, "total": follow}


def _mixture_state(num_images: int, num_clusters: int, feature_dim: int) -> State:
    return {"initialised": torch.zeros((), dtype=torch.bool)}


def kmeans_plus_plus(features: Tensor, num_clusters: int, seed: int) -> Tensor:
    """k-means++ (Arthur & Vassilvitskii 2007) seeding followed by Lloyd steps; (N,) labels."""
    from sklearn.cluster import KMeans

    kmeans = KMeans(num_clusters, init="k-means++", n_init=1, random_state=seed)
    return torch.from_numpy(kmeans.fit_predict(features.double().numpy())).long()


def reseed_small(pooled: PooledStatistics, shares: Tensor, floor: float) -> PooledStatistics:
    """Every cluster holding under floor / K of the images (``shares``: by the head's argmax;
    the soft π of an argmax-empty cluster can stay above the floor) takes half of the cluster
    with the largest mass × variance, split along its widest feature at ± one standard
    deviation."""
    proportions, mean, var = pooled.proportions.clone(), pooled.mean.clone(), pooled.var.clone()
    k = len(proportions)
    for small in torch.nonzero(shares < floor / k).flatten().tolist():
        spread = proportions * var.sum(1)
        spread[small] = -1.0
        big = int(spread.argmax())
        widest = int(var[big].argmax())
        step = var[big, widest].sqrt()
        mean[small], var[small] = mean[big], var[big]
        mean[small, widest] += step
        mean[big, widest] -= step
        proportions[small] = proportions[big] = proportions[big] / 2
    return PooledStatistics(proportions, mean, var, pooled.num_updates)


def _mixture_refresh(
    training_set: TrainingSet, state: State, pooled: PooledStatistics, config: Config, epoch: int
) -> Refreshed:
    """First refresh: the statistics start from k-means++ on the features (never from the
    random head); later ones re-seed clusters that fell below the floor."""
    if not bool(state["initialised"]):
        features = training_set.features.double()
        k = config.model.num_clusters
        labels = kmeans_plus_plus(features, k, config.run.seed)
        one_hot = torch.nn.functional.one_hot(labels, k).double()
        counts = one_hot.sum(0).clamp_min(1.0)
        mean = one_hot.T @ features / counts[:, None]
        var = (one_hot.T @ features.square() / counts[:, None] - mean.square()).clamp_min(1e-6)
        fitted = PooledStatistics(
            (counts / counts.sum()).float(), mean.float(), var.float(), pooled.num_updates
        )
        return Refreshed({"initialised": torch.ones((), dtype=torch.bool)}, fitted)
    assignments = training_set.assignments
    shares = torch.bincount(assignments.argmax(1), minlength=assignments.shape[1]) / len(
        assignments
    )
    return Refreshed(
        state, reseed_small(pooled, shares.to(pooled.proportions), config.loss.size_prior_floor)
    )


for _objective in (
    ClusteringObjective(
        name="ddc",
        compute=_ddc,
        terms=("l1", "l2", "l3"),
        source='Kampffmeyer et al., "Deep Divergence-Based Approach to Clustering", 2019',
    ),
    ClusteringObjective(
        name="ddc_flipped",
        compute=_ddc_flipped,
        terms=("l1", "l2", "l3", "size_prior"),
        source="DDC with the DDC authors' column L2 (DDC2Flipped); the size prior is ours",
    ),
    ClusteringObjective(
        name="neighbours",
        compute=_neighbours,
        terms=("consistency", "size_prior"),
        source='Van Gansbeke et al., "SCAN", ECCV 2020; the self-prior on sizes is ours',
        initial_state=_neighbours_state,
        refresh=_neighbours_refresh,
    ),
    ClusteringObjective(
        name="relaxed_ot",
        compute=_relaxed_ot,
        terms=("self_labelling",),
        source='Zhang et al., "P²OT: Progressive Partial Optimal Transport", ICLR 2024',
    ),
    ClusteringObjective(
        name="pooled_mixture",
        compute=_pooled_mixture,
        terms=("follow",),
        source="ours: the statistics pooling block as a Gaussian mixture the head follows",
        initial_state=_mixture_state,
        refresh=_mixture_refresh,
        reads_features=True,
    ),
):
    register(_objective)
