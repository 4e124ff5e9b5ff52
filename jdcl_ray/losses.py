"""The two training losses (method.md): DCL for the representation network, DDC for the
clustering network, and the pooled per-anchor debiasing prior (ours) that links them.

Both losses are pure functions of the (already gathered, see ``distributed.py``) global batch.
They run in at least float32 with autocast off: at t = 0.05 bf16 logits would be off by ~0.1,
and the DDC kernel products need the precision too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_DDC_SIGMA_SCALE = 0.15  # σ² = 0.15 · median(D)
_DDC_MIN_SIGMA2 = 1e-9
_DCS_MIN_INNER = 1e-9  # floor on each α_iᵀKα_j
_DCS_MIN_NORM_PRODUCT = 1e-18  # floor on α_iᵀKα_i · α_jᵀKα_j, i.e. 1e-9 after the sqrt
_EPS = 1e-12  # floor under a probability before its log
_VAR_FLOOR = 1e-4  # floor under a pooled variance in the mixture's likelihood
_LOG_2PI = math.log(2.0 * math.pi)


def _loss_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _check_dcl_args(z1: Tensor, z2: Tensor, temperature: float, tau_plus: float | Tensor) -> None:
    if temperature <= 0:
        raise ValueError(f"dcl_loss: temperature must be > 0, got {temperature}")
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"dcl_loss: z1 and z2 must both be (B, D), got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if z1.shape[0] < 2:
        raise ValueError(f"dcl_loss: needs B >= 2 images for any negative, got B = {z1.shape[0]}")
    if isinstance(tau_plus, Tensor):
        # Values are not checked here (that would sync the device every step): pooled_tau_plus
        # guarantees [0, 0.999].
        if tau_plus.shape != (2 * z1.shape[0],):
            raise ValueError(
                f"dcl_loss: a per-anchor tau_plus must have shape (2B,) = ({2 * z1.shape[0]},), "
                f"got {tuple(tau_plus.shape)}"
            )
    elif not 0 <= tau_plus < 1:
        raise ValueError(f"dcl_loss: tau_plus must be in [0, 1), got {tau_plus}")


def dcl_loss(z1: Tensor, z2: Tensor, temperature: float, tau_plus: float | Tensor) -> Tensor:
    """The debiased contrastive loss of :func:`dcl_terms`."""
    return dcl_terms(z1, z2, temperature, tau_plus)[0]


def dcl_terms(
    z1: Tensor,
    z2: Tensor,
    temperature: float,
    tau_plus: float | Tensor,
    images: slice = slice(None),
) -> tuple[Tensor, Tensor]:
    """Debiased contrastive loss (Chuang et al., "Debiased Contrastive Learning", NeurIPS 2020).

    z1, z2: (B, D) projections of the two views (normalised here). The 2B anchors are the B of
    view 1 then the B of view 2; anchor i's positive is its other view, the other N = 2B − 2
    samples are its negatives. tau_plus: the class prior, one float in [0, 1) or a (2B,) tensor
    of per-anchor priors in that anchor order (see :func:`pooled_tau_plus`). Returns a scalar:

        Ng_i = max((−tau_plus·N·pos_i + Σ_j neg_ij) / (1 − tau_plus), N·e^(−1/t))
        L = mean_i −log(pos_i / (pos_i + Ng_i))

    computed in log space so that t = 0.05 neither overflows nor loses precision; tau_plus = 0
    is NT-Xent (SimCLR). Also returns the fraction of anchors whose Ng_i sits at the floor
    N·e^(−1/t), detached: those anchors get no gradient through their negatives (ours, a
    diagnostic: when most of a batch is there, the representation stops learning).

    ``images``: whose two views are the anchors the mean runs over (default: all B). A worker of
    a data-parallel run takes its own images' anchors against every negative of the global
    batch: 1/W of the (2B)² products, and the gradients' sum across workers (distributed.py)
    gives the global loss's gradient.
    """
    _check_dcl_args(z1, z2, temperature, tau_plus)
    batch = z1.shape[0]
    num_neg = 2 * batch - 2
    own = torch.arange(batch, device=z1.device)[images]
    anchors = torch.cat([own, own + batch])  # rows of the 2B order
    positives = torch.cat([own + batch, own])  # each anchor's other view
    with torch.autocast(z1.device.type, enabled=False):
        z = F.normalize(torch.cat([z1, z2]).to(_loss_dtype(z1)), dim=1)
        logits = z[anchors] @ z.T / temperature  # log of every exp(z_i·z_j / t), (2b, 2B)
        log_pos = logits.gather(1, positives[:, None]).squeeze(1)
        not_negative = torch.stack([anchors, positives], dim=1)  # itself and its positive
        log_neg = torch.logsumexp(logits.scatter(1, not_negative, -math.inf), dim=1)

        tau = torch.as_tensor(tau_plus, dtype=z.dtype, device=z.device)
        if tau.ndim:
            tau = tau[anchors]
        # Σ neg − tau·N·pos = Σ neg · (1 − ratio), with ratio = tau·N·pos / Σ neg. Where
        # ratio ≥ 1 the estimate is ≤ 0 and the clamp decides; masking ratio there (before the
        # exp) keeps both the value and the gradient finite.
        log_ratio = torch.log(tau * num_neg) + log_pos - log_neg
        feasible = log_ratio < 0
        ratio = log_ratio.masked_fill(~feasible, -math.inf).exp()
        log_ng = log_neg + torch.log1p(-ratio) - torch.log1p(-tau)
        log_floor = math.log(num_neg) - 1.0 / temperature
        at_floor = ~feasible | (log_ng <= log_floor)
        log_ng = torch.where(feasible, log_ng.clamp_min(log_floor), log_floor)

        # −log(pos / (pos + Ng)) = log(1 + Ng / pos), written to stay exact when it is tiny
        log_ng_over_pos = log_ng - log_pos
        loss = torch.logaddexp(torch.zeros_like(log_ng_over_pos), log_ng_over_pos).mean()
        return loss, at_floor.detach().float().mean()


def _cauchy_schwarz_divergence(columns: Tensor, kernel: Tensor) -> Tensor:
    """d_cs: 2/(K(K−1)) Σ_{i<j} α_iᵀKα_j / sqrt(α_iᵀKα_i · α_jᵀKα_j), floors as DDC's code."""
    k = columns.shape[1]
    inner = columns.T @ kernel @ columns  # (K, K): α_iᵀ K α_j
    norms = torch.diagonal(inner)  # taken before the floor
    ratio = inner.clamp_min(_DCS_MIN_INNER) / torch.sqrt(
        (norms[:, None] * norms[None, :]).clamp_min(_DCS_MIN_NORM_PRODUCT)
    )
    return ratio.triu(diagonal=1).sum() * (2.0 / (k * (k - 1)))


def ddc_loss(assignments: Tensor, hidden: Tensor, flipped: bool = False) -> dict[str, Tensor]:
    """Deep divergence-based clustering loss (Kampffmeyer et al., "Deep Divergence-Based
    Approach to Clustering", Neural Networks 2019).

    assignments: (n, K) softmax outputs A; hidden: (n, h) hidden layer H of the clustering
    head. Returns scalars {"l1": d_cs(A), "l2": mean off-diagonal (AAᵀ)_ab, "l3": d_cs(M),
    "total": l1 + l2 + l3} with M_aj = exp(−‖A_a − e_j‖²).

    Kernel K_ab = exp(−D_ab / (2σ²)), D_ab = ‖H_a − H_b‖². σ² = 0.15 · torch.median(D) over all
    n² entries, diagonal zeros included (torch.median: the lower of the two middle values),
    detached and floored at 1e-9, as in the DDC authors' code. In d_cs each α_iᵀKα_j is floored
    at 1e-9 and each product α_iᵀKα_i · α_jᵀKα_j at 1e-18 before the square root, so an empty
    cluster contributes 1e-9 / 1e-9 = 1 instead of 0/0.

    ``flipped``: L2 on the assignment *columns*, 2/(K(K−1)) Σ_{k<l} (AᵀA)_kl, the DDC authors'
    "DDC2Flipped" (used by EAMC), here divided by n (ours) so that its scale does not grow with
    the batch. Unlike L2 it does not reward equal cluster sizes: for one-hot A it is 0 whatever
    the sizes, and it still pushes each row towards one cluster.
    """
    if assignments.ndim != 2 or hidden.ndim != 2 or assignments.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"ddc_loss: assignments (n, K) and hidden (n, h) must share n, got "
            f"{tuple(assignments.shape)} and {tuple(hidden.shape)}"
        )
    n, k = assignments.shape
    if n < 2 or k < 2:
        raise ValueError(f"ddc_loss: needs n >= 2 samples and K >= 2 clusters, got n={n}, K={k}")
    with torch.autocast(assignments.device.type, enabled=False):
        a = assignments.to(_loss_dtype(assignments))
        h = hidden.to(a.dtype)
        squared = h.square().sum(dim=1)
        distance = (squared[:, None] + squared[None, :] - 2.0 * h @ h.T).clamp_min(0.0)
        # Exact zeros on the diagonal: the expansion leaves rounding there, which a floored σ²
        # would turn into K_aa < 1.
        eye = torch.eye(n, dtype=torch.bool, device=h.device)
        distance = distance.masked_fill(eye, 0.0)
        sigma2 = (_DDC_SIGMA_SCALE * distance.detach().median()).clamp_min(_DDC_MIN_SIGMA2)
        kernel = torch.exp(-distance / (2.0 * sigma2))

        l1 = _cauchy_schwarz_divergence(a, kernel)
        if flipped:
            l2 = (a.T @ a).triu(diagonal=1).sum() * (2.0 / (k * (k - 1) * n))
        else:
            l2 = (a @ a.T).triu(diagonal=1).sum() * (2.0 / (n * (n - 1)))
        # ‖A_a − e_j‖² = ‖A_a‖² − 2 A_aj + 1
        corners = torch.exp(-(a.square().sum(dim=1, keepdim=True) - 2.0 * a + 1.0))
        l3 = _cauchy_schwarz_divergence(corners, kernel)
    return {"l1": l1, "l2": l2, "l3": l3, "total": l1 + l2 + l3}


def pooled_tau_plus(assignments: Tensor, cluster_proportions: Tensor) -> Tensor:
    """Per-anchor debiasing prior of the statistics pooling block (ours, method.md).

    Under imbalance the chance that a negative shares the anchor's class depends on the
    anchor's cluster: tau_plus_i = Σ_k A_ik · π_k. assignments: (2B, K), both views' anchors in
    dcl_loss's order; cluster_proportions: (K,) π summing to 1. Returns (2B,), detached (a prior,
    not something to optimise), clamped to [0, 0.999] so that dcl_loss's 1 − tau_plus stays > 0.
    """
    if (
        assignments.ndim != 2
        or cluster_proportions.ndim != 1
        or assignments.shape[1] != cluster_proportions.shape[0]
    ):
        raise ValueError(
            f"pooled_tau_plus: assignments (2B, K) and cluster_proportions (K,) must share K, "
            f"got {tuple(assignments.shape)} and {tuple(cluster_proportions.shape)}"
        )
    prior = assignments.detach() @ cluster_proportions.detach().to(assignments.dtype)
    return prior.clamp(0.0, 0.999)


# --- clustering losses that let cluster sizes follow the data (ours to measure, method.md) ----


def size_prior_kl(assignments: Tensor, prior: Tensor) -> Tensor:
    """KL(Ā ‖ π̃) between the batch's mean assignment Ā and a size prior π̃ (K,), summing to 1.

    With a uniform π̃ this is SCAN's entropy term −H(Ā) plus log K. A π̃ that follows the head's
    own (floored) sizes lets clusters be as unequal as the data, yet keeps each above the floor.
    """
    with torch.autocast(assignments.device.type, enabled=False):
        mean = assignments.to(_loss_dtype(assignments)).mean(0).clamp_min(_EPS)
        return (mean * (mean.log() - prior.to(mean).clamp_min(_EPS).log())).sum()


def bounded_prior(proportions: Tensor, floor: float, ceiling: float = math.inf) -> Tensor:
    """π̃ = clamp(π, floor / K, ceiling / K), renormalised and detached: a size prior no cluster
    falls below, and none grows past (a cluster that swallows its neighbours is pushed back)."""
    k = proportions.shape[0]
    bounded = proportions.detach().clamp(floor / k, ceiling / k)
    return bounded / bounded.sum()


def neighbour_consistency(assignments: Tensor, neighbour_assignments: Tensor) -> Tensor:
    """SCAN's consistency (Van Gansbeke et al., ECCV 2020): −mean_i mean_j log⟨A_i, A_j⟩ over
    each image's mined neighbours j. assignments: (n, K); neighbour_assignments: (n, k, K), the
    neighbours' assignments (targets, detached by the caller)."""
    with torch.autocast(assignments.device.type, enabled=False):
        a = assignments.to(_loss_dtype(assignments))
        inner = torch.einsum("nk,njk->nj", a, neighbour_assignments.to(a))
        return -inner.clamp_min(_EPS).log().mean()


@torch.no_grad()
def relaxed_transport(
    log_probabilities: Tensor,
    mass: float,
    penalty: float,
    epsilon: float = 0.1,
    iterations: int = 100,
) -> Tensor:
    """Pseudo-labels by partial optimal transport with a KL-relaxed size marginal (P²OT, Zhang
    et al., ICLR 2024). Returns the plan Q (n, K) over the real clusters.

    min ⟨Q, −log P⟩ − ε H(Q) + penalty · KL(Qᵀ1 ‖ mass/K · 1), each row sending 1/n, of which
    ``mass`` in total reaches the K clusters and the rest a virtual cluster at cost 0 (the images
    the model is least sure of). Solved by Sinkhorn–Knopp scaling for unbalanced transport
    (Chizat et al. 2018) in the log domain; penalty = inf is the balanced plan (equal sizes).
    """
    if not 0 < mass <= 1:
        raise ValueError(f"relaxed_transport: mass must be in (0, 1], got {mass}")
    with torch.autocast(log_probabilities.device.type, enabled=False):
        logp = log_probabilities.double()
        n, k = logp.shape
        full = mass >= 1.0
        # Kernel log: −cost/ε; the virtual column (cost 0) only when some mass is left out.
        log_kernel = logp / epsilon
        if not full:
            log_kernel = torch.cat([log_kernel, logp.new_zeros(n, 1)], dim=1)
        log_a = logp.new_full((n,), -math.log(n))
        log_b = logp.new_full((k,), math.log(mass / k))
        if not full:
            log_b = torch.cat([log_b, logp.new_full((1,), math.log(1.0 - mass))])
        relax = penalty / (penalty + epsilon) if math.isfinite(penalty) else 1.0
        exponent = logp.new_ones(log_b.shape)
        exponent[:k] = relax
        log_u = logp.new_zeros(n)
        log_v = logp.new_zeros(log_b.shape)
        for _ in range(iterations):
            log_u = log_a - torch.logsumexp(log_kernel + log_v[None], dim=1)
            log_v = exponent * (log_b - torch.logsumexp(log_kernel + log_u[:, None], dim=0))
        plan = (log_u[:, None] + log_kernel + log_v[None]).exp()
        return plan[:, :k].to(log_probabilities.dtype)


def weighted_cross_entropy(targets: Tensor, weights: Tensor, assignments: Tensor) -> Tensor:
    """Σ_i w_i · CE(targets_i, assignments_i) / Σ_i w_i: soft targets (n, K), weights (n,)."""
    with torch.autocast(assignments.device.type, enabled=False):
        a = assignments.to(_loss_dtype(assignments))
        ce = -(targets.to(a) * a.clamp_min(_EPS).log()).sum(1)
        w = weights.to(a)
        return (w * ce).sum() / w.sum().clamp_min(_EPS)


def mixture_responsibilities(
    features: Tensor, pooled_mean: Tensor, pooled_var: Tensor, proportions: Tensor, sharpen: float
) -> Tensor:
    """r_ik ∝ (π_k · N(h_i; μ_k, diag σ²_k))^sharpen, the statistics pooling block read as a
    Gaussian mixture (ours). Detached: these are targets. features (n, F); mean, var (K, F)."""
    with torch.no_grad(), torch.autocast(features.device.type, enabled=False):
        h = features.double()
        var = pooled_var.double().clamp_min(_VAR_FLOOR)
        inv = 1.0 / var
        mahalanobis = (
            h.square() @ inv.T
            - 2.0 * h @ (pooled_mean.double() * inv).T
            + (pooled_mean.double().square() * inv).sum(1)
        ).clamp_min(0.0)
        log_likelihood = -0.5 * (mahalanobis + var.log().sum(1) + h.shape[1] * _LOG_2PI)
        log_joint = proportions.double().clamp_min(_EPS).log() + log_likelihood
        return torch.softmax(sharpen * log_joint, dim=1).to(features.dtype)
