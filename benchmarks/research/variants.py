"""Research variants of the DDC loss and the joint objective (monkeypatched, jdcl_ray untouched)."""
from __future__ import annotations

import torch
from torch import Tensor

import jdcl_ray.engine as E
from jdcl_ray.distributed import gather_with_grad
from jdcl_ray.losses import (_DDC_MIN_SIGMA2, _DDC_SIGMA_SCALE, _cauchy_schwarz_divergence,
                             _loss_dtype, dcl_loss, pooled_tau_plus)


def ddc_kernel(hidden: Tensor) -> Tensor:
    h = hidden.float()
    sq = h.square().sum(1)
    d = (sq[:, None] + sq[None, :] - 2.0 * h @ h.T).clamp_min(0.0)
    d = d.masked_fill(torch.eye(len(h), dtype=torch.bool, device=h.device), 0.0)
    s2 = (_DDC_SIGMA_SCALE * d.detach().median()).clamp_min(_DDC_MIN_SIGMA2)
    return torch.exp(-d / (2.0 * s2))


def ddc_loss_prior(assignments: Tensor, hidden: Tensor, proportions: Tensor | None = None,
                   l2_mode: str = "uniform", l2_weight: float = 1.0,
                   min_proportion: float = 0.01, gamma: float = 1.0) -> dict[str, Tensor]:
    """DDC with a choice of L2: 'uniform' (DDC), 'prior' (columns weighted by 1/(K pi_k),
    optimum at cluster sizes n_k ∝ pi_k), 'none' (L1 + L3 only)."""
    a = assignments.float()
    n, k = a.shape
    kernel = ddc_kernel(hidden)
    l1 = _cauchy_schwarz_divergence(a, kernel)
    corners = torch.exp(-(a.square().sum(1, keepdim=True) - 2.0 * a + 1.0))
    l3 = _cauchy_schwarz_divergence(corners, kernel)
    if l2_mode == "none":
        l2 = a.new_zeros(())
    else:
        if l2_mode == "prior" and proportions is not None:
            pi = proportions.detach().to(a).clamp_min(min_proportion)
            pi = pi / pi.sum()
            w = (k * pi) ** (-gamma)
        else:
            w = a.new_ones(k)
        col = a.sum(0)
        # Σ_{a≠b} Σ_k w_k A_ak A_bk = Σ_k w_k (n_k² − Σ_a A_ak²)
        l2 = (w * (col.square() - a.square().sum(0))).sum() / (n * (n - 1))
    total = l1 + l2_weight * l2 + l3
    return {"l1": l1, "l2": l2, "l3": l3, "total": total}


OPTS = {"l2_mode": "uniform", "l2_weight": 1.0, "detach_head": False}


def joint_loss_variant(model, pooling_source, views, config, epoch):
    """engine.joint_loss with the L2 variant of OPTS (single worker)."""
    out = model(views.contiguous(memory_format=torch.channels_last))
    local = views.shape[0] // 2
    packed = torch.cat([out.projections.float(), out.assignments, out.cluster_hidden.float()], 1)
    packed = gather_with_grad(torch.stack([packed[:local], packed[local:]], dim=1))
    dz = out.projections.shape[1]
    da = out.assignments.shape[1]
    z = packed[..., :dz]
    A = packed[..., dz:dz + da]
    H = packed[..., dz + da:]
    lc = config.loss
    anchors = torch.cat([A[:, 0], A[:, 1]])
    pi = pooling_source.pooling.proportions()
    if lc.prior == "pooled" and epoch >= lc.prior_warmup_epochs:
        tau = pooled_tau_plus(anchors, pi)
    else:
        tau = lc.tau_plus
    dcl = dcl_loss(z[:, 0], z[:, 1], lc.temperature, tau)
    use_pi = pi if pooling_source.pooling.num_updates > 0 else None
    ddc = ddc_loss_prior(anchors, torch.cat([H[:, 0], H[:, 1]]), use_pi,
                         OPTS["l2_mode"], OPTS["l2_weight"])
    weight = lc.clustering_weight if epoch >= lc.clustering_warmup_epochs else 0.0
    pooling_source.pooling.update(out.assignments, out.features)
    return {"total": dcl + weight * ddc["total"], "dcl": dcl, "ddc_l1": ddc["l1"],
            "ddc_l2": ddc["l2"], "ddc_l3": ddc["l3"], "ddc": ddc["total"]}


def joint_forward_detached(self, images):
    """JointModel.forward whose clustering head reads detached backbone features."""
    from jdcl_ray.models import JointOutput
    features = self.backbone(images)
    assignments, hidden = self.clustering(features.detach())
    return JointOutput(features, self.projection(features), assignments, hidden)
