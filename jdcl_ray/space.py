"""Search-space files (``tune_spaces/*.yaml``): what Ray Tune searches, and how.

A file has five sections::

    base:      {config: configs/digits_lt.yaml, set: {run.epochs: 12}}   # the training config
    space:     {loss.temperature: {uniform: [0.2, 0.7]}, loss.prior: {choice: [fixed, pooled]}}
    search:    {algorithm: optuna, num_samples: 6, metric: selection_score, mode: max}
    scheduler: {kind: asha, grace_period: 4, reduction_factor: 2}
    resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0}

Everything is checked on load, before Ray starts: each mistake is one line naming the file and
the key. Each parameter's bounds or options are also put through the training config's own
validation, so ``loss.tau_plus: {uniform: [0, 1.5]}`` fails here, not in trial 7.

The number of clusters can be searched like any key (``model.num_clusters: {grid: [5, 10, 20]}``,
or ``{uniform: [5, 20]}`` for random integers). Trials with different K are then compared by
``k_score``, the search metric's default in that case: ``selection_score`` is not comparable
across K (it favours the fewest clusters, see docs/method.md), so a space that searches K with it
is refused.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jdcl_ray.config import (
    Config,
    build_dataclass,
    check,
    dotted_to_nested,
    field_type,
    from_dict,
    merge,
    read_yaml,
)
from jdcl_ray.errors import UserError
from jdcl_ray.metrics import CLUSTER_METRIC_KEYS

SECTIONS = ("name", "base", "space", "search", "scheduler", "resources")
# distribution → number of arguments (None: a non-empty list of options)
DISTRIBUTIONS: dict[str, int | None] = {
    "uniform": 2,
    "loguniform": 2,
    "quniform": 3,
    "choice": None,
    "grid": None,
}
ALGORITHMS = ("random", "optuna")
# Metrics a trial reports that a search can optimise; label-based ones need labelled data.
NUM_CLUSTERS = "model.num_clusters"
K_METRIC = "k_score"  # label-free and comparable across K: the default when K is searched
SEARCH_METRICS = (
    "selection_score",
    K_METRIC,
    "knn_acc",
    "cluster_size_l1",
    # objective.JOINT_TERMS: every clustering objective reports these (tests check they agree).
    *(f"loss/{term}" for term in ("total", "dcl", "clustering", "dcl_floor_frac")),
    *(f"{split}/{key}" for split in ("train", "test") for key in CLUSTER_METRIC_KEYS),
)


@dataclass(frozen=True)
class Parameter:
    key: str  # dotted config key, e.g. "loss.temperature"
    distribution: str  # one of DISTRIBUTIONS
    values: tuple[Any, ...]  # (low, high[, q]) or the options

    @property
    def is_int(self) -> bool:
        return field_type(self.key) is int


@dataclass
class SearchConfig:
    algorithm: str = "random"
    num_samples: int = 4
    max_concurrent_trials: int | None = None  # None: as many as the cluster's resources fit
    # Label-free by default (a real user has no labels): selection_score, or k_score when the
    # space searches model.num_clusters (resolved by load_space).
    metric: str | None = None
    mode: str = "max"
    seed: int = 0

    def validate(self) -> None:
        check(
            self.algorithm in ALGORITHMS, "search.algorithm", self.algorithm, f"one of {ALGORITHMS}"
        )
        check(self.num_samples >= 1, "search.num_samples", self.num_samples, ">= 1")
        check(
            self.max_concurrent_trials is None or self.max_concurrent_trials >= 1,
            "search.max_concurrent_trials",
            self.max_concurrent_trials,
            "null or >= 1",
        )
        check(
            self.metric is None or self.metric in SEARCH_METRICS,
            "search.metric",
            self.metric,
            f"one of {SEARCH_METRICS}",
        )
        check(self.mode in ("min", "max"), "search.mode", self.mode, "'min' or 'max'")


@dataclass
class SchedulerConfig:
    kind: str = "asha"
    grace_period: int = 1  # epochs every trial gets before it can be stopped
    reduction_factor: float = 2.0
    max_epochs: int | None = None  # None: the base config's run.epochs

    def validate(self) -> None:
        check(self.kind in ("asha", "fifo"), "scheduler.kind", self.kind, "'asha' or 'fifo'")
        check(self.grace_period >= 1, "scheduler.grace_period", self.grace_period, ">= 1")
        check(
            self.reduction_factor > 1,
            "scheduler.reduction_factor",
            self.reduction_factor,
            "> 1",
        )
        check(
            self.max_epochs is None or self.max_epochs >= self.grace_period,
            "scheduler.max_epochs",
            self.max_epochs,
            f"null or >= scheduler.grace_period ({self.grace_period})",
        )


@dataclass
class ResourcesConfig:
    workers: int = 1  # Ray Train (DDP) workers per trial
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def validate(self) -> None:
        check(self.workers >= 1, "resources.workers", self.workers, ">= 1")
        check(self.cpus_per_worker > 0, "resources.cpus_per_worker", self.cpus_per_worker, "> 0")
        check(self.gpus_per_worker >= 0, "resources.gpus_per_worker", self.gpus_per_worker, ">= 0")

    def as_overrides(self) -> dict[str, Any]:
        """The run keys of the training config that these resources set."""
        run: dict[str, Any] = {
            "workers": self.workers,
            "cpus_per_worker": self.cpus_per_worker,
            "use_gpu": self.gpus_per_worker > 0,
        }
        if self.gpus_per_worker > 0:
            run["gpus_per_worker"] = self.gpus_per_worker
        return {"run": run}


@dataclass
class SearchSpace:
    name: str  # the MLflow experiment and the Tune folder prefix
    base: dict[str, Any]  # resolved training config (as a dict), resources applied
    parameters: list[Parameter]
    search: SearchConfig = field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    @property
    def epochs(self) -> int:
        return int(self.base["run"]["epochs"])

    @property
    def searches_num_clusters(self) -> bool:
        return _searches_k(self.parameters)

    @property
    def num_trials(self) -> int:
        """Tune runs ``num_samples`` trials per point of the grid (one point without a grid)."""
        grid = [len(p.values) for p in self.parameters if p.distribution == "grid"]
        return self.search.num_samples * int(math.prod(grid))

    def trial_config(self, params: dict[str, Any]) -> Config:
        """The training config of one trial: the base with its sampled ``params`` (dotted keys)."""
        values = copy.deepcopy(self.base)
        for key, value in params.items():
            merge(values, dotted_to_nested(key, value))
        return from_dict(values)


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space file; errors name the file and the key."""
    path = Path(path)
    try:
        return _parse(read_yaml(path), path)
    except UserError as error:
        message = str(error)
        raise UserError(
            message if message.startswith(str(path)) else f"{path}: {message}"
        ) from None


def _parse(values: dict[str, Any], path: Path) -> SearchSpace:
    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        raise UserError(f"section '{unknown[0]}' is unknown: expected one of {list(SECTIONS)}")
    sections = {
        key: build_dataclass(cls, values.get(key) or {}, key)
        for key, cls in (
            ("search", SearchConfig),
            ("scheduler", SchedulerConfig),
            ("resources", ResourcesConfig),
        )
    }
    for section in sections.values():
        section.validate()
    base = _base_config(values.get("base"), path)
    merge(base, sections["resources"].as_overrides())
    from_dict(base)  # the base itself must be a valid config
    raw_space = values.get("space")
    if not isinstance(raw_space, dict) or not raw_space:
        raise UserError(
            "section 'space' must map config keys to distributions, e.g. "
            "'loss.temperature: {uniform: [0.1, 0.5]}'"
        )
    parameters = [_parameter(str(key), spec, base) for key, spec in raw_space.items()]
    search, scheduler = sections["search"], sections["scheduler"]
    if search.algorithm == "optuna" and any(p.distribution == "grid" for p in parameters):
        grid = next(p.key for p in parameters if p.distribution == "grid")
        raise UserError(
            f"space key '{grid}' uses 'grid', which search.algorithm 'optuna' can't sample: "
            f"use 'choice', or search.algorithm 'random'"
        )
    search.metric = _search_metric(search.metric, parameters)
    epochs = int(base["run"]["epochs"])
    if scheduler.max_epochs is not None and scheduler.max_epochs > epochs:
        raise UserError(
            f"key 'scheduler.max_epochs' = {scheduler.max_epochs} is more than the base "
            f"config's run.epochs = {epochs}"
        )
    name = values.get("name", path.stem)
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"key 'name' = {name!r} must be a non-empty string")
    return SearchSpace(name, base, parameters, search, scheduler, sections["resources"])


def _searches_k(parameters: list[Parameter]) -> bool:
    return any(p.key == NUM_CLUSTERS for p in parameters)


def _search_metric(metric: str | None, parameters: list[Parameter]) -> str:
    """The metric as written, else the label-free default: k_score when K is searched."""
    searches_k = _searches_k(parameters)
    if metric is None:
        return K_METRIC if searches_k else "selection_score"
    if searches_k and metric == "selection_score":
        raise UserError(
            f"key 'search.metric' = 'selection_score' can't compare trials with different "
            f"{NUM_CLUSTERS}, which this space searches (it favours the fewest clusters): use "
            f"'{K_METRIC}' (the default when {NUM_CLUSTERS} is searched) or a label-based metric"
        )
    return metric


def _base_config(raw: Any, path: Path) -> dict[str, Any]:
    """``base: {config: FILE, set: {dotted.key: value}}`` → the merged config values."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"section 'base' must be a mapping with 'config' and/or 'set', got {raw!r}")
    unknown = sorted(set(raw) - {"config", "set"})
    if unknown:
        raise UserError(f"key 'base.{unknown[0]}' is unknown: expected 'config' and/or 'set'")
    values: dict[str, Any] = {}
    if raw.get("config") is not None:
        values = read_yaml(_find_config(str(raw["config"]), path))
    overrides = raw.get("set") or {}
    if not isinstance(overrides, dict):
        raise UserError(f"key 'base.set' must map config keys to values, got {overrides!r}")
    for key, value in overrides.items():
        merge(values, dotted_to_nested(str(key), value))
    return values


def _find_config(name: str, space_file: Path) -> Path:
    """A base config path as written, else beside the space file, else in the project above it."""
    candidates = [Path(name), space_file.parent / name, space_file.parent.parent / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(
        f"key 'base.config' = {name!r}: no such file (looked in {[str(c) for c in candidates]})"
    )


def _parameter(key: str, spec: Any, base: dict[str, Any]) -> Parameter:
    where = f"space key '{key}'"
    try:
        field_type(key)
    except UserError as error:
        raise UserError(f"space key {error}") from None
    if not isinstance(spec, dict) or len(spec) != 1:
        raise UserError(
            f"{where} must have exactly one distribution, e.g. {{uniform: [0.1, 0.5]}}: "
            f"expected one of {list(DISTRIBUTIONS)}, got {spec!r}"
        )
    distribution, args = next(iter(spec.items()))
    if distribution not in DISTRIBUTIONS:
        raise UserError(
            f"{where}: distribution {distribution!r} is unknown: expected one of {list(DISTRIBUTIONS)}"
        )
    arity = DISTRIBUTIONS[distribution]
    if not isinstance(args, list) or not args:
        raise UserError(f"{where}: {distribution} needs a non-empty list, got {args!r}")
    if arity is not None:
        _check_bounds(where, distribution, args, arity)
    parameter = Parameter(key, distribution, tuple(args))
    # Put the bounds / every option through the training config's own checks.
    candidates = args if arity is None else args[:2]
    if arity is not None and parameter.is_int:
        candidates = [int(v) for v in candidates]
    for value in candidates:
        trial = copy.deepcopy(base)
        merge(trial, dotted_to_nested(key, value))
        try:
            from_dict(trial)
        except UserError as error:
            raise UserError(
                f"{where}: {distribution} value {value!r} is invalid: {error}"
            ) from None
    return parameter


def _check_bounds(where: str, distribution: str, args: list[Any], arity: int) -> None:
    usage = "[low, high, q]" if arity == 3 else "[low, high]"
    if len(args) != arity or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in args
    ):
        raise UserError(f"{where}: {distribution} needs {usage} as numbers, got {args!r}")
    low, high = args[0], args[1]
    if low >= high:
        raise UserError(f"{where}: {distribution} low {low} must be below high {high}")
    if distribution == "loguniform" and low <= 0:
        raise UserError(f"{where}: loguniform bounds must be > 0, got low {low}")
    if distribution == "quniform" and args[2] <= 0:
        raise UserError(f"{where}: quniform step q must be > 0, got {args[2]}")


def tune_distribution(parameter: Parameter) -> Any:
    """The Ray Tune sampler of a parameter (integer keys get the integer samplers)."""
    from ray import tune

    args = parameter.values
    if parameter.distribution == "choice":
        return tune.choice(list(args))
    if parameter.distribution == "grid":
        return tune.grid_search(list(args))
    if parameter.is_int:
        low, high = int(args[0]), int(args[1])
        if parameter.distribution == "uniform":
            return tune.randint(low, high + 1)
        if parameter.distribution == "loguniform":
            return tune.lograndint(low, high + 1)
        return tune.qrandint(low, high, int(args[2]))
    if parameter.distribution == "uniform":
        return tune.uniform(*args)
    if parameter.distribution == "loguniform":
        return tune.loguniform(*args)
    return tune.quniform(*args)
