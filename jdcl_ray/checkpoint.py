"""What a run folder and a checkpoint hold, in one place.

A run folder (``--output``, or one trial's folder)::

    config.yaml            the resolved config
    lt_indices.npy         the long-tailed draw (indices into the source split)
    metrics.json           the last epoch's metrics, once the run has finished
    assignments.parquet    the training images' clusters, once the run has finished
    train/checkpoint_*/    Ray Train's checkpoints, each: state.pt, metrics.json
                           (and assignments.parquet in the final one)

``state.pt`` is self-contained: the model, optimiser, schedule (with the statistics pooling in
the model's buffers), RNG, epoch, resolved config, LT draw, the input size, the fitted OOD score and its threshold,
the assignment rule's parameters (the k-means centres when ``eval.assign: kmeans``), and the
state the clustering objective declares. A model therefore loads and applies without its
training data. It loads with ``weights_only=True``: a checkpoint cannot run code.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from jdcl_ray import storage
from jdcl_ray.config import Config, config_yaml, from_dict
from jdcl_ray.errors import UserError
from jdcl_ray.models import JointModel, build_model

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"
ASSIGNMENTS_FILE = "assignments.parquet"
CONFIG_FILE = "config.yaml"
LT_INDICES_FILE = "lt_indices.npy"
TRAIN_DIR = "train"  # Ray Train's run folder inside a run folder
# What a model needs to be applied, beyond its weights (older checkpoints lack them).
APPLY_KEYS = ("config", "in_channels", "image_side", "ood", "ood_threshold", "centers")


# --- the run folder ---------------------------------------------------------------------------


def save_run_inputs(config: Config, lt_indices: np.ndarray, output: str) -> None:
    """The resolved config and the long-tail draw, beside the run's checkpoints."""
    storage.write_text(storage.join(output, CONFIG_FILE), config_yaml(config))
    buffer = io.BytesIO()
    np.save(buffer, lt_indices)
    storage.write_bytes(storage.join(output, LT_INDICES_FILE), buffer.getvalue())


def saved_checkpoints(output: str) -> list[tuple[dict[str, Any], str]]:
    """(metrics, folder) of every checkpoint in ``output`` with a readable metrics file, by epoch."""
    runs = storage.join(output, TRAIN_DIR)
    found = []
    for name in storage.list_names(runs):
        if not name.startswith("checkpoint_") or name.endswith(".json"):  # Ray's snapshot file
            continue
        folder = storage.join(runs, name)
        try:
            metrics = json.loads(storage.read_text(storage.join(folder, METRICS_FILE)))
            int(metrics["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found.append((metrics, folder))
    return sorted(found, key=lambda item: int(item[0]["epoch"]))


def newest_saved_state(output: str) -> dict[str, Any] | None:
    """The state of the highest-epoch checkpoint in ``output`` that loads completely, or None.

    Ray records a checkpoint in its snapshot some time after the folder is written; a driver
    killed in between would make ``--resume`` redo epochs whose checkpoints are on disk.
    Folders are tried newest first; only one is loaded unless the newest was cut short by the kill.
    """
    for _, folder in reversed(saved_checkpoints(output)):
        try:
            return load_state(folder)
        except Exception:  # a state file cut short by the kill: try the next older one
            continue
    return None


def find_checkpoint(location: str, what: str = "--model") -> str:
    """The checkpoint folder at ``location``: itself when it holds a state file, else the newest
    complete checkpoint of the run folder it is."""
    if storage.exists(storage.join(location, STATE_FILE)):
        return location
    for _, folder in reversed(saved_checkpoints(location)):
        if storage.exists(storage.join(folder, STATE_FILE)):
            return folder
    raise UserError(
        f"{what} {location} holds no {STATE_FILE} and no {TRAIN_DIR}/checkpoint_*/{STATE_FILE}: "
        "expected a checkpoint folder or a training run's folder"
    )


# --- one checkpoint ---------------------------------------------------------------------------


def save_checkpoint(
    folder: str | Path,
    state: dict[str, Any],
    metrics: dict[str, Any],
    assignments: dict[str, np.ndarray] | None = None,
) -> None:
    folder = Path(folder)
    torch.save(state, folder / STATE_FILE)
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    if assignments is not None:
        write_assignments(assignments, folder / ASSIGNMENTS_FILE)


def load_state(checkpoint: str | Path) -> dict[str, Any]:
    """A checkpoint's training state; weights_only=True so a checkpoint can't run code."""
    location = storage.join(str(checkpoint), STATE_FILE)
    try:
        return torch.load(storage.open_bytes(location), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).splitlines()[0][:160]
        raise UserError(
            f"{location} is not a weights-only checkpoint: refused to unpickle it ({reason})"
        ) from None


def write_assignments(columns: dict[str, np.ndarray], path: str | Path) -> Path:
    """One row per image: index, cluster, confidence, ood_score (and label when known)."""
    path = Path(path)
    pq.write_table(pa.table({name: pa.array(values) for name, values in columns.items()}), path)
    return path


def read_assignments(path: str | Path | io.BytesIO) -> dict[str, np.ndarray]:
    table = pq.read_table(path)
    return {name: table.column(name).to_numpy() for name in table.column_names}


def model_from_state(state: dict[str, Any]) -> JointModel:
    """The model of a training state (``load_state``'s, or the one ``engine.fit`` reports)."""
    model = build_model(
        from_dict(state["config"]), int(state["in_channels"]), int(state["image_side"])
    )
    model.load_state_dict(state["model"])
    return model


@dataclass
class TrainedModel:
    """A checkpoint's model with what applying it needs: no training data involved."""

    model: JointModel
    config: Config
    in_channels: int
    image_side: int  # inputs are resized to image_side x image_side
    ood_params: dict[str, torch.Tensor]  # the OOD score fitted on the training features
    ood_threshold: float  # a score above it flags an image as OOD
    centers: np.ndarray | None  # k-means centres when the run assigned with k-means
    lt_indices: np.ndarray
    folder: str


def load_model(checkpoint: str) -> TrainedModel:
    """The model of a checkpoint folder or of a run folder's newest checkpoint, in eval mode."""
    folder = find_checkpoint(storage.resolve(checkpoint))
    state = load_state(folder)
    missing = [key for key in APPLY_KEYS if key not in state]
    if missing:
        raise UserError(
            f"{storage.join(folder, STATE_FILE)} lacks {', '.join(missing)}: it was written by an "
            "older jdcl-ray; retrain, or continue the run with --resume to save a new checkpoint"
        )
    config = from_dict(state["config"])
    model = model_from_state(state)
    model.eval()
    centers = state["centers"]
    return TrainedModel(
        model=model,
        config=config,
        in_channels=int(state["in_channels"]),
        image_side=int(state["image_side"]),
        ood_params=dict(state["ood"]),
        ood_threshold=float(state["ood_threshold"]),
        centers=None if centers is None else centers.numpy(),
        lt_indices=state["lt_indices"].numpy(),
        folder=folder,
    )
