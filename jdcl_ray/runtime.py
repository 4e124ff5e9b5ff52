"""The Ray runtime edge: start or join Ray, check what the cluster holds, size a search to it.

What ``train`` and ``tune`` (and ``predict --address``) both need before any work is placed.
"""

from __future__ import annotations

import logging
import os
import warnings

from jdcl_ray.config import Config
from jdcl_ray.errors import UserError

# Each trial's driver (a Tune function trainable) holds a sliver of this custom resource instead
# of a CPU, so that on 2 cores the Train workers get the CPUs (ray.md).
TRIAL_RESOURCE = "TRAIN_DRIVER"
TRIAL_SHARE = 0.01


def init_ray(address: str | None, resources: dict[str, float] | None = None) -> bool:
    """Connect to a cluster when one is named, else start Ray in-process on this machine
    (with ``resources`` as custom resources). True when connected to a cluster."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if address:
            try:
                ray.init(address=address)
            except (ConnectionError, RuntimeError) as error:
                raise UserError(f"Ray cluster at {address} is unreachable: {error}") from None
        else:
            # "local": a new Ray here, never a stale `ray start` cluster found in /tmp/ray.
            # The dashboard hosts the State API that Train uses to clean up stopped runs.
            quiet_local_ray()
            ray.init(
                address="local",
                dashboard_host="127.0.0.1",
                resources=resources,
                runtime_env={
                    "worker_process_setup_hook": "jdcl_ray.runtime.quiet_worker_logs",
                    "env_vars": WORKER_ENV,
                },
            )
    return bool(address)


# glibc's malloc raises its mmap threshold to the largest block freed, after which the decoded
# blocks a streamed run passes through (data.stream) come from the heap and fragment it: a
# worker's resident memory then grows with the images it has seen (measured: +150 MB from 1,000
# to 4,000 images of 96 px). A fixed threshold (glibc's default value) gives large blocks back
# to the system when freed, and lowered every worker's memory by 300-500 MB here.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}

# Lines Ray prints on every trial of a search on one machine that say nothing wrong (README,
# "What the console shows"): the cleaner of a stopped trial's placement group reports, at
# warning level, that it cleans up as designed.
# A streamed run's passes (data.stream) each log that Ray Data started and finished and that
# its progress bars are off (on purpose: one per pass per epoch), and Ray Train's dataset
# manager warns of a deprecation inside Ray: none is the user's to act on. Ray Data's other
# warnings still show.
QUIET_WORKER_LOGGERS = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    "ray.data._internal.execution.streaming_executor": logging.WARNING,
    "ray.data._internal.progress": logging.ERROR,
}
QUIET_WARNINGS = r"`ExecutionOptions.exclude_resources` is deprecated"


def quiet_local_ray() -> None:
    """Before a Ray of our own starts on this machine: no node of it can be drained or
    preempted, so Train's preemption watcher (an actor per trial, whose construction logs an
    error line about its restarts) has nothing to watch; token authentication is on, which is
    right for a local cluster and needs no warning."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )


def quiet_worker_logs() -> None:
    """Ray's worker_process_setup_hook: raise the levels of QUIET_WORKER_LOGGERS."""
    for name, level in QUIET_WORKER_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    warnings.filterwarnings("ignore", message=QUIET_WARNINGS)


def trials_that_fit(config: Config, on_cluster: bool) -> int:
    """How many runs of ``config``'s workers the Ray cluster holds at once (at least 1).

    A run that can never be placed would wait forever: on this machine that is an error naming
    the keys; on a cluster (which may autoscale) it is a warning.
    """
    import ray

    run = config.run
    available = ray.cluster_resources()
    needs = {"CPU": run.workers * run.cpus_per_worker}
    if run.use_gpu:
        needs["GPU"] = run.workers * run.gpus_per_worker
    fits = min(int(available.get(name, 0) // amount) for name, amount in needs.items())
    if fits >= 1:
        return fits
    message = (
        f"a run needs {needs} (run.workers = {run.workers} × run.cpus_per_worker = "
        f"{run.cpus_per_worker}"
        + (f", × run.gpus_per_worker = {run.gpus_per_worker}" if run.use_gpu else "")
        + f") but the Ray cluster has {{{', '.join(f'{k!r}: {available.get(k, 0)}' for k in needs)}}}"
    )
    if not on_cluster:
        raise UserError(f"{message}: lower run.workers or the resources per worker")
    logging.getLogger("jdcl_ray").warning("%s: waiting for the cluster to scale up", message)
    return 1


def search_concurrency(config: Config, on_cluster: bool, requested: int | None) -> int:
    """How many trials of a search run at once: ``requested`` (the space's
    ``max_concurrent_trials``) or as many as fit; on this machine never more than fit, since
    Tune counts trial drivers, not their Train workers, and would start trials that deadlock."""
    import ray

    if ray.cluster_resources().get(TRIAL_RESOURCE, 0) < TRIAL_SHARE:
        raise UserError(
            f"the Ray cluster has no {TRIAL_RESOURCE} resource for trial drivers: start its head "
            f"with ray start --head --resources='{{\"{TRIAL_RESOURCE}\": 1}}' (cluster/gpu.yaml does)"
        )
    fits = trials_that_fit(config, on_cluster)
    concurrent = requested or fits
    return concurrent if on_cluster else min(concurrent, fits)
