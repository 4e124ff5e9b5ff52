"""Pixel k-means beside the GPU figures: k-means (seeds 0, 1, 2) on the raw pixels of the two
Fashion-MNIST-LT IR 10 draws the GPU runs used — all 24,516 images of configs/fashion_lt.yaml's
draw (the quality section) and the quality study's 4,000-image subsample (the GPU screen).
CPU only; one JSON row a seed:

    .venv/bin/python benchmarks/gpu/kmeans_pixels.py > benchmarks/results/gpu/kmeans_pixels.jsonl
"""

from __future__ import annotations

import json

from jdcl_ray.bench.common import subsample
from jdcl_ray.bench.quality import kmeans_pixels
from jdcl_ray.config import load_config
from jdcl_ray.data import prepare_data

full = prepare_data(load_config("configs/fashion_lt.yaml"))
draws = {
    "gpu quality run: all 24,516 images of fashion_lt.yaml's draw": full,
    "gpu screen: the study's 4,000-image subsample (seed 0)": subsample(full, 4000, 0),
}
for name, data in draws.items():
    for seed in (0, 1, 2):
        scores = kmeans_pixels(data, 10, seed)
        numbers = {k: v for k, v in scores.items() if isinstance(v, int | float)}
        row = {"draw": name, "images": len(data.train.images), "kmeans_seed": seed, **numbers}
        print(json.dumps(row), flush=True)
