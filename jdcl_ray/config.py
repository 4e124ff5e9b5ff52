"""Typed training configuration, loaded from YAML and validated on load.

Every mistake stops with one line naming the dotted key and the value (a ``UserError``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jdcl_ray.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD")
EVAL_SPLITS = ("auto", "test", "train", "none")
STREAMED_SOURCES = ("parquet", "folder")  # what data.stream reads


@dataclass(frozen=True)
class AugmentConfig:
    """SimCLR's augmentation strengths; the defaults are the paper's for CIFAR-sized images."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip_p: float = 0.5
    # ColorJitter's brightness, contrast, saturation, hue
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur: bool | None = None  # None: blur when the output side is >= 96 px
    blur_p: float = 0.5

    def __post_init__(self) -> None:
        scale = self.crop_scale
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            _bad("crop_scale", scale, "(min, max) with 0 < min <= max <= 1")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                _bad(name, value, "a probability in [0, 1]")
        if len(self.jitter) != 4 or not all(v >= 0 for v in self.jitter) or self.jitter[3] > 0.5:
            _bad(
                "jitter",
                self.jitter,
                "(brightness, contrast, saturation, hue), all >= 0 and hue <= 0.5",
            )
        if self.blur not in (None, True, False):
            _bad("blur", self.blur, "true, false or null (blur when the side is >= 96 px)")


def _bad(name: str, value: object, expected: str) -> None:
    raise UserError(f"augment.{name}={value!r} is out of range: expected {expected}")


def check(ok: bool, key: str, value: Any, expected: str) -> None:
    """Stop with one line naming the key and value unless ``ok``."""
    if not ok:
        raise UserError(f"config key '{key}' = {value!r} is out of range: expected {expected}")


@dataclass
class DataConfig:
    name: str = "digits"
    root: str | None = None
    # null: every image as it is; a number draws a long tail of that ratio (the benchmarks').
    imbalance_ratio: float | None = None
    profile: str = "exp"
    seed: int = 0
    # auto: the test split when the source has one, else the training images (logged as such).
    eval_split: str = "auto"
    # null: the images' own size; mixed sizes: their median shorter side, at most 128 px
    image_size: int | None = None
    download: bool = False
    # Read the images chunk by chunk with Ray Data, sharded across the workers, instead of
    # decoding them all into memory: for sets larger than memory (README, "Image sets larger
    # than memory"). stream_chunk: images per block a reader hands on; stream_readers: read-and-
    # decode tasks at once; shuffle_buffer: rows each worker shuffles its batches from;
    # stream_buffer_mb: decoded blocks Ray Data may hold ahead of the workers, per pass.
    stream: bool = False
    stream_chunk: int = 256
    stream_readers: int = 1
    shuffle_buffer: int = 4096
    stream_buffer_mb: int = 256

    def validate(self) -> None:
        check(
            self.imbalance_ratio is None or self.imbalance_ratio >= 1,
            "data.imbalance_ratio",
            self.imbalance_ratio,
            "null (every image) or >= 1",
        )
        check(self.profile in ("exp", "step"), "data.profile", self.profile, "'exp' or 'step'")
        check(
            self.eval_split in EVAL_SPLITS,
            "data.eval_split",
            self.eval_split,
            "'auto', 'test', 'train' or 'none'",
        )
        check(
            self.image_size is None or self.image_size >= 4,
            "data.image_size",
            self.image_size,
            "null or >= 4",
        )
        check(
            not self.stream or self.name in STREAMED_SOURCES,
            "data.stream",
            self.stream,
            f"false for data.name {self.name!r}: only {' and '.join(STREAMED_SOURCES)} sources "
            "stream (the others fit in memory)",
        )
        for key in ("stream_chunk", "stream_readers", "shuffle_buffer", "stream_buffer_mb"):
            check(getattr(self, key) >= 1, f"data.{key}", getattr(self, key), ">= 1")


@dataclass
class ModelConfig:
    backbone: str = "auto"  # auto: small_cnn up to 32 px, resnet18 above (models.py)
    num_clusters: int = 10
    width: int = 32
    projection_hidden: int = 512
    projection_dim: int = 128
    cluster_hidden: int = 100
    # First weights (jdcl_ray/pretrained.py): random, a weights file, torchvision:WEIGHTS, an
    # earlier run's folder or checkpoint, or an MLflow run id; init_heads: its heads too.
    init: str = "random"
    init_heads: bool = False
    freeze_backbone_epochs: int = 0  # the backbone stays as initialised for these epochs
    # The share of the clustering head's gradient that reaches the backbone: 1 trains both
    # networks through it (the paper's); 0 lets the head follow the features without shaping
    # them, so that a merge can't pull the features of two classes together (ours, README).
    clustering_backbone_grad: float = 1.0

    def validate(self) -> None:
        check(self.num_clusters >= 2, "model.num_clusters", self.num_clusters, ">= 2")
        check(bool(self.init.strip()), "model.init", self.init, "random or a weights source")
        check(
            self.freeze_backbone_epochs >= 0,
            "model.freeze_backbone_epochs",
            self.freeze_backbone_epochs,
            ">= 0",
        )
        check(
            0.0 <= self.clustering_backbone_grad <= 1.0,
            "model.clustering_backbone_grad",
            self.clustering_backbone_grad,
            "a number in [0, 1]",
        )
        for name in ("width", "projection_hidden", "projection_dim", "cluster_hidden"):
            value = getattr(self, name)
            check(value >= 1, f"model.{name}", value, ">= 1")


@dataclass
class LossConfig:
    temperature: float = 0.5
    tau_plus: float = 0.1
    prior: str = "fixed"
    prior_warmup_epochs: int = 5
    clustering: str = "ddc"  # a clustering objective of objective.py
    clustering_weight: float = 1.0
    clustering_warmup_epochs: int = 0
    pooling_momentum: float = 0.1
    # Parameters of the clustering objectives (objective.py names which reads which).
    refresh_every: int = 2  # epochs between re-mining neighbours / re-seeding the mixture
    neighbours: int = 20  # k of the mined nearest neighbours
    size_prior_weight: float = 2.0  # weight of KL(mean assignment ‖ floored own sizes)
    size_prior_floor: float = 0.2  # the floor, as a fraction of 1/K
    size_prior_ceiling: float = math.inf  # the ceiling, as a multiple of 1/K
    ot_penalty: float = 1.0  # KL penalty on the transported cluster sizes
    ot_epsilon: float = 0.1  # entropic regularisation of the transport
    ot_initial_mass: float = 0.2  # mass transported at the first clustering epoch, grown to 1
    mixture_sharpen: float = 1.0  # exponent on the mixture's joint likelihood

    def validate(self) -> None:
        check(self.temperature > 0, "loss.temperature", self.temperature, "> 0")
        check(0 <= self.tau_plus < 1, "loss.tau_plus", self.tau_plus, "in [0, 1)")
        check(self.prior in ("fixed", "pooled"), "loss.prior", self.prior, "'fixed' or 'pooled'")
        check(
            self.prior_warmup_epochs >= 0,
            "loss.prior_warmup_epochs",
            self.prior_warmup_epochs,
            ">= 0",
        )
        # Its name is checked against objective.py's registry when the objective is built.
        check(
            isinstance(self.clustering, str) and self.clustering != "",
            "loss.clustering",
            self.clustering,
            "the name of a clustering objective",
        )
        check(self.clustering_weight >= 0, "loss.clustering_weight", self.clustering_weight, ">= 0")
        check(
            self.clustering_warmup_epochs >= 0,
            "loss.clustering_warmup_epochs",
            self.clustering_warmup_epochs,
            ">= 0",
        )
        check(self.refresh_every >= 1, "loss.refresh_every", self.refresh_every, ">= 1")
        check(self.neighbours >= 1, "loss.neighbours", self.neighbours, ">= 1")
        check(self.size_prior_weight >= 0, "loss.size_prior_weight", self.size_prior_weight, ">= 0")
        check(
            self.size_prior_ceiling >= 1,
            "loss.size_prior_ceiling",
            self.size_prior_ceiling,
            ">= 1 (a multiple of 1/K; .inf for none)",
        )
        check(
            0 <= self.size_prior_floor <= 1,
            "loss.size_prior_floor",
            self.size_prior_floor,
            "in [0, 1]",
        )
        check(self.ot_penalty > 0, "loss.ot_penalty", self.ot_penalty, "> 0 (.inf: equal sizes)")
        check(self.ot_epsilon > 0, "loss.ot_epsilon", self.ot_epsilon, "> 0")
        check(
            0 < self.ot_initial_mass <= 1,
            "loss.ot_initial_mass",
            self.ot_initial_mass,
            "in (0, 1]",
        )
        check(self.mixture_sharpen > 0, "loss.mixture_sharpen", self.mixture_sharpen, "> 0")
        check(
            0 < self.pooling_momentum <= 1,
            "loss.pooling_momentum",
            self.pooling_momentum,
            "in (0, 1]",
        )


@dataclass
class OptimConfig:
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-6
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: int = 0
    batch_size: int = 256

    def validate(self) -> None:
        check(
            self.optimizer in ("adam", "adamw", "sgd"),
            "optim.optimizer",
            self.optimizer,
            "'adam', 'adamw' or 'sgd'",
        )
        check(self.lr > 0, "optim.lr", self.lr, "> 0")
        check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        check(0 <= self.momentum < 1, "optim.momentum", self.momentum, "in [0, 1)")
        check(
            self.schedule in ("cosine", "constant"),
            "optim.schedule",
            self.schedule,
            "'cosine' or 'constant'",
        )
        check(self.warmup_epochs >= 0, "optim.warmup_epochs", self.warmup_epochs, ">= 0")
        check(self.batch_size >= 2, "optim.batch_size", self.batch_size, ">= 2")


@dataclass
class EvalConfig:
    assign: str = "head"
    knn_k: int = 20
    every: int = 1

    def validate(self) -> None:
        check(self.assign in ("head", "kmeans"), "eval.assign", self.assign, "'head' or 'kmeans'")
        check(self.knn_k >= 1, "eval.knn_k", self.knn_k, ">= 1")
        check(self.every >= 1, "eval.every", self.every, ">= 1")


@dataclass
class RunConfig:
    name: str = "jdcl"
    epochs: int = 10
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    seed: int = 0
    output_dir: str = "runs/jdcl"
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    max_failures: int = 2
    # How Ray places the workers: PACK (fewest nodes), SPREAD, STRICT_SPREAD (one per node).
    placement_strategy: str = "PACK"
    # auto: bf16 autocast on a GPU, fp32 on a CPU (bf16 matmuls are slower there).
    precision: str = "auto"
    # torch.compile the joint model: faster steps on a GPU after a one-off compile (minutes).
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile's; aot_eager needs no C++ compiler

    def validate(self) -> None:
        check(self.epochs >= 1, "run.epochs", self.epochs, ">= 1")
        check(self.workers >= 1, "run.workers", self.workers, ">= 1")
        check(self.cpus_per_worker > 0, "run.cpus_per_worker", self.cpus_per_worker, "> 0")
        check(self.gpus_per_worker > 0, "run.gpus_per_worker", self.gpus_per_worker, "> 0")
        check(self.checkpoint_every >= 1, "run.checkpoint_every", self.checkpoint_every, ">= 1")
        check(self.keep_checkpoints >= 1, "run.keep_checkpoints", self.keep_checkpoints, ">= 1")
        check(self.max_failures >= 0, "run.max_failures", self.max_failures, ">= 0")
        check(
            self.placement_strategy in PLACEMENT_STRATEGIES,
            "run.placement_strategy",
            self.placement_strategy,
            f"one of {PLACEMENT_STRATEGIES}",
        )
        check(bool(self.compile_backend), "run.compile_backend", self.compile_backend, "a name")
        check(self.precision in PRECISIONS, "run.precision", self.precision, f"one of {PRECISIONS}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # validates itself
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        for section in dataclasses.fields(self):
            validate = getattr(getattr(self, section.name), "validate", None)
            if validate is not None:
                validate()
        batch, workers = self.optim.batch_size, self.run.workers
        if batch % workers:
            raise UserError(
                f"config key 'optim.batch_size' = {batch} is not divisible by run.workers = "
                f"{workers}: the global batch is split evenly across workers"
            )
        if batch // workers < 2:
            raise UserError(
                f"config key 'optim.batch_size' = {batch} gives fewer than 2 images per worker "
                f"with run.workers = {workers}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field's type; ints widen to floats, lists to tuples."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except UserError:
                continue
        names = " or ".join("null" if o is type(None) else o.__name__ for o in options)
        raise UserError(f"config key '{key}' = {value!r} has the wrong type: expected {names}")
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise UserError(
                f"config key '{key}' = {value!r} has the wrong type: expected a list of "
                f"{len(args)} numbers"
            )
        return tuple(
            _coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e8 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if annotation is bool or annotation is int:
        ok = isinstance(value, annotation) and (annotation is bool or not isinstance(value, bool))
    else:
        ok = isinstance(value, annotation)
    if not ok:
        raise UserError(
            f"config key '{key}' = {value!r} has the wrong type: expected {annotation.__name__}"
        )
    return value


def build_dataclass(cls: type, values: Any, prefix: str) -> Any:
    """Build a (nested) dataclass from a mapping, checking every key and type."""
    if not isinstance(values, dict):
        where = f"section '{prefix}'" if prefix else "the config file"
        raise UserError(f"{where} must be a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise UserError(f"config key '{dotted}' is unknown: expected one of {names}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build_dataclass(hint, value if value is not None else {}, dotted)
        else:
            kwargs[key] = _coerce(value, hint, dotted)
    return cls(**kwargs)


def field_type(dotted: str) -> Any:
    """The annotated type of a dotted config key, e.g. ``loss.temperature`` → float."""
    *parents, leaf = dotted.split(".")
    cls: Any = Config
    for depth, part in enumerate(parents):
        hints = typing.get_type_hints(cls)
        if part not in hints or not dataclasses.is_dataclass(hints[part]):
            where = f"in section '{'.'.join(parents[:depth])}'" if depth else "as a section"
            raise UserError(
                f"'{dotted}' is not a config key: expected one of {sorted(hints)} {where}"
            )
        cls = hints[part]
    hints = typing.get_type_hints(cls)
    if not parents:
        raise UserError(
            f"'{dotted}' is not a config key: expected SECTION.KEY, SECTION one of {sorted(hints)}"
        )
    if leaf not in hints:
        raise UserError(
            f"'{dotted}' is not a config key: expected one of {sorted(hints)} in section '{'.'.join(parents)}'"
        )
    return hints[leaf]


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["loss.temperature=0.2", ...]`` into a nested dict; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(
                f"--set {item!r} is malformed: expected KEY=VALUE, e.g. loss.tau_plus=0.1"
            )
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        merge(nested, dotted_to_nested(key.strip(), value))
    return nested


def dotted_to_nested(key: str, value: Any) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    node = nested
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return nested


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``update`` into ``base`` in place (nested dicts merge, other values replace)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist: expected a YAML file")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise UserError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of sections, got {values!r}")
    return values


def from_dict(values: dict[str, Any]) -> Config:
    config = build_dataclass(Config, values, "")
    config.validate()
    return config


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> Config:
    """Load a YAML config (or the defaults), apply overrides, validate."""
    values = read_yaml(path) if path is not None else {}
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    merge(values, overrides or {})
    return from_dict(values)


def config_yaml(config: Config) -> str:
    """The config as YAML that loads back into the same config."""
    return yaml.safe_dump(_plain(config.to_dict()), sort_keys=False)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(config_yaml(config))


def _plain(value: Any) -> Any:
    """Tuples → lists so that safe_dump writes YAML that loads back into the same config."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
