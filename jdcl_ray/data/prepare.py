"""The data of one run: the source read, its long-tailed draw, and the evaluation split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jdcl_ray.config import Config
from jdcl_ray.data.dataset import ImageDataset
from jdcl_ray.data.longtail import sample_long_tail
from jdcl_ray.data.registry import MissingSplit, load_dataset
from jdcl_ray.data.stream import StreamedSet, open_stream
from jdcl_ray.errors import UserError

# Decoded in memory, or read chunk by chunk (data.stream): the same metadata either way.
Images = ImageDataset | StreamedSet


@dataclass
class RunData:
    train: Images  # the long-tailed set that is clustered
    eval: Images | None  # the configured evaluation split (None: train only)
    lt_indices: np.ndarray  # indices of ``train`` in the source split, saved with the run
    class_order: list[int]  # classes from most to least frequent in ``train``
    evaluated_on: str = "test"  # what ``eval`` holds, in words for the logs and MLflow


def prepare_data(config: Config) -> RunData:
    """Load the source, draw the long-tailed training set, load the evaluation split."""
    cfg = config.data
    # Only the options a user set: loaders reject options that don't apply to them.
    options = {
        key: value
        for key, value in (("image_size", cfg.image_size), ("download", cfg.download))
        if value not in (None, False)
    }
    source = read_source(config, "train", options)
    lt_indices = long_tail_indices(source, cfg.imbalance_ratio, cfg.profile, cfg.seed)
    class_order: list[int] = []
    if source.labels is not None:
        counts = np.bincount(source.labels[lt_indices], minlength=source.num_classes)
        class_order = [int(c) for c in np.argsort(-counts, kind="stable")]
    train = source.subset(lt_indices)
    check_fits(config, train)
    evaluation, evaluated_on = evaluation_split(config, train, options)
    return RunData(train, evaluation, lt_indices, class_order, evaluated_on)


def read_source(config: Config, split: str, options: dict[str, object]) -> Images:
    """One split of the configured source: decoded, or opened for streaming."""
    cfg = config.data
    if cfg.stream:
        return open_stream(cfg.name, cfg.root, split, cfg.image_size)
    return load_dataset(cfg.name, cfg.root, split=split, **options)


def check_fits(config: Config, train: Images) -> None:
    """The clusters and the batch a config asks for fit in the training images."""
    for key, value in (
        ("model.num_clusters", config.model.num_clusters),
        ("optim.batch_size", config.optim.batch_size),
    ):
        if len(train) < value:
            raise UserError(
                f"config key '{key}' = {value} is larger than the {len(train)} training "
                f"images of {train.name}"
            )


def long_tail_indices(
    source: Images, imbalance_ratio: float | None, profile: str, seed: int
) -> np.ndarray:
    """Every image (ratio null: the data as it is), or a seeded long-tailed draw by class."""
    if imbalance_ratio is None:
        return np.arange(len(source))
    if source.labels is None:
        raise UserError(
            f"config key 'data.imbalance_ratio' = {imbalance_ratio} draws a long tail by class, "
            f"but {source.name} has no labels: expected null (every image)"
        )
    return sample_long_tail(source.labels, imbalance_ratio, profile=profile, seed=seed)


def evaluation_split(
    config: Config, train: Images, options: dict[str, object]
) -> tuple[Images | None, str]:
    """``data.eval_split``'s images, and what they are in words; ``auto`` falls back to the
    training images when the source has no test split (a user's folder rarely has one)."""
    cfg = config.data
    if cfg.eval_split == "none":
        return None, "none"
    if cfg.eval_split == "train":
        return train, "train"
    try:
        return read_source(config, "test", options), "test"
    except MissingSplit as error:
        if cfg.eval_split == "test":
            raise UserError(
                f"config key 'data.eval_split' = 'test' needs a test split, but {error}: "
                "expected auto or train (evaluate on the training images), or a test split"
            ) from None
    return train, "train (the source has no test split)"
