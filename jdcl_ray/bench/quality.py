"""The quality study: clustering quality of every method on long-tailed sets, same budget each.

On long-tailed sets at several imbalance ratios and seeds, with the same epochs (the same CPU
budget) per run: k-means on pixels; SimCLR then k-means on its features; joint SimCLR + DDC;
joint DCL with a fixed tau_plus + DDC (the paper); joint DCL with the pooled per-anchor prior +
DDC (ours); an ablation of the clustering weight and the temperature of the last; and the
statistics-pooling OOD score on held-out classes. Runs call the training loop directly (one
process, every core): the same code as a Ray Train worker, without start-up noise. Variants of
the full method on the same budget: ``screen.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

from jdcl_ray import metrics, ood
from jdcl_ray.bench.common import (
    machine,
    markdown_table,
    positive,
    pyplot,
    save_figure,
    subsample,
    train_once,
)
from jdcl_ray.checkpoint import model_from_state
from jdcl_ray.config import Config, load_config, merge
from jdcl_ray.data import RunData, prepare_data
from jdcl_ray.engine import embed, embed_training_set, pixel_rows
from jdcl_ray.errors import UserError
from jdcl_ray.ood import OOD_SCORE

# Method → config overrides on top of the base config ("ours": the pooled prior); None: a
# baseline on the pixels (PIXEL_BASELINES), no training.
METHODS: dict[str, dict[str, Any] | None] = {
    "kmeans_pixels": None,
    "umap_gmm_pixels": None,
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
# The methods are the paper's, with DDC whatever the base config's objective (a screening
# variant sets its own loss.clustering).
STUDY_OVERRIDES: dict[str, Any] = {"loss": {"temperature": 0.5, "clustering": "ddc"}}
# The screening mode's axes (screen.py), unless --ratios and --seeds say otherwise.
SCREEN_RATIOS: tuple[float, ...] = (10, 100)
SCREEN_SEEDS: tuple[int, ...] = (0,)
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

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Study:
        """The study (or quick study) with the command line's base, budget and axes (the
        last ratio is the ablation's; screening has its own default axes)."""
        study = cls.quick() if args.quick else cls()
        if args.variants:
            study.imbalance_ratios, study.seeds = SCREEN_RATIOS, SCREEN_SEEDS
        if args.base:
            study.base = args.base
        if args.epochs is not None:
            study.epochs = positive("--epochs", args.epochs)
        if args.max_images is not None:
            study.max_images = positive("--max-images", args.max_images)
        if args.ratios:
            study.imbalance_ratios = tuple(args.ratios)
            study.ablation_ratio = args.ratios[-1]
        if args.seeds:
            study.seeds = tuple(args.seeds)
        return study


def run_config(study: Study, ratio: float, seed: int, method_overrides: dict[str, Any]) -> Config:
    """The base config with the study's, then the method's overrides, at ``ratio`` and ``seed``."""
    values = merge(copy.deepcopy(study.overrides), copy.deepcopy(method_overrides))
    values.setdefault("data", {}).update({"imbalance_ratio": ratio, "seed": seed})
    values.setdefault("run", {}).update({"seed": seed, "epochs": study.epochs, "workers": 1})
    values.setdefault("eval", {}).setdefault("every", study.epochs)
    return load_config(study.base, values)


def kmeans_pixels(data: RunData, num_clusters: int, seed: int) -> dict[str, Any]:
    clusters = KMeans(num_clusters, n_init=10, random_state=seed).fit_predict(
        pixel_rows(data.train.images)
    )
    return _scores(data, clusters, num_clusters)


def umap_gmm_pixels(data: RunData, num_clusters: int, seed: int) -> dict[str, Any]:
    """N2D's clustering step on the pixels (McConville et al. 2020, without its autoencoder):
    UMAP to K dimensions (20 neighbours, min_dist 0), then a full-covariance GMM."""
    try:
        import umap
    except ImportError:
        raise UserError(
            "the umap_gmm_pixels baseline needs umap-learn: pip install -e '.[dev]'"
        ) from None
    embedding = umap.UMAP(
        n_components=num_clusters, n_neighbors=20, min_dist=0.0, random_state=seed
    ).fit_transform(pixel_rows(data.train.images))
    mixture = GaussianMixture(num_clusters, covariance_type="full", random_state=seed)
    return _scores(data, mixture.fit_predict(embedding), num_clusters)


PIXEL_BASELINES = {"kmeans_pixels": kmeans_pixels, "umap_gmm_pixels": umap_gmm_pixels}


def _scores(data: RunData, clusters: np.ndarray, num_clusters: int) -> dict[str, Any]:
    labels = data.train.labels
    result: dict[str, Any] = metrics.cluster_metrics(
        labels, clusters, num_clusters, class_order=data.class_order
    )
    sizes = metrics.cluster_size_report(labels, clusters, num_clusters)
    result.update({key: sizes[key] for key in ("predicted_sizes", "true_sizes", "size_l1")})
    return result


def method_run(study: Study, method: str, ratio: float, seed: int) -> dict[str, Any]:
    overrides = METHODS[method]
    config = run_config(study, ratio, seed, overrides or {})
    data = subsample(prepare_data(config), study.max_images, seed)
    started = time.perf_counter()
    if overrides is None:
        scores = PIXEL_BASELINES[method](data, config.model.num_clusters, seed)
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
    section, name = key.split(".")
    overrides = merge(copy.deepcopy(METHODS[FULL_METHOD]) or {}, {section: {name: value}})
    config = run_config(study, study.ablation_ratio, seed, overrides)
    data = subsample(prepare_data(config), study.max_images, seed)
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
    reduced = subsample(reduced, study.max_images, seed)
    ood_images = test.subset(np.flatnonzero(test_ood))
    if study.max_images is not None:
        ood_images = ood_images.subset(np.arange(min(len(ood_images.images), study.max_images)))
    last, state = train_once(config, reduced)
    model = model_from_state(state)
    device = torch.device("cpu")
    fitted = embed_training_set(model, reduced, config, device).ood_params
    scores_in = ood.score(OOD_SCORE, fitted, embed(model, reduced.eval.images, device)["features"])
    ood_out = embed(model, ood_images.images, device)
    features = torch.nn.functional.normalize(ood_out["features"], dim=1).numpy()
    pixels = pixel_rows(ood_images.images)
    ood_labels = ood_images.labels
    on_features = KMeans(len(held), n_init=10, random_state=seed).fit_predict(features)
    on_pixels = KMeans(len(held), n_init=10, random_state=seed).fit_predict(pixels)
    return {
        "seed": seed,
        "held_out_classes": held,
        "in_distribution_images": len(scores_in),
        "ood_images": len(ood_labels),
        "auroc": metrics.ood_auroc(
            scores_in.numpy(), ood.score(OOD_SCORE, fitted, ood_out["features"]).numpy()
        ),
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
        "study": dict(study.__dict__),
        "machine": machine(),
        "runs": runs,
        "summary": summarize(runs, ("method", "imbalance_ratio")),
        "ablation": ablation,
        "ablation_summary": summarize(ablation, ("parameter", "value")),
        "ood": ood,
        "wall_s": round(time.perf_counter() - started, 1),
    }


# --- the report -------------------------------------------------------------------------------


def _cell(value: tuple[float, float]) -> str:
    mean, std = value
    return "n/a" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def _summary_table(rows: list[dict[str, Any]], group: tuple[str, str]) -> list[str]:
    """Markdown rows of a ``summarize`` table: its two group columns, seeds, each metric."""
    return markdown_table(
        [*group, "seeds", *REPORTED],
        [
            [row[group[0]], f"{row[group[1]]:g}", row["seeds"], *(_cell(row[k]) for k in REPORTED)]
            for row in rows
        ],
    )


def _acc_nmi(scores: dict[str, float]) -> str:
    return f"{scores['acc']:.3f} / {scores['nmi']:.3f}"


def markdown(result: dict[str, Any], command: str) -> str:
    study, where = result["study"], result["machine"]
    ood = [
        [
            row["seed"],
            row["held_out_classes"],
            f"{row['auroc']:.3f}",
            _acc_nmi(row["ood_clusters_features"]),
            _acc_nmi(row["ood_clusters_pixels"]),
        ]
        for row in result["ood"]
    ]
    lines = [
        "# Quality study",
        "",
        f"Command: `{command}` — wall time {result['wall_s'] / 60:.1f} min on "
        f"{where['platform']} ({where['torch_threads']} torch threads).",
        "",
        f"Every run: base config `{study['base']}` with {study['overrides']}, "
        f"{study['epochs']} epochs over at most {study['max_images']} images.",
        "",
        "## Methods (mean ± std over seeds, LT training set)",
        "",
        *_summary_table(result["summary"], ("method", "imbalance_ratio")),
        "",
        "## Ablation of the full method (ours)",
        "",
        *_summary_table(result["ablation_summary"], ("parameter", "value")),
        "",
        "## Out-of-distribution (held-out classes of the test split)",
        "",
        *markdown_table(
            [
                "seed",
                "held out",
                "AUROC",
                "OOD k-means on features (ACC / NMI)",
                "on pixels (ACC / NMI)",
            ],
            ood,
        ),
        "",
        "## Predicted cluster sizes vs true class sizes (seed 0)",
        "",
    ]
    for row in result["runs"]:
        if row["seed"] == result["runs"][0]["seed"] and row["predicted_sizes"] is not None:
            lines.append(
                f"- {row['method']}, IR {row['imbalance_ratio']:g}: {row['predicted_sizes']} "
                f"vs {row['true_sizes']}"
            )
    return "\n".join(lines) + "\n"


def plot_caa(result: dict[str, Any], path: Path) -> Path:
    """CAA against the imbalance ratio, one line per method, with ± std bars."""
    figure, axis = pyplot().subplots(figsize=(6.4, 4))
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
    return save_figure(figure, path)


def plot_sizes(result: dict[str, Any], path: Path) -> Path:
    """Predicted cluster sizes (largest first) against the true class sizes, one panel per
    imbalance ratio, the first seed's runs: whether a method follows the long tail."""
    seed = result["runs"][0]["seed"]
    ratios = list(dict.fromkeys(r["imbalance_ratio"] for r in result["runs"]))
    figure, axes = pyplot().subplots(
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
    return save_figure(figure, path)


def main(study: Study, args: argparse.Namespace, command: str) -> int:
    """The study; its tables printed, and written with the raw result and plots where asked."""
    result = quality(study)
    text = markdown(result, command)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=float))
    if args.markdown:
        args.markdown.write_text(text)
        plot_caa(result, args.markdown.with_name(args.markdown.stem + "_caa.png"))
        plot_sizes(result, args.markdown.with_name(args.markdown.stem + "_sizes.png"))
    print(text)
    return 0
