"""The joint networks: a shared backbone, a projection head, a clustering head and the
statistics pooling block (method.md, "Networks" and "Statistics pooling block").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from jdcl_ray.config import Config
from jdcl_ray.distributed import all_reduce_sum, gather_with_grad, is_distributed
from jdcl_ray.errors import UserError


def _small_cnn(in_channels: int, width: int) -> tuple[nn.Module, int]:
    """Four conv stages (w, 2w, 4w, 4w channels), each halving the side, for 8–28 px images.

    One conv per stage: on a 2-core CPU a 28 px step runs ~3× faster than two convs per
    stage, and contrastive learning gains more from the extra epochs than from the depth.
    """
    widths = [width, 2 * width, 4 * width, 4 * width]
    layers: list[nn.Module] = []
    c_in = in_channels
    for stage, c_out in enumerate(widths):
        if stage:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        layers += [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        ]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), widths[-1]


def _resnet(name: str, in_channels: int, cifar_stem: bool) -> tuple[nn.Module, int]:
    net = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    features = net.fc.in_features
    net.fc = nn.Identity()
    return net, features


BACKBONES: dict[str, Callable[[int, int], tuple[nn.Module, int]]] = {
    "small_cnn": _small_cnn,
    "resnet18_cifar": lambda c, _w: _resnet("resnet18", c, cifar_stem=True),
    "resnet18": lambda c, _w: _resnet("resnet18", c, cifar_stem=False),
    "resnet50_cifar": lambda c, _w: _resnet("resnet50", c, cifar_stem=True),
    "resnet50": lambda c, _w: _resnet("resnet50", c, cifar_stem=False),
}


AUTO_BACKBONE = "auto"
SMALL_CNN_MAX_SIDE = 32


def resolve_backbone(name: str, image_side: int) -> str:
    """``auto``: the small CNN up to 32 px (fast on a CPU), else a ResNet-18 whose stride-4
    ImageNet stem brings 64–224 px images down to the sizes its stages were made for."""
    if name != AUTO_BACKBONE:
        return name
    return "small_cnn" if image_side <= SMALL_CNN_MAX_SIDE else "resnet18"


def build_backbone(name: str, in_channels: int, width: int = 32) -> tuple[nn.Module, int]:
    """Return the backbone f and its feature size d."""
    if name not in BACKBONES:
        raise UserError(
            f"model.backbone = {name!r} is unknown: expected {AUTO_BACKBONE} or one of "
            f"{sorted(BACKBONES)}"
        )
    return BACKBONES[name](in_channels, width)


class ProjectionHead(nn.Module):
    """g of the representation network: Linear(d,512,no bias) → BN → ReLU → Linear(512,128)."""

    def __init__(self, in_features: int, hidden: int = 512, out_features: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, out_features),
        )

    def forward(self, features: Tensor) -> Tensor:
        return F.normalize(self.net(features), dim=1)


class ClusteringHead(nn.Module):
    """c of the clustering network: Linear(d,100) → ReLU → BN gives H; Linear(100,K) → softmax gives A."""

    def __init__(self, in_features: int, num_clusters: int, hidden: int = 100) -> None:
        super().__init__()
        self.hidden = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.BatchNorm1d(hidden)
        )
        self.logits = nn.Linear(hidden, num_clusters)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.hidden(features)
        # Softmax in float32: under bf16 autocast the DDC kernel products need the precision.
        assignments = torch.softmax(self.logits(hidden).float(), dim=1)
        return assignments, hidden


class PooledStatistics(NamedTuple):
    """What the statistics pooling block holds, read-only for the objective (ours)."""

    proportions: Tensor  # (K,) π_k, uniform before the first update
    mean: Tensor  # (K, F) per-cluster feature mean
    var: Tensor  # (K, F) per-cluster diagonal feature variance
    num_updates: Tensor  # () steps pooled so far


class StatisticsPooling(nn.Module):
    """Per-cluster soft cardinality, mean and diagonal variance of the backbone features (ours).

    Pooled over the global batch (``reduce`` sums across workers), kept as an exponential
    moving average across steps, and stored as buffers so checkpoints carry it. It feeds the
    pooled debiasing prior, the clustering objectives that read it and the cluster-size report.
    """

    def __init__(
        self,
        num_clusters: int,
        num_features: int,
        momentum: float = 0.1,
        reduce: Callable[[Tensor], Tensor] = all_reduce_sum,
    ) -> None:
        super().__init__()
        self.momentum = momentum
        self.reduce = reduce
        self.register_buffer("cardinality", torch.zeros(num_clusters))
        self.register_buffer("mean", torch.zeros(num_clusters, num_features))
        self.register_buffer("var", torch.ones(num_clusters, num_features))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, assignments: Tensor, features: Tensor) -> None:
        """Fold one (local) batch into the running statistics; all ranks must call it together."""
        weights = assignments.detach().double()
        feats = features.detach().double()
        # One packed all-reduce: [n_k | Σ A h | Σ A h²] for every cluster.
        packed = torch.cat(
            [weights.sum(0)[:, None], weights.T @ feats, weights.T @ feats.square()], dim=1
        )
        packed = self.reduce(packed)
        dim = feats.shape[1]
        count = packed[:, 0]
        safe = count.clamp_min(1e-12)[:, None]
        mean = packed[:, 1 : 1 + dim] / safe
        var = (packed[:, 1 + dim :] / safe - mean.square()).clamp_min(0.0)
        # A cluster that got no mass in this batch keeps its old mean/variance.
        seen = (count > 1e-6)[:, None]
        first = self.num_updates == 0
        momentum = torch.where(first, 1.0, self.momentum)
        self.cardinality.lerp_(count.to(self.cardinality), momentum)
        new_mean = torch.where(seen | first, mean, self.mean.double())
        new_var = torch.where(seen, var, self.var.double())
        self.mean.lerp_(new_mean.to(self.mean), momentum)
        self.var.lerp_(new_var.to(self.var), momentum)
        self.num_updates += 1

    def proportions(self) -> Tensor:
        """π_k = n_k / Σ n, uniform before the first update. No host sync: every training step
        reads it."""
        total = self.cardinality.sum()
        uniform = torch.full_like(self.cardinality, 1.0 / self.cardinality.numel())
        return torch.where(total > 0, self.cardinality / total.clamp_min(1e-30), uniform)

    def statistics(self) -> PooledStatistics:
        return PooledStatistics(self.proportions(), self.mean, self.var, self.num_updates)

    @torch.no_grad()
    def load_statistics(self, pooled: PooledStatistics) -> None:
        """Replace the running statistics (an objective re-seeding them), keeping their scale:
        the cardinalities still sum to what one update pools."""
        total = self.cardinality.sum().clamp_min(1.0)
        self.cardinality.copy_(pooled.proportions.to(self.cardinality) * total)
        self.mean.copy_(pooled.mean.to(self.mean))
        self.var.copy_(pooled.var.to(self.var))


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the global batch, on CPU (gloo) as on GPU.

    Without it, 2 workers × B/2 normalise each half by its own statistics and train a
    different model than 1 worker × B; torch's SyncBatchNorm refuses CPU tensors.
    One worker, or eval mode: exactly ``nn.BatchNorm``.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3, 4):
            raise ValueError(f"expected a 2-D to 4-D input, got {input.dim()}-D")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        x = input.float()
        channels = x.shape[1]
        count = torch.full((1,), x.numel() / channels, device=x.device)
        # Σx, Σx² and n of every rank, summed with gradients flowing back to each rank.
        local = torch.cat([x.sum(dims), x.square().sum(dims), count])
        total = gather_with_grad(local[None]).sum(0)
        n = total[-1]
        mean = total[:channels] / n
        var = (total[channels : 2 * channels] / n - mean.square()).clamp_min(0.0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1.0), self.momentum)
        shape = [1, channels] + [1] * (input.dim() - 2)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
        shift = -mean * scale + (self.bias if self.affine else 0.0)
        return (x * scale.view(shape) + shift.view(shape)).to(input.dtype)


def use_global_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm layer of ``module`` for a GlobalBatchNorm holding the same state."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(
            child, GlobalBatchNorm
        ):
            replacement = GlobalBatchNorm(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            )
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement)
        else:
            use_global_batchnorm(child)
    return module


def scale_gradient(x: Tensor, scale: float) -> Tensor:
    """x in the forward pass; its gradient times ``scale`` in the backward pass (0: detached)."""
    if scale == 1.0:
        return x
    return x.detach() + scale * (x - x.detach())


class JointOutput(NamedTuple):
    features: Tensor  # h = f(x), (n, d)
    projections: Tensor  # z = normalize(g(h)), (n, 128)
    assignments: Tensor  # A = softmax(c(h)), (n, K), float32
    cluster_hidden: Tensor  # H, the clustering head's hidden layer, (n, 100)


class JointModel(nn.Module):
    """Representation network (f, g) and clustering network (f, c) sharing one backbone."""

    def __init__(
        self,
        backbone: str,
        in_channels: int,
        num_clusters: int,
        width: int = 32,
        projection_hidden: int = 512,
        projection_dim: int = 128,
        cluster_hidden: int = 100,
        pooling_momentum: float = 0.1,
        clustering_backbone_grad: float = 1.0,
    ) -> None:
        super().__init__()
        self.backbone, num_features = build_backbone(backbone, in_channels, width)
        self.clustering_backbone_grad = clustering_backbone_grad
        self.projection = ProjectionHead(num_features, projection_hidden, projection_dim)
        self.clustering = ClusteringHead(num_features, num_clusters, cluster_hidden)
        self.pooling = StatisticsPooling(num_clusters, num_features, pooling_momentum)
        self.num_features = num_features

    def forward(self, images: Tensor) -> JointOutput:
        features = self.backbone(images)
        assignments, hidden = self.clustering(
            scale_gradient(features, self.clustering_backbone_grad)
        )
        return JointOutput(features, self.projection(features), assignments, hidden)


def build_model(config: Config, in_channels: int, image_side: int) -> JointModel:
    """The joint model a config describes for these images, with batch norm over the global
    batch."""
    m = config.model
    model = JointModel(
        resolve_backbone(m.backbone, image_side),
        in_channels,
        m.num_clusters,
        width=m.width,
        projection_hidden=m.projection_hidden,
        projection_dim=m.projection_dim,
        cluster_hidden=m.cluster_hidden,
        pooling_momentum=config.loss.pooling_momentum,
        clustering_backbone_grad=m.clustering_backbone_grad,
    )
    return use_global_batchnorm(model)
