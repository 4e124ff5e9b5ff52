"""Which K does ``k_score`` pick, and does its ranking agree with CAA? (issue 19)

For each set, imbalance ratio and seed, one short run per K trains in this process through the
product's own loop (``engine.fit``, no Ray: what each Tune trial runs) and its last evaluation's
``k_score``, ``selection_score`` and ``train/caa`` are kept. Per (set, ratio, seed): the K each
label-free score picks and its Spearman correlation with CAA over the K values.

    .venv/bin/python benchmarks/k_selection.py --config configs/digits_lt.yaml --epochs 12 \\
        --seeds 0 1 2 --jsonl benchmarks/results/k_selection.jsonl
    .venv/bin/python benchmarks/k_selection.py --config configs/fashion_lt.yaml --epochs 8 \\
        --max-images 3000 --seeds 0 --jsonl benchmarks/results/k_selection.jsonl
    .venv/bin/python benchmarks/k_selection.py --summary benchmarks/results/k_selection.jsonl

One JSON row a trial (``"kind": "trial"``) and one a group (``"kind": "group"``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from jdcl_ray.config import load_config
from jdcl_ray.data import RunData, prepare_data
from jdcl_ray.engine import WorkerContext, fit

KS = (5, 8, 10, 12, 15, 20)
SCORES = ("k_score", "selection_score")


def subsample(data: RunData, limit: int | None, seed: int) -> RunData:
    """At most ``limit`` training images, a seeded draw (the same for every K)."""
    if limit is None or len(data.train.images) <= limit:
        return data
    keep = np.sort(np.random.default_rng(seed).choice(len(data.train.images), limit, replace=False))
    return replace(data, train=data.train.subset(keep), lt_indices=data.lt_indices[keep])


def group_row(trials: list[dict]) -> dict:
    caa = [t["caa"] for t in trials]
    row = {key: trials[0][key] for key in ("set", "ratio", "seed", "epochs", "images")}
    row.update(kind="group", ks=[t["k"] for t in trials], caa_by_k=caa)
    row["best_caa_k"] = trials[int(np.argmax(caa))]["k"]
    for score in SCORES:
        values = [t[score] for t in trials]
        picked = trials[int(np.argmax(values))]
        row[f"{score}_picks"] = picked["k"]
        row[f"{score}_picked_caa"] = picked["caa"]
        row[f"{score}_spearman"] = float(spearmanr(values, caa).statistic)
    return row


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    ctx = WorkerContext(0, 1, torch.device("cpu"))
    with args.jsonl.open("a") as out:
        for ratio in args.ratios:
            for seed in args.seeds:
                common = [
                    f"data.imbalance_ratio={ratio}",
                    f"data.seed={seed}",
                    f"run.seed={seed}",
                    f"run.epochs={args.epochs}",
                    f"eval.every={args.epochs}",  # only the last epoch is scored
                    "data.eval_split=none",
                ]
                base = load_config(args.config, common)
                data = subsample(prepare_data(base), args.max_images, seed)
                trials = []
                for k in args.ks:
                    config = load_config(args.config, [*common, f"model.num_clusters={k}"])
                    started = time.perf_counter()
                    last = fit(config, data, ctx, lambda *_: None, log=lambda _: None)
                    trial = {
                        "kind": "trial",
                        "set": base.data.name,
                        "ratio": ratio,
                        "seed": seed,
                        "epochs": args.epochs,
                        "images": len(data.train.images),
                        "k": k,
                        "caa": last["train/caa"],
                        "nmi": last["train/nmi"],
                        "kmeans_caa": last["train/kmeans_caa"],
                        **{score: last[score] for score in SCORES},
                        "empty_clusters": last["empty_clusters"],
                        "seconds": round(time.perf_counter() - started, 1),
                    }
                    trials.append(trial)
                    out.write(json.dumps(trial) + "\n")
                    out.flush()
                    print({k: round(v, 3) if isinstance(v, float) else v for k, v in trial.items()})
                group = group_row(trials)
                out.write(json.dumps(group) + "\n")
                out.flush()
                print(group)


def summary(path: Path) -> None:
    """A Markdown table: per (set, ratio), the K picked at each seed and the Spearman
    correlations (mean ± std over seeds) with the trials' CAA and with k-means' CAA on the
    trials' features (the partition k_score rates; the same thing under eval.assign kmeans)."""
    trials = [row for row in map(json.loads, path.open()) if row["kind"] == "trial"]
    groups: dict[tuple, list[dict]] = {}
    for row in trials:
        groups.setdefault((row["set"], row["ratio"], row["seed"]), []).append(row)
    by_set: dict[tuple, list[tuple[dict, list[dict]]]] = {}
    for (name, ratio, _), rows in sorted(groups.items()):
        by_set.setdefault((name, ratio), []).append((group_row(rows), rows))
    print(
        "| set | IR | images | seeds | K with the best CAA | k_score picks | CAA at pick / best "
        "| Spearman(k_score, CAA) | Spearman(k_score, k-means CAA) | selection_score picks "
        "| Spearman(selection_score, CAA) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (name, ratio), entries in sorted(by_set.items()):

        def rho(score: str, target: str, entries: list = entries) -> str:
            values = [
                spearmanr([t[score] for t in rows], [t[target] for t in rows]).statistic
                for _, rows in entries
            ]
            return f"{np.mean(values):+.2f} ± {np.std(values):.2f}"

        def listed(key: str, entries: list = entries) -> str:
            return ", ".join(str(group[key]) for group, _ in entries)

        caa = ", ".join(
            f"{group['k_score_picked_caa']:.2f}/{max(group['caa_by_k']):.2f}"
            for group, _ in entries
        )
        print(
            f"| {name} | {ratio:g} | {entries[0][0]['images']} | {len(entries)} "
            f"| {listed('best_caa_k')} | {listed('k_score_picks')} | {caa} "
            f"| {rho('k_score', 'caa')} | {rho('k_score', 'kmeans_caa')} "
            f"| {listed('selection_score_picks')} | {rho('selection_score', 'caa')} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/digits_lt.yaml"))
    parser.add_argument("--ratios", type=float, nargs="+", default=[10, 100])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jsonl", type=Path, default=Path("benchmarks/results/k_selection.jsonl"))
    parser.add_argument("--summary", type=Path, metavar="JSONL", help="only print the table")
    args = parser.parse_args()
    if args.summary:
        summary(args.summary)
    else:
        run(args)


if __name__ == "__main__":
    main()
