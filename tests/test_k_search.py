"""An unknown number of clusters (issue 19): a search over ``model.num_clusters`` compares its
trials by ``k_score`` and picks the K of the data; bad K values are one-line errors.

The images are written by the tests: five groups, each its own colour and pattern (stripes both
ways, checks, a disc, a cross) with pixel noise, of unequal sizes, as a user's folder would be.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from jdcl_ray.errors import UserError
from jdcl_ray.space import load_space

GROUP_SIZES = (120, 80, 50, 30, 20)
COLOURS = np.array([[230, 40, 40], [40, 200, 40], [40, 80, 230], [230, 200, 30], [200, 40, 200]])


def group_mask(group: int, side: int) -> np.ndarray:
    y, x = np.mgrid[:side, :side] / side
    if group == 0:
        return np.sin(6 * np.pi * y) > 0
    if group == 1:
        return np.sin(6 * np.pi * x) > 0
    if group == 2:
        return np.sin(4 * np.pi * x) * np.sin(4 * np.pi * y) > 0
    if group == 3:
        return (x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.09
    return (np.abs(x - y) < 0.12) | (np.abs(x + y - 1) < 0.12)


def write_groups(root: Path, side: int = 16, seed: int = 0) -> Path:
    """One sub-folder per group of noisy ``side`` px RGB PNGs."""
    rng = np.random.default_rng(seed)
    for group, count in enumerate(GROUP_SIZES):
        folder = root / f"group_{group}"
        folder.mkdir(parents=True)
        mask = group_mask(group, side)[..., None]
        for index in range(count):
            image = np.where(mask, COLOURS[group], 20) + rng.normal(0, 12, (side, side, 3))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
                folder / f"{index:03d}.png"
            )
    return root


def write_space(folder: Path, images: Path, num_clusters: dict, **search) -> Path:
    space = {
        "name": "k_search",
        "base": {
            "set": {
                "data.name": "folder",
                "data.root": str(images),
                "run.epochs": 3,
                "optim.batch_size": 64,
                "eval.every": 1,
            }
        },
        "space": {"model.num_clusters": num_clusters},
        "search": {"algorithm": "random", "num_samples": 1, **search},
        "scheduler": {"kind": "fifo"},
        "resources": {"workers": 1, "cpus_per_worker": 1},
    }
    path = folder / "k_search.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def groups(tmp_path_factory) -> Path:
    return write_groups(tmp_path_factory.mktemp("groups") / "images")


def test_searching_k_defaults_the_metric_to_k_score(tmp_path, groups):
    space = load_space(write_space(tmp_path, groups, {"grid": [3, 5, 8]}))
    assert space.searches_num_clusters and space.search.metric == "k_score"
    assert space.num_trials == 3


def test_a_space_without_k_keeps_selection_score(tmp_path, groups):
    path = write_space(tmp_path, groups, {"grid": [5]})
    values = yaml.safe_load(path.read_text())
    values["space"] = {"loss.temperature": {"uniform": [0.3, 0.6]}}
    path.write_text(yaml.safe_dump(values))
    space = load_space(path)
    assert not space.searches_num_clusters and space.search.metric == "selection_score"


@pytest.mark.parametrize(
    ("num_clusters", "search", "message"),
    [
        ({"grid": [1, 5, 8]}, {}, "'model.num_clusters' = 1 is out of range: expected >= 2"),
        ({"uniform": [1, 8]}, {}, "'model.num_clusters' = 1 is out of range"),
        (
            {"grid": [3, 5]},
            {"metric": "selection_score"},
            "'search.metric' = 'selection_score' can't compare trials with different "
            "model.num_clusters",
        ),
    ],
)
def test_bad_k_searches_are_one_line(tmp_path, groups, num_clusters, search, message):
    path = write_space(tmp_path, groups, num_clusters, **search)
    with pytest.raises(UserError) as raised:
        load_space(path)
    text = str(raised.value)
    assert "\n" not in text and text.startswith(str(path)) and message in text, text


def test_k_larger_than_the_images_is_one_line_before_ray_starts(tmp_path, groups):
    from jdcl_ray.tune import check_data

    path = write_space(tmp_path, groups, {"grid": [5, 301]})
    with pytest.raises(UserError) as raised:
        check_data(load_space(path), path)
    text = str(raised.value)
    assert "\n" not in text, text
    assert "'model.num_clusters' = 301 is larger than the 300 training images" in text, text


@pytest.mark.slow
def test_a_search_over_k_picks_the_number_of_groups(tmp_path, groups, capsys):
    """K in {3, 5, 8} on five well-separated groups of unequal sizes: the search picks 5, says
    so, and tags the parent run with it; k_score ranks 5 above both neighbours."""
    import ray
    from mlflow.tracking import MlflowClient

    from jdcl_ray.tune import main

    path = write_space(tmp_path, groups, {"grid": [3, 5, 8]}, max_concurrent_trials=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        code = main(
            ["--space", str(path), "--storage", str(tmp_path / "tune"), "--tracking-uri", uri]
        )
    finally:
        ray.shutdown()
    assert code == 0
    printed = capsys.readouterr().out
    assert "number of clusters: picked K = 5 (model.num_clusters) by k_score" in printed, printed
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("k_search").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.tags["num_clusters"] == "5"
    assert parent.data.params["best.model.num_clusters"] == "5"
    scores = {
        int(r.data.params["model.num_clusters"]): r.data.metrics["k_score"]
        for r in runs
        if "trial_id" in r.data.tags
    }
    assert set(scores) == {3, 5, 8}
    assert scores[5] > max(scores[3], scores[8]), scores
