"""A user's own images, as they are: no resampling, no test split, maybe no labels (issue 19).

The folders are written by the tests from scikit-learn's digits, as 32 px colour PNGs (each class
tinted its own colour), with unequal class sizes, as a user's folder would be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from servers import BIN, ROOT

from jdcl_ray import tracking
from jdcl_ray.cli import PARSERS
from jdcl_ray.config import load_config
from jdcl_ray.data import prepare_data
from jdcl_ray.engine import WorkerContext, fit
from jdcl_ray.errors import UserError
from jdcl_ray.models import resolve_backbone
from jdcl_ray.train import data_overrides

CLASS_SIZES = (150, 100, 60, 30, 15)
TINTS = np.array([[1, 0.3, 0.3], [0.3, 1, 0.3], [0.3, 0.3, 1], [1, 1, 0.3], [0.3, 1, 1]])


def digit_images(label: int, count: int, side: int = 32) -> list[np.ndarray]:
    """``count`` images of ``label`` from scikit-learn's digits, upscaled and tinted (RGB)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    picked = digits.images[digits.target == label][:count] / 16.0
    out = []
    for image in picked:
        grey = np.asarray(
            Image.fromarray((image * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
        )
        out.append((grey[..., None] * TINTS[label % len(TINTS)]).astype(np.uint8))
    return out


def write_folder(root: Path, sizes=CLASS_SIZES, labelled: bool = True) -> Path:
    for label, count in enumerate(sizes):
        folder = root / f"class_{label}" if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(digit_images(label, count)):
            Image.fromarray(image).save(folder / f"{label}_{index:03d}.png")
    return root


def folder_config(root: Path, *overrides: str):
    return load_config(None, data_overrides(str(root)) + list(overrides))


def fit_quietly(config, data):
    """Train in this process (no Ray): the last metrics, the saved states, the log lines."""
    states, lines = [], []
    metrics = fit(
        config,
        data,
        WorkerContext(0, 1, torch.device("cpu")),
        lambda _metrics, state, _assignments: state is None or states.append(state),
        log=lines.append,
    )
    return metrics, states, lines


def test_an_imbalanced_labelled_folder_trains_on_all_its_images_with_the_defaults(tmp_path):
    root = write_folder(tmp_path / "photos")
    config = folder_config(root, "run.epochs=2", "optim.batch_size=64")
    data = prepare_data(config)
    assert len(data.train.images) == sum(CLASS_SIZES)  # nothing resampled
    assert data.train.images.shape[1:] == (3, 32, 32)
    assert data.evaluated_on == "train (the source has no test split)"
    metrics, _, lines = fit_quietly(config, data)
    assert metrics["true_sizes"] == sorted(CLASS_SIZES, reverse=True)  # the folder's labels
    assert 0 <= metrics["train/caa"] <= 1 and "test/caa" not in metrics
    assert "355 images, evaluated on train (the source has no test split)" in lines[0]


def test_a_flat_unlabelled_folder_trains_and_reports_what_needs_no_labels(tmp_path):
    root = write_folder(tmp_path / "pile", sizes=(60, 40, 20), labelled=False)
    config = folder_config(root, "run.epochs=2", "optim.batch_size=32", "model.num_clusters=3")
    data = prepare_data(config)
    assert data.train.labels is None and len(data.train.images) == 120
    metrics, states, _ = fit_quietly(config, data)
    assert sum(metrics["predicted_sizes"]) == 120
    assert np.isfinite(metrics["selection_score"]) and np.isfinite(metrics["ood_threshold"])
    assert not any(key.startswith("train/") for key in metrics)
    assert states[-1]["in_channels"] == 3 and states[-1]["image_side"] == 32


def test_what_a_folder_lacks_is_an_error_naming_the_key(tmp_path):
    root = write_folder(tmp_path / "pile", sizes=(20, 20), labelled=False)
    with pytest.raises(UserError, match=r"'data.eval_split' = 'test' needs a test split.*test/"):
        prepare_data(folder_config(root, "data.eval_split=test", "optim.batch_size=8"))
    with pytest.raises(UserError, match=r"'data.imbalance_ratio' = 10.0 .* has no labels"):
        prepare_data(folder_config(root, "data.imbalance_ratio=10", "optim.batch_size=8"))
    # A ratio on a labelled folder draws the long tail exactly as for the benchmark sets.
    labelled = write_folder(tmp_path / "labelled", sizes=(40, 40, 40))
    drawn = prepare_data(folder_config(labelled, "data.imbalance_ratio=4", "optim.batch_size=8"))
    assert np.bincount(drawn.train.labels).tolist() == [40, 20, 10]


def test_the_backbone_fits_the_image_size():
    assert resolve_backbone("auto", 28) == "small_cnn"
    assert resolve_backbone("auto", 32) == "small_cnn"
    assert resolve_backbone("auto", 96) == "resnet18"
    assert resolve_backbone("resnet18_cifar", 96) == "resnet18_cifar"  # what the user set


def test_the_dataset_input_is_on_the_mlflow_run(tmp_path, mlflow_store):
    _, client, experiment = mlflow_store
    root = write_folder(tmp_path / "photos")
    config = folder_config(root, "optim.batch_size=64")
    data = prepare_data(config)
    run_ids = [client.create_run(experiment).info.run_id for _ in range(3)]
    tracking.log_dataset(client, run_ids[0], config, data)
    tracking.log_dataset(client, run_ids[1], config, prepare_data(config))
    other = folder_config(root, "data.imbalance_ratio=10", "optim.batch_size=8")
    tracking.log_dataset(client, run_ids[2], other, prepare_data(other))
    inputs = [client.get_run(run_id).inputs.dataset_inputs for run_id in run_ids]
    assert all(len(found) == 1 for found in inputs)
    first, same, drawn = (found[0] for found in inputs)
    assert first.dataset.name == "folder/photos"
    assert str(root.resolve()) in first.dataset.source
    tags = {tag.key: tag.value for tag in first.tags}
    assert tags["images"] == "355" and tags["mlflow.data.context"] == "training"
    assert tags["class_counts"] == (
        '{"class_0": 150, "class_1": 100, "class_2": 60, "class_3": 30, "class_4": 15}'
    )
    assert tags["evaluated_on"] == "train (the source has no test split)"
    assert first.dataset.digest == same.dataset.digest != drawn.dataset.digest


HELP_SCRIPT = """
import sys
from jdcl_ray import cli
sys.argv = ["jdcl-{command}", "--help"]
try:
    cli.{command}()
except SystemExit:
    pass
print(sorted(m for m in ("torch", "ray", "mlflow") if m in sys.modules))
"""


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_each_console_command_answers_help_without_the_heavy_imports(command):
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            HELP_SCRIPT.format(command=command),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert f"usage: jdcl-{command}" in done.stdout
    assert done.stdout.strip().endswith("[]")  # none of them imported for --help
    installed = subprocess.run(
        [BIN / f"jdcl-{command}", "--help"], capture_output=True, text=True, timeout=60
    )
    assert installed.returncode == 0 and f"usage: jdcl-{command}" in installed.stdout


@pytest.mark.slow
def test_the_readme_walk_through_from_a_folder_to_clusters_pictures_and_outliers(tmp_path):
    """README "Your own images": train, predict, report with the console commands and their
    defaults, on a folder with unequal class sizes and no test split."""
    folder = write_folder(tmp_path / "my_images")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}

    def command(name: str, *args: str) -> str:
        done = subprocess.run(
            [BIN / f"jdcl-{name}", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    command("train", "--data", "my_images", "--output", "runs/my_images")
    saved = yaml.safe_load((tmp_path / "runs/my_images/config.yaml").read_text())
    assert saved["data"] == {**saved["data"], "name": "folder", "imbalance_ratio": None}
    metrics = json.loads((tmp_path / "runs/my_images/metrics.json").read_text())
    assert metrics["true_sizes"] == sorted(CLASS_SIZES, reverse=True)
    out = "outputs/my_images.parquet"
    command("predict", "--model", "runs/my_images", "--data", "my_images", "--output", out)
    predictions = pq.read_table(tmp_path / out)
    assert predictions.num_rows == sum(CLASS_SIZES)
    flagged = predictions.filter(predictions.column("ood")).column("path").to_pylist()
    assert 0 < len(flagged) < 0.2 * sum(CLASS_SIZES)  # the 95th percentile of training scores
    printed = command("report", "--run", "runs/my_images", "--output", "outputs/report")
    pictures = sorted(path.name for path in (tmp_path / "outputs/report").glob("*.png"))
    assert "cluster_sizes.png" in pictures and len(pictures) >= 4, (pictures, printed)
    assert str(folder) in flagged[0]
