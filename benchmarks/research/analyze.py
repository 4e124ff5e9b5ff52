"""Offline screening on frozen features: assignment methods and heads trained on the features.

taskset -c 1 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/research/analyze.py \
    --features benchmarks/research/out/NAME_ir10_s0.npz [METHOD ...] [--jsonl FILE]
taskset -c 1 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/research/analyze.py \
    --pixels benchmarks/research/fashion_ir10.yaml km_h gmm_pca spectral

Features come from ``python -m jdcl_ray.bench quality --variants FILE --dump-features DIR``
(h: backbone features, z: projections, hidden and A: the head's, labels); ``--pixels CONFIG`` reads
the config's long-tailed set as h = pixels / 255 instead. Methods: nbr (20-neighbour label purity),
head, km_h, km_z, km_hidden, gmm_pca, gmm_diag (on PCA-32 of h), spectral (kNN-20 graph),
ddc_uniform, ddc_none, ddc_prior, ddc_priorGG (γ = GG/10), scan, scan_prior (a clustering head
trained on frozen h). One JSON line per file is appended to offline.jsonl beside this script.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import objectives
import torch
from sklearn.cluster import KMeans, SpectralClustering
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture

from jdcl_ray import metrics
from jdcl_ray.config import load_config
from jdcl_ray.data import prepare_data
from jdcl_ray.models import ClusteringHead

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parents[1]
METHODS = ("nbr", "head", "km_h", "km_z", "km_hidden", "gmm_pca", "gmm_diag", "spectral")
METHODS += ("ddc_uniform", "ddc_none", "ddc_prior", "scan", "scan_prior")  # and ddc_priorGG
DEFAULT_METHODS = ("km_h", "km_z", "gmm_pca", "ddc_uniform", "ddc_prior", "ddc_none")


def score(labels: np.ndarray, clusters: np.ndarray) -> dict[str, Any]:
    k = int(labels.max()) + 1
    order = np.argsort(-np.bincount(labels, minlength=k), kind="stable")
    found = metrics.cluster_metrics(labels, clusters, k, class_order=order)
    sizes = sorted(np.bincount(clusters, minlength=k).tolist(), reverse=True)
    return {key: round(found[key], 4) for key in ("caa", "nmi", "acc", "tail_acc")} | {
        "sizes": sizes
    }


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_graph(x: np.ndarray, k: int = 20) -> np.ndarray:
    """(n, k) indices of each row's k nearest other rows by cosine similarity."""
    x = unit(x).astype(np.float32)
    neighbours = np.empty((len(x), k), dtype=np.int64)
    for start in range(0, len(x), 2048):
        similarity = x[start : start + 2048] @ x.T
        rows = np.arange(len(similarity))
        similarity[rows, start + rows] = -np.inf
        neighbours[start : start + 2048] = np.argpartition(-similarity, k, axis=1)[:, :k]
    return neighbours


def load_input(features: Path | None, pixels: Path | None) -> tuple[dict[str, np.ndarray], str]:
    """The arrays to cluster and their name: a --dump-features file, or a config's pixels."""
    if features is not None:
        return dict(np.load(features)), str(features)
    assert pixels is not None
    data = prepare_data(load_config(pixels))
    h = data.train.images.flatten(1).float().numpy() / 255.0
    return {"h": h, "labels": np.asarray(data.train.labels)}, f"pixels:{pixels}"


def l2_weights(mode: str, pi: torch.Tensor) -> torch.Tensor | None:
    """ddc_MODE's L2 column weights: uniform, none, prior (γ = 1) or priorGG (γ = GG/10)."""
    if mode == "uniform":
        return torch.ones_like(pi)
    if mode == "none":
        return None
    gamma = float(mode[5:]) / 10 if len(mode) > 5 else 1.0
    return objectives.prior_weights(pi, gamma)


def train_head(
    h: np.ndarray,
    loss_name: str,
    k: int,
    neighbours: np.ndarray | None = None,
    epochs: int = 30,
    batch: int = 512,
    seed: int = 0,
    lr: float = 1e-3,
) -> np.ndarray:
    """A clustering head (the model's architecture) trained on frozen features; its argmax.

    ``loss_name``: ddc_MODE (see ``l2_weights``), scan or scan_prior (neighbour consistency plus
    the marginal's negative entropy, or its KL to the running prior floored at 0.01)."""
    torch.manual_seed(seed)
    x = torch.as_tensor(h, dtype=torch.float32)
    batch = min(batch, len(x))
    head = ClusteringHead(x.shape[1], k)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    pi = torch.full((k,), 1.0 / k)  # running mean of the head's assignments
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x) - batch + 1, batch):
            index = order[start : start + batch]
            assignments, hidden = head(x[index])
            if loss_name.startswith("ddc_"):
                weights = l2_weights(loss_name.removeprefix("ddc_"), pi)
                loss = objectives.ddc_terms(assignments, hidden, weights)["total"]
            else:
                assert neighbours is not None
                pick = torch.randint(neighbours.shape[1], (len(index),), generator=generator)
                partner = torch.as_tensor(neighbours[index.numpy(), pick.numpy()])
                partner_assignments, _ = head(x[partner])
                consistency = -torch.log((assignments * partner_assignments).sum(1).clamp_min(1e-8))
                marginal = assignments.mean(0)
                log_marginal = torch.log(marginal.clamp_min(1e-8))
                if loss_name == "scan":
                    regulariser = (marginal * log_marginal).sum()  # −H(marginal)
                else:
                    target = pi.clamp_min(0.01)
                    target = target / target.sum()
                    regulariser = (marginal * (log_marginal - torch.log(target))).sum()
                loss = consistency.mean() + regulariser
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                pi = 0.9 * pi + 0.1 * assignments.detach().mean(0)
    head.eval()
    with torch.no_grad():
        assignments, _ = head(x)
    return assignments.numpy().argmax(1)


def spectral(h: np.ndarray, neighbours: np.ndarray, k: int) -> np.ndarray:
    """Spectral clustering of the symmetrised kNN graph."""
    from scipy.sparse import csr_matrix

    n = len(h)
    rows = np.repeat(np.arange(n), neighbours.shape[1])
    graph = csr_matrix((np.ones(neighbours.size), (rows, neighbours.ravel())), shape=(n, n))
    graph = ((graph + graph.T) > 0).astype(float)
    model = SpectralClustering(
        k, affinity="precomputed", random_state=0, assign_labels="cluster_qr"
    )
    return model.fit(graph).labels_


def cluster(method: str, d: dict[str, np.ndarray], k: int, neighbours: np.ndarray) -> np.ndarray:
    h = d["h"]
    if method == "head":
        return d["A"].argmax(1)
    if method in ("km_h", "km_z", "km_hidden"):
        x = d["hidden"] if method == "km_hidden" else unit(d[method.removeprefix("km_")])
        return KMeans(k, n_init=10, random_state=0).fit(x).labels_
    if method in ("gmm_pca", "gmm_diag"):
        reduced = PCA(32, random_state=0).fit_transform(unit(h))
        start = KMeans(k, n_init=10, random_state=0).fit(reduced).cluster_centers_
        mixture = GaussianMixture(
            k,
            covariance_type="diag" if method == "gmm_diag" else "full",
            random_state=0,
            means_init=start,
            reg_covar=1e-4,
        )
        return mixture.fit(reduced).predict(reduced)
    if method.startswith("ddc_") or method in ("scan", "scan_prior"):
        return train_head(h, method, k, neighbours)
    if method == "spectral":
        return spectral(h, neighbours, k)
    raise ValueError(f"method {method!r} is unknown")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", type=Path, help="an .npz of --dump-features")
    source.add_argument("--pixels", type=Path, help="cluster this config's LT pixels instead")
    parser.add_argument("methods", nargs="*", default=list(DEFAULT_METHODS))
    parser.add_argument("--jsonl", type=Path, default=HERE / "offline.jsonl")
    args = parser.parse_args()
    unknown = [m for m in args.methods if m not in METHODS and not re.fullmatch(r"ddc_prior\d+", m)]
    if unknown:
        parser.error(f"method {unknown[0]!r} is unknown: expected one of {', '.join(METHODS)}")
    torch.set_num_threads(1)
    d, name = load_input(args.features, args.pixels)
    labels = d["labels"]
    k = int(labels.max()) + 1
    result: dict[str, Any] = {"file": name}
    needs_graph = {"nbr", "spectral", "scan", "scan_prior"} & set(args.methods)
    neighbours = knn_graph(d["h"], 20) if needs_graph else np.empty((0, 0), dtype=np.int64)
    for method in args.methods:
        started = time.time()
        if method == "nbr":
            purity = float((labels[neighbours] == labels[:, None]).mean())
            result[method] = {"purity20": round(purity, 4)}
        else:
            clusters = cluster(method, d, k, neighbours)
            result[method] = score(labels, clusters) | {"s": round(time.time() - started, 1)}
        print(method, json.dumps(result[method]), flush=True)
    with args.jsonl.open("a") as jsonl:
        jsonl.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
