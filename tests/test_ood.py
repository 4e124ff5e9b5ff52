"""The OOD scores of jdcl_ray.ood against naive float64 re-implementations (loops, explicit
formulas), on synthetic blobs (far points score above the blobs), and knn_distance's leaving
each training point out of its own neighbours."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.covariance import ledoit_wolf_shrinkage

from jdcl_ray import metrics, ood
from jdcl_ray.checkpoint import model_from_state
from jdcl_ray.config import load_config
from jdcl_ray.data import prepare_data
from jdcl_ray.engine import WorkerContext, embed, embed_training_set, fit
from jdcl_ray.metrics import ood_auroc


def _inputs(seed: int = 0, n: int = 60, d: int = 5, k: int = 3):
    """Features (n, d), clusters (n,) with every cluster used, and pooled μ, σ², π of K clusters
    (made up, not the features' own, as the pooling block's EMA would be)."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=d) + 1.0
    clusters = np.r_[np.arange(k), rng.integers(0, k, size=n - k)]
    mean = rng.normal(size=(k, d))
    var = rng.uniform(0.2, 3.0, size=(k, d))
    proportions = rng.dirichlet(np.ones(k))
    return features, clusters, mean, var, proportions


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x))


def _naive_min_distance(x, mean, var, eps):
    return np.array(
        [
            min(
                sum((h[j] - m[j]) ** 2 / (v[j] + eps) for j in range(len(h)))
                for m, v in zip(mean, var, strict=True)
            )
            for h in x
        ]
    )


def _naive_mixture_nll(x, mean, var, proportions, eps):
    out = []
    for h in x:
        logs = []
        for m, v, p in zip(mean, var, proportions, strict=True):
            log_density = 0.0
            for j in range(len(h)):
                s2 = v[j] + eps
                log_density += -0.5 * math.log(2 * math.pi * s2) - (h[j] - m[j]) ** 2 / (2 * s2)
            logs.append(math.log(p) + log_density)
        top = max(logs)
        out.append(-(top + math.log(sum(math.exp(value - top) for value in logs))))
    return np.array(out)


def _naive_shared_mahalanobis(train, clusters, x, shrinkage=None):
    labels = sorted(set(clusters.tolist()))
    means = {c: train[clusters == c].mean(0) for c in labels}
    d = train.shape[1]
    cov = np.zeros((d, d))
    centred = []
    for h, c in zip(train, clusters, strict=True):
        diff = h - means[c]
        cov += np.outer(diff, diff)
        centred.append(diff)
    cov /= len(train)
    if shrinkage is None:
        shrinkage = ledoit_wolf_shrinkage(np.array(centred), assume_centered=True)
    mu = np.trace(cov) / d
    shrunk = (1 - shrinkage) * cov + (shrinkage * mu + 1e-6 * mu) * np.eye(d)
    precision = np.linalg.inv(shrunk)
    return np.array(
        [min(float((h - means[c]) @ precision @ (h - means[c])) for c in labels) for h in x]
    )


def _naive_knn(bank, x, k, exclude=None):
    unit_bank = [b / np.linalg.norm(b) for b in bank]
    out = []
    for i, h in enumerate(x):
        z = h / np.linalg.norm(h)
        distances = sorted(
            np.linalg.norm(z - b)
            for j, b in enumerate(unit_bank)
            if exclude is None or exclude[i] != j
        )
        out.append(distances[k - 1])
    return np.array(out)


def test_min_distance_matches_the_formula():
    train, clusters, mean, var, pi = _inputs()
    queries = _inputs(seed=1)[0]
    params = ood.fit("min_distance", _t(train), _t(clusters), _t(mean), _t(var), _t(pi))
    got = ood.score("min_distance", params, _t(queries)).numpy()
    expected = _naive_min_distance(queries, mean, var, ood.VAR_EPS)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_mixture_nll_matches_the_formula():
    train, clusters, mean, var, pi = _inputs()
    queries = _inputs(seed=1)[0] * 3.0  # far enough that one cluster does not dominate everywhere
    params = ood.fit("mixture_nll", _t(train), _t(clusters), _t(mean), _t(var), _t(pi))
    got = ood.score("mixture_nll", params, _t(queries)).numpy()
    expected = _naive_mixture_nll(queries, mean, var, pi, ood.VAR_EPS)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_diagonal_scores_fall_back_to_the_clusters_own_statistics():
    train, clusters, *_ = _inputs()
    queries = _inputs(seed=1)[0]
    labels = sorted(set(clusters.tolist()))
    mean = np.array([train[clusters == c].mean(0) for c in labels])
    var = np.array([train[clusters == c].var(0) for c in labels])
    pi = np.array([np.mean(clusters == c) for c in labels])
    params = ood.fit("mixture_nll", _t(train), _t(clusters))
    got = ood.score("mixture_nll", params, _t(queries)).numpy()
    np.testing.assert_allclose(
        got, _naive_mixture_nll(queries, mean, var, pi, ood.VAR_EPS), rtol=1e-5
    )
    params = ood.fit("min_distance", _t(train), _t(clusters))
    got = ood.score("min_distance", params, _t(queries)).numpy()
    np.testing.assert_allclose(got, _naive_min_distance(queries, mean, var, ood.VAR_EPS), rtol=1e-5)


def test_an_empty_cluster_is_no_nearest_cluster():
    train, clusters, *_ = _inputs()
    params = ood.fit("min_distance", _t(train), _t(clusters * 2))  # ids 0, 2, 4: 1 and 3 empty
    assert params["mean"].shape[0] == 3


@pytest.mark.parametrize("shrinkage", [None, 0.3])
def test_shared_mahalanobis_matches_the_formula(shrinkage):
    train, clusters, *_ = _inputs(n=80, d=6, k=4)
    queries = _inputs(seed=1, d=6)[0]
    params = ood.fit("shared_mahalanobis", _t(train), _t(clusters), shrinkage=shrinkage)
    got = ood.score("shared_mahalanobis", params, _t(queries)).numpy()
    expected = _naive_shared_mahalanobis(train, clusters, queries, shrinkage)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    if shrinkage is None:
        assert 0.0 <= float(params["shrinkage"]) <= 1.0


def test_shared_mahalanobis_survives_a_dead_channel():
    train, clusters, *_ = _inputs(d=6)
    train[:, 2] = 0.0  # a ReLU channel that never fires: the empirical Σ is singular
    params = ood.fit("shared_mahalanobis", _t(train), _t(clusters), shrinkage=0.0)
    scores = ood.score("shared_mahalanobis", params, _t(train))
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("k", [1, 4])
def test_knn_distance_matches_the_formula(k):
    train, clusters, *_ = _inputs(n=40)
    queries = _inputs(seed=1, n=15)[0]
    params = ood.fit("knn_distance", _t(train), _t(clusters), k=k)
    got = ood.score("knn_distance", params, _t(queries)).numpy()
    np.testing.assert_allclose(got, _naive_knn(train, queries, k), rtol=1e-5, atol=1e-6)


def test_knn_distance_leaves_each_training_point_out_of_its_own_neighbours():
    train, clusters, *_ = _inputs(n=50)
    params = ood.fit("knn_distance", _t(train), _t(clusters), k=1, max_bank=30, seed=3)
    kept = params["indices"].numpy()
    assert params["bank"].shape == (30, train.shape[1]) and len(set(kept.tolist())) == 30
    # Without training=True a kept point is its own nearest neighbour.
    as_new = ood.score("knn_distance", params, _t(train)).numpy()
    assert np.allclose(as_new[kept], 0.0, atol=1e-3)
    own = np.full(len(train), -1)
    own[kept] = np.arange(len(kept))
    got = ood.score("knn_distance", params, _t(train), training=True).numpy()
    np.testing.assert_allclose(got, _naive_knn(train[kept], train, 1, exclude=own), rtol=1e-5)
    assert (got[kept] > 1e-3).all()
    with pytest.raises(ValueError, match="50 features"):
        ood.score("knn_distance", params, _t(train[:10]), training=True)


def test_knn_subsample_is_seeded_and_k_follows_the_paper():
    train = _inputs(n=200)[0]
    first = ood.fit("knn_distance", _t(train), max_bank=50, seed=7)
    again = ood.fit("knn_distance", _t(train), max_bank=50, seed=7)
    assert torch.equal(first["indices"], again["indices"])
    assert ood.default_k(50_000) == 50 and ood.default_k(4_000) == 4 and ood.default_k(300) == 1
    assert ood.default_k(10**6) == 50
    with pytest.raises(ValueError, match="k <= 50"):
        ood.fit("knn_distance", _t(train), max_bank=50, k=51)


def _blobs(seed: int = 0, d: int = 16):
    """Four Gaussian blobs of unequal sizes in the positive orthant (like ReLU features), and
    far points: blobs around other directions, farther out."""
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.normal(size=(4, d))) * 4.0
    sizes = [300, 120, 50, 20]
    train = np.concatenate(
        [c + rng.normal(size=(s, d)) * 0.5 for c, s in zip(centres, sizes, strict=True)]
    )
    clusters = np.repeat(np.arange(4), sizes)
    test_in = np.concatenate(
        [c + rng.normal(size=(s // 2, d)) * 0.5 for c, s in zip(centres, sizes, strict=True)]
    )
    far_centres = np.abs(rng.normal(size=(3, d))) * 8.0
    test_out = np.concatenate([c + rng.normal(size=(80, d)) * 0.5 for c in far_centres])
    return train, clusters, test_in, test_out


@pytest.mark.parametrize("kind", ood.OOD_SCORES)
def test_far_points_score_above_the_blobs(kind):
    train, clusters, test_in, test_out = _blobs()
    pi, mean, var = ood.cluster_statistics(_t(train), _t(clusters))
    params = ood.fit(kind, _t(train), _t(clusters), mean, var, pi)
    inside = ood.score(kind, params, _t(test_in))
    outside = ood.score(kind, params, _t(test_out))
    assert ood_auroc(inside, outside) > 0.95


@pytest.mark.parametrize("kind", ood.OOD_SCORES)
def test_params_travel_in_a_weights_only_checkpoint(kind):
    train, clusters, test_in, _ = _blobs()
    pi, mean, var = ood.cluster_statistics(_t(train), _t(clusters))
    params = ood.fit(kind, _t(train).float(), _t(clusters), mean.float(), var.float(), pi.float())
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in params.values())
    buffer = io.BytesIO()
    torch.save({"ood": params}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["ood"]
    queries = _t(test_in).float()
    assert torch.equal(ood.score(kind, loaded, queries), ood.score(kind, params, queries))


def test_an_unknown_kind_names_the_known_ones():
    train = _inputs()[0]
    with pytest.raises(ValueError, match="knn_distance"):
        ood.fit("energy", _t(train))
    with pytest.raises(ValueError, match="min_distance"):
        ood.score("energy", {}, _t(train))


def test_missing_inputs_are_named():
    train, clusters, mean, var, _ = _inputs()
    with pytest.raises(ValueError, match="clusters"):
        ood.fit("shared_mahalanobis", _t(train))
    with pytest.raises(ValueError, match="proportions"):
        ood.fit("mixture_nll", _t(train), _t(clusters), _t(mean), _t(var))
    with pytest.raises(ValueError, match="pooled mean"):
        ood.fit("min_distance", _t(train))


def test_after_three_digits_epochs_the_shipped_score_ranks_noise_above_digits():
    """The issue's check on the model itself (the pooled min-distance scored 0.10–0.36 here)."""
    config = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "digits_lt.yaml",
        ["run.epochs=3", "eval.every=3"],
    )
    data = prepare_data(config)
    states: list[dict] = []
    cpu = torch.device("cpu")
    fit(
        config, data, WorkerContext(0, 1, cpu), lambda m, s, a: states.append(s), log=lambda _: None
    )
    model = model_from_state(states[-1])
    fitted = embed_training_set(model, data, config, cpu).ood_params
    assert set(fitted) == set(states[-1]["ood"])
    noise = torch.randint(
        0, 256, data.eval.images.shape, generator=torch.Generator().manual_seed(0)
    )
    scores = [
        ood.score(ood.OOD_SCORE, fitted, embed(model, images, cpu)["features"]).numpy()
        for images in (data.eval.images, noise.to(torch.uint8))
    ]
    assert metrics.ood_auroc(*scores) >= 0.9
