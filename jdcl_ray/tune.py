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
import json
import logging
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, SearchAlgorithm, Searcher

from jdcl_ray import cli, objective, storage, tracking
from jdcl_ray.checkpoint import (
    ASSIGNMENTS_FILE,
    METRICS_FILE,
    STATE_FILE,
    newest_saved_state,
    read_assignments,
    save_run_inputs,
    saved_checkpoints,
)
from jdcl_ray.config import Config, save_config
from jdcl_ray.data import RunData, check_fits, prepare_data
from jdcl_ray.errors import UserError, run_cli
from jdcl_ray.report import assignment_plots
from jdcl_ray.runtime import TRIAL_RESOURCE, TRIAL_SHARE, init_ray, search_concurrency
from jdcl_ray.search_summary import summarize
from jdcl_ray.space import SearchConfig, SearchSpace, load_space, tune_distribution
from jdcl_ray.tracking import tracked
from jdcl_ray.train import initial_weights, run_training, save_assignments

logger = logging.getLogger("jdcl_ray")

SEARCH_FILE = "jdcl_search.json"  # beside Tune's state: the parent run and where trials live
TRIALS_DIR = "trials"


@dataclass(frozen=True)
class SearchContext:
    """What every trial needs to know about its search (sent once through the object store)."""

    space: SearchSpace
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    trials_dir: str

    def trial_dir(self, trial_id: str) -> str:
        return storage.join(self.trials_dir, trial_id)


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


class SearchTracker(tune.Callback):
    """Ends each trial's child run with the status the trial really ended with."""

    def __init__(self, context: SearchContext) -> None:
        self.context = context

    def _end(self, trial: Any, status: str) -> None:
        context, trial_id = self.context, trial.trial_id
        try:
            client = tracking.connect(context.tracking_uri)
            child = tracking.find_child(
                client, context.experiment_id, context.parent_run_id, trial_id
            )
            if child is not None:
                if tracking.CHECKPOINT_TAG not in child.data.tags:  # stopped early
                    tag_checkpoint(client, child.info.run_id, context.trial_dir(trial_id))
                tracking.set_status(client, child.info.run_id, status)
        except Exception as error:  # tracking must not stop the search
            logger.warning("MLflow: could not end trial %s's run: %s", trial_id, error)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        done = (trial.last_result or {}).get("epochs_done", 0)
        self._end(trial, "FINISHED" if done >= self.context.space.epochs else "KILLED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FAILED")


def run_trial(params: dict[str, Any], context: SearchContext) -> None:
    """One trial (a Tune function trainable): train one config, track it in its child run."""
    from mlflow.tracking import MlflowClient

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
    output = context.trial_dir(trial_id)
    final_metrics = storage.join(output, METRICS_FILE)
    if storage.exists(final_metrics):
        # Finished before the driver stopped, but after Tune last saved its state: report the
        # result again instead of training again.
        tune.report(tracking.scalar_metrics(json.loads(storage.read_text(final_metrics))))
        return
    config, initial = initial_weights(config, context.tracking_uri)
    data = prepare_data(config)
    save_run_inputs(config, data.lt_indices, output)
    if created:
        log_inputs(client, run_id, config, data)
    callback = TrialReportCallback(context.space.search.metric, context.tracking_uri, run_id)
    resume_state = newest_saved_state(output)
    if resume_state is not None:
        log_resume(client, run_id, output, int(resume_state["epoch"]), callback.epoch_log)
    metrics, checkpoint = run_training(
        config, output, data, resume_state, callbacks=[callback], initial=initial
    )
    if run_id is not None:
        log_outputs(client, run_id, trial_id, config, checkpoint, output)
    final = {**metrics, "epochs_done": int(metrics.get("epoch", -1)) + 1}
    storage.write_text(final_metrics, json.dumps(final, indent=2))


def log_inputs(client: Any, run_id: str, config: Config, data: RunData) -> None:
    """The trial's resolved config and long-tail draw, as artifacts of its new run, and its
    data as the run's dataset input."""
    with tempfile.TemporaryDirectory() as folder:
        save_config(config, Path(folder) / "config.yaml")
        np.save(Path(folder) / "lt_indices.npy", data.lt_indices)
        tracked("the trial's config", lambda: client.log_artifacts(run_id, folder))
    tracked("the trial's dataset", lambda: tracking.log_dataset(client, run_id, config, data))


def log_resume(
    client: Any, run_id: str | None, output: str, resumed_from: int, epoch_log: tracking.EpochLog
) -> None:
    """A restarted trial: tag the epoch it continues after, and log the epochs it saved."""
    if run_id is not None:
        tracked(
            "the trial's resume tag",
            lambda: client.set_tag(run_id, tracking.RESUMED_TAG, str(resumed_from)),
        )
    # Train workers can outlive a killed driver by seconds and save epochs whose reports
    # never reached MLflow: log them from their checkpoints before training goes on.
    for saved, _ in saved_checkpoints(output):
        if int(saved["epoch"]) <= resumed_from:
            epoch_log.log(saved)


def log_outputs(
    client: Any, run_id: str, trial_id: str, config: Config, checkpoint: Any, output: str
) -> None:
    """The finished trial's assignments and plots, and the tag naming its final checkpoint."""
    with tempfile.TemporaryDirectory() as folder:
        table = Path(folder) / ASSIGNMENTS_FILE
        if not save_assignments(checkpoint, str(table)):
            return
        plots = assignment_plots(
            read_assignments(table), config.model.num_clusters, Path(folder) / "plots"
        )

        def log() -> None:
            client.log_artifact(run_id, str(table))
            for plot in plots:
                client.log_artifact(run_id, str(plot), artifact_path="plots")
            tag_checkpoint(client, run_id, output)

        tracked(f"trial {trial_id}'s assignments, plots and checkpoint tag", log)


def tag_checkpoint(client: Any, run_id: str, output: str) -> None:
    """Point the trial's run at its newest complete checkpoint (what predict and report load)."""
    saved = saved_checkpoints(output)
    if saved:
        client.set_tag(run_id, tracking.CHECKPOINT_TAG, saved[-1][1])


def register_best(client: Any, context: SearchContext, trial_id: str) -> str | None:
    """Register the best trial's model (state, metrics, config) as a new version of
    ``jdcl-<space name>``; returns its ``models:/NAME/VERSION`` URI."""
    child = tracking.find_child(client, context.experiment_id, context.parent_run_id, trial_id)
    location = child.data.tags.get(tracking.CHECKPOINT_TAG) if child is not None else None
    if location is None:
        return None
    search = context.space.search
    with tempfile.TemporaryDirectory() as folder:
        for name in (STATE_FILE, METRICS_FILE):
            (Path(folder) / name).write_bytes(storage.read_bytes(storage.join(location, name)))
        config = storage.read_text(storage.join(context.trial_dir(trial_id), "config.yaml"))
        (Path(folder) / "config.yaml").write_text(config)
        final = json.loads((Path(folder) / METRICS_FILE).read_text())
        return tracking.register_model(
            client,
            child.info.run_id,
            folder,
            f"jdcl-{context.space.name}",
            tags={
                "config": config,
                search.metric: str(final.get(search.metric)),
                tracking.CHECKPOINT_TAG: location,
            },
            description=f"best trial {trial_id} by {search.metric} ({search.mode})",
        )


def trainable(context: SearchContext) -> Any:
    """``run_trial`` for Tune: holding a sliver of the trial-driver resource, not a CPU."""
    return tune.with_resources(
        tune.with_parameters(run_trial, context=context), {TRIAL_RESOURCE: TRIAL_SHARE}
    )


def build_tuner(context: SearchContext, location: str, name: str, max_concurrent: int) -> Any:
    space = context.space
    search_alg, limit = search_algorithm(space.search, max_concurrent)
    return tune.Tuner(
        trainable(context),
        param_space={p.key: tune_distribution(p) for p in space.parameters},
        tune_config=tune.TuneConfig(
            metric=space.search.metric,
            mode=space.search.mode,
            num_samples=space.search.num_samples,
            max_concurrent_trials=limit,
            scheduler=trial_scheduler(space),
            search_alg=search_alg,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=location,
            callbacks=[SearchTracker(context)],
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=1,
        ),
    )


def trial_scheduler(space: SearchSpace) -> TrialScheduler:
    if space.scheduler.kind != "asha":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epochs_done",
        max_t=space.scheduler.max_epochs or space.epochs,
        grace_period=space.scheduler.grace_period,
        reduction_factor=space.scheduler.reduction_factor,
        # Let a trial that reached max_t return by itself, so it logs its artifacts.
        stop_last_trials=False,
    )


def search_algorithm(
    search: SearchConfig, max_concurrent: int
) -> tuple[Searcher | SearchAlgorithm, int | None]:
    """The searcher, and the ``max_concurrent_trials`` Tune should apply to it."""
    if search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=search.seed), max_concurrent
    # Tune applies max_concurrent_trials to Searchers only: this generator takes it itself.
    return BasicVariantGenerator(random_state=search.seed, max_concurrent=max_concurrent), None


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


def run_search(tuner: Any, client: Any, context: SearchContext) -> Any | None:
    """Tune's results, or None when the search stopped before it finished (its runs then end
    KILLED)."""
    results = None
    try:
        results = tuner.fit()
    finally:
        # Ctrl+C / SIGTERM: Tune returns early, with trials not done (or not yet created).
        unfinished = (
            results is None
            or len(results) < context.space.num_trials
            or results.num_terminated + results.num_errors < len(results)
        )
        if unfinished:
            with contextlib.suppress(Exception):
                tracking.end_interrupted(client, context.experiment_id, context.parent_run_id)
    return None if unfinished else results


def check_objectives(space: SearchSpace, path: Path) -> None:
    """Every clustering objective a trial may get is registered: fail before Ray starts."""
    choices = [
        {parameter.key: value}
        for parameter in space.parameters
        if parameter.key == "loss.clustering"
        for value in parameter.values
    ]
    for params in choices or [{}]:
        try:
            objective.loss_terms(space.trial_config(params))
        except UserError as error:
            raise UserError(f"{path}: {error}") from None


def check_data(space: SearchSpace, path: Path) -> RunData:
    """Read the data once in the driver, so that what every trial would fail on (a batch larger
    than the images, a missing test split) stops the search in one line before Ray starts."""
    try:
        data = prepare_data(space.trial_config({}))
        for parameter in space.parameters:
            if parameter.key in ("optim.batch_size", "model.num_clusters"):
                options = parameter.distribution in ("choice", "grid")
                largest = max(parameter.values if options else parameter.values[:2])
                check_fits(space.trial_config({parameter.key: largest}), data.train)
    except UserError as error:
        raise UserError(f"{path}: {error}") from None
    return data


def main(argv: list[str] | None = None) -> int:
    return run(cli.parse("tune", argv))


def run(args: argparse.Namespace) -> int:
    space = load_space(args.space)
    check_objectives(space, args.space)
    data = check_data(space, args.space)
    uri = args.tracking_uri or tracking.default_tracking_uri()
    initial_weights(space.trial_config({}), uri)  # a bad model.init fails before Ray starts
    client = tracking.connect(uri)
    context, folder = open_search(args, space, client, uri)
    if not args.resume:
        tracked(
            "the search's dataset",
            lambda: tracking.log_dataset(
                client, context.parent_run_id, space.trial_config({}), data
            ),
        )
    # Tune checks the metric in every result; ours skip it on epochs without evaluation
    # (space.py checks the metric's name instead). Save Tune's state often: a killed driver
    # then loses at most a second of the search's bookkeeping.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    on_cluster = init_ray(args.address, resources={TRIAL_RESOURCE: 1.0})
    storage.check_shared(storage.resolve(args.storage), "--storage")
    max_concurrent = search_concurrency(
        space.trial_config({}), on_cluster, space.search.max_concurrent_trials
    )
    # SIGTERM (a scheduler, `kill`) ends the search like Ctrl+C: Tune saves its state.
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    if args.resume:
        tuner = tune.Tuner.restore(
            folder, trainable=trainable(context), resume_unfinished=True, resume_errored=False
        )
    else:
        location, name = folder.rsplit("/", 1)
        tuner = build_tuner(context, location, name, max_concurrent)
    results = run_search(tuner, client, context)
    if results is None:
        raise UserError(
            f"search stopped before it finished: continue it with jdcl-tune "
            f"--space {args.space} --storage {args.storage} --resume"
        )
    best = summarize(results, space, client, context.parent_run_id, folder)
    if best is None:
        tracked(
            "the search's end", lambda: tracking.set_status(client, context.parent_run_id, "FAILED")
        )
        raise UserError(
            f"search failed: none of its {len(results)} trials finished without error; their "
            f"errors are in {folder}"
        )
    registered = tracked(
        "the best model", lambda: register_best(client, context, str(best["trial_id"]))
    )
    if registered:
        tracked(
            "the registered model's name",
            lambda: client.set_tag(context.parent_run_id, "registered_model", registered),
        )
        print(f"best model: {registered}  (jdcl-predict --model {registered} ...)")
    tracked(
        "the search's end", lambda: tracking.set_status(client, context.parent_run_id, "FINISHED")
    )
    print(f"Tune state: {folder}")
    print(tracking.where_to_look(uri, context.experiment_id))
    return 0


if __name__ == "__main__":
    run_cli(main)
