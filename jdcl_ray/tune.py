"""The Ray Tune edge: ``python -m jdcl_ray.tune --space tune_spaces/quickstart.yaml``.

Each trial is a Tune function that runs one data-parallel Ray Train run (Train V2: the trainer
is launched from inside the trial) and owns one nested MLflow child run. Who does what:

- the trial function prepares the data, opens (or, on resume, reopens) the child run, trains,
  and logs the artifacts (config, long-tail indices, assignments Parquet, plots);
- ``TrialReportCallback`` runs in the Train controller: it logs every epoch to the child run
  and forwards rank 0's metrics to Tune (which ASHA and the searcher use);
- ``SearchTracker`` runs on the driver: it gives each child run its honest final status
  (FINISHED, KILLED when the scheduler stopped it early, FAILED when it errored);
- ``main`` opens the parent run, runs or resumes the Tuner, and ends with the best trial.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from jdcl_ray import storage, tracking
from jdcl_ray.config import save_config
from jdcl_ray.engine import prepare_data
from jdcl_ray.errors import UserError, run_cli
from jdcl_ray.predict import ASSIGNMENTS_FILE, read_assignments
from jdcl_ray.report import assignment_plots
from jdcl_ray.space import SearchSpace, load_space, tune_distribution
from jdcl_ray.train import (
    METRICS_FILE,
    STATE_FILE,
    init_ray,
    newest_saved_state,
    run_training,
    save_assignments,
    save_run_inputs,
    saved_checkpoints,
    trials_that_fit,
)

logger = logging.getLogger("jdcl_ray")
T = TypeVar("T")

# Trials hold a sliver of this custom resource instead of a CPU, so Train workers get every core.
TRIAL_RESOURCE = "TRAIN_DRIVER"
TRIAL_SHARE = 0.01
SEARCH_FILE = "jdcl_search.json"  # beside Tune's state: the parent run and where trials live
TRIALS_DIR = "trials"
STATUS_COLUMNS = ("caa", "nmi", "acc", "tail_acc")
LABEL_CHECK = "train/caa"  # judges the label-free pick when the data has labels


@dataclass(frozen=True)
class SearchContext:
    """What every trial needs to know about its search (sent once through the object store)."""

    space: SearchSpace
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    trials_dir: str


def _tune_report_callback() -> type:
    from ray.tune.integration.ray_train import TuneReportCallback

    class TrialReportCallback(TuneReportCallback):
        """Log each epoch to the trial's MLflow run; forward it to Tune with the search metric
        carried over epochs that skip evaluation (``eval.every``), and ``epochs_done``."""

        def __init__(self, metric: str, tracking_uri: str, run_id: str | None) -> None:
            super().__init__()
            self.metric = metric
            self.epoch_log = tracking.EpochLog(tracking_uri, run_id)
            self.carried: dict[str, Any] = {}

        def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
            fresh = metrics[0]
            self.epoch_log.log(fresh)
            if self.metric in fresh:
                self.carried[self.metric] = fresh[self.metric]
            # Scalars only: cluster-size lists stay in the checkpoint's metrics.json.
            scalars = tracking.scalar_metrics(fresh)
            forwarded = {**self.carried, **scalars, "epochs_done": int(fresh["epoch"]) + 1}
            super().after_report(run_context, [forwarded], checkpoint)

    return TrialReportCallback


def run_trial(params: dict[str, Any], context: SearchContext) -> None:
    """One trial (a Tune function trainable): train one config, track it in its child run."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    config = context.space.trial_config(params)
    client = MlflowClient(context.tracking_uri)
    opened = tracked(
        f"trial {trial_id}'s run",
        lambda: tracking.child_run(
            client,
            context.experiment_id,
            context.parent_run_id,
            trial_id,
            tracking.trial_run_name(params),
            config,
        ),
    )
    run_id, created = opened if opened is not None else (None, False)
    output = storage.join(context.trials_dir, trial_id)
    final_metrics = storage.join(output, METRICS_FILE)
    if storage.exists(final_metrics):
        # Finished before the driver stopped, but after Tune last saved its state: report the
        # result again instead of training again.
        tune.report(tracking.scalar_metrics(json.loads(storage.read_text(final_metrics))))
        return
    data = prepare_data(config)
    save_run_inputs(config, data.lt_indices, output)
    with tempfile.TemporaryDirectory() as folder:
        save_config(config, Path(folder) / "config.yaml")
        np.save(Path(folder) / "lt_indices.npy", data.lt_indices)
        if created:
            tracked("the trial's config", lambda: client.log_artifacts(run_id, folder))
    callback = _tune_report_callback()(context.space.search.metric, context.tracking_uri, run_id)
    resume_state = newest_saved_state(output)
    if resume_state is not None:
        resumed_from = int(resume_state["epoch"])
        if run_id is not None:
            tracked(
                "the trial's resume tag",
                lambda: client.set_tag(run_id, tracking.RESUMED_TAG, str(resumed_from)),
            )
        # Train workers can outlive a killed driver by seconds and save epochs whose reports
        # never reached MLflow: log them from their checkpoints before training goes on.
        for saved, _ in saved_checkpoints(output):
            if int(saved["epoch"]) <= resumed_from:
                callback.epoch_log.log(saved)
    metrics, checkpoint = run_training(config, output, data, resume_state, callbacks=[callback])
    with tempfile.TemporaryDirectory() as folder:
        table = Path(folder) / ASSIGNMENTS_FILE
        if run_id is not None and save_assignments(checkpoint, str(table)):
            plots = assignment_plots(
                read_assignments(table), config.model.num_clusters, Path(folder) / "plots"
            )

            def log_outputs() -> None:
                client.log_artifact(run_id, str(table))
                for plot in plots:
                    client.log_artifact(run_id, str(plot), artifact_path="plots")
                tag_checkpoint(client, run_id, context, trial_id)

            tracked(f"trial {trial_id}'s assignments, plots and checkpoint tag", log_outputs)
    final = {**metrics, "epochs_done": int(metrics.get("epoch", -1)) + 1}
    storage.write_text(final_metrics, json.dumps(final, indent=2))


def tracked(what: str, action: Callable[[], T]) -> T | None:
    """Do an MLflow call; if the tracking server is away, say what was not logged and go on:
    training and checkpoints matter more than the record of them."""
    try:
        return action()
    except Exception as error:
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        logger.warning("MLflow: %s not logged (%s)", what, reason)
        return None


def tag_checkpoint(client: Any, run_id: str, context: SearchContext, trial_id: str) -> None:
    """Point the trial's run at its newest complete checkpoint (what predict and report load)."""
    saved = saved_checkpoints(storage.join(context.trials_dir, trial_id))
    if saved:
        client.set_tag(run_id, tracking.CHECKPOINT_TAG, saved[-1][1])


def register_best(client: Any, context: SearchContext, trial_id: str) -> str | None:
    """Register the best trial's model (state, metrics, config) as a new version of
    ``jdcl-<space name>``; returns its ``models:/NAME/VERSION`` URI."""
    child = tracking.find_child(client, context.experiment_id, context.parent_run_id, trial_id)
    location = child.data.tags.get(tracking.CHECKPOINT_TAG) if child is not None else None
    if location is None:
        return None
    run_id = child.info.run_id
    with tempfile.TemporaryDirectory() as folder:
        for name in (STATE_FILE, METRICS_FILE):
            (Path(folder) / name).write_bytes(storage.read_bytes(storage.join(location, name)))
        config = storage.read_text(storage.join(context.trials_dir, trial_id, "config.yaml"))
        (Path(folder) / "config.yaml").write_text(config)
        final = json.loads((Path(folder) / METRICS_FILE).read_text())
        client.log_artifacts(run_id, folder, artifact_path="model")
    name = f"jdcl-{context.space.name}"
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="jdcl-ray: best model of each search")
    metric = context.space.search.metric
    version = client.create_model_version(
        name,
        f"runs:/{run_id}/model",
        run_id=run_id,
        tags={
            "config": config,
            metric: str(final.get(metric)),
            tracking.CHECKPOINT_TAG: location,
        },
        description=f"best trial {trial_id} by {metric} ({context.space.search.mode})",
    )
    return f"models:/{name}/{version.version}"


def _search_tracker(context: SearchContext) -> Any:
    from ray import tune

    class SearchTracker(tune.Callback):
        """Ends each trial's child run with the status the trial really ended with."""

        def _end(self, trial: Any, status: str) -> None:
            try:
                client = tracking.connect(context.tracking_uri)
                child = tracking.find_child(
                    client, context.experiment_id, context.parent_run_id, trial.trial_id
                )
                if child is not None:
                    if tracking.CHECKPOINT_TAG not in child.data.tags:  # stopped early
                        tag_checkpoint(client, child.info.run_id, context, trial.trial_id)
                    tracking.set_status(client, child.info.run_id, status)
            except Exception as error:  # tracking must not stop the search
                logger.warning("MLflow: could not end trial %s's run: %s", trial.trial_id, error)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            done = (trial.last_result or {}).get("epochs_done", 0)
            self._end(trial, "FINISHED" if done >= context.space.epochs else "KILLED")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._end(trial, "FAILED")

    return SearchTracker()


def build_tuner(context: SearchContext, location: str, name: str, max_concurrent: int) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    space = context.space
    search = space.search
    if space.scheduler.kind == "asha":
        scheduler = ASHAScheduler(
            time_attr="epochs_done",
            max_t=space.scheduler.max_epochs or space.epochs,
            grace_period=space.scheduler.grace_period,
            reduction_factor=space.scheduler.reduction_factor,
            # Let a trial that reached max_t return by itself, so it logs its artifacts.
            stop_last_trials=False,
        )
    else:
        scheduler = FIFOScheduler()
    if search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg: Any = OptunaSearch(seed=search.seed)
        limit: int | None = max_concurrent
    else:
        from ray.tune.search import BasicVariantGenerator

        # Tune applies max_concurrent_trials to Searchers only: this generator takes it itself.
        search_alg = BasicVariantGenerator(random_state=search.seed, max_concurrent=max_concurrent)
        limit = None
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, context=context), {TRIAL_RESOURCE: TRIAL_SHARE}
    )
    return tune.Tuner(
        trainable,
        param_space={p.key: tune_distribution(p) for p in space.parameters},
        tune_config=tune.TuneConfig(
            metric=search.metric,
            mode=search.mode,
            num_samples=search.num_samples,
            max_concurrent_trials=limit,
            scheduler=scheduler,
            search_alg=search_alg,
        ),
        run_config=_run_config(context, location, name),
    )


def _run_config(context: SearchContext, location: str, name: str) -> Any:
    from ray import tune

    return tune.RunConfig(
        name=name,
        storage_path=location,
        callbacks=[_search_tracker(context)],
        failure_config=tune.FailureConfig(max_failures=0),
        verbose=1,
    )


def latest_search(location: str, name: str) -> str:
    """The newest search of this space under ``location`` (what ``--resume`` continues)."""
    found = [
        storage.join(location, folder)
        for folder in storage.list_names(location)
        if folder.startswith(f"{name}-")
        and storage.exists(storage.join(location, folder, SEARCH_FILE))
    ]
    if not found:
        raise UserError(
            f"--resume: no search named {name!r} under --storage {location}: expected a folder "
            f"{name}-<date> holding {SEARCH_FILE}"
        )
    return found[-1]


def summarize(results: Any, context: SearchContext, client: Any) -> dict[str, Any] | None:
    """Print every trial and the best one; log the table and the best trial to the parent run."""
    from rich.console import Console
    from rich.table import Table

    space, metric = context.space, context.space.search.metric
    rows = []
    for result in results:
        metrics = result.metrics or {}
        rows.append(
            {
                "trial": metrics.get("trial_id", ""),
                "name": tracking.trial_run_name(result.config or {}),
                "status": "ERROR"
                if result.error
                else ("DONE" if metrics.get("epochs_done", 0) >= space.epochs else "STOPPED"),
                "epochs": metrics.get("epochs_done", 0),
                metric: metrics.get(metric),
                **{f"train/{k}": metrics.get(f"train/{k}") for k in STATUS_COLUMNS},
            }
        )
    table_csv = io.StringIO()
    writer = csv.DictWriter(table_csv, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    writer.writerows(rows)
    search_folder = context.trials_dir.rsplit("/", 1)[0]
    storage.write_text(storage.join(search_folder, "trials.csv"), table_csv.getvalue())
    tracked(
        "the trials table",
        lambda: client.log_text(context.parent_run_id, table_csv.getvalue(), "trials.csv"),
    )
    table = Table(title=f"search {space.name}: {len(rows)} trials ({metric}, {space.search.mode})")
    for column in rows[0] if rows else ():
        table.add_column(
            column, justify="right" if column not in ("name", "status", "trial") else "left"
        )
    for row in rows:
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))
    console = Console()
    if not console.is_terminal:
        console.width = 160
    console.print(table)
    try:
        best = results.get_best_result(metric, space.search.mode, scope="last")
    except RuntimeError:
        best = None
    if best is None or best.metrics is None:
        console.print("no trial reported the search metric")
        return None
    best_metrics = tracking.scalar_metrics(best.metrics)

    def log_best() -> None:
        client.log_batch(
            context.parent_run_id,
            metrics=[_metric(f"best/{k}", v) for k, v in best_metrics.items()],
        )
        for key, value in (best.config or {}).items():
            client.log_param(context.parent_run_id, f"best.{key}", str(value))
        client.set_tag(context.parent_run_id, "best_trial", str(best.metrics.get("trial_id")))

    tracked("the best trial's summary", log_best)
    console.print(f"best trial {best.metrics.get('trial_id')}: {best.config}")
    shown = [
        metric,
        *(f"{split}/{k}" for split in ("train", "test") for k in STATUS_COLUMNS),
        "knn_acc",
    ]
    console.print(", ".join(f"{k} {best_metrics[k]:.3f}" for k in shown if k in best_metrics))
    agreement = selection_agreement(rows, metric, best_metrics)
    if agreement:
        selection = [_metric(f"selection/{k}", v) for k, v in agreement.items()]
        tracked(
            "the label check", lambda: client.log_batch(context.parent_run_id, metrics=selection)
        )
        spearman = agreement.get("spearman", float("nan"))
        console.print(
            f"label check ({LABEL_CHECK}): the pick ranks {agreement['pick_rank']:.0f} of "
            f"{agreement['trials']:.0f} trials; Spearman({metric}, {LABEL_CHECK}) = {spearman:.2f}"
        )
    return best.metrics


def selection_agreement(
    rows: list[dict[str, Any]], metric: str, best: dict[str, float]
) -> dict[str, float]:
    """How well the (label-free) search metric picked, judged by the labels when there are any:
    the pick's rank by train CAA and the rank correlation over all trials."""
    from scipy.stats import spearmanr

    pairs = [
        (row[metric], row[LABEL_CHECK])
        for row in rows
        if row.get(metric) is not None and row.get(LABEL_CHECK) is not None
    ]
    if metric == LABEL_CHECK or len(pairs) < 3 or LABEL_CHECK not in best:
        return {}
    scores, caas = np.array(pairs, dtype=float).T
    agreement = {
        "pick_rank": float(1 + np.sum(caas > best[LABEL_CHECK])),
        "trials": float(len(pairs)),
    }
    if scores.std() > 0 and caas.std() > 0:  # a rank correlation needs distinct values
        agreement["spearman"] = float(spearmanr(scores, caas).statistic)
    return agreement


def _metric(key: str, value: float) -> Any:
    from mlflow.entities import Metric

    return Metric(key, value, int(time.time() * 1000), 0)


def where_to_look(context: SearchContext) -> str:
    uri = context.tracking_uri
    link = f"#/experiments/{context.experiment_id}/runs?workflowType=machine_learning"
    if uri.startswith("sqlite:"):
        return (
            f"MLflow: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then open "
            f"http://127.0.0.1:5000/{link}"
        )
    return f"MLflow: {tracking.redact(uri).rstrip('/')}/{link}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jdcl_ray.tune", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--space", type=Path, required=True, help="search space (tune_spaces/*.yaml)"
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)",
    )
    parser.add_argument(
        "--storage",
        default="tune_results",
        help="Tune state and checkpoints: a folder every node sees, or s3://BUCKET/PATH",
    )
    parser.add_argument(
        "--resume", action="store_true", help="finish the newest stopped search of --space"
    )
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    return parser.parse_args(argv)


def open_search(
    args: argparse.Namespace, space: SearchSpace, client: Any, uri: str
) -> tuple[SearchContext, str]:
    """A new search's context and folder, or those ``--resume`` continues."""
    location = storage.resolve(args.storage)
    if args.resume:
        folder = latest_search(location, space.name)
        saved = json.loads(storage.read_text(storage.join(folder, SEARCH_FILE)))
        experiment, parent = saved["experiment_id"], saved["parent_run_id"]
        client.update_run(parent, status="RUNNING")
    else:
        name = f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        folder = storage.join(location, name)
        experiment = tracking.experiment_id(client, space.name)
        parent = tracking.start_parent(
            client,
            experiment,
            name,
            {"space": str(args.space), "git_revision": tracking.git_revision()},
        )
        for key, value in tracking.flatten(space.base).items():
            client.log_param(parent, f"base.{key}", value)
        storage.write_text(
            storage.join(folder, SEARCH_FILE),
            json.dumps(
                {"experiment_id": experiment, "parent_run_id": parent, "space": str(args.space)}
            ),
        )
        client.log_artifact(parent, str(args.space))
    context = SearchContext(space, uri, experiment, parent, storage.join(folder, TRIALS_DIR))
    return context, folder


def end_interrupted(client: Any, context: SearchContext) -> None:
    """A stopped search: its RUNNING child runs and the parent end as KILLED, not RUNNING."""
    runs = client.search_runs(
        [context.experiment_id],
        filter_string=f"tags.`{tracking.PARENT_TAG}` = '{context.parent_run_id}' and attributes.status = 'RUNNING'",
    )
    for run in runs:
        client.set_terminated(run.info.run_id, status="KILLED")
    tracking.set_status(client, context.parent_run_id, "KILLED")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    space = load_space(args.space)
    uri = args.tracking_uri or tracking.default_tracking_uri()
    client = tracking.connect(uri)
    context, folder = open_search(args, space, client, uri)
    # Tune checks the metric in every result; ours skip it on epochs without evaluation
    # (space.py checks the metric's name instead). Save Tune's state often: a killed driver
    # then loses at most a second of the search's bookkeeping.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    on_cluster = init_ray(args.address, resources={TRIAL_RESOURCE: 1.0})
    import ray
    from ray import tune

    storage.check_shared(storage.resolve(args.storage), "--storage")
    if ray.cluster_resources().get(TRIAL_RESOURCE, 0) < TRIAL_SHARE:
        raise UserError(
            f"the Ray cluster has no {TRIAL_RESOURCE} resource for trial drivers: start its head "
            f"with ray start --head --resources='{{\"{TRIAL_RESOURCE}\": 1}}' (cluster/gpu.yaml does)"
        )
    fits = trials_that_fit(space.trial_config({}), on_cluster)
    max_concurrent = space.search.max_concurrent_trials or fits
    if not on_cluster:
        max_concurrent = min(max_concurrent, fits)
    # SIGTERM (a scheduler, `kill`) ends the search like Ctrl+C: Tune saves its state.
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    if args.resume:
        tuner = tune.Tuner.restore(
            folder,
            trainable=tune.with_resources(
                tune.with_parameters(run_trial, context=context), {TRIAL_RESOURCE: TRIAL_SHARE}
            ),
            resume_unfinished=True,
            resume_errored=False,
        )
    else:
        location, name = folder.rsplit("/", 1)
        tuner = build_tuner(context, location, name, max_concurrent)
    results = None
    try:
        results = tuner.fit()
    finally:
        # Ctrl+C / SIGTERM: Tune returns early, with trials not done (or not yet created).
        unfinished = (
            results is None
            or len(results) < space.num_trials
            or results.num_terminated + results.num_errors < len(results)
        )
        if unfinished:
            with contextlib.suppress(Exception):
                end_interrupted(client, context)
    if unfinished:
        raise UserError(
            f"search stopped before it finished: continue it with python -m jdcl_ray.tune "
            f"--space {args.space} --storage {args.storage} --resume"
        )
    best = summarize(results, context, client)
    if best is not None:
        registered = tracked(
            "the best model", lambda: register_best(client, context, str(best["trial_id"]))
        )
        if registered:
            tracked(
                "the registered model's name",
                lambda: client.set_tag(context.parent_run_id, "registered_model", registered),
            )
            print(
                f"best model: {registered}  (python -m jdcl_ray.predict --model {registered} ...)"
            )
    tracked(
        "the search's end", lambda: tracking.set_status(client, context.parent_run_id, "FINISHED")
    )
    print(f"Tune state: {folder}")
    print(where_to_look(context))
    return 0


if __name__ == "__main__":
    run_cli(main)
