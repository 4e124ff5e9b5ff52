"""Every user mistake ends the command with one line naming the item, exit code 2, no traceback.

The commands run in this process through the same ``run_cli`` wrapper as on the command line.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import yaml
from servers import sets

from jdcl_ray import train, tune
from jdcl_ray.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "digits_lt.yaml")
QUICK_SPACE = ROOT / "tune_spaces" / "quickstart.yaml"


@pytest.fixture(scope="module", autouse=True)
def stop_ray_afterwards():
    yield
    ray.shutdown()


def write_idx(folder: Path, images: int, labels: int) -> Path:
    folder.mkdir()
    pixels = np.zeros((images, 28, 28), dtype=np.uint8)
    (folder / "train-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 2051, images, 28, 28) + pixels.tobytes()
    )
    (folder / "train-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 2049, labels) + np.zeros(labels, dtype=np.uint8).tobytes()
    )
    return folder


def folder_with_corrupt_image(root: Path) -> Path:
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "broken.png").write_bytes(b"this is not a png")
    return root


def parquet_without_images(path: Path) -> Path:
    pq.write_table(pa.table({"pixels": [b"x", b"y"], "label": [0, 1]}), path)
    return path


def space_with(tmp: Path, parameter: dict, key: str = "loss.temperature") -> Path:
    values = yaml.safe_load(QUICK_SPACE.read_text())
    values["base"]["config"] = DIGITS
    values["space"][key] = parameter
    path = tmp / "space.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def train_args(tmp: Path, *overrides: str) -> list[str]:
    return ["--config", DIGITS, "--output", str(tmp / "run"), *sets(*overrides)]


CASES = {
    "malformed yaml": (
        "train",
        lambda t: [
            "--config",
            str((t / "bad.yaml").write_text("loss: {temperature: [") and t / "bad.yaml"),
        ],
        "is not valid YAML at line",
    ),
    "missing config": (
        "train",
        lambda t: ["--config", str(t / "nope.yaml")],
        "nope.yaml does not exist",
    ),
    "misspelled key": ("train", lambda t: train_args(t, "loss.temprature=0.2"), "loss.temprature"),
    "unknown section": (
        "train",
        lambda t: train_args(t, "losses.temperature=0.2"),
        "'losses' is unknown",
    ),
    "wrong type": ("train", lambda t: train_args(t, "optim.lr=fast"), "'optim.lr' = 'fast'"),
    "out of range": (
        "train",
        lambda t: train_args(t, "loss.tau_plus=1.5"),
        "'loss.tau_plus' = 1.5",
    ),
    "bad choice": ("train", lambda t: train_args(t, "data.profile=linear"), "'data.profile'"),
    "bad placement": (
        "train",
        lambda t: train_args(t, "run.placement_strategy=DIAGONAL"),
        "placement",
    ),
    "malformed --set": ("train", lambda t: train_args(t, "loss.temperature"), "is malformed"),
    "unknown dataset": (
        "train",
        lambda t: train_args(t, "data.name=imagenet"),
        "'imagenet' is unknown",
    ),
    "missing data folder": (
        "train",
        lambda t: train_args(
            t, "data.name=folder", f"data.root={t / 'absent'}", "data.imbalance_ratio=1"
        ),
        "absent",
    ),
    "empty data folder": (
        "train",
        lambda t: (
            (t / "empty").mkdir()
            or train_args(
                t, "data.name=folder", f"data.root={t / 'empty'}", "data.imbalance_ratio=1"
            )
        ),
        "empty",
    ),
    "corrupt image": (
        "train",
        lambda t: train_args(
            t,
            "data.name=folder",
            f"data.root={folder_with_corrupt_image(t / 'pics')}",
            "data.imbalance_ratio=1",
        ),
        "broken.png",
    ),
    "parquet without image column": (
        "train",
        lambda t: train_args(
            t, "data.name=parquet", f"data.root={parquet_without_images(t / 'x.parquet')}"
        ),
        "image",
    ),
    "labels of the wrong length": (
        "train",
        lambda t: train_args(t, "data.name=mnist", f"data.root={write_idx(t / 'idx', 5, 4)}"),
        "has 4 labels, expected 5",
    ),
    "K larger than the images": (
        "train",
        lambda t: train_args(t, "model.num_clusters=5000"),
        "model.num_clusters",
    ),
    "ratio that empties a class": (
        "train",
        lambda t: train_args(t, "data.imbalance_ratio=100000"),
        "leaves class rank",
    ),
    "batch larger than the images": (
        "train",
        lambda t: train_args(t, "optim.batch_size=4096"),
        "optim.batch_size",
    ),
    "resume without output": ("train", lambda t: ["--resume"], "--resume needs --output"),
    "output already holds a run": (
        "train",
        lambda t: (t / "run" / "train").mkdir(parents=True) or train_args(t),
        "already holds a run",
    ),
    "more workers than the cluster": (
        "train",
        lambda t: train_args(t, "run.workers=64", "optim.batch_size=128", "run.cpus_per_worker=1"),
        "run.workers = 64",
    ),
    "empty choice": (
        "tune",
        lambda t: ["--space", str(space_with(t, {"choice": []}))],
        "choice needs a non-empty",
    ),
    "loguniform bound <= 0": (
        "tune",
        lambda t: ["--space", str(space_with(t, {"loguniform": [0.0, 0.5]}))],
        "loguniform bounds must be > 0",
    ),
    "unknown clustering objective": (
        "train",
        lambda t: train_args(t, "loss.clustering=kmeans"),
        "'loss.clustering' = 'kmeans' is not a clustering objective",
    ),
    "unknown clustering objective in a space": (
        "tune",
        lambda t: [
            "--space",
            str(space_with(t, {"choice": ["ddc", "scan"]}, key="loss.clustering")),
        ],
        "'loss.clustering' = 'scan' is not a clustering objective",
    ),
    "unreachable tracking server": (
        "tune",
        lambda t: ["--space", str(QUICK_SPACE), "--tracking-uri", "http://127.0.0.1:9"],
        "http://127.0.0.1:9 is unreachable",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mistake_is_one_line(case, tmp_path, capsys, monkeypatch):
    command, make_args, expected = CASES[case]
    monkeypatch.chdir(tmp_path)  # nothing of a failed command lands in the repository
    argv = make_args(tmp_path)
    if command == "tune" and "--tracking-uri" not in argv:
        argv += [
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--storage",
            str(tmp_path / "t"),
        ]
    with pytest.raises(SystemExit) as ended:
        run_cli({"train": train.main, "tune": tune.main}[command], argv)
    err = capsys.readouterr().err
    assert ended.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and expected in lines[0], err
