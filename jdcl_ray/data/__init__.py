"""Data: image sources read into one ``ImageDataset``, and seeded long-tailed sampling."""

from jdcl_ray.data.longtail import PROFILES, long_tail_counts, sample_long_tail
from jdcl_ray.data.sources import (
    LOADERS,
    ImageDataset,
    load_cifar10,
    load_cifar100,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_idx,
    load_image_folder,
    load_mnist,
    load_parquet,
    load_stl10,
)

__all__ = [
    "LOADERS",
    "PROFILES",
    "ImageDataset",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_idx",
    "load_image_folder",
    "load_mnist",
    "load_parquet",
    "load_stl10",
    "long_tail_counts",
    "sample_long_tail",
]
