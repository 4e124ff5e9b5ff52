"""Screen label-free scores for choosing the number of clusters K (issue 19, deliverable 2).

For each K, a short run trains in this process (no Ray) with ``model.num_clusters = K``; its
training set is embedded once and every candidate score is taken on that trial's L2-normalised
backbone features and its clusters. A second, "frozen" screen takes one set of features (the
run at the true K, and the raw pixels) and k-means for every K, so that only K changes.

    taskset -c 0,1 .venv/bin/python benchmarks/research/k_selection_screen.py \
        --config configs/digits_lt.yaml --ratios 10 100 --seeds 0 --epochs 12 \
        --jsonl benchmarks/research/k_selection_screen.jsonl

One JSON row a (set, ratio, seed, K, source): every candidate's value and the trial's train CAA.
``--summary`` prints, per candidate, the K it picks and its Spearman correlation with CAA.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score, calinski_harabasz_score, silhouette_score
from sklearn.mixture import GaussianMixture

from jdcl_ray import metrics
from jdcl_ray.assign import assign
from jdcl_ray.config import load_config
from jdcl_ray.data import RunData, prepare_data
from jdcl_ray.engine import (
    WorkerContext,
    embed,
    embed_training_set,
    pixel_rows,
    start_training,
    train_epoch,
)

KS = (5, 6, 8, 10, 12, 15, 20)
SAMPLE = 2000
CONFIGS = {"digits": "configs/digits_lt.yaml", "fashion_mnist": "configs/fashion_lt.yaml"}
FROZEN_SAME = ("silhouette_kmeans", "stability_trial", "modularity_kmeans")  # = the trial's there


def subsample(data: RunData, limit: int | None, seed: int) -> RunData:
    if limit is None or len(data.train.images) <= limit:
        return data
    keep = np.sort(np.random.default_rng(seed).choice(len(data.train.images), limit, replace=False))
    return replace(data, train=data.train.subset(keep), lt_indices=data.lt_indices[keep])


def kmeans(x: np.ndarray, k: int, seed: int, n_init: int = 3) -> KMeans:
    return KMeans(k, n_init=n_init, random_state=seed).fit(x)


# --- candidates: (features, clusters, k, seed) -> score, higher = better ---------------------


def silhouette_kmeans(x, clusters, k, seed):
    labels = kmeans(x, k, seed).labels_
    return float(silhouette_score(x, labels, metric="cosine"))


def silhouette_trial(x, clusters, k, seed):
    if len(np.unique(clusters)) < 2:
        return -1.0
    return float(silhouette_score(x, clusters, metric="cosine"))


def calinski_trial(x, clusters, k, seed):
    if len(np.unique(clusters)) < 2:
        return 0.0
    return float(calinski_harabasz_score(x, clusters))


def stability_subsample(x, clusters, k, seed, pairs=5, fraction=0.8):
    """Ben-Hur et al. 2002: k-means on two overlapping subsamples, ARI on their intersection."""
    rng = np.random.default_rng(seed)
    n, scores = len(x), []
    for pair in range(pairs):
        a = rng.choice(n, int(fraction * n), replace=False)
        b = rng.choice(n, int(fraction * n), replace=False)
        la = np.full(n, -1)
        lb = np.full(n, -1)
        la[a] = kmeans(x[a], k, seed + 2 * pair, 1).labels_
        lb[b] = kmeans(x[b], k, seed + 2 * pair + 1, 1).labels_
        both = (la >= 0) & (lb >= 0)
        scores.append(adjusted_rand_score(la[both], lb[both]))
    return float(np.mean(scores))


def stability_transfer(x, clusters, k, seed, pairs=5):
    """Lange et al. 2004: k-means on half A predicts half B by nearest centre; ARI with
    k-means on B (ARI is chance-corrected, standing in for their random-label normalisation)."""
    rng = np.random.default_rng(seed)
    scores = []
    for pair in range(pairs):
        order = rng.permutation(len(x))
        a, b = order[: len(x) // 2], order[len(x) // 2 :]
        fitted = kmeans(x[a], k, seed + 2 * pair, 1)
        own = kmeans(x[b], k, seed + 2 * pair + 1, 1).labels_
        scores.append(adjusted_rand_score(fitted.predict(x[b]), own))
    return float(np.mean(scores))


def stability_trial(x, clusters, k, seed, pairs=5, fraction=0.8):
    """The trial's own clusters against k-means (K) on subsamples of its features."""
    rng = np.random.default_rng(seed)
    scores = []
    for pair in range(pairs):
        a = rng.choice(len(x), int(fraction * len(x)), replace=False)
        scores.append(adjusted_rand_score(clusters[a], kmeans(x[a], k, seed + pair, 1).labels_))
    return float(np.mean(scores))


def _transfer_agreement(x, k, rng, seed, pairs):
    """Clest's statistic (Dudoit & Fridlyand 2002): k-means on a learning 2/3 labels the test 1/3
    by nearest centre; ARI with k-means on the test third. Mean over ``pairs`` splits."""
    scores = []
    for pair in range(pairs):
        order = rng.permutation(len(x))
        cut = 2 * len(x) // 3
        learn, test = order[:cut], order[cut:]
        fitted = kmeans(x[learn], k, seed + 2 * pair, 1)
        own = kmeans(x[test], k, seed + 2 * pair + 1, 1).labels_
        scores.append(adjusted_rand_score(fitted.predict(x[test]), own))
    return float(np.mean(scores))


def _uniform_reference(x, rng):
    """Uniform in the box of the data's principal axes (Tibshirani et al. 2001's reference)."""
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    rotated = centred @ vt.T
    return rng.uniform(rotated.min(0), rotated.max(0), size=rotated.shape) @ vt


def _gaussian_reference(x, rng):
    """A single Gaussian with the data's mean and covariance: no clusters at all."""
    centred = x - x.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    scale = s / np.sqrt(len(x) - 1)
    return x.mean(0) + (rng.standard_normal((len(x), len(s))) * scale) @ vt


def _clest(x, k, seed, reference, pairs=5, references=3):
    """Clest: the data's transfer agreement minus its mean on null references."""
    rng = np.random.default_rng(seed)
    observed = _transfer_agreement(x, k, rng, seed, pairs)
    null = [_transfer_agreement(reference(x, rng), k, rng, seed, pairs) for _ in range(references)]
    return observed - float(np.mean(null))


def clest_uniform(x, clusters, k, seed):
    return _clest(x, k, seed, _uniform_reference)


def clest_gaussian(x, clusters, k, seed):
    return _clest(x, k, seed, _gaussian_reference)


def _matching_distance(a, b, k):
    """Lange et al. 2004's minimal matching distance: 1 − best agreement over label maps."""
    from scipy.optimize import linear_sum_assignment

    counts = np.zeros((k, k))
    np.add.at(counts, (a, b), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return 1.0 - counts[rows, cols].sum() / len(a)


def stability_lange(x, clusters, k, seed, pairs=5):
    """Lange et al. 2004: 1 − (transfer matching distance / same for random labels of the
    same sizes): 1 perfectly stable, 0 no better than chance."""
    rng = np.random.default_rng(seed)
    ratios = []
    for pair in range(pairs):
        order = rng.permutation(len(x))
        a, b = order[: len(x) // 2], order[len(x) // 2 :]
        predicted = kmeans(x[a], k, seed + 2 * pair, 1).predict(x[b])
        own = kmeans(x[b], k, seed + 2 * pair + 1, 1).labels_
        chance = np.mean([_matching_distance(rng.permutation(predicted), own, k) for _ in range(5)])
        ratios.append(_matching_distance(predicted, own, k) / max(chance, 1e-12))
    return 1.0 - float(np.mean(ratios))


def _modularity(x, clusters, neighbours=10):
    """Newman-Girvan modularity of ``clusters`` on the symmetrised cosine kNN graph of x."""
    import scipy.sparse as sp
    from sklearn.neighbors import NearestNeighbors

    n = len(x)
    found = NearestNeighbors(n_neighbors=neighbours + 1, metric="cosine").fit(x)
    cols = found.kneighbors(x, return_distance=False)[:, 1:].ravel()
    rows = np.repeat(np.arange(n), neighbours)
    a = sp.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)).tocsr()
    a = ((a + a.T) > 0).astype(float)
    total, degree = a.sum(), np.asarray(a.sum(1)).ravel()
    q = 0.0
    for c in np.unique(clusters):
        members = clusters == c
        q += a[members][:, members].sum() / total - (degree[members].sum() / total) ** 2
    return float(q)


def modularity_trial(x, clusters, k, seed):
    return _modularity(x, clusters)


def modularity_kmeans(x, clusters, k, seed):
    return _modularity(x, kmeans(x, k, seed).labels_)


def gap_statistic(x, clusters, k, seed, references=5):
    """Tibshirani et al. 2001: E*[log W_k] − log W_k, reference uniform in the PCA-aligned box."""
    rng = np.random.default_rng(seed)
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    rotated = centred @ vt.T
    low, high = rotated.min(0), rotated.max(0)
    log_w = np.log(kmeans(x, k, seed, 1).inertia_)
    ref = [
        np.log(kmeans(rng.uniform(low, high, size=rotated.shape), k, seed, 1).inertia_)
        for _ in range(references)
    ]
    return float(np.mean(ref) - log_w)


def _pca(x, seed, dims=16):
    return PCA(min(dims, x.shape[1], len(x) - 1), random_state=seed).fit_transform(x)


def gmm_heldout(x, clusters, k, seed):
    """Held-out mean log-likelihood of a diagonal Gaussian mixture (PCA-16), half/half."""
    z = _pca(x, seed)
    order = np.random.default_rng(seed).permutation(len(z))
    a, b = order[: len(z) // 2], order[len(z) // 2 :]
    gmm = GaussianMixture(k, covariance_type="diag", random_state=seed, reg_covar=1e-4).fit(z[a])
    return float(gmm.score(z[b]))


def gmm_bic(x, clusters, k, seed):
    """−BIC of a diagonal Gaussian mixture on PCA-16 features (higher = better)."""
    z = _pca(x, seed)
    gmm = GaussianMixture(k, covariance_type="diag", random_state=seed, reg_covar=1e-4).fit(z)
    return float(-gmm.bic(z))


CANDIDATES: dict[str, Callable] = {
    "silhouette_kmeans": silhouette_kmeans,
    "silhouette_trial": silhouette_trial,
    "calinski_trial": calinski_trial,
    "stability_subsample": stability_subsample,
    "stability_transfer": stability_transfer,
    "stability_trial": stability_trial,
    "clest_uniform": clest_uniform,
    "clest_gaussian": clest_gaussian,
    "stability_lange": stability_lange,
    "modularity_trial": modularity_trial,
    "modularity_kmeans": modularity_kmeans,
    "gap": gap_statistic,
    "gmm_heldout": gmm_heldout,
    "gmm_bic": gmm_bic,
}


def score_all(x, clusters, k, seed, skip=()) -> dict[str, float]:
    if len(x) > SAMPLE:
        keep = np.random.default_rng(seed).choice(len(x), SAMPLE, replace=False)
        x, clusters = x[keep], clusters[keep]
    return {name: fn(x, clusters, k, seed) for name, fn in CANDIDATES.items() if name not in skip}


def view_stability(training, data, config, embedded, seed) -> float:
    """ARI of the trial's own assignment rule on clean images vs one augmented view of them."""
    generator = torch.Generator().manual_seed(seed)
    views = training.augment(data.train.images, generator)
    out = embed(training.model, (views * 255).round().to(torch.uint8), training.ctx.device)
    features = torch.nn.functional.normalize(out["features"], dim=1).numpy()
    clusters, _ = assign(
        features, out["assignments"].numpy(), embedded.centers, config.loss.temperature
    )
    return float(adjusted_rand_score(embedded.clusters, clusters))


def train_trial(config, data):
    torch.manual_seed(config.run.seed)
    training = start_training(config, data, WorkerContext(0, 1, torch.device("cpu")), None)
    for epoch in range(config.run.epochs):
        train_epoch(training, epoch)
    return training, embed_training_set(training.model, data, config, torch.device("cpu"))


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(2)
    out = args.jsonl.open("a")

    def write(row):
        out.write(json.dumps(row) + "\n")
        out.flush()
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})

    for ratio in args.ratios:
        for seed in args.seeds:
            overrides = [
                f"data.imbalance_ratio={ratio}",
                f"data.seed={seed}",
                f"run.seed={seed}",
                f"run.epochs={args.epochs}",
                *args.set,
            ]
            base = load_config(args.config, overrides)
            data = subsample(prepare_data(base), args.max_images, seed)
            labels = np.asarray(data.train.labels)
            common = {"set": base.data.name, "ratio": ratio, "seed": seed, "epochs": args.epochs}
            true_k_features = None
            for k in args.ks:
                started = time.perf_counter()
                config = load_config(args.config, [*overrides, f"model.num_clusters={k}"])
                training, embedded = train_trial(config, data)
                caa = metrics.cluster_metrics(labels, embedded.clusters, k)["caa"]
                km = kmeans(embedded.features, k, seed).labels_
                row = {
                    **common,
                    "source": "trial",
                    "k": k,
                    "caa": caa,
                    "kmeans_caa": metrics.cluster_metrics(labels, km, k)["caa"],
                    "used": len(np.unique(embedded.clusters)),
                    "selection_score": metrics.selection_score(embedded.hidden, embedded.clusters),
                    "view_stability": view_stability(training, data, config, embedded, seed),
                    **score_all(embedded.features, embedded.clusters, k, seed),
                    "seconds": time.perf_counter() - started,
                }
                write(row)
                if args.dump is not None:
                    args.dump.mkdir(parents=True, exist_ok=True)
                    name = f"{base.data.name}_ir{ratio:g}_s{seed}_k{k}.npz"
                    np.savez_compressed(
                        args.dump / name,
                        features=embedded.features,
                        clusters=embedded.clusters,
                        hidden=embedded.hidden,
                        labels=labels,
                        caa=caa,
                    )
                if k == args.true_k:
                    true_k_features = embedded.features
            frozen = {"pixels": pixel_rows(data.train.images)}
            if true_k_features is not None:
                frozen[f"features_k{args.true_k}"] = true_k_features
            for source, x in frozen.items():
                for k in range(min(args.ks), max(args.ks) + 1):
                    km = kmeans(x, k, seed).labels_
                    row = {
                        **common,
                        "source": source,
                        "k": k,
                        "caa": metrics.cluster_metrics(labels, km, k)["caa"],
                        **score_all(
                            x,
                            km,
                            k,
                            seed,
                            skip=FROZEN_SAME,
                        ),
                    }
                    write(row)


def complete(args: argparse.Namespace) -> None:
    """Rows of ``--inputs`` merged by (set, ratio, seed, source, K) (later files win), then
    every candidate of ``--only`` a row lacks computed from what ``--dump`` saved: the trial's
    features and clusters, the run at the true K's features (k-means), or the pixels of the
    same draw (rebuilt from ``--config`` and ``--max-images``); written to ``--jsonl``."""
    merged: dict[tuple, dict] = {}
    for path in args.inputs:
        for row in map(json.loads, path.open()):
            key = (row["set"], float(row["ratio"]), row["seed"], row["source"], row["k"])
            merged.setdefault(key, {}).update(row)
    trials = {key[:3]: key for key in merged if key[3] == "trial"}
    for name, ratio, seed in trials:  # the frozen screens of every trained group, K in min..max
        ks = [key[4] for key in merged if key[:4] == (name, ratio, seed, "trial")]
        for source in ("pixels", f"features_k{args.true_k}"):
            for k in range(min(ks), max(ks) + 1):
                merged.setdefault(
                    (name, ratio, seed, source, k),
                    {"set": name, "ratio": ratio, "seed": seed, "source": source, "k": k},
                )
    pixels: dict[tuple, np.ndarray] = {}
    with args.jsonl.open("w") as out:
        for (name, ratio, seed, source, k), row in merged.items():
            missing = [c for c in ["caa", *args.only] if c not in row]
            # On a frozen row, k-means is the partition already.
            missing = [c for c in missing if source == "trial" or c not in FROZEN_SAME]
            if missing:
                dump_k = k if source == "trial" else args.true_k
                saved = np.load(args.dump / f"{name}_ir{ratio:g}_s{seed}_k{dump_k}.npz")
                x = saved["features"]
                if source == "pixels":
                    if (name, ratio, seed) not in pixels:
                        config = load_config(
                            CONFIGS[name], [f"data.imbalance_ratio={ratio}", f"data.seed={seed}"]
                        )
                        data = subsample(prepare_data(config), args.max_images, seed)
                        pixels[name, ratio, seed] = pixel_rows(data.train.images)
                    x = pixels[name, ratio, seed]
                clusters = saved["clusters"] if source == "trial" else kmeans(x, k, seed).labels_
                if "caa" in missing:
                    row["caa"] = metrics.cluster_metrics(saved["labels"], clusters, k)["caa"]
                skip = [c for c in CANDIDATES if c not in missing]
                row.update(score_all(x, clusters, k, seed, skip))
                print(name, ratio, seed, source, k, {c: round(row[c], 3) for c in missing})
            out.write(json.dumps(row) + "\n")


def summary(path: Path) -> None:
    rows = [json.loads(line) for line in path.open()]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["set"], row["ratio"], row["seed"], row["source"]), []).append(row)
    for key, group in sorted(groups.items()):
        print("\n", key)
        skip = {"set", "ratio", "seed", "source", "k", "epochs", "caa", "seconds", "used"}
        names = sorted({n for r in group for n in r} - skip - {"kmeans_caa"})
        print(f"  CAA by K: { {r['k']: round(r['caa'], 3) for r in group} }")
        for name in names:
            scored = [r for r in group if name in r]
            if len(scored) < 3:
                continue
            values = [r[name] for r in scored]
            rho = spearmanr(values, [r["caa"] for r in scored]).statistic
            print(
                f"  {name:22s} picks K={scored[int(np.argmax(values))]['k']:3d}  "
                f"rho(CAA)={rho:+.2f}  {np.round(values, 3).tolist()}"
            )


def aggregate(path: Path, source: str = "trial") -> None:
    """A Markdown table, per candidate over every (set, ratio, seed) of ``source``: the K it
    picks in each group, the mean |log2(K / 10)| of its picks and its Spearman with CAA."""
    rows = [r for r in map(json.loads, path.open()) if r["source"] == source]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["set"], row["ratio"], row["seed"]), []).append(row)
    skip = {"set", "ratio", "seed", "source", "k", "epochs", "caa", "seconds", "used", "kmeans_caa"}
    names = sorted({n for r in rows for n in r} - skip)
    order = ", ".join(f"{name} IR {ratio:g} s{seed}" for name, ratio, seed in sorted(groups))
    print(f"\n{source}: picks in the order {order}\n")
    print("| candidate | K picked | mean abs(log2(K/10)) | Spearman with CAA |\n|---|---|---|---|")
    print(
        f"| (CAA itself) | {[g[int(np.argmax([r['caa'] for r in g]))]['k'] for _, g in sorted(groups.items())]} | | |"
    )
    for name in names:
        picks, rhos = [], []
        for _, group in sorted(groups.items()):
            group = [r for r in group if name in r]
            if len(group) < 3:
                continue
            values = [r[name] for r in group]
            picks.append(group[int(np.argmax(values))]["k"])
            rhos.append(spearmanr(values, [r["caa"] for r in group]).statistic)
        if picks:
            distance = np.mean(np.abs(np.log2(np.array(picks) / 10)))
            print(
                f"| {name} | {picks} | {distance:.2f} | {np.mean(rhos):+.2f} ± {np.std(rhos):.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/digits_lt.yaml"))
    parser.add_argument("--ratios", type=float, nargs="+", default=[10, 100])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS))
    parser.add_argument("--true-k", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--jsonl", type=Path, default=Path(__file__).with_suffix(".jsonl"))
    parser.add_argument("--dump", type=Path, help="save each trial's features here (npz)")
    parser.add_argument(
        "--complete",
        nargs="+",
        type=Path,
        metavar="JSONL",
        dest="inputs",
        help="merge these screens and fill in the --only candidates they lack",
    )
    parser.add_argument("--only", nargs="*", default=[], help="--complete these candidates")
    parser.add_argument("--summary", action="store_true", help="only summarise --jsonl")
    args = parser.parse_args()
    if args.summary:
        summary(args.jsonl)
        for source in ("trial", "features_k10", "pixels"):
            aggregate(args.jsonl, source)
    elif args.inputs:
        complete(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
