"""Long-tailed subsets of a balanced labelled set (CIFAR-10-LT and friends, method.md).

Results on long-tailed sets are seed-sensitive, so sampling is seeded and returns the chosen
indices, which the caller saves with the run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from jdcl_ray.errors import UserError


def _exp_counts(num_classes: int, max_per_class: int, imbalance_ratio: float) -> np.ndarray:
    """n_c = floor(n_max * IR^(-c / (C - 1))): the CIFAR-LT profile of Cao et al. (LDAM).

    The relative 1e-12 keeps rounding noise from flooring an exact integer down
    (49 * 49 ** -1.0 is 0.999... in floating point; the last class must get n_max / IR).
    """
    if num_classes == 1:
        return np.array([max_per_class])
    ranks = np.arange(num_classes)
    counts = max_per_class * imbalance_ratio ** (-ranks / (num_classes - 1))
    return np.floor(counts * (1 + 1e-12))


def _step_counts(num_classes: int, max_per_class: int, imbalance_ratio: float) -> np.ndarray:
    """LDAM's step profile: the first C // 2 classes (at least one) keep n_max, the rest n_max / IR."""
    head = max(1, num_classes // 2)
    tail = math.floor(max_per_class / imbalance_ratio)
    return np.array([max_per_class] * head + [tail] * (num_classes - head))


PROFILES: dict[str, Callable[[int, int, float], np.ndarray]] = {
    "exp": _exp_counts,
    "step": _step_counts,
}


def long_tail_counts(
    num_classes: int, max_per_class: int, imbalance_ratio: float, profile: str = "exp"
) -> np.ndarray:
    """Images per class, head (rank 0) first, for a long-tail ``profile``."""
    if profile not in PROFILES:
        raise UserError(f"long-tail profile {profile!r} is unknown: expected {', '.join(PROFILES)}")
    if num_classes < 1 or max_per_class < 1:
        raise UserError(
            f"long-tail needs num_classes >= 1 and max_per_class >= 1, got {num_classes} "
            f"and {max_per_class}"
        )
    if not math.isfinite(imbalance_ratio) or imbalance_ratio < 1:
        raise UserError(f"imbalance_ratio {imbalance_ratio} is invalid: expected a number >= 1")
    counts = PROFILES[profile](num_classes, max_per_class, imbalance_ratio).astype(np.int64)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise UserError(
            f"imbalance_ratio {imbalance_ratio} leaves class rank {empty[0]} with no images "
            f"(max_per_class {max_per_class}): the largest allowed ratio is {max_per_class}"
        )
    return counts


def sample_long_tail(
    labels: np.ndarray,
    imbalance_ratio: float,
    profile: str = "exp",
    seed: int = 0,
    class_order: Sequence[int] | None = None,
) -> np.ndarray:
    """Sorted int64 indices into ``labels`` of a seeded long-tailed subset.

    ``max_per_class`` is the smallest class size, so every class can supply its count;
    ``class_order[r]`` is the class given rank r (rank 0 = head). Default: class 0 is the head.
    """
    if labels is None:
        raise UserError("long-tail sampling needs labels: the data set has none")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) == 0:
        raise UserError(
            f"labels of shape {labels.shape} and dtype {labels.dtype} are invalid: "
            "expected a non-empty 1-D integer array"
        )
    if labels.min() < 0:
        raise UserError(f"label {labels.min()} is invalid: expected labels >= 0")
    num_classes = int(labels.max()) + 1 if class_order is None else len(class_order)
    order = np.arange(num_classes) if class_order is None else np.asarray(class_order)
    if sorted(order.tolist()) != list(range(num_classes)) or labels.max() >= num_classes:
        raise UserError(
            f"class_order {list(order)} is invalid: expected a permutation of all classes "
            f"0..{int(labels.max())}"
        )
    sizes = np.bincount(labels, minlength=num_classes)
    if (sizes == 0).any():
        raise UserError(
            f"class {np.flatnonzero(sizes == 0)[0]} is absent from the labels: "
            "expected every class 0..C-1 to have images"
        )
    quota = np.empty(num_classes, dtype=np.int64)
    quota[order] = long_tail_counts(num_classes, int(sizes.min()), imbalance_ratio, profile)
    # A random permutation grouped stably by class: each class's first `quota` entries are a
    # uniform sample without replacement, taken for all classes at once.
    shuffled = np.random.default_rng(seed).permutation(len(labels))
    grouped = shuffled[np.argsort(labels[shuffled], kind="stable")]
    grouped_labels = labels[grouped]
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    rank_in_class = np.arange(len(labels)) - starts[grouped_labels]
    return np.sort(grouped[rank_in_class < quota[grouped_labels]]).astype(np.int64)
