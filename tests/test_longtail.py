"""Long-tail counts against the formulas written out naively, and the seeded sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jdcl_ray.data import long_tail_counts, sample_long_tail
from jdcl_ray.errors import UserError


def naive_exp(num_classes: int, n_max: int, ratio: float) -> list[int]:
    """method.md: n_c = n_max * IR^(-c / (C - 1)), floored."""
    return [math.floor(n_max * ratio ** (-c / (num_classes - 1))) for c in range(num_classes)]


def naive_step(num_classes: int, n_max: int, ratio: float) -> list[int]:
    """LDAM: the first C // 2 classes keep n_max, the others get n_max / IR, floored."""
    return [
        n_max if c < num_classes // 2 else math.floor(n_max / ratio) for c in range(num_classes)
    ]


CASES = [
    (10, 5000, 100),
    (10, 500, 10),
    (100, 500, 50),
    (20, 2500, 10),
    (5, 300, 2.5),
    (7, 1000, 7),
]


@pytest.mark.parametrize(("num_classes", "n_max", "ratio"), CASES)
@pytest.mark.parametrize(("profile", "naive"), [("exp", naive_exp), ("step", naive_step)])
def test_counts_follow_profile(num_classes, n_max, ratio, profile, naive):
    counts = long_tail_counts(num_classes, n_max, ratio, profile)
    assert counts.dtype == np.int64
    assert counts.tolist() == naive(num_classes, n_max, ratio)


def test_cifar10_lt_published_counts():
    # The per-class sizes of CIFAR-10-LT at IR 100 as published with LDAM-DRW.
    expected = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert long_tail_counts(10, 5000, 100).tolist() == expected


def test_last_class_gets_exactly_max_over_ratio():
    # 49 * 49 ** -1.0 is 0.999... in floating point; the tail must still get one image.
    assert long_tail_counts(10, 49, 49)[-1] == 1
    assert long_tail_counts(4, 49, 49, "step").tolist() == [49, 49, 1, 1]


@pytest.mark.parametrize("profile", ["exp", "step"])
def test_ratio_one_is_balanced(profile):
    assert long_tail_counts(6, 40, 1, profile).tolist() == [40] * 6


@pytest.mark.parametrize("profile", ["exp", "step"])
def test_ratio_that_empties_a_class_names_value_and_limit(profile):
    with pytest.raises(UserError, match=r"imbalance_ratio 60\b.*largest allowed ratio is 50"):
        long_tail_counts(10, 50, 60, profile)


def test_ratio_below_one_and_unknown_profile():
    with pytest.raises(UserError, match=r"imbalance_ratio 0\.5"):
        long_tail_counts(10, 50, 0.5)
    with pytest.raises(UserError, match="'zipf'"):
        long_tail_counts(10, 50, 10, "zipf")


def make_labels(sizes: list[int], seed: int = 1) -> np.ndarray:
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.random.default_rng(seed).permutation(labels)


@pytest.mark.parametrize("profile", ["exp", "step"])
def test_sample_matches_counts(profile):
    sizes = [130, 90, 120, 100, 110, 95]
    labels = make_labels(sizes)
    chosen = sample_long_tail(labels, 9, profile, seed=3)
    assert chosen.dtype == np.int64
    assert np.all(np.diff(chosen) > 0)  # sorted, no repeats
    expected = naive_exp(6, 90, 9) if profile == "exp" else naive_step(6, 90, 9)
    assert np.bincount(labels[chosen], minlength=6).tolist() == expected


def test_class_order_picks_the_head():
    labels = make_labels([50, 60, 70, 80])
    order = [2, 0, 3, 1]
    chosen = sample_long_tail(labels, 10, seed=0, class_order=order)
    counts = np.bincount(labels[chosen], minlength=4)
    assert [counts[c] for c in order] == naive_exp(4, 50, 10)


def test_seed_reproducible_and_varies():
    labels = make_labels([200] * 5)
    first = sample_long_tail(labels, 10, seed=7)
    assert np.array_equal(first, sample_long_tail(labels, 10, seed=7))
    assert not np.array_equal(first, sample_long_tail(labels, 10, seed=8))


def test_ratio_one_gives_balanced_subset_of_smallest_class():
    labels = make_labels([30, 25, 40])
    chosen = sample_long_tail(labels, 1)
    assert np.bincount(labels[chosen]).tolist() == [25, 25, 25]


def test_sampling_errors_name_the_problem():
    with pytest.raises(UserError, match="class 1 is absent"):
        sample_long_tail(np.array([0, 0, 2, 2]), 2)
    with pytest.raises(UserError, match="class_order"):
        sample_long_tail(make_labels([5, 5, 5]), 2, class_order=[0, 0, 1])
    with pytest.raises(UserError, match="imbalance_ratio 6"):
        sample_long_tail(make_labels([5, 5, 5]), 6)
    with pytest.raises(UserError, match="needs labels"):
        sample_long_tail(None, 2)
