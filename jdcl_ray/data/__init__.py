"""Data: image sources read into one ``ImageDataset``, and seeded long-tailed sampling.

Each loader reads the files in their published on-disk format from a local folder, so runs work on
machines without internet; ``download=True`` hands the fetching to torchvision for users who have it.
"""

from jdcl_ray.data.cifar import load_cifar10, load_cifar100
from jdcl_ray.data.dataset import ImageDataset
from jdcl_ray.data.digits import load_digits
from jdcl_ray.data.idx import load_fashion_mnist, load_idx, load_mnist
from jdcl_ray.data.images import (
    IMAGE_EXTENSIONS,
    decode_images,
    load_image_folder,
    mixed_size_side,
)
from jdcl_ray.data.longtail import PROFILES, long_tail_counts, sample_long_tail
from jdcl_ray.data.parquet import load_parquet, parquet_image_bytes
from jdcl_ray.data.prepare import RunData, check_fits, prepare_data
from jdcl_ray.data.registry import LOADERS, load_dataset
from jdcl_ray.data.stl import load_stl10
from jdcl_ray.data.stream import StreamedSet, open_stream

__all__ = [
    "IMAGE_EXTENSIONS",
    "LOADERS",
    "PROFILES",
    "ImageDataset",
    "RunData",
    "StreamedSet",
    "check_fits",
    "decode_images",
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
    "mixed_size_side",
    "open_stream",
    "parquet_image_bytes",
    "prepare_data",
    "sample_long_tail",
]
