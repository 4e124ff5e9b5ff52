"""The quality suite's screening mode: variants of the full method (ours) on the study's budget.

``python -m jdcl_ray.bench quality --variants FILE [--ratios R ...] [--seeds S ...]
[--jsonl FILE] [--dump-features DIR]`` with a variants file (YAML)::

    plugins: [benchmarks/research/objectives.py]  # optional: Python files imported first (paths
                                                  # relative to the repository root), e.g. to
                                                  # register clustering objectives
    variants:                                     # name → config overrides, SECTION.KEY: value
      t05: {loss.temperature: 0.5}
      prior_l2: {loss.clustering: ddc_prior_l2}

Every run is the study's base config and budget (``--base``, ``--epochs``, ``--max-images``,
``--quick``) with the study's overrides, the full method's, then the variant's, at each ratio
(default 10 and 100) and seed (default 0). Each run prints one JSON row — the head's CAA, ACC, NMI,
tail accuracy, cluster-size L1 and empty clusters, k-means on the features (CAA, ACC, NMI, size
L1), kNN accuracy, the OOD AUROC of uniform-noise images against the evaluation split, the
head's cluster sizes, the DCL and clustering losses, the wall seconds — and appends it to
``--jsonl``; ``--baselines`` adds the pixel baselines' rows (k-means, UMAP + GMM) on each draw. ``--dump-features``
writes the training set through the model (``NAME_irR_sS.npz``: h, hidden, A, z, labels, pi),
which ``benchmarks/research/analyze.py`` and ``merge.py`` read.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans

from jdcl_ray import metrics, objective, ood
from jdcl_ray.bench.common import markdown_table, subsample, train_once
from jdcl_ray.bench.quality import FULL_METHOD, METHODS, PIXEL_BASELINES, Study, run_config
from jdcl_ray.checkpoint import model_from_state
from jdcl_ray.config import dotted_to_nested, field_type, merge, read_yaml
from jdcl_ray.data import RunData, prepare_data
from jdcl_ray.engine import embed
from jdcl_ray.errors import UserError
from jdcl_ray.models import JointModel
from jdcl_ray.ood import OOD_SCORE

REPOSITORY = Path(__file__).resolve().parents[2]  # plugin paths are relative to it
FILE_KEYS = ("plugins", "variants")
# The study sets these for every run (--ratios, --seeds, --epochs): a variant may not.
STUDY_KEYS = ("data.imbalance_ratio", "data.seed", "run.seed", "run.epochs", "run.workers")


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any]  # SECTION.KEY → value, as written

    def method(self) -> dict[str, Any]:
        """The full method's overrides with this variant's on top, nested by section."""
        nested = copy.deepcopy(METHODS[FULL_METHOD] or {})
        for key, value in self.overrides.items():
            merge(nested, dotted_to_nested(key, value))
        return nested


def load_plugin(relative: str, source: Path) -> ModuleType:
    """Import the Python file ``relative`` (to the repository root) once per process."""
    path = (REPOSITORY / relative).resolve()
    if path.suffix != ".py" or not path.is_file():
        raise UserError(
            f"{source}: plugin {relative!r} is not a Python file: expected a path relative to "
            f"the repository root {REPOSITORY}"
        )
    name = "jdcl_ray_plugin_" + re.sub(r"\W", "_", str(path))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _checked(variant: Variant, study: Study, source: Path) -> Variant:
    """``variant`` when every key is a config key the study leaves free and the config it gives
    is valid (its clustering objective registered); else a one-line error naming it."""
    where = f"{source}: variant {variant.name!r}"
    try:
        for key in variant.overrides:
            if key in STUDY_KEYS:
                raise UserError(
                    f"'{key}' is set by the study for every run: use --ratios, --seeds, --epochs"
                )
            field_type(key)
        config = run_config(study, study.imbalance_ratios[0], study.seeds[0], variant.method())
        objective.clustering_objective(config.loss.clustering)
    except UserError as error:
        raise UserError(f"{where}: {error}") from None
    return variant


def load_variants(path: Path, study: Study) -> list[Variant]:
    """The variants of a variants file, each checked, after importing its plugins."""
    if not path.is_file():
        raise UserError(f"--variants {path} does not exist: expected a YAML file of variants")
    values = read_yaml(path)
    unknown = sorted(set(values) - set(FILE_KEYS))
    if unknown:
        raise UserError(f"{path}: key {unknown[0]!r} is unknown: expected {' or '.join(FILE_KEYS)}")
    plugins = values.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise UserError(f"{path}: 'plugins' = {plugins!r}: expected a list of file paths")
    for plugin in plugins:
        load_plugin(plugin, path)
    variants = values.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise UserError(
            f"{path}: 'variants' = {variants!r}: expected a mapping of names to overrides"
        )
    loaded = []
    for name, overrides in variants.items():
        if not re.fullmatch(r"[\w.-]+", str(name)):
            raise UserError(
                f"{path}: variant name {name!r}: expected letters, digits, '_', '.', '-' (it "
                "names the --dump-features file)"
            )
        if not isinstance(overrides, dict | None):
            raise UserError(
                f"{path}: variant {name!r} = {overrides!r}: expected a mapping SECTION.KEY: value"
            )
        loaded.append(_checked(Variant(str(name), dict(overrides or {})), study, path))
    return loaded


@torch.no_grad()
def dump_features(
    path: Path, model: JointModel, out: dict[str, torch.Tensor], data: RunData
) -> Path:
    """The training set through the model: backbone features h, the head's hidden layer and
    assignments A, projections z, labels and the pooled cluster proportions pi."""
    model.eval()
    z = torch.cat([model.projection(part) for part in out["features"].split(2048)])
    np.savez_compressed(
        path,
        h=out["features"].numpy(),
        hidden=out["hidden"].numpy(),
        A=out["assignments"].numpy(),
        z=z.numpy(),
        labels=np.asarray(data.train.labels),
        pi=model.pooling.proportions().numpy(),
    )
    return path


def screen_run(
    study: Study, variant: Variant, ratio: float, seed: int, dump: Path | None
) -> dict[str, Any]:
    """Train one variant; the head's scores, k-means on its features, kNN accuracy."""
    config = run_config(study, ratio, seed, variant.method())
    data = subsample(prepare_data(config), study.max_images, seed)
    if data.train.labels is None:
        raise UserError(f"data.name {config.data.name!r} has no labels: screening scores them")
    started = time.perf_counter()
    last, state = train_once(config, data)
    model = model_from_state(state)
    out = embed(model, data.train.images, torch.device("cpu"))
    features = torch.nn.functional.normalize(out["features"], dim=1).numpy()
    k = config.model.num_clusters
    clusters = KMeans(k, n_init=3, random_state=seed).fit_predict(features)
    on_features = metrics.cluster_metrics(
        data.train.labels, clusters, k, class_order=data.class_order
    )
    km_sizes = metrics.cluster_size_report(data.train.labels, clusters, k)
    inside = data.eval if data.eval is not None else data.train
    noise = torch.randint(
        0, 256, inside.images.shape, generator=torch.Generator().manual_seed(seed)
    ).to(torch.uint8)
    params = dict(state["ood"])
    scores_in, scores_noise = (
        ood.score(OOD_SCORE, params, embed(model, images, torch.device("cpu"))["features"])
        for images in (inside.images, noise)
    )
    row = {
        "name": variant.name,
        "ir": ratio,
        "seed": seed,
        "overrides": variant.overrides,
        "wall": round(time.perf_counter() - started),
        "head_caa": last["train/caa"],
        "head_acc": last["train/acc"],
        "head_nmi": last["train/nmi"],
        "tail": last["train/tail_acc"],
        "size_l1": last["cluster_size_l1"],
        "empty": last["empty_clusters"],
        "km_caa": on_features["caa"],
        "km_acc": on_features["acc"],
        "km_nmi": on_features["nmi"],
        "km_size_l1": km_sizes["size_l1"],
        "knn": last["knn_acc"],
        "knn_pixels": last.get("knn_acc_pixels"),
        "dcl_floor_frac": last.get("loss/dcl_floor_frac"),
        "ood_noise_auroc": metrics.ood_auroc(scores_in.numpy(), scores_noise.numpy()),
        "sizes": sorted(last["predicted_sizes"], reverse=True),
        "dcl": last["loss/dcl"],
        "clustering": last["loss/clustering"],
    }
    if dump is not None:
        dump_features(dump / f"{variant.name}_ir{ratio:g}_s{seed}.npz", model, out, data)
    return row


def baseline_run(study: Study, name: str, ratio: float, seed: int) -> dict[str, Any]:
    """A pixel baseline on the draw the variants train on, in the columns of ``screen_run``
    (its clusters in the head's; the feature columns empty)."""
    config = run_config(study, ratio, seed, {})
    data = subsample(prepare_data(config), study.max_images, seed)
    started = time.perf_counter()
    scores = PIXEL_BASELINES[name](data, config.model.num_clusters, seed)
    sizes = np.asarray(scores["predicted_sizes"])
    row: dict[str, Any] = {"name": name, "ir": ratio, "seed": seed, "overrides": {}}
    row["wall"] = round(time.perf_counter() - started)
    row.update(head_caa=scores["caa"], head_acc=scores["acc"], head_nmi=scores["nmi"])
    row.update(tail=scores["tail_acc"], size_l1=scores["size_l1"], empty=int((sizes == 0).sum()))
    row["sizes"] = sorted(sizes.tolist(), reverse=True)
    return row


def _cell(value: Any) -> str:
    return "—" if value is None else f"{value:.3f}"


def table(rows: list[dict[str, Any]]) -> list[str]:
    """The rows as the markdown table of benchmarks/research/README.md."""
    header = ["variant", "IR", "seed", "head CAA", "head ACC", "tail acc", "k-means(h) CAA"]
    header += ["k-means(h) ACC", "kNN acc", "dcl", "head cluster sizes"]
    keys = ("head_caa", "head_acc", "tail", "km_caa", "km_acc", "knn", "dcl")
    cells = [
        [r["name"], f"{r['ir']:g}", r["seed"], *(_cell(r.get(k)) for k in keys), r["sizes"]]
        for r in rows
    ]
    return markdown_table(header, cells)


# The columns of the study's summary: (row key, header), mean ± std over seeds.
SUMMARY_COLUMNS = (
    ("head_caa", "CAA"),
    ("head_nmi", "NMI"),
    ("tail", "tail acc"),
    ("km_caa", "k-means(h) CAA"),
    ("size_l1", "size L1"),
    ("km_size_l1", "k-means(h) size L1"),
    ("empty", "empty clusters"),
    ("knn", "kNN acc"),
    ("knn_pixels", "pixels' kNN acc"),
    ("ood_noise_auroc", "noise AUROC"),
)


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """Mean ± std over seeds per variant and ratio (the README's study table), in run order."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["name"], row["ir"]), []).append(row)
    cells = []
    for (name, ratio), members in groups.items():
        cells.append([name, f"{ratio:g}", len(members)])
        for key, _ in SUMMARY_COLUMNS:
            values = [float(r[key]) for r in members if r.get(key) is not None]
            cells[-1].append(f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "—")
    header = ["method", "IR", "seeds", *(title for _, title in SUMMARY_COLUMNS)]
    return markdown_table(header, cells)


def main(study: Study, args: argparse.Namespace) -> int:
    """Every variant at every ratio and seed: a JSON line a run, then the table."""
    variants = load_variants(args.variants, study)
    if args.dump_features is not None:
        args.dump_features.mkdir(parents=True, exist_ok=True)
    runs = [
        (lambda r, s, name=name: baseline_run(study, name, r, s))
        for name in (PIXEL_BASELINES if args.baselines else ())
    ]
    runs += [
        (lambda r, s, v=variant: screen_run(study, v, r, s, args.dump_features))
        for variant in variants
    ]
    rows = []
    for run in runs:
        for ratio in study.imbalance_ratios:
            for seed in study.seeds:
                row = run(ratio, seed)
                line = json.dumps(row)
                print(line, flush=True)
                if args.jsonl is not None:
                    with args.jsonl.open("a") as jsonl:
                        jsonl.write(line + "\n")
                rows.append(row)
    print("\n".join(["", *table(rows), "", *summary(rows)]))
    return 0
