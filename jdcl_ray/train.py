"""The Ray Train edge: ``python -m jdcl_ray.train --config FILE [--set k=v ...] [--output DIR] [--resume]``.

Ray starts locally unless ``--address`` / ``RAY_ADDRESS`` names a cluster. The data is read
once by the driver (so a bad path fails in one line before any worker starts) and shipped to
the workers through Ray's object store, so only the driver needs the files.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from jdcl_ray import cli, objective, storage, streaming, tracking
from jdcl_ray.checkpoint import (
    ASSIGNMENTS_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    TRAIN_DIR,
    load_state,
    newest_saved_state,
    save_checkpoint,
    save_run_inputs,
    saved_checkpoints,
)
from jdcl_ray.config import Config, from_dict, load_config, merge, parse_overrides
from jdcl_ray.data import RunData, prepare_data
from jdcl_ray.engine import (
    NonFiniteLossError,
    fit,
    sample_rss,
    sampled_rss_peak_mb,
    worker_context,
)
from jdcl_ray.errors import UserError, run_cli
from jdcl_ray.pretrained import InitialWeights, read_initial_weights
from jdcl_ray.runtime import init_ray, trials_that_fit

NON_FINITE = "non_finite_loss"  # key of a worker's return value when training diverged
USER_ERROR = "user_error"  # ... when a worker met a user mistake (a streamed image unreadable)


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Runs in every Ray Train worker (torch.distributed is already set up by TorchTrainer)."""
    import ray
    import ray.train

    # Ray 2.60 logs every report at INFO under a logger named by its file path, outside
    # "ray.train", so LoggingConfig can't quiet it: without this, one long line per rank per epoch.
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    config = from_dict(loop_config["config"])
    data: RunData = ray.get(loop_config["data"])
    ctx = worker_context(config.run.use_gpu)
    images = streaming.worker_images(config, data, ctx) if streaming.is_streamed(data) else None
    checkpoint = ray.train.get_checkpoint()
    restored = ray.get(loop_config["resume_state"])
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            recorded = load_state(folder)
        if restored is None or int(recorded["epoch"]) > int(restored["epoch"]):
            restored = recorded

    def report(
        metrics: dict[str, Any],
        state: dict[str, Any] | None,
        assignments: dict[str, np.ndarray] | None,
    ) -> None:
        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(folder, state, metrics, assignments)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    # Train V2 routes worker prints through its logger: log once, through logging.
    try:
        return fit(
            config,
            data,
            ctx,
            report,
            restored,
            log=logging.getLogger("jdcl_ray").info,
            initial=ray.get(loop_config["initial"]),
            images=images,
        )
    except NonFiniteLossError as error:
        # Returned, not raised: Ray would restart the workers and hit the same NaN again.
        return {NON_FINITE: str(error)}
    except UserError as error:  # the same: a retry would meet the same bad image
        return {USER_ERROR: str(error)}


def run_training(
    config: Config,
    output: str,
    data: RunData,
    resume_state: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    initial: InitialWeights | None = None,
) -> tuple[dict[str, Any], Path | None]:
    """Fit one data-parallel run into ``output``; returns the last epoch's metrics and the
    last checkpoint (``output``: a path or URI; ``callbacks``: Ray Train ``UserCallback``s;
    ``initial``: the first weights, read on the driver like the data)."""
    import ray
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    run = config.run
    resources = {"CPU": run.cpus_per_worker}
    if run.use_gpu:
        resources["GPU"] = run.gpus_per_worker
    streamed = {}
    if streaming.is_streamed(data):
        datasets, dataset_config = streaming.training_datasets(data, config)
        streamed = {"datasets": datasets, "dataset_config": dataset_config}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": config.to_dict(),
            "data": ray.put(data),
            "resume_state": ray.put(resume_state),
            "initial": ray.put(initial),
        },
        scaling_config=ScalingConfig(
            num_workers=run.workers,
            use_gpu=run.use_gpu,
            resources_per_worker=resources,
            placement_strategy=run.placement_strategy,
        ),
        run_config=RunConfig(
            name=TRAIN_DIR,
            storage_path=str(output),
            failure_config=FailureConfig(max_failures=run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints),
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=callbacks or [],
        ),
        **streamed,
    )
    result = trainer.fit()
    returned = result.return_value or {}
    if NON_FINITE in returned:
        raise NonFiniteLossError(returned[NON_FINITE])
    if USER_ERROR in returned:
        raise UserError(returned[USER_ERROR])
    # Ray's record of a resumed run can lag the folders on disk (see newest_saved_state): the
    # newest checkpoint there, by epoch, is what the run really reached.
    saved = saved_checkpoints(output)
    if saved and int(saved[-1][0]["epoch"]) > int((result.metrics or {}).get("epoch", -1)):
        metrics, folder = saved[-1]
        return metrics, ray.train.Checkpoint(folder)
    return dict(result.metrics or {}), result.checkpoint


def initial_weights(config: Config, tracking_uri: str) -> tuple[Config, InitialWeights | None]:
    """``model.init``'s weights, read here on the driver; an MLflow run id or ``models:/`` name
    becomes its checkpoint folder in the returned config, so the run records what it loaded."""
    spec = config.model.init
    if tracking.RUN_ID.match(spec) or spec.startswith("models:/"):
        spec = tracking.resolve_checkpoint(spec, tracking_uri, "model.init")
        config = replace(config, model=replace(config.model, init=spec))
    return config, read_initial_weights(spec, config.model.init_heads)


def save_assignments(checkpoint: Any, destination: str) -> bool:
    """Copy the final checkpoint's assignments table to ``destination``; False if it has none."""
    if checkpoint is None:
        return False
    with checkpoint.as_directory() as folder:
        table = Path(folder) / ASSIGNMENTS_FILE
        if not table.is_file():
            return False
        storage.write_bytes(destination, table.read_bytes())
    return True


def print_summary(metrics: dict[str, Any], output: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"jdcl-ray: epoch {metrics.get('epoch', -1) + 1}")
    table.add_column("split")
    keys = ("acc", "caa", "macro_f1", "nmi", "ari", "tail_acc")
    for key in keys:
        table.add_column(key, justify="right")
    for split in ("train", "test"):
        if f"{split}/acc" in metrics:
            table.add_row(split, *(f"{metrics[f'{split}/{k}']:.3f}" for k in keys))
    console = Console()
    console.print(table)
    extras = {
        k: metrics[k]
        for k in ("knn_acc", "knn_acc_pixels", "selection_score", "k_score", "images_per_s")
        if k in metrics
    }
    console.print(", ".join(f"{k} {v:.3f}" for k, v in extras.items()))
    console.print(f"metrics: {storage.join(output, METRICS_FILE)}")


def data_overrides(data: str | None) -> list[str]:
    """``--data PATH``: a user's folder of images, or a ``.parquet`` table, as it is."""
    if data is None:
        return []
    kind = "parquet" if data.endswith(".parquet") else "folder"
    return [f"data.name={kind}", f"data.root={data}"]


def resolve_run(args: argparse.Namespace) -> tuple[Config, str]:
    """The config and output location of a new run, or of the run that ``--resume`` continues."""
    if args.resume:
        if args.output is None:
            raise UserError("--resume needs --output: the folder of the run to continue")
        output = storage.resolve(args.output)
        saved = storage.join(output, CONFIG_FILE)
        if not storage.exists(saved):
            raise UserError(f"--resume: {saved} does not exist: expected the folder of a run")
        values = yaml.safe_load(storage.read_text(saved))
        return load_config(None, merge(values, parse_overrides(args.set))), output
    config = load_config(args.config, data_overrides(args.data) + args.set)
    output = storage.resolve(args.output or config.run.output_dir)
    if storage.exists(storage.join(output, TRAIN_DIR)):
        raise UserError(
            f"--output {output} already holds a run: pass --resume to continue it, "
            f"or choose another folder"
        )
    return config, output


def main(argv: list[str] | None = None) -> int:
    return run(cli.parse("train", argv))


def run(args: argparse.Namespace) -> int:
    config, output = resolve_run(args)
    objective.loss_terms(config)  # an unknown loss.clustering fails here, before Ray starts
    config, initial = initial_weights(config, tracking.default_tracking_uri())
    data = prepare_data(config)
    sample_rss()
    on_cluster = init_ray(args.address)
    storage.check_shared(output, "--output")
    trials_that_fit(config, on_cluster)
    save_run_inputs(config, data.lt_indices, output)
    resume_state = newest_saved_state(output) if args.resume else None
    metrics, checkpoint = run_training(config, output, data, resume_state, initial=initial)
    sample_rss()
    metrics["memory/driver_peak_mb"] = sampled_rss_peak_mb()
    storage.write_text(storage.join(output, METRICS_FILE), json.dumps(metrics, indent=2))
    save_assignments(checkpoint, storage.join(output, ASSIGNMENTS_FILE))
    print_summary(metrics, output)
    return 0


if __name__ == "__main__":
    run_cli(main)
