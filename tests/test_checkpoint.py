"""A checkpoint is self-contained: train on a folder of colour images, delete the folder, and
the model still predicts the training clusters; an objective's declared state travels with it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jdcl_ray import objective
from jdcl_ray.checkpoint import (
    ASSIGNMENTS_FILE,
    STATE_FILE,
    find_checkpoint,
    load_model,
    load_state,
    read_assignments,
    save_checkpoint,
)
from jdcl_ray.config import load_config
from jdcl_ray.data import prepare_data
from jdcl_ray.engine import WorkerContext, fit
from jdcl_ray.errors import UserError
from jdcl_ray.predict import main as predict

ROOT = Path(__file__).resolve().parents[1]
CPU = WorkerContext(0, 1, torch.device("cpu"))
COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 60, 230], [230, 210, 40]], dtype=np.uint8)


def write_colour_folder(folder: Path, per_class: tuple[int, ...], side: int = 24) -> None:
    """Class folders of noisy colour squares on a grey background, at a side no loader defaults
    to: what a user's own folder of small colour images looks like to the pipeline."""
    rng = np.random.default_rng(0)
    for label, count in enumerate(per_class):
        (folder / f"class{label}").mkdir(parents=True)
        for index in range(count):
            pixels = np.full((side, side, 3), 128, dtype=np.int16)
            top, left = rng.integers(0, side // 2, size=2)
            pixels[top : top + side // 2, left : left + side // 2] = COLOURS[label]
            pixels += rng.integers(-20, 21, size=pixels.shape)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
                folder / f"class{label}" / f"{index:03d}.png"
            )


def train_on_folder(images: Path, output: Path, **overrides: object) -> Path:
    """A short in-process run (no Ray), checkpoints laid out as Ray Train lays them out."""
    config = load_config(
        ROOT / "configs" / "digits_lt.yaml",
        {
            "data": {
                "name": "folder",
                "root": str(images),
                "imbalance_ratio": 1,
                "eval_split": "train",
            },
            "model": {"num_clusters": 4},
            "run": {"epochs": 2, "checkpoint_every": 1},
            "optim": {"batch_size": 32},
            "eval": {"every": 1},
            **overrides,
        },
    )

    def report(metrics: dict, state: dict | None, assignments: dict | None) -> None:
        if state is not None:
            folder = output / "train" / f"checkpoint_{metrics['epoch']:06d}"
            folder.mkdir(parents=True)
            save_checkpoint(folder, state, metrics, assignments)

    torch.set_num_threads(2)
    fit(config, prepare_data(config), CPU, report, log=lambda _: None)
    return output


@pytest.mark.parametrize("assign", ["kmeans", "head"])
def test_predict_needs_no_training_data(tmp_path, assign):
    images = tmp_path / "images"
    write_colour_folder(images, (60, 40, 20, 12))
    run = train_on_folder(images, tmp_path / "run", eval={"assign": assign, "every": 1})
    copy = tmp_path / "copy"
    shutil.copytree(images, copy)
    shutil.rmtree(images)
    predictions = tmp_path / "predictions.parquet"

    assert predict(["--model", str(run), "--data", str(copy), "--output", str(predictions)]) == 0

    final = find_checkpoint(str(run))
    assert final.endswith("checkpoint_000001")
    trained = read_assignments(Path(final) / ASSIGNMENTS_FILE)
    rows = pq.read_table(predictions).to_pydict()
    assert len(rows["cluster"]) == 132
    # Both read the folder sorted by path; the run trained on the draw at trained["index"].
    drawn = trained["index"]
    assert np.array_equal(np.asarray(rows["cluster"])[drawn], trained["cluster"])
    assert np.allclose(np.asarray(rows["confidence"])[drawn], trained["confidence"], atol=1e-4)
    model = load_model(str(run))
    assert (model.centers is not None) == (assign == "kmeans")
    assert model.image_side == 24 and model.in_channels == 3


def _toy_terms(batch, pooled, state, config, epoch):
    """A made-up objective whose value depends on its state, to follow the state around."""
    total = (batch.assignments.mean((0, 1)) * state["weights"]).sum()
    return {"total": total, "weighted": total}


def test_an_objectives_declared_state_is_in_every_checkpoint(tmp_path):
    toy = objective.ClusteringObjective(
        name="toy_with_state",
        compute=_toy_terms,
        terms=("weighted",),
        source="tests",
        initial_state=lambda n, k, d: {"weights": torch.arange(k, dtype=torch.float32)},
    )
    objective.register(toy)
    try:
        images = tmp_path / "images"
        write_colour_folder(images, (20, 20, 10, 10))
        run = train_on_folder(images, tmp_path / "run", loss={"clustering": toy.name})
        state = load_state(find_checkpoint(str(run)))
        assert torch.equal(state["objective_state"]["weights"], torch.arange(4.0))
        assert load_model(str(run)).config.loss.clustering == toy.name  # and it applies
    finally:
        del objective.CLUSTERING_OBJECTIVES[toy.name]


def test_a_checkpoint_without_what_applying_needs_is_a_one_line_error(tmp_path):
    torch.save({"model": {}, "config": {}, "epoch": 0}, tmp_path / STATE_FILE)
    with pytest.raises(UserError) as error:
        load_model(str(tmp_path))
    assert "\n" not in str(error.value)
    assert "in_channels" in str(error.value) and "older jdcl-ray" in str(error.value)


def test_a_folder_without_checkpoints_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match=r"holds no state\.pt"):
        find_checkpoint(str(tmp_path))
