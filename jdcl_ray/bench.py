"""Benchmarks: ``python -m jdcl_ray.bench quality [--quick] [--json FILE] [--markdown FILE]
[--epochs N] [--max-images N]`` and ``python -m jdcl_ray.bench throughput [--quick] [--json FILE]``.

``quality`` compares, on long-tailed sets at several imbalance ratios and seeds, with the same
epochs (the same CPU budget) per run: k-means on pixels; SimCLR then k-means on its features;
joint SimCLR + DDC; joint DCL with a fixed tau_plus + DDC (the paper); joint DCL with the pooled
per-anchor prior + DDC (ours); an ablation of the clustering weight and the temperature of the
last; and the statistics-pooling OOD score on held-out classes. Runs call the training loop
directly (one process, every core): the same code as a Ray Train worker, without start-up noise.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans

from jdcl_ray import metrics
from jdcl_ray.config import load_config
from jdcl_ray.engine import RunData, WorkerContext, build_model, embed, fit, prepare_data
from jdcl_ray.errors import UserError, run_cli

# Method → config overrides on top of the base config ("ours": the pooled prior).
METHODS: dict[str, dict[str, Any] | None] = {
    "kmeans_pixels": None,
    "simclr_kmeans": {
        "loss": {"tau_plus": 0.0, "prior": "fixed", "clustering_weight": 0.0},
        "eval": {"assign": "kmeans"},
    },
    "joint_simclr_ddc": {"loss": {"tau_plus": 0.0, "prior": "fixed"}, "eval": {"assign": "head"}},
    "joint_dcl_fixed_ddc": {"loss": {"prior": "fixed"}, "eval": {"assign": "head"}},
    "joint_dcl_pooled_ddc (ours)": {"loss": {"prior": "pooled"}, "eval": {"assign": "head"}},
}
FULL_METHOD = "joint_dcl_pooled_ddc (ours)"
# t = 0.5 (the DCL reference's) for every method: at the base config's t = 0.2 the debiased
# negative estimate sits at its floor and stops giving gradient (benchmarks/research/README.md,
# finding 3); screened at +0.05 CAA of the head at IR 10 and 100.
STUDY_OVERRIDES: dict[str, Any] = {"loss": {"temperature": 0.5}}
REPORTED = ("acc", "caa", "macro_f1", "nmi", "ari", "tail_acc", "knn_acc")


@dataclass
class Study:
    """What one quality study runs (``--quick`` shrinks every axis but keeps every section)."""

    base: str = "configs/fashion_lt.yaml"
    imbalance_ratios: tuple[float, ...] = (1, 10, 100)
    seeds: tuple[int, ...] = (0, 1, 2)
    # The per-run budget: ~70 s on 2 CPU cores; raise both (--epochs, --max-images) on a GPU.
    epochs: int = 15
    max_images: int | None = 4000  # subsample every LT set to this many images
    ablation_ratio: float = 100
    clustering_weights: tuple[float, ...] = (0.3, 1.0, 3.0)
    temperatures: tuple[float, ...] = (0.1, 0.2, 0.5)
    ood_classes: tuple[int, ...] = (8, 9)
    # On top of the base config, for every run (quick mode adds to it).
    overrides: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(STUDY_OVERRIDES))

    @classmethod
    def quick(cls) -> Study:
        return cls(
            imbalance_ratios=(10,),
            seeds=(0,),
            epochs=1,
            max_images=1200,
            ablation_ratio=10,
            clustering_weights=(0.3, 3.0),
            temperatures=(0.5,),
            overrides={
                **copy.deepcopy(STUDY_OVERRIDES),
                "eval": {"knn_k": 5},
                "optim": {"batch_size": 128},
            },
        )


def _subsample(data: RunData, limit: int | None, seed: int) -> RunData:
    if limit is None or len(data.train.images) <= limit:
        return data
    keep = np.sort(np.random.default_rng(seed).choice(len(data.train.images), limit, replace=False))
    evaluation = data.eval
    if evaluation is not None and evaluation is not data.train and len(evaluation.images) > limit:
        evaluation = evaluation.subset(np.arange(limit))
    return replace(
        data, train=data.train.subset(keep), eval=evaluation, lt_indices=data.lt_indices[keep]
    )


def run_config(study: Study, ratio: float, seed: int, method_overrides: dict[str, Any]) -> Any:
    values: dict[str, Any] = copy.deepcopy(study.overrides)
    for key, value in method_overrides.items():
        values.setdefault(key, {}).update(value)
    values.setdefault("data", {}).update({"imbalance_ratio": ratio, "seed": seed})
    values.setdefault("run", {}).update({"seed": seed, "epochs": study.epochs, "workers": 1})
    values.setdefault("eval", {}).setdefault("every", study.epochs)
    return load_config(study.base, values)


def kmeans_pixels(data: RunData, num_clusters: int, seed: int) -> dict[str, Any]:
    pixels = data.train.images.flatten(1).float().numpy() / 255.0
    clusters = KMeans(num_clusters, n_init=10, random_state=seed).fit_predict(pixels)
    return _scores(data, clusters, num_clusters)


def _scores(data: RunData, clusters: np.ndarray, num_clusters: int) -> dict[str, Any]:
    labels = data.train.labels
    result: dict[str, Any] = metrics.cluster_metrics(
        labels, clusters, num_clusters, class_order=data.class_order
    )
    sizes = metrics.cluster_size_report(labels, clusters, num_clusters)
    result.update(predicted_sizes=sizes["predicted_sizes"], true_sizes=sizes["true_sizes"])
    return result


def train_once(config: Any, data: RunData) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit in this process; the last epoch's metrics and the final training state."""
    final: dict[str, Any] = {}

    def keep_state(_metrics: dict, state: dict | None, _assignments: Any) -> None:
        if state is not None:
            final.update(state)

    ctx = WorkerContext(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    last = fit(config, data, ctx, keep_state, log=lambda _line: None)
    return last, final


def method_run(study: Study, method: str, ratio: float, seed: int) -> dict[str, Any]:
    overrides = METHODS[method]
    config = run_config(study, ratio, seed, overrides or {})
    data = _subsample(prepare_data(config), study.max_images, seed)
    started = time.perf_counter()
    if overrides is None:
        scores = kmeans_pixels(data, config.model.num_clusters, seed)
    else:
        last, _ = train_once(config, data)
        scores = {key.removeprefix("train/"): value for key, value in last.items()}
    row = {"method": method, "imbalance_ratio": ratio, "seed": seed, "epochs": study.epochs}
    row["wall_s"] = round(time.perf_counter() - started, 1)
    row.update({key: scores.get(key) for key in REPORTED})
    for key in ("predicted_sizes", "true_sizes"):  # largest first, to compare by rank
        row[key] = sorted(scores[key], reverse=True) if scores.get(key) is not None else None
    return row


def ablation_run(study: Study, key: str, value: float, seed: int) -> dict[str, Any]:
    overrides = copy.deepcopy(METHODS[FULL_METHOD]) or {}
    section, name = key.split(".")
    overrides.setdefault(section, {})[name] = value
    config = run_config(study, study.ablation_ratio, seed, overrides)
    data = _subsample(prepare_data(config), study.max_images, seed)
    started = time.perf_counter()
    last, _ = train_once(config, data)
    row = {"parameter": key, "value": value, "imbalance_ratio": study.ablation_ratio, "seed": seed}
    row["wall_s"] = round(time.perf_counter() - started, 1)
    row.update({k: last.get(f"train/{k}", last.get(k)) for k in REPORTED})
    return row


def ood_run(study: Study, seed: int) -> dict[str, Any]:
    """Train the full method on the LT set without ``ood_classes``; score held-out test images."""
    held = list(study.ood_classes)
    config = run_config(study, study.imbalance_ratios[-1], seed, METHODS[FULL_METHOD] or {})
    data = prepare_data(config)
    inside = ~np.isin(data.train.labels, held)
    test = data.eval if data.eval is not None else data.train
    test_inside, test_ood = ~np.isin(test.labels, held), np.isin(test.labels, held)
    num_clusters = config.model.num_clusters - len(held)
    config = replace(config, model=replace(config.model, num_clusters=num_clusters))
    reduced = RunData(
        train=data.train.subset(np.flatnonzero(inside)),
        eval=test.subset(np.flatnonzero(test_inside)),
        lt_indices=data.lt_indices[inside],
        class_order=[c for c in data.class_order if c not in held],
    )
    reduced = _subsample(reduced, study.max_images, seed)
    ood_images = test.subset(np.flatnonzero(test_ood))
    if study.max_images is not None:
        ood_images = ood_images.subset(np.arange(min(len(ood_images.images), study.max_images)))
    last, state = train_once(config, reduced)
    model = build_model(config, int(state["in_channels"]))
    model.load_state_dict(state["model"])
    device = torch.device("cpu")
    scores_in = embed(model, reduced.eval.images, device)["ood"].numpy()
    ood_out = embed(model, ood_images.images, device)
    features = torch.nn.functional.normalize(ood_out["features"], dim=1).numpy()
    pixels = ood_images.images.flatten(1).float().numpy() / 255.0
    ood_labels = ood_images.labels
    on_features = KMeans(len(held), n_init=10, random_state=seed).fit_predict(features)
    on_pixels = KMeans(len(held), n_init=10, random_state=seed).fit_predict(pixels)
    return {
        "seed": seed,
        "held_out_classes": held,
        "in_distribution_images": len(scores_in),
        "ood_images": len(ood_labels),
        "auroc": metrics.ood_auroc(scores_in, ood_out["ood"].numpy()),
        "train_caa": last.get("train/caa"),
        "ood_clusters_features": _two(metrics.cluster_metrics(ood_labels, on_features, len(held))),
        "ood_clusters_pixels": _two(metrics.cluster_metrics(ood_labels, on_pixels, len(held))),
    }


def _two(scores: dict[str, float]) -> dict[str, float]:
    return {key: scores[key] for key in ("acc", "nmi", "ari")}


def mean_std(rows: Iterable[dict[str, Any]], key: str) -> tuple[float, float]:
    values = [
        float(r[key]) for r in rows if r.get(key) is not None and math.isfinite(float(r[key]))
    ]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values))


def summarize(rows: list[dict[str, Any]], group: tuple[str, ...]) -> list[dict[str, Any]]:
    """Mean ± std of every reported metric over seeds, per ``group`` key combination."""
    keys = list(dict.fromkeys(tuple(r[g] for g in group) for r in rows))  # in run order
    table = []
    for combo in keys:
        members = [r for r in rows if tuple(r[g] for g in group) == combo]
        entry: dict[str, Any] = dict(zip(group, combo, strict=True))
        entry["seeds"] = len(members)
        for key in REPORTED:
            entry[key] = mean_std(members, key)
        table.append(entry)
    return table


def quality(study: Study) -> dict[str, Any]:
    started = time.perf_counter()
    runs = [
        method_run(study, method, ratio, seed)
        for ratio in study.imbalance_ratios
        for seed in study.seeds
        for method in METHODS
    ]
    ablation = [
        ablation_run(study, key, value, seed)
        for key, values in (
            ("loss.clustering_weight", study.clustering_weights),
            ("loss.temperature", study.temperatures),
        )
        for value in values
        for seed in study.seeds
    ]
    ood = [ood_run(study, seed) for seed in study.seeds]
    return {
        "study": {k: v for k, v in study.__dict__.items()},
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "runs": runs,
        "summary": summarize(runs, ("method", "imbalance_ratio")),
        "ablation": ablation,
        "ablation_summary": summarize(ablation, ("parameter", "value")),
        "ood": ood,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def _cell(value: tuple[float, float]) -> str:
    mean, std = value
    return "n/a" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def _summary_table(rows: list[dict[str, Any]], group: tuple[str, str]) -> list[str]:
    """Markdown rows of a ``summarize`` table: its two group columns, seeds, each metric."""
    lines = [
        f"| {group[0]} | {group[1]} | seeds | " + " | ".join(REPORTED) + " |",
        "|---|---|---|" + "---|" * len(REPORTED),
    ]
    for row in rows:
        cells = " | ".join(_cell(row[k]) for k in REPORTED)
        lines.append(f"| {row[group[0]]} | {row[group[1]]:g} | {row['seeds']} | {cells} |")
    return lines


def markdown(result: dict[str, Any], command: str) -> str:
    lines = [
        "# Quality study",
        "",
        f"Command: `{command}` — wall time {result['wall_s'] / 60:.1f} min on "
        f"{result['machine']['platform']} ({result['machine']['torch_threads']} torch threads).",
        "",
        f"Every run: base config `{result['study']['base']}` with {result['study']['overrides']}, "
        f"{result['study']['epochs']} epochs over at most {result['study']['max_images']} images.",
        "",
        "## Methods (mean ± std over seeds, LT training set)",
        "",
        *_summary_table(result["summary"], ("method", "imbalance_ratio")),
        "",
        "## Ablation of the full method (ours)",
        "",
        *_summary_table(result["ablation_summary"], ("parameter", "value")),
    ]
    lines += [
        "",
        "## Out-of-distribution (held-out classes of the test split)",
        "",
        "| seed | held out | AUROC | OOD k-means on features (ACC / NMI) | on pixels (ACC / NMI) |",
        "|---|---|---|---|---|",
    ]
    for row in result["ood"]:
        f, p = row["ood_clusters_features"], row["ood_clusters_pixels"]
        lines.append(
            f"| {row['seed']} | {row['held_out_classes']} | {row['auroc']:.3f} | "
            f"{f['acc']:.3f} / {f['nmi']:.3f} | {p['acc']:.3f} / {p['nmi']:.3f} |"
        )
    lines += ["", "## Predicted cluster sizes vs true class sizes (seed 0)", ""]
    for row in result["runs"]:
        if row["seed"] == result["runs"][0]["seed"] and row["predicted_sizes"] is not None:
            lines.append(
                f"- {row['method']}, IR {row['imbalance_ratio']:g}: {row['predicted_sizes']} "
                f"vs {row['true_sizes']}"
            )
    return "\n".join(lines) + "\n"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
    return path


def plot_caa(result: dict[str, Any], path: Path) -> Path:
    """CAA against the imbalance ratio, one line per method, with ± std bars."""
    figure, axis = _pyplot().subplots(figsize=(6.4, 4))
    for method in METHODS:
        rows = [r for r in result["summary"] if r["method"] == method]
        ratios = [r["imbalance_ratio"] for r in rows]
        means = [r["caa"][0] for r in rows]
        stds = [r["caa"][1] for r in rows]
        axis.errorbar(ratios, means, yerr=stds, marker="o", capsize=3, label=method)
    axis.set_xscale("log")
    axis.set_xlabel("imbalance ratio")
    axis.set_ylabel("CAA (LT training set)")
    axis.legend(fontsize=7)
    return _save(figure, path)


def plot_sizes(result: dict[str, Any], path: Path) -> Path:
    """Predicted cluster sizes (largest first) against the true class sizes, one panel per
    imbalance ratio, the first seed's runs: whether a method follows the long tail."""
    seed = result["runs"][0]["seed"]
    ratios = list(dict.fromkeys(r["imbalance_ratio"] for r in result["runs"]))
    figure, axes = _pyplot().subplots(
        1, len(ratios), figsize=(4.2 * len(ratios), 3.6), squeeze=False
    )
    for axis, ratio in zip(axes[0], ratios, strict=True):
        rows = [r for r in result["runs"] if r["seed"] == seed and r["imbalance_ratio"] == ratio]
        ranks = np.arange(len(rows[0]["true_sizes"]))
        axis.bar(ranks, rows[0]["true_sizes"], color="lightgrey", label="true classes")
        for row in rows:
            axis.plot(ranks, row["predicted_sizes"], marker=".", label=row["method"])
        axis.set_title(f"IR {ratio:g}, seed {seed}")
        axis.set_xlabel("rank (largest first)")
        axis.set_ylabel("images")
    axes[0][-1].legend(fontsize=6)
    return _save(figure, path)


# --- throughput -------------------------------------------------------------------------------


class PilViews(torch.utils.data.Dataset):
    """The conventional pipeline, as peers ship it: SimCLR's transforms applied per PIL image,
    two views per image, run in DataLoader worker processes."""

    def __init__(self, images: torch.Tensor, config: Any) -> None:
        from torchvision import transforms as T

        self.images = images.permute(0, 2, 3, 1).squeeze(-1).numpy()  # HWC or HW for PIL
        size = images.shape[-1]
        self.transform = T.Compose(
            [
                T.RandomResizedCrop(size, scale=config.crop_scale),
                T.RandomHorizontalFlip(config.flip_p),
                T.RandomApply([T.ColorJitter(*config.jitter)], p=config.jitter_p),
                T.RandomGrayscale(config.grayscale_p),
                T.ToTensor(),
            ]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        image = Image.fromarray(self.images[index])
        return self.transform(image), self.transform(image)


def conventional_batches(images: torch.Tensor, config: Any, batch: int, workers: int) -> Any:
    loader = torch.utils.data.DataLoader(
        PilViews(images, config),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
    )
    while True:
        yield from loader


def _rate(images_per_call: int, calls: int, run: Any) -> float:
    """Images per second of ``calls`` calls of ``run`` (after one warm-up call)."""
    run()
    started = time.perf_counter()
    for _ in range(calls):
        run()
    return images_per_call * calls / (time.perf_counter() - started)


def synthetic_images(count: int, channels: int, side: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(
        0, 256, (count, channels, side, side), dtype=torch.uint8, generator=generator
    )


def augmentation_throughput(channels: int, side: int, batch: int, calls: int, workers: int) -> dict:
    from jdcl_ray.augment import AugmentConfig, BatchAugment

    config = AugmentConfig()
    images = synthetic_images(batch * 4, channels, side)
    augment, generator = BatchAugment(config), torch.Generator().manual_seed(0)
    order = iter(range(10**9))

    def batched() -> None:
        start = (next(order) % 4) * batch
        augment.stacked_views(images[start : start + batch], generator)

    conventional = conventional_batches(images, config, batch, workers)
    batched_rate = _rate(batch, calls, batched)
    conventional_rate = _rate(batch, calls, lambda: next(conventional))
    return {
        "batched_img_s": batched_rate,
        "conventional_img_s": conventional_rate,
        "ratio": batched_rate / conventional_rate,
    }


def step_throughput(
    config: Any,
    device: torch.device,
    batch: int,
    steps: int,
    workers: int,
    conventional: bool = True,
) -> dict:
    """Images/s of the full step, of the model step on ready tensors, and of the model step fed by
    the conventional pipeline; also the share of the full step spent making its input."""
    from jdcl_ray.augment import BatchAugment
    from jdcl_ray.engine import autocast, build_optimizer, joint_loss

    side, channels = (
        28 if config.model.backbone == "small_cnn" else 32,
        1 if config.model.backbone == "small_cnn" else 3,
    )
    images = synthetic_images(batch * 4, channels, side).to(device)
    model = build_model(config, channels).to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(config, model)
    augment, generator = BatchAugment(config.augment), torch.Generator(device).manual_seed(0)
    epoch = max(
        config.loss.clustering_warmup_epochs, config.loss.prior_warmup_epochs
    )  # every term on
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def model_step(views: torch.Tensor) -> None:
        with autocast(device):
            losses = joint_loss(model, model, views, config, epoch)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()

    ready = augment.stacked_views(images[:batch], generator)
    order = iter(range(10**9))
    input_time = [0.0]

    def full_step() -> None:
        start = (next(order) % 4) * batch
        begun = time.perf_counter()
        views = augment.stacked_views(images[start : start + batch], generator)
        sync()
        input_time[0] += time.perf_counter() - begun
        model_step(views)
        sync()

    def ready_step() -> None:
        model_step(ready)
        sync()

    # Alternate the two steps so that both see the same machine (load, clocks, caches).
    ready_step()
    full_step()
    spent = {"ready": 0.0, "full": 0.0}
    input_time[0] = 0.0
    for _ in range(steps):
        for name, step in (("ready", ready_step), ("full", full_step)):
            begun = time.perf_counter()
            step()
            spent[name] += time.perf_counter() - begun
    model_rate, full_rate = batch * steps / spent["ready"], batch * steps / spent["full"]
    result = {
        "model_only_img_s": model_rate,
        "full_step_img_s": full_rate,
        "full_vs_model_only": full_rate / model_rate,
        "input_share_of_full_step": input_time[0] / spent["full"],
    }
    if conventional:
        loader = conventional_batches(images.cpu(), config.augment, batch, workers)

        def conventional_step() -> None:
            first, second = next(loader)
            model_step(torch.cat([first, second]).to(device, non_blocking=True))
            sync()

        rate = _rate(batch, steps, conventional_step)
        result.update(conventional_img_s=rate, conventional_vs_model_only=rate / model_rate)
    return result


def ray_overhead(base: str, epochs: int, max_images: int) -> dict:
    """One epoch's images/s under Ray Train (1 worker, all cores) vs the same loop bare here."""
    import tempfile

    from jdcl_ray.train import init_ray, run_training, saved_checkpoints

    cores = torch.get_num_threads()
    config = load_config(
        base,
        {
            "run": {
                "epochs": epochs,
                "workers": 1,
                "cpus_per_worker": cores,
                "keep_checkpoints": epochs,
            },
            "eval": {"every": epochs + 1},
        },
    )
    data = _subsample(prepare_data(config), max_images, 0)
    rates: list[float] = []

    def note(metrics_: dict, _state: Any, _assignments: Any) -> None:
        rates.append(metrics_["images_per_s"])

    fit(config, data, WorkerContext(0, 1, torch.device("cpu")), note, log=lambda _line: None)
    bare = float(np.mean(rates[1:] or rates))
    init_ray(None)
    with tempfile.TemporaryDirectory() as output:
        run_training(config, output, data)
        reported = [metrics_ for metrics_, _ in saved_checkpoints(output)]
    under_ray = float(
        np.mean([m["images_per_s"] for m in reported[1:]] or [reported[-1]["images_per_s"]])
    )
    startup, teardown = ray_worker_startup(cores)
    return {
        "bare_epoch_img_s": bare,
        "ray_epoch_img_s": under_ray,
        "ray_vs_bare": under_ray / bare,
        "worker_startup_s": startup,
        "worker_teardown_s": teardown,
        "epochs": epochs,
        "images": len(data.train.images),
    }


def _now() -> float:
    return time.time()


def ray_worker_startup(cores: float) -> tuple[float, float]:
    """Seconds from ``TorchTrainer.fit()`` to its worker function starting, and from its end
    to ``fit()`` returning (a 1-worker run whose function only returns the time)."""
    import tempfile

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory() as output:
        trainer = TorchTrainer(
            _now,
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cores}),
            run_config=RunConfig(name="startup", storage_path=output),
        )
        called = time.time()
        started = trainer.fit().return_value
        returned = time.time()
    return started - called, returned - started


def _loss_inputs(batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """B images → 2B projections of 128, 2B assignments over 10 clusters, 2B hidden rows of 100."""
    generator = torch.Generator(device).manual_seed(0)
    shapes = ((batch, 128), (batch, 128), (2 * batch, 10), (2 * batch, 100))
    return tuple(
        torch.randn(*shape, device=device, generator=generator).requires_grad_() for shape in shapes
    )


def _loss_step(inputs: tuple[torch.Tensor, ...], device: torch.device) -> None:
    from jdcl_ray.losses import dcl_loss, ddc_loss

    z1, z2, logits, hidden = inputs
    loss = dcl_loss(z1, z2, 0.5, 0.1) + ddc_loss(logits.softmax(1), hidden)["total"]
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()


def _status_bytes(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field_name} in /proc/self/status")


def loss_peak_child(batch: int) -> None:
    """In a fresh process (no allocator cache yet): peak RSS growth of one loss step, printed."""
    inputs = _loss_inputs(batch, torch.device("cpu"))
    before = _status_bytes("VmRSS")
    _loss_step(inputs, torch.device("cpu"))
    print(_status_bytes("VmHWM") - before)


def _cpu_loss_peak_mb(batch: int) -> float | None:
    import subprocess

    code = f"from jdcl_ray.bench import loss_peak_child; loss_peak_child({batch})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return None
    return int(done.stdout.strip().splitlines()[-1]) / 2**20


def loss_cost(global_batches: Iterable[int], device: torch.device, repeats: int) -> list[dict]:
    """Forward + backward time and peak memory of dcl_loss + ddc_loss at each global batch."""
    rows = []
    for batch in global_batches:
        inputs = _loss_inputs(batch, device)
        _loss_step(inputs, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
        started = time.perf_counter()
        for _ in range(repeats):
            _loss_step(inputs, device)
        seconds = (time.perf_counter() - started) / repeats
        if device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated() - baseline) / 2**20
        else:
            peak = _cpu_loss_peak_mb(batch)
        rows.append({"global_batch": batch, "seconds": seconds, "peak_extra_mb": peak})
    return rows


def throughput(quick: bool, base: str) -> dict[str, Any]:
    """Every figure of the throughput suite, measured side by side in this one process."""
    device = torch.device("cpu")
    calls, steps = (3, 3) if quick else (20, 20)
    workers = min(2, torch.get_num_threads())
    small = load_config(base, {"optim": {"batch_size": 256}})
    result: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "loader_workers": workers,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "augmentation": {
            "rgb32": augmentation_throughput(3, 32, 256, calls, workers),
            "grey28": augmentation_throughput(1, 28, 256, calls, workers),
        },
        "step": step_throughput(small, device, 256, steps, workers),
        "ray": ray_overhead(base, 2 if quick else 4, 1024 if quick else 8192),
        "loss": loss_cost((512, 1024) if quick else (512, 1024, 4096), device, 1 if quick else 3),
        "gpu": None,
    }
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        gpu_config = load_config(
            base,
            {
                "model": {"backbone": "resnet18_cifar"},
                "augment": {"crop_scale": [0.08, 1.0]},
                "optim": {"batch_size": 512},
            },
        )
        gpu: dict[str, Any] = {}
        for precision in ("fp32", "bf16"):
            if precision == "fp32":
                torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            else:
                torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
            gpu[precision] = step_throughput(
                gpu_config, cuda, 512, steps * 3, workers, conventional=precision == "bf16"
            )
        gpu["loss"] = loss_cost((512, 1024, 4096), cuda, 5)
        result["gpu"] = gpu
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jdcl_ray.bench", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    study = commands.add_parser("quality", help="the clustering-quality study")
    study.add_argument("--quick", action="store_true", help="a few minutes: every section, tiny")
    study.add_argument("--json", type=Path, help="write the raw result here")
    study.add_argument("--markdown", type=Path, help="write the tables here (plots beside it)")
    study.add_argument("--base", help="base config (default configs/fashion_lt.yaml)")
    study.add_argument("--epochs", type=int, help="epochs of every training run (the budget)")
    study.add_argument(
        "--max-images", type=int, help="subsample every LT set to this many images (the budget)"
    )
    speed = commands.add_parser("throughput", help="images/s of augmentation, step, Ray, losses")
    speed.add_argument("--quick", action="store_true", help="seconds per figure instead of minutes")
    speed.add_argument("--json", type=Path, help="write the JSON object here too")
    speed.add_argument("--base", default="configs/fashion_lt.yaml", help="config of the step")
    return parser.parse_args(argv)


def positive(option: str, value: int) -> int:
    if value < 1:
        raise UserError(f"{option} {value}: expected a whole number >= 1")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "throughput":
        figures = throughput(args.quick, args.base)
        text = json.dumps(figures, indent=1)
        if args.json:
            args.json.write_text(text)
        print(text)
        return 0
    study = Study.quick() if args.quick else Study()
    if args.base:
        study.base = args.base
    if args.epochs is not None:
        study.epochs = positive("--epochs", args.epochs)
    if args.max_images is not None:
        study.max_images = positive("--max-images", args.max_images)
    result = quality(study)
    command = " ".join(["python -m jdcl_ray.bench", *(argv if argv is not None else sys.argv[1:])])
    text = markdown(result, command)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=float))
    if args.markdown:
        args.markdown.write_text(text)
        plot_caa(result, args.markdown.with_name(args.markdown.stem + "_caa.png"))
        plot_sizes(result, args.markdown.with_name(args.markdown.stem + "_sizes.png"))
    print(text)
    return 0


if __name__ == "__main__":
    run_cli(main)
