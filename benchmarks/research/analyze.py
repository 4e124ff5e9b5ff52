"""Offline screening on dumped features: assignment methods and head losses on frozen features.

taskset -c 1 env OMP_NUM_THREADS=1 python analyze.py out/TAG.npz [methods...]
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

torch.set_num_threads(1)
from sklearn.cluster import KMeans  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.mixture import GaussianMixture  # noqa: E402

from jdcl_ray import metrics  # noqa: E402
import variants as V  # noqa: E402

K = 10


def score(labels, cl):
    order = np.argsort(-np.bincount(labels, minlength=K), kind="stable")
    m = metrics.cluster_metrics(labels, cl, K, class_order=order)
    return {k: round(m[k], 4) for k in ("caa", "nmi", "acc", "tail_acc")} | {
        "sizes": sorted(np.bincount(cl, minlength=K).tolist(), reverse=True)}


def unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_graph(x, k=20):
    x = unit(x).astype(np.float32)
    idx = np.empty((len(x), k), dtype=np.int64)
    for s in range(0, len(x), 2048):
        sim = x[s:s + 2048] @ x.T
        r = np.arange(len(sim))
        sim[r, s + r] = -np.inf
        idx[s:s + 2048] = np.argpartition(-sim, k, axis=1)[:, :k]
    return idx


def train_head(h, loss_name, epochs=30, batch=512, seed=0, nbrs=None, prior_mode="uniform",
               ent_w=1.0, lr=1e-3):
    """Clustering head (engine's architecture) trained on frozen features."""
    torch.manual_seed(seed)
    from jdcl_ray.models import ClusteringHead
    x = torch.as_tensor(h, dtype=torch.float32)
    head = ClusteringHead(x.shape[1], K)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    n = len(x)
    pi = torch.full((K,), 1.0 / K)
    g = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n - batch + 1, batch):
            idx = perm[s:s + batch]
            A, H = head(x[idx])
            if loss_name.startswith("ddc"):
                mode = loss_name.split("_")[1]  # uniform / prior / none / priorGG (gamma GG/10)
                gamma = float(mode[5:]) / 10 if mode.startswith("prior") and len(mode) > 5 else 1.0
                out = V.ddc_loss_prior(A, H, pi, mode[:5] if mode.startswith("prior") else mode, gamma=gamma)
                loss = out["total"]
            elif loss_name == "scan":
                j = torch.as_tensor(nbrs[idx.numpy(), torch.randint(nbrs.shape[1], (len(idx),), generator=g).numpy()])
                An, _ = head(x[j])
                cons = -torch.log((A * An).sum(1).clamp_min(1e-8)).mean()
                marg = A.mean(0)
                if prior_mode == "uniform":
                    reg = (marg * torch.log(marg.clamp_min(1e-8))).sum()  # −H(marg)
                else:  # KL(marg || pi): pooled prior, floored
                    target = pi.clamp_min(0.01)
                    target = target / target.sum()
                    reg = (marg * (torch.log(marg.clamp_min(1e-8)) - torch.log(target))).sum()
                loss = cons + ent_w * reg
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                pi = 0.9 * pi + 0.1 * A.detach().mean(0)
    head.eval()
    with torch.no_grad():
        A, _ = head(x)
    return A.numpy().argmax(1)


def main():
    path = sys.argv[1]
    methods = sys.argv[2:] or ["km_h", "km_z", "gmm_pca", "ddc_uniform", "ddc_prior", "ddc_none"]
    d = np.load(path)
    labels = d["labels"]
    h, z = d["h"], d["z"]
    res = {"file": path}
    nbrs = None
    for m in methods:
        t = time.time()
        if m == "nbr":
            if nbrs is None:
                nbrs = knn_graph(h, 20)
            res[m] = {"purity20": round(float((labels[nbrs] == labels[:, None]).mean()), 4)}
            print(m, res[m], flush=True)
            continue
        if m == "head":
            cl = d["A"].argmax(1)
        elif m == "km_h":
            cl = KMeans(K, n_init=10, random_state=0).fit(unit(h)).labels_
        elif m == "km_z":
            cl = KMeans(K, n_init=10, random_state=0).fit(unit(z)).labels_
        elif m == "km_hidden":
            cl = KMeans(K, n_init=10, random_state=0).fit(d["hidden"]).labels_
        elif m.startswith("gmm"):
            xp = PCA(32, random_state=0).fit_transform(unit(h))
            cov = "diag" if m.endswith("diag") else "full"
            init = KMeans(K, n_init=10, random_state=0).fit(xp)
            gm = GaussianMixture(K, covariance_type=cov, random_state=0, means_init=init.cluster_centers_,
                                 reg_covar=1e-4).fit(xp)
            cl = gm.predict(xp)
        elif m.startswith("ddc_"):
            cl = train_head(h, m)
        elif m.startswith("scan"):
            if nbrs is None:
                nbrs = knn_graph(h, 20)
            cl = train_head(h, "scan", nbrs=nbrs, prior_mode="prior" if m.endswith("prior") else "uniform")
        elif m == "spectral":
            from scipy.sparse import csr_matrix
            from sklearn.cluster import SpectralClustering
            if nbrs is None:
                nbrs = knn_graph(h, 20)
            n = len(h)
            W = csr_matrix((np.ones(nbrs.size), (np.repeat(np.arange(n), nbrs.shape[1]), nbrs.ravel())), shape=(n, n))
            W = ((W + W.T) > 0).astype(float)
            cl = SpectralClustering(K, affinity="precomputed", random_state=0, assign_labels="cluster_qr").fit(W).labels_
        res[m] = score(labels, cl) | {"s": round(time.time() - t, 1)}
        print(m, json.dumps(res[m]), flush=True)
    with open("/work/main/benchmarks/research/offline.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
