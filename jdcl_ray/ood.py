"""Out-of-distribution scores of backbone features h, each "higher = more out-of-distribution".

Every score is fitted once on the training set's features (and, where it needs them, the
training clusters or the statistics pooling block's π, μ, σ²) and is then a dict of tensors: a
checkpoint carries it (it loads with ``weights_only=True``) and new images are scored without
the training data::

    params = fit("knn_distance", train_features, train_clusters, mean, var, proportions)
    scores = score("knn_distance", params, new_features)
    train_scores = score("knn_distance", params, train_features, training=True)

``training=True`` says the rows are the features ``fit`` saw, in the same order, so that a
score that would otherwise find each point itself (the k-NN distance) leaves it out: the
threshold taken from the training scores then matches what a new in-distribution image gets.

Kinds (``OOD_SCORES``):

- ``min_distance``: min_k Σ_d (h_d − μ_kd)² / (σ²_kd + ε), the pooling block's score today;
- ``mixture_nll``: −log Σ_k π_k N(h; μ_k, diag(σ²_k + ε)), the negative log-likelihood of the
  pooled diagonal-Gaussian mixture, so that the log-determinant and the cluster sizes count;
- ``shared_mahalanobis``: min_k (h − μ_k)ᵀ Σ⁻¹ (h − μ_k) with class-conditional means and one
  shared (tied) covariance fitted on the training features grouped by cluster (Lee et al.,
  "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
  Attacks", NeurIPS 2018), Σ shrunk towards a scaled identity (Ledoit & Wolf 2004);
- ``knn_distance``: ‖z − z_(k)‖₂, the distance of z = h/‖h‖ to its k-th nearest L2-normalised
  training feature (Sun et al., "Out-of-Distribution Detection with Deep Nearest Neighbors",
  ICML 2022), from a seeded subsample of at most ``max_bank`` training features.

Plain PyTorch: no Ray, no MLflow. Gaussian scores are computed in float64; scores come back as
float32 on the features' device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

OOD_SCORES = ("min_distance", "mixture_nll", "shared_mahalanobis", "knn_distance")
# The score the model ships: the best on both held-out tests, and the most stable over seeds
# (benchmarks/research/ood_scores.jsonl; README "Out-of-distribution images").
OOD_SCORE = "shared_mahalanobis"
OOD_QUANTILE = 0.95  # an image is flagged OOD above this quantile of the training scores
VAR_EPS = 1e-5  # added to σ², as StatisticsPooling.eps
MAX_BANK = 10_000  # training features kept for knn_distance (the checkpoint's size)
KNN_K_FULL = 50  # Sun et al.'s k for CIFAR-10's 50,000 training images
KNN_N_FULL = 50_000
SCORE_BATCH = 4096  # rows scored at a time: memory stays at SCORE_BATCH × (K or bank size)
Params = dict[str, Tensor]


def _check_kind(kind: str) -> None:
    if kind not in OOD_SCORES:
        raise ValueError(f"unknown OOD score {kind!r}: expected one of {list(OOD_SCORES)}")


def _matrix(features: Tensor, name: str = "features") -> Tensor:
    if not isinstance(features, Tensor):
        features = torch.as_tensor(features)
    if features.ndim != 2 or not len(features):
        raise ValueError(
            f"{name} must be a non-empty (n, d) array, got shape {tuple(features.shape)}"
        )
    return features.detach()


def default_k(num_bank: int) -> int:
    """Sun et al. use k = 50 for CIFAR-10's 50,000 images and find the best k proportional to the
    share of training data kept (k = 50·α for a fraction α): k = round(50·n/50,000) in [1, 50]."""
    return max(1, min(KNN_K_FULL, round(KNN_K_FULL * num_bank / KNN_N_FULL)))


def cluster_statistics(features: Tensor, clusters: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(π, μ, σ²) of the hard clusters that hold points, float64: what the pooling block
    estimates, taken on the training features instead (empty clusters are left out, so that
    none sits at the origin as a spurious nearest cluster)."""
    feats = _matrix(features).double()
    ids = torch.as_tensor(clusters, device=feats.device).long()
    if ids.shape != (len(feats),):
        raise ValueError(f"clusters must be ({len(feats)},) ids, got {tuple(ids.shape)}")
    _, ids = torch.unique(ids, return_inverse=True)
    count = torch.bincount(ids).double()
    zeros = torch.zeros(len(count), feats.shape[1], dtype=torch.float64, device=feats.device)
    mean = zeros.index_add(0, ids, feats) / count[:, None]
    var = zeros.index_add(0, ids, (feats - mean[ids]).square()) / count[:, None]
    return count / count.sum(), mean, var


def _diagonal_params(
    features: Tensor,
    clusters: Tensor | None,
    pooled_mean: Tensor | None,
    pooled_var: Tensor | None,
    proportions: Tensor | None,
    eps: float,
) -> Params:
    if pooled_mean is None or pooled_var is None:
        if clusters is None:
            raise ValueError("need the pooled mean and var, or the training clusters to fit them")
        pi, mean, var = cluster_statistics(features, clusters)
    else:
        mean, var = pooled_mean.detach().double(), pooled_var.detach().double()
        pi = proportions.detach().double() if proportions is not None else None
    params = {"mean": mean.float(), "var": (var + eps).float()}
    if pi is not None:
        params["proportions"] = pi.float()
    return params


def _shared_covariance(features: Tensor, clusters: Tensor, shrinkage: float | None) -> Params:
    """Lee et al.'s tied Gaussian: μ_k the cluster means, Σ = (1/N) Σ_k Σ_{i∈k} (h_i−μ_k)(h_i−μ_k)ᵀ.

    Dead ReLU channels make Σ singular, so it is shrunk: Σ' = (1−α) Σ + α (tr Σ / d) I with
    Ledoit–Wolf's α when ``shrinkage`` is None (the formula of sklearn's
    ``ledoit_wolf_shrinkage``), plus a ridge of 1e-6 · tr Σ / d for a Cholesky that never fails.
    """
    if clusters is None:
        raise ValueError("shared_mahalanobis needs the training clusters")
    feats = _matrix(features).double()
    _, means, _ = cluster_statistics(feats, clusters)
    _, ids = torch.unique(
        torch.as_tensor(clusters, device=feats.device).long(), return_inverse=True
    )
    centred = feats - means[ids]
    n, d = centred.shape
    cov = centred.T @ centred / n
    mu = torch.trace(cov) / d
    if shrinkage is None:
        # Ledoit & Wolf (2004): α = min(β, δ)/δ, β the estimation error, δ the distance to μI.
        squared = centred.square()
        beta_sum = (squared.sum(1).square()).sum() / n  # Σ_i ‖x_i‖⁴ / n
        delta_sum = cov.square().sum()  # ‖S‖²_F
        beta = (beta_sum - delta_sum) / (d * n)
        delta = (delta_sum - 2.0 * mu * torch.trace(cov) + d * mu**2) / d
        alpha = float(torch.clamp(beta, max=delta) / delta) if delta > 0 else 1.0
    else:
        alpha = float(shrinkage)
    eye = torch.eye(d, dtype=torch.float64, device=feats.device)
    ridge = 1e-6 * float(mu) if mu > 0 else 1e-6
    shrunk = (1.0 - alpha) * cov + (alpha * mu + ridge) * eye
    precision = torch.cholesky_inverse(torch.linalg.cholesky(shrunk))
    return {
        "means": means.float(),
        "precision": precision.float(),
        "shrinkage": torch.tensor(alpha, dtype=torch.float32),
    }


def _knn_bank(features: Tensor, k: int | None, max_bank: int, seed: int) -> Params:
    feats = _matrix(features).float()
    n = len(feats)
    if n > max_bank:
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(n, generator=generator)[:max_bank].sort().values
    else:
        indices = torch.arange(n)
    bank = torch.nn.functional.normalize(feats[indices.to(feats.device)], dim=1)
    k = default_k(len(indices)) if k is None else int(k)
    if not 1 <= k <= len(indices):
        raise ValueError(f"knn_distance needs 1 <= k <= {len(indices)} (the bank), got k={k}")
    return {
        "bank": bank.cpu(),
        "indices": indices,
        "k": torch.tensor(k),
        "num_train": torch.tensor(n),
    }


def fit(
    kind: str,
    features: Tensor,
    clusters: Tensor | None = None,
    pooled_mean: Tensor | None = None,
    pooled_var: Tensor | None = None,
    proportions: Tensor | None = None,
    *,
    eps: float = VAR_EPS,
    shrinkage: float | None = None,
    k: int | None = None,
    max_bank: int = MAX_BANK,
    seed: int = 0,
) -> Params:
    """Fit OOD score ``kind`` on the training set; its parameters, CPU tensors.

    ``features``: the training images' raw backbone features h (n, d), un-augmented, eval mode.
    ``clusters``: their hard cluster ids (n,) (head argmax or k-means), for shared_mahalanobis,
    and for the diagonal scores when no pooled statistics are given. ``pooled_mean``,
    ``pooled_var`` (K, d) and ``proportions`` (K,): the pooling block's μ, σ², π
    (``model.pooling.statistics()``); min_distance and mixture_nll use them, or, when they are
    None, the per-cluster statistics of ``features`` (`cluster_statistics`). ``eps`` is added to
    σ²; ``shrinkage`` fixes shared_mahalanobis' α (default Ledoit–Wolf); ``k`` (default
    `default_k`), ``max_bank`` and ``seed`` set knn_distance's neighbour and subsample.
    Arguments a kind does not use are ignored.
    """
    _check_kind(kind)
    features = _matrix(features)
    if kind in ("min_distance", "mixture_nll"):
        params = _diagonal_params(features, clusters, pooled_mean, pooled_var, proportions, eps)
        if kind == "mixture_nll" and "proportions" not in params:
            raise ValueError("mixture_nll needs the proportions with the pooled mean and var")
        if kind == "min_distance":
            params.pop("proportions", None)
    elif kind == "shared_mahalanobis":
        params = _shared_covariance(features, clusters, shrinkage)
    else:
        params = _knn_bank(features, k, max_bank, seed)
    return {key: value.detach().cpu() for key, value in params.items()}


def _quadratic(feats: Tensor, means: Tensor, weights: Tensor) -> Tensor:
    """Σ_d w_kd (h_d − μ_kd)² for every row and cluster (n, K), as h²·w − 2h·(μw) + μ²·w."""
    return (
        feats.square() @ weights.T
        - 2.0 * feats @ (means * weights).T
        + (means.square() * weights).sum(1)
    ).clamp_min(0.0)


def _min_distance(params: Params, feats: Tensor) -> Tensor:
    """min_k Σ_d (h_d − μ_kd)² / σ²_kd (σ² already holds ε)."""
    return _quadratic(feats, params["mean"], 1.0 / params["var"]).min(1).values


def _mixture_nll(params: Params, feats: Tensor) -> Tensor:
    """−logsumexp_k [log π_k − ½ Σ_d log(2π σ²_kd) − ½ Σ_d (h_d − μ_kd)²/σ²_kd]."""
    var = params["var"]
    log_norm = -0.5 * (math.log(2.0 * math.pi) * var.shape[1] + var.log().sum(1))
    log_joint = (
        params["proportions"].log() + log_norm - 0.5 * _quadratic(feats, params["mean"], 1 / var)
    )
    return -torch.logsumexp(log_joint, dim=1)


def _shared_mahalanobis(params: Params, feats: Tensor) -> Tensor:
    """min_k (h − μ_k)ᵀ P (h − μ_k) = hᵀPh − 2 hᵀPμ_k + μ_kᵀPμ_k, P = Σ⁻¹."""
    precision, means = params["precision"], params["means"]
    projected = feats @ precision
    distance = (
        (projected * feats).sum(1, keepdim=True)
        - 2.0 * projected @ means.T
        + ((means @ precision) * means).sum(1)
    )
    return distance.clamp_min(0.0).min(1).values


def _knn_distance(params: Params, feats: Tensor, own: Tensor | None) -> Tensor:
    """The k-th smallest ‖z − b‖ over the bank, √(2 − 2 z·b) for unit vectors; ``own`` (n,) is
    each row's own bank position (−1: none), left out."""
    bank = params["bank"]
    unit = torch.nn.functional.normalize(feats, dim=1)
    squared = (2.0 - 2.0 * unit @ bank.T).clamp_min(0.0)
    k = int(params["k"])
    if own is not None:
        rows = torch.nonzero(own >= 0).squeeze(1)
        squared[rows, own[rows]] = math.inf
        k = min(k, len(bank) - 1)
        if k < 1:
            raise ValueError("knn_distance with training=True needs a bank of at least 2 points")
    return squared.kthvalue(k, dim=1).values.sqrt()


@torch.no_grad()
def score(kind: str, params: Params, features: Tensor, training: bool = False) -> Tensor:
    """OOD score ``kind`` of each row of ``features`` (raw h, (n, d)): (n,) float32, higher = more
    out-of-distribution, on the features' device.

    ``training=True``: the rows are the training features ``fit`` saw, in its order; knn_distance
    then leaves each row's own bank entry out (the other kinds are in-sample fits and ignore it).
    """
    _check_kind(kind)
    feats = _matrix(features)
    device = feats.device
    exact = kind != "knn_distance"  # the Gaussian scores cancel large terms: float64
    dtype = torch.float64 if exact else torch.float32
    on_device = {
        key: value.to(device, dtype if value.is_floating_point() else None)
        for key, value in params.items()
    }
    own = None
    if kind == "knn_distance" and training:
        num_train = int(on_device["num_train"])
        if len(feats) != num_train:
            raise ValueError(
                f"training=True needs the {num_train} features knn_distance was fitted on, "
                f"got {len(feats)}"
            )
        own = torch.full((num_train,), -1, dtype=torch.long, device=device)
        own[on_device["indices"]] = torch.arange(len(on_device["indices"]), device=device)
    parts = []
    for start in range(0, len(feats), SCORE_BATCH):
        batch = feats[start : start + SCORE_BATCH].to(dtype)
        if kind == "min_distance":
            part = _min_distance(on_device, batch)
        elif kind == "mixture_nll":
            part = _mixture_nll(on_device, batch)
        elif kind == "shared_mahalanobis":
            part = _shared_mahalanobis(on_device, batch)
        else:
            mine = None if own is None else own[start : start + SCORE_BATCH]
            part = _knn_distance(on_device, batch, mine)
        parts.append(part.float())
    return torch.cat(parts)
