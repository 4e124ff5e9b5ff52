"""Cross-worker collectives for the global-batch losses, in plain torch.distributed (no Ray).

DCL draws its negatives, and DDC its kernel, from the GLOBAL batch (method.md): every rank
all-gathers its projections, assignments and hidden features with :func:`gather_with_grad`.
DCL then takes only the rank's own anchors (:func:`own_rows`) against every negative, 1/W of
its (2B)² products; the clustering objectives compute the same loss on the whole batch. Outside
a process group (one worker, tests) every function here is the identity, so the losses never
branch on the setup.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx


def is_distributed() -> bool:
    """True when a process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the incoming gradients and keeps this rank's slice."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor) -> Tensor:
        ctx.local_size = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.local_size
        return grad[start : start + ctx.local_size]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks along dim 0, in rank order.

    Gradients flow back to every rank's own slice (as solo-learn's GatherLayer). A term that
    every rank computes on the whole batch (L), or as the mean over its own 1/W of the anchors
    (L_r, with Σ_r L_r = W · L), is summed by the backward pass over the ranks: this rank's
    samples receive W · dL/dz (W = world size) either way, and DDP's averaging of the parameter
    gradients over the W ranks brings that back to exactly the dL/dθ that one process would get
    on the global batch. All ranks must call this, and backward, together. Identity when not
    distributed.
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def own_rows(local_size: int) -> slice:
    """This rank's rows of a gathered batch (rank order): the images whose anchors it takes."""
    if not is_distributed():
        return slice(None)
    start = dist.get_rank() * local_size
    return slice(start, start + local_size)


@torch.no_grad()
def all_reduce_sum(x: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """Sum (or ``op``) ``x`` in place across ranks (no gradient) and return it; identity when
    not distributed."""
    if is_distributed():
        dist.all_reduce(x, op=op)
    return x


def first_message(message: str | None, device: torch.device) -> str | None:
    """The lowest failing rank's message, known to every rank (None: no rank failed), so that
    all stop together instead of the others waiting in a collective for a rank that left."""
    if not is_distributed():
        return message
    failed = all_reduce_sum(
        torch.tensor([float(message is not None)], device=device), dist.ReduceOp.MAX
    )
    if not failed.item():
        return None
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    return next(text for text in messages if text is not None)
