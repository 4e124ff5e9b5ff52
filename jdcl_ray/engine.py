"""One worker's training and evaluation loop, in plain PyTorch.

The walk of one step: shard of the global batch → two augmented views on the device →
joint model → gather across workers → the joint objective (``objective.py``) → optimiser step →
statistics pooling update. Ray stays outside: ``fit`` receives a ``report`` callback.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from jdcl_ray import metrics, objective, ood
from jdcl_ray.assign import assign, fit_centers
from jdcl_ray.augment import BatchAugment, to_float
from jdcl_ray.config import Config
from jdcl_ray.data import RunData, StreamedSet
from jdcl_ray.data.prepare import Images
from jdcl_ray.distributed import all_reduce_sum, first_message, gather_with_grad, own_rows
from jdcl_ray.errors import UserError
from jdcl_ray.models import JointModel, JointOutput, build_model
from jdcl_ray.pretrained import InitialWeights, apply_initial_weights

# report(metrics, state, assignments): see ``fit``.
Report = Callable[[dict[str, Any], dict[str, Any] | None, dict[str, np.ndarray] | None], None]


class NonFiniteLossError(UserError):
    """Training produced inf/NaN: continuing (or retrying) would only log NaN metrics. Almost
    always a setting (learning rate, temperature), so it is reported like a user mistake."""


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


@torch.no_grad()
def embed(
    model: JointModel, images: Tensor, device: torch.device, batch_size: int = 1024
) -> dict[str, Tensor]:
    """Features, assignments and clustering hidden layer of un-augmented images."""
    model.eval()
    parts: dict[str, list[Tensor]] = {"features": [], "assignments": [], "hidden": []}
    for start in range(0, len(images), batch_size):
        batch = to_float(images[start : start + batch_size].to(device, non_blocking=True))
        batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            out = model(batch)
        parts["features"].append(out.features.float().cpu())
        parts["assignments"].append(out.assignments.cpu())
        parts["hidden"].append(out.cluster_hidden.float().cpu())
    model.train()
    return {key: torch.cat(value) for key, value in parts.items()}


def autocast(device: torch.device, precision: str = "auto") -> torch.autocast:
    """bf16 autocast on GPU; on CPU autocast is off (bf16 matmuls are slower there), unless
    ``precision`` (run.precision) says otherwise."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


# --- training ---------------------------------------------------------------------------------


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


# (uint8 images, their positions in the set): a batch, or a chunk of a pass over the set.
Chunk = tuple[Tensor, Tensor]


@dataclass
class WorkerImages:
    """How one worker reads its images: in memory (``in_memory``) or streamed
    (``jdcl_ray/streaming.py``); the loops below don't know which.

    ``epoch_batches(epoch, local_batch)``: this worker's batches of an epoch, on the device;
    ``train_chunks()`` / ``eval_chunks()``: every image of the training / evaluation set once.
    ``coordinated``: reading can fail (a UserError naming the image): the ranks then agree,
    each step and epoch, that all of them read their images, so that all stop together.
    """

    epoch_batches: Callable[[int, int], Iterator[Chunk]]
    train_chunks: Callable[[], Iterator[Chunk]]
    eval_chunks: Callable[[], Iterator[Chunk]] | None = None
    coordinated: bool = False


def in_memory(data: RunData, seed: int, ctx: WorkerContext) -> WorkerImages:
    """The decoded images, the training set on the device: each epoch one seeded permutation
    of the set, shared by the ranks, each rank taking its slice of every global batch."""
    images = data.train.images.to(ctx.device)

    def epoch_batches(epoch: int, local_batch: int) -> Iterator[Chunk]:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(images), generator=generator).to(ctx.device)
        global_batch = local_batch * ctx.world_size
        for start in range(0, len(order) - global_batch + 1, global_batch):
            first = start + ctx.rank * local_batch
            positions = order[first : first + local_batch]
            yield images[positions], positions

    evaluation = data.eval.images if has_eval_labels(data) else None
    return WorkerImages(
        epoch_batches,
        lambda: tensor_chunks(data.train.images),
        None if evaluation is None else lambda: tensor_chunks(evaluation),
    )


def timed(batches: Iterator[Chunk], waited: list[float]) -> Iterator[Chunk]:
    """``batches``, the seconds spent waiting for each added to ``waited[0]``."""
    while True:
        begun = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        waited[0] += time.perf_counter() - begun
        sample_rss()
        yield batch


def agreed(batches: Iterator[Chunk], device: torch.device) -> Iterator[Chunk]:
    """``batches``, each step only once every rank has read its own: one rank's unreadable
    image stops every rank with its UserError (``distributed.first_message``)."""
    while True:
        failure = None
        try:
            batch = next(batches)
        except StopIteration:  # every rank's shard holds the same number of batches
            return
        except UserError as error:
            failure = str(error)
        failure = first_message(failure, device)
        if failure is not None:
            raise UserError(failure)
        yield batch


def tensor_chunks(images: Tensor, size: int = 4096) -> Iterator[Chunk]:
    for start in range(0, len(images), size):
        part = images[start : start + size]
        yield part, torch.arange(start, start + len(part))


def set_chunks(images: Images) -> Iterator[Chunk]:
    """Every image of a set once, read in this process: decoded in memory, or a streamed set
    read chunk by chunk (no Ray: ``report``, tests)."""
    if not isinstance(images, StreamedSet):
        yield from tensor_chunks(images.images)
        return
    for part in images.iter_images():
        yield torch.from_numpy(part["image"]), torch.from_numpy(part["position"])


def embed_all(
    model: JointModel, chunks: Iterable[Chunk], count: int, device: torch.device
) -> dict[str, Tensor]:
    """``embed`` of every image of a set, read chunk by chunk, each row at its position."""
    parts: dict[str, Tensor] = {}
    seen = 0
    for images, positions in chunks:
        sample_rss()
        out = embed(model, images, device)
        for key, value in out.items():
            if key not in parts:
                parts[key] = torch.empty((count, *value.shape[1:]), dtype=value.dtype)
            parts[key][positions.cpu()] = value
        seen += len(positions)
    if seen != count:
        raise RuntimeError(f"a pass over the images read {seen} of {count}")
    return parts


@dataclass
class Training:
    """Everything one worker's training mutates, built from the config (and a restored state)."""

    config: Config
    ctx: WorkerContext
    model: JointModel
    wrapped: nn.Module  # the model, inside DDP when there are several workers
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    augment: BatchAugment
    images: WorkerImages
    num_images: int
    steps_per_epoch: int
    start_epoch: int = 0
    objective_state: dict[str, Tensor] = field(default_factory=dict)
    terms: tuple[str, ...] = ()  # the objective's loss terms, in reporting order
    gathers_features: bool = False  # the objective reads the backbone features of the batch


def start_training(
    config: Config,
    data: RunData,
    ctx: WorkerContext,
    restored: dict[str, Any] | None,
    initial: InitialWeights | None = None,
    images: WorkerImages | None = None,
) -> Training:
    """``images``: how this worker reads them (default: decoded in memory, ``in_memory``)."""
    torch.manual_seed(config.run.seed)
    steps_per_epoch = len(data.train) // config.optim.batch_size  # >= 1: prepare_data
    model = build_model(config, data.train.channels, data.train.side)
    if initial is not None and restored is None:
        apply_initial_weights(model, initial)
    # channels-last: faster convolutions on GPU (tensor cores) and on CPU (oneDNN) alike.
    model = model.to(ctx.device, memory_format=torch.channels_last)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    state = objective.initial_state(config, len(data.train), model.pooling.mean.shape[1])
    start_epoch = 0
    if restored is not None:
        model.load_state_dict(restored["model"])
        optimizer.load_state_dict(restored["optimizer"])
        scheduler.load_state_dict(restored["scheduler"])
        torch.set_rng_state(restored["rng_state"])
        state = dict(restored.get("objective_state", state))
        start_epoch = int(restored["epoch"]) + 1
    wrapped: nn.Module = model
    if ctx.world_size > 1:
        wrapped = DistributedDataParallel(
            model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None
        )
    if config.run.compile:  # outside DDP, as PyTorch's DDP + compile notes advise
        wrapped = torch.compile(wrapped, backend=config.run.compile_backend)
    return Training(
        config=config,
        ctx=ctx,
        model=model,
        wrapped=wrapped,
        optimizer=optimizer,
        scheduler=scheduler,
        augment=BatchAugment(config.augment),
        images=images or in_memory(data, config.run.seed, ctx),
        num_images=len(data.train),
        steps_per_epoch=steps_per_epoch,
        start_epoch=start_epoch,
        objective_state={key: value.to(ctx.device) for key, value in state.items()},
        terms=objective.loss_terms(config),
        gathers_features=objective.clustering_objective(config.loss.clustering).reads_features,
    )


def gather_views(
    out: JointOutput, indices: Tensor, with_features: bool = False
) -> objective.GlobalBatch:
    """This worker's outputs of its (2b) views of the images ``indices`` (b,) → both views of
    the global batch.

    One collective per step: z | A | H (| h, when the objective reads it) of both views and the
    image index packed, gathered, unpacked (indices are exact in float32 below 2^24 images).
    """
    local = len(indices)
    parts = [out.projections.float(), out.assignments, out.cluster_hidden.float()]
    if with_features:
        parts.append(out.features.float())
    packed = torch.cat(parts, dim=1)
    rows = torch.cat([packed[:local], packed[local:], indices[:, None].to(packed)], dim=1)
    gathered = gather_with_grad(rows)
    widths = [part.shape[1] for part in parts]
    views = gathered[:, :-1].reshape(len(gathered), 2, -1).split(widths, dim=2)
    return objective.GlobalBatch(
        projections=views[0],
        assignments=views[1],
        hidden=views[2],
        features=views[3] if with_features else None,
        indices=gathered[:, -1].detach().round().long(),
        own=own_rows(local),
    )


def backbone_frozen(config: Config, epoch: int) -> bool:
    return epoch < config.model.freeze_backbone_epochs


def train_step(training: Training, views: Tensor, indices: Tensor, epoch: int) -> Tensor:
    """One optimiser step on this worker's (2b, C, H, W) views of the images ``indices`` (b,):
    its b first views, then its b second views. Returns the loss terms, detached, on the device.
    """
    model = training.model
    with autocast(training.ctx.device, training.config.run.precision):
        out = training.wrapped(views.contiguous(memory_format=torch.channels_last))
        batch = gather_views(out, indices, training.gathers_features)
        losses = objective.joint_objective(
            batch, model.pooling.statistics(), training.objective_state, training.config, epoch
        )
    model.pooling.update(out.assignments, out.features)
    training.optimizer.zero_grad(set_to_none=True)
    losses["total"].backward()
    if backbone_frozen(training.config, epoch):  # no gradient: neither Adam nor decay moves it
        for parameter in model.backbone.parameters():
            parameter.grad = None
    training.optimizer.step()
    training.scheduler.step()
    return torch.stack([losses[term].detach().float() for term in training.terms])


def refresh_objective(training: Training, epoch: int) -> None:
    """The objective's refresh from the whole training set. Every rank embeds the set and
    computes the same refresh (eval mode is deterministic), so no rank waits for another."""
    model, config = training.model, training.config
    out = embed_all(model, training.images.train_chunks(), training.num_images, training.ctx.device)
    refresh = objective.clustering_objective(config.loss.clustering).refresh
    assert refresh is not None  # refresh_due checked it
    device = training.ctx.device
    refreshed = refresh(
        objective.TrainingSet(out["features"], out["assignments"]),
        {key: value.cpu() for key, value in training.objective_state.items()},
        model.pooling.statistics(),
        config,
        epoch,
    )
    training.objective_state = {key: value.to(device) for key, value in refreshed.state.items()}
    if refreshed.pooled is not None:
        model.pooling.load_statistics(refreshed.pooled)


def train_epoch(training: Training, epoch: int) -> dict[str, Any]:
    """One pass over the shuffled training set; the mean of each loss term, and the rate.

    Raises NonFiniteLossError naming the first step whose terms were not finite.
    """
    config, ctx = training.config, training.ctx
    if objective.refresh_due(config, epoch):
        refresh_objective(training, epoch)
    # A frozen backbone keeps its batch-norm statistics too (eval mode uses, not updates, them).
    training.model.backbone.train(not backbone_frozen(config, epoch))
    seed, global_batch = config.run.seed, config.optim.batch_size
    local_batch = global_batch // ctx.world_size
    started = time.perf_counter()
    views_rng = torch.Generator(ctx.device).manual_seed((seed * 100_003 + epoch) * 1_009 + ctx.rank)
    sums = torch.zeros(len(training.terms), device=ctx.device)
    # The first step with a non-finite term and its terms, kept on the device (no sync).
    first_bad = torch.full((), -1, dtype=torch.long, device=ctx.device)
    bad_terms = torch.zeros(len(training.terms), device=ctx.device)
    steps, waited = 0, [0.0]
    batches = timed(training.images.epoch_batches(epoch, local_batch), waited)
    if training.images.coordinated:
        batches = agreed(batches, ctx.device)
    for step, (images, positions) in enumerate(batches):
        views = training.augment.stacked_views(images, generator=views_rng)
        terms = train_step(training, views, positions, epoch)
        sums += terms
        newly_bad = ~torch.isfinite(terms).all() & (first_bad < 0)
        first_bad = torch.where(newly_bad, step, first_bad)
        bad_terms = torch.where(newly_bad, terms, bad_terms)
        steps += 1
    if steps != training.steps_per_epoch:  # ranks out of step would hang in a collective
        raise RuntimeError(
            f"epoch {epoch} had {steps} batches, expected {training.steps_per_epoch}"
        )
    # DCL's terms are each rank's own anchors' mean: the epoch's figure is the ranks' mean.
    means = (all_reduce_sum(sums) / (ctx.world_size * training.steps_per_epoch)).tolist()
    elapsed = time.perf_counter() - started
    bad_step = int(first_bad)
    if bad_step >= 0:
        values = zip(training.terms, bad_terms.tolist(), strict=True)
        raise NonFiniteLossError(
            f"non-finite loss at step {epoch * training.steps_per_epoch + bad_step} (epoch "
            f"{epoch}, step {bad_step} of {training.steps_per_epoch}): "
            f"{', '.join(f'{k}={v:.4g}' for k, v in values)}; "
            f"lower optim.lr (now {config.optim.lr}) or raise loss.temperature"
        )
    return {
        **{f"loss/{term}": value for term, value in zip(training.terms, means, strict=True)},
        "epoch": epoch,
        "lr": training.scheduler.get_last_lr()[0],
        "images_per_s": training.steps_per_epoch * global_batch / elapsed,
        # The share of the epoch this worker waited for its next batch: the input's cost
        # that the step did not hide (streamed images: reading and decoding).
        "input_wait_share": waited[0] / elapsed,
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_rss_peak_mb = [0.0]  # the largest resident memory seen by sample_rss in this process


def sample_rss() -> None:
    """Note this process's resident memory (Linux /proc) at every step and chunk: its peak
    while training and evaluating, which says whether memory stays bounded as a streamed set
    grows. Its own pages only (anonymous and file-backed): the object store's shared pages a
    worker maps are Ray's, bounded by the store's size; start-up transients are left out."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if line.startswith("Rss"))
        resident = sum(int(fields[key].split()[0]) for key in ("RssAnon", "RssFile")) / 1024
    except (OSError, KeyError, ValueError):  # not Linux: the whole run's peak instead
        resident = peak_rss_mb()
    _rss_peak_mb[0] = max(_rss_peak_mb[0], resident)


def sampled_rss_peak_mb() -> float:
    return _rss_peak_mb[0]


def workers_peak_mb(device: torch.device) -> float:
    """The largest ``sample_rss`` peak of the ranks (a collective: every rank calls it)."""
    sample_rss()
    peak = torch.tensor(sampled_rss_peak_mb(), dtype=torch.float64, device=device)
    return float(all_reduce_sum(peak, dist.ReduceOp.MAX))


# --- evaluation -------------------------------------------------------------------------------


@dataclass
class Embedded:
    """The training set through the model, and the assignment rule fitted on it."""

    features: np.ndarray  # L2-normalised backbone features
    clusters: np.ndarray
    probabilities: np.ndarray
    ood: np.ndarray
    hidden: np.ndarray
    centers: np.ndarray | None  # k-means centres when eval.assign is kmeans
    ood_params: dict[str, Tensor]  # the OOD score fitted on these features (ood.OOD_SCORE)
    ood_threshold: float


def embed_training_set(
    model: JointModel,
    data: RunData,
    config: Config,
    device: torch.device,
    images: WorkerImages | None = None,
) -> Embedded:
    """``images``: how to read the training set (default: ``data.train``'s, in memory)."""
    chunks = images.train_chunks() if images else set_chunks(data.train)
    out = embed_all(model, chunks, len(data.train), device)
    features = nn.functional.normalize(out["features"], dim=1).numpy()
    centers = None
    if config.eval.assign == "kmeans":
        centers = fit_centers(features, config.model.num_clusters, config.run.seed)
    clusters, probabilities = assign(
        features, out["assignments"].numpy(), centers, config.loss.temperature
    )
    ood_params = ood.fit(ood.OOD_SCORE, out["features"], torch.from_numpy(clusters))
    scores = ood.score(ood.OOD_SCORE, ood_params, out["features"], training=True).numpy()
    return Embedded(
        features=features,
        clusters=clusters,
        probabilities=probabilities,
        ood=scores,
        hidden=out["hidden"].numpy(),
        centers=centers,
        ood_params=ood_params,
        ood_threshold=float(np.quantile(scores, ood.OOD_QUANTILE)),
    )


def assignment_table(embedded: Embedded, data: RunData) -> dict[str, np.ndarray]:
    """One entry per training image: its index in the source split, cluster, confidence, OOD
    score and label when known (the run's Parquet artifact)."""
    clusters = embedded.clusters
    table = {
        "index": np.asarray(data.lt_indices, dtype=np.int64),
        "cluster": clusters.astype(np.int64),
        "confidence": embedded.probabilities[np.arange(len(clusters)), clusters],
        "ood_score": embedded.ood,
    }
    if data.train.labels is not None:
        table["label"] = np.asarray(data.train.labels, dtype=np.int64)
    return table


def has_eval_labels(data: RunData) -> bool:
    return data.eval is not None and data.eval is not data.train and data.eval.labels is not None


def knn_accuracy(
    data: RunData, config: Config, train_rows: np.ndarray, eval_rows: np.ndarray | None = None
) -> float:
    """kNN accuracy of rows standing for the training images: on the evaluation split's rows
    when it is labelled, else leave-one-out on the training set."""
    labels, k = data.train.labels, config.eval.knn_k
    if eval_rows is None:
        return metrics.knn_accuracy(train_rows, labels, train_rows, labels, k=k, exclude_self=True)
    return metrics.knn_accuracy(train_rows, labels, eval_rows, data.eval.labels, k=k)


PIXEL_SIDE = 32  # larger images are shrunk to this side for the pixels' kNN (memory)


def pixel_rows(images: Tensor) -> np.ndarray:
    pixels = images.float() / 255.0
    if max(images.shape[-2:]) > PIXEL_SIDE:
        pixels = nn.functional.interpolate(pixels, size=(PIXEL_SIDE, PIXEL_SIDE), mode="area")
    return pixels.flatten(1).numpy()


def pixel_rows_of(chunks: Iterable[Chunk], count: int) -> np.ndarray:
    """``pixel_rows`` of every image of a set, read chunk by chunk."""
    rows: np.ndarray | None = None
    for images, positions in chunks:
        part = pixel_rows(images.cpu())
        if rows is None:
            rows = np.empty((count, part.shape[1]), dtype=part.dtype)
        rows[positions.cpu().numpy()] = part
    assert rows is not None
    return rows


def pixel_knn_accuracy(data: RunData, config: Config, images: WorkerImages) -> float:
    """kNN accuracy of the raw pixels on the same draw and split as ``knn_acc``: whether the
    features are better neighbours than the input itself."""
    eval_rows = None
    if images.eval_chunks is not None:
        eval_rows = pixel_rows_of(images.eval_chunks(), len(data.eval))
    return knn_accuracy(
        data, config, pixel_rows_of(images.train_chunks(), len(data.train)), eval_rows
    )


def evaluate(
    model: JointModel,
    data: RunData,
    config: Config,
    device: torch.device,
    embedded: Embedded,
    images: WorkerImages,
) -> dict[str, Any]:
    """Every metric of the metrics module, on the LT training set and the evaluation split."""
    num_clusters = config.model.num_clusters
    clusters = embedded.clusters
    sizes = np.bincount(clusters, minlength=num_clusters)
    # k-means on the same features: what the head adds, and the partition k_score rates.
    if embedded.centers is None:
        kmeans_clusters, _ = assign(
            embedded.features,
            embedded.probabilities,
            fit_centers(embedded.features, num_clusters, config.run.seed),
            config.loss.temperature,
        )
    else:
        kmeans_clusters = clusters
    result: dict[str, Any] = {
        "selection_score": metrics.selection_score(embedded.hidden, clusters),
        # Comparable across model.num_clusters (selection_score is not): docs/method.md.
        "k_score": metrics.knn_modularity(embedded.features, kmeans_clusters),
        "ood_threshold": embedded.ood_threshold,
        "predicted_sizes": sizes.tolist(),
        "empty_clusters": int((sizes == 0).sum()),
    }
    labels = data.train.labels
    if labels is None:
        return result
    for key, value in metrics.cluster_metrics(
        labels, clusters, num_clusters, class_order=data.class_order
    ).items():
        result[f"train/{key}"] = value
    result["train/kmeans_caa"] = metrics.cluster_metrics(
        labels, kmeans_clusters, num_clusters, class_order=data.class_order
    )["caa"]
    sizes = metrics.cluster_size_report(labels, clusters, num_clusters)
    result["true_sizes"] = sizes["true_sizes"]
    result["cluster_size_l1"] = sizes["size_l1"]
    evaluation, features = data.eval, embedded.features
    if images.eval_chunks is None:
        result["knn_acc"] = knn_accuracy(data, config, features)
        return result
    eval_out = embed_all(model, images.eval_chunks(), len(evaluation), device)
    eval_features = nn.functional.normalize(eval_out["features"], dim=1).numpy()
    eval_clusters, _ = assign(
        eval_features, eval_out["assignments"].numpy(), embedded.centers, config.loss.temperature
    )
    for key, value in metrics.cluster_metrics(
        evaluation.labels, eval_clusters, num_clusters, class_order=data.class_order
    ).items():
        result[f"test/{key}"] = value
    result["knn_acc"] = knn_accuracy(data, config, features, eval_features)
    return result


def checkpoint_state(
    training: Training, data: RunData, epoch: int, embedded: Embedded
) -> dict[str, Any]:
    """A weights_only-loadable dict: what resuming needs, and what applying the model needs
    (see checkpoint.py), so that a checkpoint works without its training data."""
    return {
        "model": training.model.state_dict(),
        "optimizer": training.optimizer.state_dict(),
        "scheduler": training.scheduler.state_dict(),
        "rng_state": torch.get_rng_state(),
        "epoch": epoch,
        "config": training.config.to_dict(),
        "lt_indices": torch.tensor(data.lt_indices),
        "in_channels": data.train.channels,
        "image_side": data.train.side,
        "ood_threshold": embedded.ood_threshold,
        "ood": embedded.ood_params,
        "centers": None if embedded.centers is None else torch.from_numpy(embedded.centers),
        "objective_state": {k: v.detach().cpu() for k, v in training.objective_state.items()},
    }


def fit(
    config: Config,
    data: RunData,
    ctx: WorkerContext,
    report: Report,
    restored: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    initial: InitialWeights | None = None,
    images: WorkerImages | None = None,
) -> dict[str, Any]:
    """Train from epoch 0 (or after ``restored``'s epoch) to ``run.epochs``; returns last metrics.

    ``report(metrics, state, assignments)`` is called by every rank once per epoch; ``state``
    (only on rank 0, on checkpoint epochs) is a weights_only-loadable dict to save as the
    checkpoint; ``assignments`` (rank 0, last epoch) are the training set's clusters.
    ``initial``: the first weights (``model.init``), unless the run continues from ``restored``.
    ``images``: how this worker reads them (default: decoded in memory).
    """
    training = start_training(config, data, ctx, restored, initial, images)
    images = training.images
    run = config.run
    if ctx.rank == 0:
        log(f"{data.train.name}: {len(data.train)} images, evaluated on {data.evaluated_on}")
    last: dict[str, Any] = {}
    pixels_knn: list[float] = []  # computed once, at the first evaluation
    for epoch in range(training.start_epoch, run.epochs):
        epoch_metrics = train_epoch(training, epoch)
        is_last = epoch == run.epochs - 1
        evaluates = is_last or (epoch + 1) % config.eval.every == 0
        saves = is_last or (epoch + 1) % run.checkpoint_every == 0
        state = assignments = None
        failure = None
        if ctx.rank == 0 and (evaluates or saves):
            try:
                state, assignments = evaluate_epoch(
                    training, data, epoch_metrics, (evaluates, saves, is_last), pixels_knn
                )
            except UserError as error:  # a streamed image that can't be read
                if not images.coordinated:
                    raise
                failure = str(error)
        if images.coordinated:  # the other ranks must not wait for rank 0 in report()
            failure = first_message(failure, ctx.device)
            if failure is not None:
                raise UserError(failure)
        epoch_metrics["memory/worker_peak_mb"] = workers_peak_mb(ctx.device)
        if ctx.rank == 0:
            log(progress_line(epoch_metrics, run.epochs))
        report(epoch_metrics, state, assignments)
        last = epoch_metrics
    return last


def evaluate_epoch(
    training: Training,
    data: RunData,
    epoch_metrics: dict[str, Any],
    due: tuple[bool, bool, bool],
    pixels_knn: list[float],
) -> tuple[dict[str, Any] | None, dict[str, np.ndarray] | None]:
    """Rank 0's end of an epoch: the metrics (into ``epoch_metrics``), when ``due`` (evaluates,
    saves, is last) says so the checkpoint's state and the assignments table."""
    evaluates, saves, is_last = due
    config, device, images = training.config, training.ctx.device, training.images
    embedded = embed_training_set(training.model, data, config, device, images)
    state = assignments = None
    if evaluates:
        epoch_metrics.update(evaluate(training.model, data, config, device, embedded, images))
        if "knn_acc" in epoch_metrics:
            if not pixels_knn:
                pixels_knn.append(pixel_knn_accuracy(data, config, images))
            epoch_metrics["knn_acc_pixels"] = pixels_knn[0]
    if saves:
        state = checkpoint_state(training, data, epoch_metrics["epoch"], embedded)
    if is_last:
        assignments = assignment_table(embedded, data)
    return state, assignments


def progress_line(epoch_metrics: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {epoch_metrics['epoch'] + 1}/{epochs}"]
    for key in (
        "loss/total",
        "loss/dcl",
        "loss/clustering",
        "loss/dcl_floor_frac",
        "train/caa",
        "train/kmeans_caa",
        "train/nmi",
        "test/caa",
        "test/nmi",
        "knn_acc",
        "knn_acc_pixels",
    ):
        if key in epoch_metrics:
            parts.append(f"{key} {epoch_metrics[key]:.4f}")
    parts.append(f"{epoch_metrics['images_per_s']:.0f} img/s")
    return " | ".join(parts)
