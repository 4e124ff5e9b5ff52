"""The console commands: ``jdcl-train``, ``jdcl-tune``, ``jdcl-predict``, ``jdcl-report``.

Each parses its arguments here, with argparse alone, before its module (and torch, Ray, MLflow
with it) is imported: ``--help`` and a mistyped option answer at once.
``python -m jdcl_ray.<command>`` uses the same parsers.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path

from jdcl_ray.errors import run_cli

TRACKING_HELP = "MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)"
ADDRESS_HELP = "Ray cluster address (default: RAY_ADDRESS, else a local Ray)"


class _WithDefaults(argparse.HelpFormatter):
    """Each option's default in its help, unless there is none or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _parser(command: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=f"jdcl-{command}", description=description, formatter_class=_WithDefaults
    )


def train_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "train",
        "Train one run, data-parallel on Ray Train. With neither --config nor --data it trains "
        "on digits; --data DIR trains on your own folder of images (or a .parquet table).",
    )
    parser.add_argument("--config", type=Path, help="YAML training config (configs/*.yaml)")
    parser.add_argument(
        "--data",
        help="your images: a folder (one sub-folder per class, or flat) or a .parquet table; "
        "shorthand for --set data.name=folder|parquet --set data.root=PATH",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set loss.temperature=0.2 (repeatable)",
    )
    parser.add_argument("--output", help="run folder or s3:// URI (default: run.output_dir)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the stopped run in --output"
    )
    parser.add_argument("--address", help=ADDRESS_HELP)
    return parser


def tune_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "tune",
        "Search hyperparameters with Ray Tune: each trial a Ray Train run and a nested MLflow run.",
    )
    parser.add_argument(
        "--space", type=Path, required=True, help="search space (tune_spaces/*.yaml)"
    )
    parser.add_argument("--tracking-uri", help=TRACKING_HELP)
    parser.add_argument(
        "--storage",
        default="tune_results",
        help="Tune state and checkpoints: a folder every node sees, or s3://BUCKET/PATH",
    )
    parser.add_argument(
        "--resume", action="store_true", help="finish the newest stopped search of --space"
    )
    parser.add_argument("--address", help=ADDRESS_HELP)
    return parser


def predict_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "predict",
        "Cluster, embed and score (out-of-distribution) new images with a trained model.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="checkpoint folder, training run folder, MLflow run id or models:/NAME/VERSION",
    )
    parser.add_argument(
        "--data", required=True, type=Path, help="folder of images or Parquet table"
    )
    parser.add_argument("--output", default="predictions.parquet", help="Parquet file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--image-column", default="image", help="Parquet column of image bytes")
    parser.add_argument("--batch-size", type=int, default=256, help="images per chunk")
    parser.add_argument(
        "--embeddings", action="store_true", help="also write each image's L2-normalised features"
    )
    parser.add_argument("--tracking-uri", help=TRACKING_HELP)
    parser.add_argument("--address", help="run as Ray Data jobs on this Ray cluster")
    return parser


def report_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "report",
        "Pictures of what a run learned: cluster sizes, example grids, the 2-D embedding, the "
        "images flagged out-of-distribution.",
    )
    parser.add_argument(
        "--run", required=True, help="MLflow run id of a trial (or a search), or a run folder"
    )
    parser.add_argument("--output", type=Path, help="folder for the PNGs (default: report-RUN)")
    parser.add_argument("--tracking-uri", help=TRACKING_HELP)
    return parser


PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "train": train_parser,
    "tune": tune_parser,
    "predict": predict_parser,
    "report": report_parser,
}


def parse(command: str, argv: list[str] | None = None) -> argparse.Namespace:
    return PARSERS[command]().parse_args(argv)


def _console(command: str) -> None:
    args = parse(command)  # --help exits here, before the module's imports
    module = importlib.import_module(f"jdcl_ray.{command}")
    run_cli(lambda _argv: module.run(args))


def train() -> None:
    _console("train")


def tune() -> None:
    _console("tune")


def predict() -> None:
    _console("predict")


def report() -> None:
    _console("report")
