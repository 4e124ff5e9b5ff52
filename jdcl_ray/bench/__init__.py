"""Benchmark suites, one module each, behind one command line:

``python -m jdcl_ray.bench quality [--quick] [--json FILE] [--markdown FILE] [--base CONFIG]
[--epochs N] [--max-images N] [--ratios R ...] [--seeds S ...]`` — the clustering-quality study
(``quality.py``); with ``--variants FILE [--baselines] [--jsonl FILE] [--dump-features DIR]`` its screening
mode (``screen.py``).

``python -m jdcl_ray.bench blobs [OBJECTIVE ...] [--seeds S ...] [--jsonl FILE]`` — whether a
clustering objective recovers the small blobs of a long-tailed Gaussian mixture (``blobs.py``).

``python -m jdcl_ray.bench throughput [--quick] [--json FILE] [--base CONFIG]`` — images/s of
augmentation, the training step, Ray Train and the losses (``throughput.py``).

``python -m jdcl_ray.bench stream [--quick] [--images N] [--epochs N] [--repeats N] [--gpu]
[--json FILE] [--markdown FILE]`` — images/s of a run streaming its images from Parquet
against the same run in memory, side by side, with peak memory (``stream.py``).

``python -m jdcl_ray.bench gpu --output DIR [--smoke] [--fashion-root DIR] [--sections NAME ...]
[--budget-s S]`` — every
GPU figure in one run on a bare CUDA machine, no Ray or MLflow (``gpu.py``,
``benchmarks/gpu/run.sh``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jdcl_ray.errors import UserError


def _fashion_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fashion-root",
        type=Path,
        default=Path("/usr/share/datasets/fashion-mnist"),
        metavar="DIR",
        help="Fashion-MNIST's four .gz files (default: Debian's dataset-fashion-mnist)",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jdcl_ray.bench", description="Benchmark suites of jdcl-ray."
    )
    suites = parser.add_subparsers(dest="suite", required=True)
    study = suites.add_parser("quality", help="the clustering-quality study, or its screening")
    study.add_argument("--quick", action="store_true", help="a few minutes: every section, tiny")
    study.add_argument("--json", type=Path, metavar="FILE", help="write the raw result here")
    study.add_argument(
        "--markdown", type=Path, metavar="FILE", help="write the tables here (plots beside it)"
    )
    study.add_argument(
        "--base", metavar="CONFIG", help="base config (default configs/fashion_lt.yaml)"
    )
    study.add_argument(
        "--epochs", type=int, metavar="N", help="epochs of every training run (the budget)"
    )
    study.add_argument(
        "--max-images",
        type=int,
        metavar="N",
        help="subsample every LT set to this many images (the budget)",
    )
    study.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        metavar="R",
        help="imbalance ratios (default 1 10 100, the last one the ablation's; screening: 10 100)",
    )
    study.add_argument(
        "--seeds", type=int, nargs="+", metavar="S", help="seeds (default 0 1 2; screening: 0)"
    )
    screen = study.add_argument_group("screening (jdcl_ray/bench/screen.py)")
    screen.add_argument(
        "--variants",
        type=Path,
        metavar="FILE",
        help="screen the variants of this YAML file (name → SECTION.KEY overrides) instead",
    )
    screen.add_argument(
        "--baselines",
        action="store_true",
        help="also score the pixel baselines (k-means, UMAP + GMM) on every ratio and seed's draw",
    )
    screen.add_argument(
        "--jsonl", type=Path, metavar="FILE", help="append one JSON row per screening run here"
    )
    screen.add_argument(
        "--dump-features",
        type=Path,
        metavar="DIR",
        help="write each screening run's features here (NAME_irR_sS.npz)",
    )
    blobs = suites.add_parser("blobs", help="recovery of a long-tailed mixture's small blobs")
    blobs.add_argument("objectives", nargs="*", help="clustering objectives (default: every one)")
    blobs.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="S")
    blobs.add_argument("--jsonl", type=Path, metavar="FILE", help="append one JSON row a run here")
    speed = suites.add_parser("throughput", help="images/s of augmentation, step, Ray, losses")
    speed.add_argument("--quick", action="store_true", help="seconds per figure instead of minutes")
    speed.add_argument("--json", type=Path, metavar="FILE", help="write the JSON object here too")
    speed.add_argument(
        "--base", default="configs/fashion_lt.yaml", metavar="CONFIG", help="config of the step"
    )
    streaming = suites.add_parser("stream", help="streamed vs in-memory images/s and memory")
    streaming.add_argument("--quick", action="store_true", help="4,000 images, 2 epochs, 1 run")
    streaming.add_argument("--images", type=int, default=24_000, metavar="N")
    streaming.add_argument("--epochs", type=int, default=3, metavar="N")
    streaming.add_argument("--workers", type=int, default=2, metavar="N")
    streaming.add_argument("--repeats", type=int, default=2, metavar="N", help="runs of each")
    streaming.add_argument("--gpu", action="store_true", help="train on the GPUs (run.use_gpu)")
    _fashion_root(streaming)
    streaming.add_argument("--json", type=Path, metavar="FILE", help="write the result here too")
    streaming.add_argument("--markdown", type=Path, metavar="FILE", help="write the table here")
    gpu = suites.add_parser("gpu", help="every GPU figure in one run (no Ray, no MLflow)")
    gpu.add_argument("--output", type=Path, required=True, metavar="DIR", help="gpu.json, gpu.md")
    gpu.add_argument("--smoke", action="store_true", help="the same code on the CPU, tiny sizes")
    _fashion_root(gpu)
    gpu.add_argument(
        "--sections",
        nargs="+",
        choices=("step", "loss", "quality", "compile"),
        default=["step", "loss", "quality", "compile"],
        metavar="NAME",
        help="run only these of step, loss, quality, compile (default: all, in that order)",
    )
    gpu.add_argument(
        "--budget-s",
        type=float,
        metavar="S",
        help="seconds for the whole run (default 480; 600 with --smoke)",
    )
    return parser.parse_args(argv)


def _check_mode(args: argparse.Namespace) -> None:
    """The study's outputs and the screening mode's do not mix."""
    if args.variants:
        wrong, why = ("json", "markdown"), "is the study's: screening writes --jsonl"
    else:
        wrong, why = ("jsonl", "dump_features", "baselines"), "needs --variants (screening)"
    for name in wrong:
        if getattr(args, name) not in (None, False):
            raise UserError(f"--{name.replace('_', '-')} {why}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.suite == "blobs":
        from jdcl_ray.bench import blobs

        return blobs.main(args)
    if args.suite == "gpu":
        from jdcl_ray.bench import gpu

        return gpu.main(args)
    if args.suite == "throughput":
        from jdcl_ray.bench import throughput

        return throughput.main(args)
    if args.suite == "stream":
        from jdcl_ray.bench import stream

        return stream.main(args)
    from jdcl_ray.bench import quality, screen

    _check_mode(args)
    study = quality.Study.from_args(args)
    if args.variants:
        return screen.main(study, args)
    command = " ".join(["python -m jdcl_ray.bench", *(argv if argv is not None else sys.argv[1:])])
    return quality.main(study, args, command)
