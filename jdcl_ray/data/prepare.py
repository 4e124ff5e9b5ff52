"""The data of one run: the source read, its long-tailed draw, and the evaluation split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jdcl_ray.config import Config
from jdcl_ray.data.dataset import ImageDataset
from jdcl_ray.data.longtail import sample_long_tail
from jdcl_ray.data.registry import load_dataset
from jdcl_ray.errors import UserError


@dataclass
class RunData:
    train: ImageDataset  # the long-tailed set that is clustered
    eval: ImageDataset | None  # the configured evaluation split (None: train only)
    lt_indices: np.ndarray  # indices of ``train`` in the source split, saved with the run
    class_order: list[int]  # classes from most to least frequent in ``train``


def prepare_data(config: Config) -> RunData:
    """Load the source, draw the long-tailed training set, load the evaluation split."""
    cfg = config.data
    # Only the options a user set: loaders reject options that don't apply to them.
    options = {
        key: value
        for key, value in (("image_size", cfg.image_size), ("download", cfg.download))
        if value not in (None, False)
    }
    source = load_dataset(cfg.name, cfg.root, split="train", **options)
    if source.labels is None:
        if cfg.imbalance_ratio != 1:
            raise UserError(
                f"config key 'data.imbalance_ratio' = {cfg.imbalance_ratio} needs labels to draw a "
                f"long-tailed set, but {source.name} has none: set it to 1"
            )
        lt_indices = np.arange(len(source.images))
        class_order: list[int] = []
    else:
        lt_indices = sample_long_tail(
            source.labels, cfg.imbalance_ratio, profile=cfg.profile, seed=cfg.seed
        )
        counts = np.bincount(source.labels[lt_indices], minlength=source.num_classes)
        class_order = [int(c) for c in np.argsort(-counts, kind="stable")]
    train = source.subset(lt_indices)
    if len(train.images) < config.model.num_clusters:
        raise UserError(
            f"config key 'model.num_clusters' = {config.model.num_clusters} is larger than the "
            f"{len(train.images)} training images of {train.name}"
        )
    if len(train.images) < config.optim.batch_size:
        raise UserError(
            f"config key 'optim.batch_size' = {config.optim.batch_size} is larger than the "
            f"{len(train.images)} training images of {train.name}"
        )
    if cfg.eval_split == "test":
        evaluation = load_dataset(cfg.name, cfg.root, split="test", **options)
    elif cfg.eval_split == "train":
        evaluation = train
    else:
        evaluation = None
    return RunData(train, evaluation, lt_indices, class_order)
