"""One worker's training and evaluation loop, in plain PyTorch.

The walk of one step: shard of the global batch → two augmented views on the device →
joint model → gather across workers → DCL + clustering_weight · DDC → optimiser step →
statistics pooling update. Ray stays outside: ``fit`` receives a ``report`` callback.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from sklearn.cluster import KMeans
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from jdcl_ray import metrics
from jdcl_ray.augment import BatchAugment, to_float
from jdcl_ray.config import Config
from jdcl_ray.data import ImageDataset, load_dataset, sample_long_tail
from jdcl_ray.distributed import gather_with_grad
from jdcl_ray.errors import UserError
from jdcl_ray.losses import dcl_loss, ddc_loss, pooled_tau_plus
from jdcl_ray.models import JointModel, use_global_batchnorm

LOSS_TERMS = ("total", "dcl", "ddc_l1", "ddc_l2", "ddc_l3", "ddc")  # reported as loss/<term>
# report(metrics, state, assignments): see ``fit``.
Report = Callable[[dict[str, Any], dict[str, Any] | None, dict[str, np.ndarray] | None], None]


class NonFiniteLossError(UserError):
    """Training produced inf/NaN: continuing (or retrying) would only log NaN metrics. Almost
    always a setting (learning rate, temperature), so it is reported like a user mistake."""


@dataclass
class RunData:
    train: ImageDataset  # the long-tailed set that is clustered
    eval: ImageDataset | None  # the configured evaluation split (None: train only)
    lt_indices: np.ndarray  # indices of ``train`` in the source split, saved with the run
    class_order: list[int]  # classes from most to least frequent in ``train``


def prepare_data(config: Config) -> RunData:
    """Load the source, draw the long-tailed training set, load the evaluation split."""
    cfg = config.data
    # Only the options a user set: loaders reject options that don't apply to them.
    options = {
        key: value
        for key, value in (("image_size", cfg.image_size), ("download", cfg.download))
        if value not in (None, False)
    }
    source = load_dataset(cfg.name, cfg.root, split="train", **options)
    if source.labels is None:
        if cfg.imbalance_ratio != 1:
            raise UserError(
                f"config key 'data.imbalance_ratio' = {cfg.imbalance_ratio} needs labels to draw a "
                f"long-tailed set, but {source.name} has none: set it to 1"
            )
        lt_indices = np.arange(len(source.images))
        class_order: list[int] = []
    else:
        lt_indices = sample_long_tail(
            source.labels, cfg.imbalance_ratio, profile=cfg.profile, seed=cfg.seed
        )
        counts = np.bincount(source.labels[lt_indices], minlength=source.num_classes)
        class_order = [int(c) for c in np.argsort(-counts, kind="stable")]
    train = source.subset(lt_indices)
    if len(train.images) < config.model.num_clusters:
        raise UserError(
            f"config key 'model.num_clusters' = {config.model.num_clusters} is larger than the "
            f"{len(train.images)} training images of {train.name}"
        )
    if len(train.images) < config.optim.batch_size:
        raise UserError(
            f"config key 'optim.batch_size' = {config.optim.batch_size} is larger than the "
            f"{len(train.images)} training images of {train.name}"
        )
    if cfg.eval_split == "test":
        evaluation = load_dataset(cfg.name, cfg.root, split="test", **options)
    elif cfg.eval_split == "train":
        evaluation = train
    else:
        evaluation = None
    return RunData(train, evaluation, lt_indices, class_order)


def build_model(config: Config, in_channels: int) -> JointModel:
    m = config.model
    model = JointModel(
        m.backbone,
        in_channels,
        m.num_clusters,
        width=m.width,
        projection_hidden=m.projection_hidden,
        projection_dim=m.projection_dim,
        cluster_hidden=m.cluster_hidden,
        pooling_momentum=config.loss.pooling_momentum,
    )
    return use_global_batchnorm(model)


def build_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = config.optim
    params = model.parameters()
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    optimizer = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
    return optimizer(params, lr=o.lr, weight_decay=o.weight_decay)


def build_scheduler(
    config: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to 0 (or constant), stepped every optimiser step."""
    warmup = config.optim.warmup_epochs * steps_per_epoch
    total = max(config.run.epochs * steps_per_epoch, 1)
    cosine = config.optim.schedule == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def joint_loss(
    model: nn.Module,
    pooling_source: JointModel,
    views: Tensor,
    config: Config,
    epoch: int,
) -> dict[str, Tensor]:
    """The joint objective on the global batch: L = L_dcl + clustering_weight · L_ddc.

    ``views``: this worker's (2b, C, H, W) batch, its b first views then its b second views.
    """
    out = model(views.contiguous(memory_format=torch.channels_last))
    local = views.shape[0] // 2
    # One collective per step: pack z | A | H of both views, gather, unpack.
    packed = torch.cat(
        [out.projections.float(), out.assignments, out.cluster_hidden.float()], dim=1
    )
    packed = gather_with_grad(torch.stack([packed[:local], packed[local:]], dim=1))
    dim_z = out.projections.shape[1]
    dim_a = out.assignments.shape[1]
    z = packed[..., :dim_z]
    assignments = packed[..., dim_z : dim_z + dim_a]
    hidden = packed[..., dim_z + dim_a :]
    loss_cfg = config.loss
    # Anchors in dcl_loss order: all first views, then all second views.
    anchors_a = torch.cat([assignments[:, 0], assignments[:, 1]])
    if loss_cfg.prior == "pooled" and epoch >= loss_cfg.prior_warmup_epochs:
        tau_plus: float | Tensor = pooled_tau_plus(anchors_a, pooling_source.pooling.proportions())
    else:
        tau_plus = loss_cfg.tau_plus
    dcl = dcl_loss(z[:, 0], z[:, 1], loss_cfg.temperature, tau_plus)
    ddc = ddc_loss(anchors_a, torch.cat([hidden[:, 0], hidden[:, 1]]))
    weight = loss_cfg.clustering_weight if epoch >= loss_cfg.clustering_warmup_epochs else 0.0
    pooling_source.pooling.update(out.assignments, out.features)
    return {
        "total": dcl + weight * ddc["total"],
        "dcl": dcl,
        "ddc_l1": ddc["l1"],
        "ddc_l2": ddc["l2"],
        "ddc_l3": ddc["l3"],
        "ddc": ddc["total"],
    }


@torch.no_grad()
def embed(
    model: JointModel, images: Tensor, device: torch.device, batch_size: int = 1024
) -> dict[str, Tensor]:
    """Features, assignments, clustering hidden layer and OOD score of un-augmented images."""
    model.eval()
    parts: dict[str, list[Tensor]] = {"features": [], "assignments": [], "hidden": [], "ood": []}
    for start in range(0, len(images), batch_size):
        batch = to_float(images[start : start + batch_size].to(device, non_blocking=True))
        batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            out = model(batch)
        features = out.features.float()
        parts["features"].append(features.cpu())
        parts["assignments"].append(out.assignments.cpu())
        parts["hidden"].append(out.cluster_hidden.float().cpu())
        parts["ood"].append(model.pooling.ood_score(features).cpu())
    model.train()
    return {key: torch.cat(value) for key, value in parts.items()}


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on GPU; on CPU autocast is off (bf16 matmuls are slower there)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def evaluate(
    model: JointModel, data: RunData, config: Config, device: torch.device
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every metric of the metrics module, on the LT training set and the evaluation split.

    Also returns the training set's assignments (one entry per image: its index in the source
    split, cluster, confidence, OOD score and label when known), the run's Parquet artifact.
    """
    num_clusters = config.model.num_clusters
    train_out = embed(model, data.train.images, device)
    features = nn.functional.normalize(train_out["features"], dim=1).numpy()
    kmeans = None
    if config.eval.assign == "kmeans":
        kmeans = KMeans(num_clusters, n_init=3, random_state=config.run.seed).fit(features)
        train_clusters = kmeans.labels_
        probabilities = kmeans_probabilities(features, kmeans.cluster_centers_, config)
    else:
        probabilities = train_out["assignments"].numpy()
        train_clusters = probabilities.argmax(1)
    assignments = {
        "index": np.asarray(data.lt_indices, dtype=np.int64),
        "cluster": train_clusters.astype(np.int64),
        "confidence": probabilities[np.arange(len(train_clusters)), train_clusters],
        "ood_score": train_out["ood"].numpy(),
    }
    if data.train.labels is not None:
        assignments["label"] = np.asarray(data.train.labels, dtype=np.int64)
    result: dict[str, Any] = {
        "selection_score": metrics.selection_score(train_out["hidden"].numpy(), train_clusters),
        "ood_threshold": float(np.quantile(train_out["ood"].numpy(), 0.95)),
        "predicted_sizes": np.bincount(train_clusters, minlength=num_clusters).tolist(),
    }
    if data.train.labels is None:
        return result, assignments
    labels = data.train.labels
    for key, value in metrics.cluster_metrics(
        labels, train_clusters, num_clusters, class_order=data.class_order
    ).items():
        result[f"train/{key}"] = value
    sizes = metrics.cluster_size_report(labels, train_clusters, num_clusters)
    result["true_sizes"] = sizes["true_sizes"]
    result["cluster_size_l1"] = sizes["size_l1"]
    evaluation = data.eval
    if evaluation is None or evaluation is data.train or evaluation.labels is None:
        result["knn_acc"] = metrics.knn_accuracy(
            features, labels, features, labels, k=config.eval.knn_k, exclude_self=True
        )
        return result, assignments
    eval_out = embed(model, evaluation.images, device)
    eval_features = nn.functional.normalize(eval_out["features"], dim=1).numpy()
    if kmeans is not None:
        eval_clusters = kmeans.predict(eval_features)
    else:
        eval_clusters = eval_out["assignments"].argmax(1).numpy()
    for key, value in metrics.cluster_metrics(
        evaluation.labels, eval_clusters, num_clusters, class_order=data.class_order
    ).items():
        result[f"test/{key}"] = value
    result["knn_acc"] = metrics.knn_accuracy(
        features, labels, eval_features, evaluation.labels, k=config.eval.knn_k
    )
    return result, assignments


def kmeans_probabilities(features: np.ndarray, centers: np.ndarray, config: Config) -> np.ndarray:
    """Soft k-means assignments: a softmax over cosine similarity to the centroids at the
    contrastive temperature, so a k-means confidence reads like the head's."""
    centers = centers / np.maximum(np.linalg.norm(centers, axis=1, keepdims=True), 1e-12)
    logits = features @ centers.T / config.loss.temperature
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device


def worker_context(use_gpu: bool) -> WorkerContext:
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if use_gpu and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return WorkerContext(rank, world, device)


def fit(
    config: Config,
    data: RunData,
    ctx: WorkerContext,
    report: Report,
    restored: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train from epoch 0 (or after ``restored``'s epoch) to ``run.epochs``; returns last metrics.

    ``report(metrics, state, assignments)`` is called by every rank once per epoch; ``state``
    (only on rank 0, on checkpoint epochs) is a weights_only-loadable dict to save as the
    checkpoint; ``assignments`` (rank 0, last epoch) are the training set's clusters.
    """
    torch.manual_seed(config.run.seed)
    run = config.run
    global_batch = config.optim.batch_size
    local_batch = global_batch // ctx.world_size
    num_images = len(data.train.images)
    steps_per_epoch = num_images // global_batch  # >= 1: checked by prepare_data
    # channels-last: faster convolutions on GPU (tensor cores) and on CPU (oneDNN) alike.
    model = build_model(config, data.train.images.shape[1]).to(
        ctx.device, memory_format=torch.channels_last
    )
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    start_epoch = 0
    if restored is not None:
        model.load_state_dict(restored["model"])
        optimizer.load_state_dict(restored["optimizer"])
        scheduler.load_state_dict(restored["scheduler"])
        torch.set_rng_state(restored["rng_state"])
        start_epoch = int(restored["epoch"]) + 1
    wrapped: nn.Module = model
    if ctx.world_size > 1:
        wrapped = DistributedDataParallel(
            model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None
        )
    augment = BatchAugment(config.augment)
    images = data.train.images.to(ctx.device)
    last: dict[str, Any] = {}
    for epoch in range(start_epoch, run.epochs):
        started = time.perf_counter()
        order = torch.randperm(
            num_images, generator=torch.Generator().manual_seed(run.seed * 100_003 + epoch)
        ).to(ctx.device)
        views_rng = torch.Generator(ctx.device).manual_seed(
            (run.seed * 100_003 + epoch) * 1_009 + ctx.rank
        )
        sums = torch.zeros(len(LOSS_TERMS), device=ctx.device)
        # The first step with a non-finite term and its terms, kept on the device (no sync).
        first_bad = torch.full((), -1, dtype=torch.long, device=ctx.device)
        bad_terms = torch.zeros(len(LOSS_TERMS), device=ctx.device)
        for step in range(steps_per_epoch):
            first = step * global_batch + ctx.rank * local_batch
            batch = images[order[first : first + local_batch]]
            views = augment.stacked_views(batch, generator=views_rng)
            with autocast(ctx.device):
                losses = joint_loss(wrapped, model, views, config, epoch)
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            scheduler.step()
            terms = torch.stack([losses[k].detach().float() for k in LOSS_TERMS])
            sums += terms
            newly_bad = ~torch.isfinite(terms).all() & (first_bad < 0)
            first_bad = torch.where(newly_bad, step, first_bad)
            bad_terms = torch.where(newly_bad, terms, bad_terms)
        means = (sums / steps_per_epoch).tolist()
        elapsed = time.perf_counter() - started
        epoch_metrics: dict[str, Any] = {
            f"loss/{k}": v for k, v in zip(LOSS_TERMS, means, strict=True)
        }
        bad_step = int(first_bad)
        if bad_step >= 0:
            values = zip(LOSS_TERMS, bad_terms.tolist(), strict=True)
            raise NonFiniteLossError(
                f"non-finite loss at step {epoch * steps_per_epoch + bad_step} (epoch {epoch}, step "
                f"{bad_step} of {steps_per_epoch}): {', '.join(f'{k}={v:.4g}' for k, v in values)}; "
                f"lower optim.lr (now {config.optim.lr}) or raise loss.temperature"
            )
        epoch_metrics["epoch"] = epoch
        epoch_metrics["lr"] = scheduler.get_last_lr()[0]
        epoch_metrics["images_per_s"] = steps_per_epoch * global_batch / elapsed
        is_last = epoch == run.epochs - 1
        assignments = None
        if ctx.rank == 0 and (is_last or (epoch + 1) % config.eval.every == 0):
            evaluated, assignments = evaluate(model, data, config, ctx.device)
            epoch_metrics.update(evaluated)
        state = None
        if ctx.rank == 0 and (is_last or (epoch + 1) % run.checkpoint_every == 0):
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng_state": torch.get_rng_state(),
                "epoch": epoch,
                "config": config.to_dict(),
                "lt_indices": torch.tensor(data.lt_indices),
                "in_channels": int(data.train.images.shape[1]),
            }
        if ctx.rank == 0:
            log(progress_line(epoch_metrics, run.epochs))
        report(epoch_metrics, state, assignments if is_last else None)
        last = epoch_metrics
    return last


def progress_line(epoch_metrics: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {epoch_metrics['epoch'] + 1}/{epochs}"]
    for key in (
        "loss/total",
        "loss/dcl",
        "loss/ddc",
        "train/caa",
        "train/nmi",
        "test/caa",
        "test/nmi",
        "knn_acc",
    ):
        if key in epoch_metrics:
            parts.append(f"{key} {epoch_metrics[key]:.4f}")
    parts.append(f"{epoch_metrics['images_per_s']:.0f} img/s")
    return " | ".join(parts)
