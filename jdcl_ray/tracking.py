"""The MLflow edge: one parent run per search, one nested child run per trial.

Child runs are named from their hyperparameters (``t0.20-tp0.10-w1.00``), hold the trial's
resolved config as params, every epoch's metrics with step = epoch, and tags that say what was
clustered and how. Runs are found again by their ``trial_id`` tag, so a resumed search reuses
them instead of opening duplicates. With no tracking server, MLflow writes ``mlflow.db``
(sqlite) in the working directory, which ``mlflow ui`` opens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from jdcl_ray import storage
from jdcl_ray.checkpoint import find_checkpoint
from jdcl_ray.config import Config
from jdcl_ray.errors import UserError

logger = logging.getLogger(__name__)
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
T = TypeVar("T")

TRIAL_TAG = "trial_id"
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
CHECKPOINT_TAG = "checkpoint"  # a trial's final checkpoint folder (path or URI): what predict loads
RESUMED_TAG = "resumed_from_epoch"  # the checkpoint epoch a restarted trial continued after
# Short names of the searched keys in run names; other keys use their last part.
SHORT_NAMES = {
    "loss.temperature": "t",
    "loss.tau_plus": "tp",
    "loss.clustering_weight": "w",
    "loss.prior": "",
    "optim.lr": "lr",
    "model.num_clusters": "K",
}


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def redact(text: str, uri: str | None = None) -> str:
    """``text`` fit to print or log: the credentials of ``uri`` (default: ``text`` itself is the
    URI), as in ``http://user:secret@host``, become ``***``."""
    from urllib.parse import urlsplit

    netloc = urlsplit(uri or text).netloc
    if "@" not in netloc:
        return text
    return text.replace(netloc.rsplit("@", 1)[0] + "@", "***@")


def _first_line(error: Exception) -> str:
    """What went wrong, short enough for one log line."""
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__


def connect(uri: str) -> Any:
    """An MlflowClient for ``uri``, after checking a server answers (one line if it doesn't)."""
    # Fail in seconds, not after MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    from mlflow.tracking import MlflowClient

    # "Creating initial MLflow database tables..." and alembic's migrations are not news.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not uri.startswith(("http://", "https://", "sqlite:///", "databricks")):
        raise UserError(
            f"--tracking-uri {redact(uri)!r} is not supported: expected http(s)://HOST:PORT of an MLflow "
            f"server or sqlite:///PATH.db"
        )
    client = MlflowClient(uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as error:  # any failure to reach the store is the same user-facing fact
        raise UserError(
            f"MLflow tracking server {redact(uri)} is unreachable: {redact(_first_line(error), uri)}"
        ) from None
    return client


def tracked(what: str, action: Callable[[], T]) -> T | None:
    """Do an MLflow call; if the tracking server is away, say what was not logged and go on:
    training and checkpoints matter more than the record of them."""
    try:
        return action()
    except Exception as error:
        logger.warning("MLflow: %s not logged (%s)", what, _first_line(error))
        return None


def where_to_look(uri: str, experiment: str) -> str:
    """The line that says where to see the search's runs (how to open the UI on a sqlite store)."""
    link = f"#/experiments/{experiment}/runs?workflowType=machine_learning"
    if uri.startswith("sqlite:"):
        return (
            f"MLflow: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then open "
            f"http://127.0.0.1:5000/{link}"
        )
    return f"MLflow: {redact(uri).rstrip('/')}/{link}"


def experiment_id(client: Any, name: str) -> str:
    """The experiment's id, created if new. With a sqlite store, artifacts go beside the
    database file (``mlartifacts/``), not into whatever folder the command ran in."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = None
        uri = client.tracking_uri
        if uri.startswith("sqlite:///"):
            location = (
                Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts" / name
            ).as_uri()
        return client.create_experiment(name, artifact_location=location)
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → ``{"loss.temperature": "0.2", ...}`` (MLflow params are strings)."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = str(list(value) if isinstance(value, tuple) else value)
    return flat


def git_revision() -> str:
    """The project's git commit (with ``-dirty`` for local changes), or ``unknown``."""
    root = Path(__file__).resolve().parents[1]
    try:
        revision = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return revision or "unknown"


def run_tags(config: Config) -> dict[str, str]:
    return {
        "dataset": config.data.name,
        "imbalance_ratio": str(config.data.imbalance_ratio),
        "num_clusters": str(config.model.num_clusters),
        "backbone": config.model.backbone,
        "init": config.model.init,
        "seed": str(config.run.seed),
        "world_size": str(config.run.workers),
        "git_revision": git_revision(),
    }


def dataset_digest(name: str, root: str | None, indices: Any) -> str:
    """The same for two runs on the same draw of the same source, and only for them."""
    digest = hashlib.sha256(f"{name}\0{root}\0".encode())
    digest.update(bytes(memoryview(indices.astype("<i8"))))
    return digest.hexdigest()[:12]


def log_dataset(client: Any, run_id: str, config: Config, data: Any) -> None:
    """The run's training images as an MLflow dataset input (the runs table's Dataset column):
    source, size, per-class counts when labelled, what evaluation used, a digest of the draw."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import CodeDatasetSource, LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    cfg, train = config.data, data.train
    if cfg.root is None:  # a built-in set at its default place
        source = CodeDatasetSource({"loader": f"jdcl_ray.data:{cfg.name}"})
    else:
        root = cfg.root if "://" in cfg.root else str(Path(cfg.root).resolve())
        source = LocalArtifactDatasetSource(root)
    digest = dataset_digest(cfg.name, cfg.root, data.lt_indices)
    dataset = MetaDataset(source, name=train.name, digest=digest)
    tags = {
        "mlflow.data.context": "training",
        "images": str(len(train)),
        "imbalance_ratio": str(cfg.imbalance_ratio),
        "evaluated_on": data.evaluated_on,
    }
    if train.labels is not None:
        counts = np.bincount(train.labels, minlength=train.num_classes).tolist()
        names = train.class_names or [str(label) for label in range(len(counts))]
        tags["class_counts"] = json.dumps(dict(zip(names, counts, strict=False)))
    entity = dataset._to_mlflow_entity()
    client.log_inputs(run_id, [DatasetInput(entity, [InputTag(k, v) for k, v in tags.items()])])


def _short_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if 0.01 <= abs(value) < 100 else f"{value:.2g}"
    return str(value)


def trial_run_name(params: dict[str, Any]) -> str:
    """``{"loss.temperature": 0.2, "loss.tau_plus": 0.1}`` → ``t0.20-tp0.10``."""
    parts = []
    for key, value in params.items():
        short = SHORT_NAMES.get(key, key.rsplit(".", 1)[-1])
        parts.append(f"{short}{_short_value(value)}")
    return "-".join(parts) or "trial"


def start_parent(client: Any, experiment: str, name: str, tags: dict[str, str]) -> str:
    run = client.create_run(experiment, run_name=name, tags={**tags, "kind": "search"})
    return run.info.run_id


def find_child(client: Any, experiment: str, parent_id: str, trial_id: str) -> Any | None:
    runs = client.search_runs(
        [experiment],
        filter_string=f"tags.{TRIAL_TAG} = '{trial_id}' and tags.`{PARENT_TAG}` = '{parent_id}'",
        max_results=1,
    )
    return runs[0] if runs else None


def child_run(
    client: Any,
    experiment: str,
    parent_id: str,
    trial_id: str,
    name: str,
    config: Config,
) -> tuple[str, bool]:
    """The trial's child run (reopened if a resumed search ran it before); True if created."""
    existing = find_child(client, experiment, parent_id, trial_id)
    if existing is not None:
        if existing.info.status != "RUNNING":
            client.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id, False
    tags = {**run_tags(config), PARENT_TAG: parent_id, TRIAL_TAG: trial_id, "kind": "trial"}
    run = client.create_run(experiment, run_name=name, tags=tags)
    from mlflow.entities import Param

    params = [Param(k, v) for k, v in flatten(config.to_dict()).items()]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    return run.info.run_id, True


def set_status(client: Any, run_id: str, status: str) -> None:
    """End a run with ``status`` (FINISHED, FAILED, KILLED) unless it already ended."""
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status=status)


def end_interrupted(client: Any, experiment: str, parent_id: str) -> None:
    """A stopped search: its RUNNING child runs and the parent end as KILLED, not RUNNING."""
    runs = client.search_runs(
        [experiment],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.status = 'RUNNING'",
    )
    for run in runs:
        client.set_terminated(run.info.run_id, status="KILLED")
    set_status(client, parent_id, "KILLED")


def log_metrics(client: Any, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """One batch of metrics, all stamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])


def register_model(
    client: Any, run_id: str, folder: str, name: str, tags: dict[str, str], description: str
) -> str:
    """Log ``folder`` as the run's ``model`` artifacts and register them as a new version of
    ``name`` (created if new); returns its ``models:/NAME/VERSION`` URI."""
    client.log_artifacts(run_id, folder, artifact_path="model")
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="jdcl-ray: best model of each search")
    version = client.create_model_version(
        name, f"runs:/{run_id}/model", run_id=run_id, tags=tags, description=description
    )
    return f"models:/{name}/{version.version}"


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a report (lists such as cluster sizes go to artifacts)."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


def last_logged_epoch(client: Any, run_id: str) -> int:
    history = client.get_metric_history(run_id, "epoch")
    return max((int(point.step) for point in history), default=-1)


class EpochLog:
    """Logs each epoch's metrics once (step = epoch) to a run, keeping what fails to send.

    A trial that restarts from its last checkpoint reports some epochs again: those already in
    the run are skipped, so the history has one point per epoch. If the server is away, the
    epochs wait here and go out with the next one that gets through; each failure is logged.
    """

    def __init__(self, tracking_uri: str, run_id: str | None) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.last_epoch: int | None = None
        self.pending: list[tuple[int, dict[str, float]]] = []

    def log(self, metrics: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        if self.run_id is None:  # the run could not be opened (already said): nothing to log to
            return
        epoch = int(metrics["epoch"])
        self.pending.append((epoch, scalar_metrics(metrics)))
        client = MlflowClient(self.tracking_uri)
        try:
            if self.last_epoch is None:
                self.last_epoch = last_logged_epoch(client, self.run_id)
            while self.pending:
                step, values = self.pending[0]
                if step > self.last_epoch:
                    log_metrics(client, self.run_id, values, step)
                    self.last_epoch = step
                self.pending.pop(0)
        except Exception as error:
            logger.warning(
                "MLflow: could not log epoch(s) %s to run %s at %s (%s); kept, retried next epoch",
                [step for step, _ in self.pending],
                self.run_id,
                redact(self.tracking_uri),
                redact(_first_line(error), self.tracking_uri),
            )


# --- which checkpoint a name stands for ---------------------------------------------------


def resolve_checkpoint(model: str, tracking_uri: str, what: str = "--model") -> str:
    """The checkpoint folder named by ``model``: a checkpoint folder (holding state.pt), a Train
    run folder (its newest complete checkpoint), an MLflow run id (its ``checkpoint`` tag; a
    search's parent run stands for its best trial) or ``models:/NAME/VERSION``."""
    if model.startswith("models:/"):
        return resolve_checkpoint(_registered_run(model, tracking_uri, what), tracking_uri, what)
    location = storage.resolve(model)
    if storage.exists(location):
        return find_checkpoint(location, what)
    if RUN_ID.match(model):
        return resolve_checkpoint(_run_checkpoint(model, tracking_uri), tracking_uri, what)
    raise UserError(
        f"{what} {model!r} is not a folder, an MLflow run id (32 hex digits) or "
        "models:/NAME/VERSION"
    )


def _run_checkpoint(run_id: str, tracking_uri: str) -> str:
    """The run's checkpoint tag; for a search's parent run, that of its best trial's run."""
    client = connect(tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception:
        where = redact(tracking_uri)
        raise UserError(f"MLflow run {run_id} is not in {where}") from None
    tags = run.data.tags
    if CHECKPOINT_TAG not in tags and "best_trial" in tags:
        child = find_child(client, run.info.experiment_id, run_id, tags["best_trial"])
        if child is not None:
            run, tags = child, child.data.tags
    if CHECKPOINT_TAG not in tags:
        raise UserError(
            f"MLflow run {run.info.run_id} has no {CHECKPOINT_TAG!r} tag: expected a "
            "trial's run (or a search's run with a best trial) whose checkpoint was recorded"
        )
    return tags[CHECKPOINT_TAG]


def _registered_run(uri: str, tracking_uri: str, what: str) -> str:
    """The run id behind a registered model version ``models:/NAME/VERSION``."""
    name, _, version = uri.removeprefix("models:/").rpartition("/")
    client = connect(tracking_uri)
    try:
        run_id = client.get_model_version(name, version).run_id
    except Exception:
        raise UserError(
            f"{what} {uri}: no such model version in {redact(tracking_uri)}: "
            "expected models:/NAME/VERSION"
        ) from None
    if not run_id:
        raise UserError(f"{what} {uri}: the model version names no run")
    return run_id
