"""Which OOD score to ship: the four of ``jdcl_ray/ood.py`` on two settings, per seed.

.venv/bin/python benchmarks/research/ood_scores.py [--seeds 0 1 2] [--settings digits fashion]

- ``digits_noise``: ``configs/digits_lt.yaml`` trained for 3 epochs (``run.epochs=3``,
  ``run.seed``, ``data.seed`` = the seed; ``eval.every=3`` so only the last epoch evaluates);
  in-distribution = the digits test split, OOD = as many uniform-noise uint8 images of the same
  shape (seeded).
- ``fashion_heldout``: the quality study's OOD run (``jdcl_ray/bench/quality.py::ood_run``):
  the full method (pooled prior, head assignment, t = 0.5) on ``configs/fashion_lt.yaml``
  (IR 10) without classes 8 and 9, the LT set then subsampled to ``--max-images`` (4,000),
  ``--fashion-epochs`` (8) epochs, K = 8; in-distribution = every test image of classes 0–7,
  OOD = every test image of classes 8–9.

Every score is fitted on the (un-augmented, eval-mode) training features, the training clusters
(the config's assignment rule) and the pooling block's π, μ, σ². Besides the four shipped kinds,
variants that inform the choice: the diagonal scores refitted on the training features'
per-cluster statistics instead of the pooled EMA ("refit"), and the k-NN distance at other k.
Rows go to ``benchmarks/research/ood_scores.jsonl`` (``--append`` to add to it); a mean ± std
table over the seeds is printed.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jdcl_ray import metrics, ood
from jdcl_ray.bench.common import subsample, train_once
from jdcl_ray.bench.quality import FULL_METHOD, METHODS, Study, run_config
from jdcl_ray.checkpoint import model_from_state
from jdcl_ray.config import Config, load_config
from jdcl_ray.data import ImageDataset, RunData, prepare_data
from jdcl_ray.engine import embed, embed_training_set

ROOT = Path(__file__).resolve().parents[2]
JSONL = ROOT / "benchmarks" / "research" / "ood_scores.jsonl"
DIGITS_EPOCHS = 3
HELD_OUT = (8, 9)
KNN_KS = (1, 5, 10, 50)
CPU = torch.device("cpu")


def score_all(
    model: Any,
    config: Config,
    data: RunData,
    inside: torch.Tensor,
    outside: torch.Tensor,
    seed: int,
) -> dict[str, float]:
    """AUROC (OOD positive) of every score and variant, fitted on ``data.train`` (and, under
    ``knn_default_k``, the k knn_distance chose)."""
    train = embed(model, data.train.images, CPU)
    clusters = torch.from_numpy(embed_training_set(model, data, config, CPU).clusters)
    pooled = model.pooling.statistics()
    feats_in = embed(model, inside, CPU)
    feats_out = embed(model, outside, CPU)
    result: dict[str, float] = {
        "pooling.ood_score (today)": metrics.ood_auroc(feats_in["ood"], feats_out["ood"])
    }

    def auroc(kind: str, params: dict[str, torch.Tensor]) -> float:
        return metrics.ood_auroc(
            ood.score(kind, params, feats_in["features"]),
            ood.score(kind, params, feats_out["features"]),
        )

    feats = train["features"]
    for kind in ood.OOD_SCORES:
        params = ood.fit(
            kind, feats, clusters, pooled.mean, pooled.var, pooled.proportions, seed=seed
        )
        result[kind] = auroc(kind, params)
        if kind == "knn_distance":
            result["knn_default_k"] = int(params["k"])
    for kind in ("min_distance", "mixture_nll"):
        result[f"{kind} (refit)"] = auroc(kind, ood.fit(kind, feats, clusters))
    for k in KNN_KS:
        if k <= len(feats):
            params = ood.fit("knn_distance", feats, k=k, seed=seed)
            result[f"knn_distance k={k}"] = auroc("knn_distance", params)
    return result


def digits_run(seed: int) -> dict[str, Any]:
    config = load_config(
        ROOT / "configs" / "digits_lt.yaml",
        {
            "run": {"epochs": DIGITS_EPOCHS, "seed": seed, "workers": 1},
            "data": {"seed": seed},
            "eval": {"every": DIGITS_EPOCHS},
        },
    )
    data = prepare_data(config)
    started = time.perf_counter()
    last, state = train_once(config, data)
    model = model_from_state(state)
    inside = data.eval.images
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, inside.shape, generator=generator, dtype=torch.uint8)
    scores = score_all(model, config, data, inside, noise, seed)
    return {
        "setting": "digits_noise",
        "seed": seed,
        "epochs": DIGITS_EPOCHS,
        "train_images": len(data.train.images),
        "in_images": len(inside),
        "out_images": len(noise),
        "train_caa": last.get("train/caa"),
        "wall_s": round(time.perf_counter() - started, 1),
        "knn_default_k": scores.pop("knn_default_k"),
        "auroc": scores,
    }


def fashion_run(seed: int, epochs: int, max_images: int) -> dict[str, Any]:
    """quality.ood_run's data and training, every score on the whole test split."""
    study = Study(
        base=str(ROOT / "configs" / "fashion_lt.yaml"),
        imbalance_ratios=(10,),
        seeds=(seed,),
        epochs=epochs,
        max_images=max_images,
        ood_classes=HELD_OUT,
    )
    held = list(HELD_OUT)
    config = run_config(study, study.imbalance_ratios[-1], seed, METHODS[FULL_METHOD] or {})
    data = prepare_data(config)
    keep = ~np.isin(data.train.labels, held)
    test: ImageDataset = data.eval if data.eval is not None else data.train
    test_in, test_out = ~np.isin(test.labels, held), np.isin(test.labels, held)
    config = replace(
        config, model=replace(config.model, num_clusters=config.model.num_clusters - len(held))
    )
    reduced = RunData(
        train=data.train.subset(np.flatnonzero(keep)),
        eval=test.subset(np.flatnonzero(test_in)),
        lt_indices=data.lt_indices[keep],
        class_order=[c for c in data.class_order if c not in held],
    )
    reduced = subsample(reduced, max_images, seed)
    started = time.perf_counter()
    last, state = train_once(config, reduced)
    model = model_from_state(state)
    inside = test.images[torch.from_numpy(np.flatnonzero(test_in))]
    outside = test.images[torch.from_numpy(np.flatnonzero(test_out))]
    scores = score_all(model, config, reduced, inside, outside, seed)
    return {
        "setting": "fashion_heldout",
        "seed": seed,
        "epochs": epochs,
        "imbalance_ratio": 10,
        "held_out_classes": held,
        "train_images": len(reduced.train.images),
        "in_images": len(inside),
        "out_images": len(outside),
        "train_caa": last.get("train/caa"),
        "wall_s": round(time.perf_counter() - started, 1),
        "knn_default_k": scores.pop("knn_default_k"),
        "auroc": scores,
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per score, one column per setting, mean ± std over the seeds."""
    settings = list(dict.fromkeys(row["setting"] for row in rows))
    names = list(dict.fromkeys(name for row in rows for name in row["auroc"]))
    header = ["score", *(f"{s} (seeds)" for s in settings)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        cells = [name]
        for setting in settings:
            values = [
                r["auroc"][name] for r in rows if r["setting"] == setting and name in r["auroc"]
            ]
            if values:
                cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f} ({len(values)})")
            else:
                cells.append("n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--settings", nargs="+", choices=("digits", "fashion"), default=["digits", "fashion"]
    )
    parser.add_argument("--fashion-epochs", type=int, default=8)
    parser.add_argument("--max-images", type=int, default=4000)
    parser.add_argument("--jsonl", type=Path, default=JSONL)
    parser.add_argument("--append", action="store_true", help="add to --jsonl, not replace it")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with args.jsonl.open("a" if args.append else "w") as out:
        for setting in args.settings:
            for seed in args.seeds:
                if setting == "digits":
                    row = digits_run(seed)
                else:
                    row = fashion_run(seed, args.fashion_epochs, args.max_images)
                out.write(json.dumps(row) + "\n")
                out.flush()
                rows.append(row)
                print(f"{row['setting']} seed {seed}: {row['wall_s']} s", flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
