"""The Ray Data edge of ``data.stream``: images read and decoded by Ray Data tasks as training
goes, each Train worker fed its own shard, so no process ever holds the whole set.

One pass is a dataset of read tasks (``StreamedSet.chunks``: a Parquet row group, or a group of
files); a task decodes its images ``data.stream_chunk`` at a time. Training shuffles the order
of the tasks with the run's seed, differently each epoch, then each worker shuffles its rows in
a buffer of ``data.shuffle_buffer`` images; the augmentation stays on the device, as in memory.
Whole passes (evaluation, neighbour mining) read the same tasks unshuffled and unsplit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from jdcl_ray.config import Config
from jdcl_ray.data import RunData, StreamedSet
from jdcl_ray.data.stream import Decoding, read_or_mark
from jdcl_ray.engine import Chunk, WorkerContext, WorkerImages, has_eval_labels

TRAIN = "train"  # the training set, split across the workers, shuffled each epoch
TRAIN_PASS = "train_pass"  # the training set whole, for evaluation and refreshes
EVAL_PASS = "eval_pass"  # the evaluation split whole, when it is not the training set
DTYPES = {"image": torch.uint8, "position": torch.int64}


def is_streamed(data: RunData) -> bool:
    return isinstance(data.train, StreamedSet)


def _read(batch: dict[str, np.ndarray], decoding: Decoding, rows: int) -> Iterator[dict]:
    """Ray Data's task: read and decode a batch of read tasks, ``rows`` images at a time."""
    for task in range(len(batch["position"])):
        yield from read_or_mark(
            {key: column[task] for key, column in batch.items()}, decoding, rows
        )


def image_dataset(streamed: StreamedSet, config: Config, shuffled: bool) -> Any:
    """A Ray Dataset of ``streamed``'s decoded images (columns ``image``, ``position``).

    The readers reserve no CPU: like a DataLoader's workers they share the cores with training
    (on a machine whose CPUs the Train workers hold, a reader that reserved one would never
    start), and ``data.stream_readers`` bounds how many run at once.
    """
    import ray
    from ray.data import RandomSeedConfig, TaskPoolStrategy

    cfg = config.data
    tasks = streamed.chunks(cfg.stream_chunk, config.run.seed)
    dataset = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    if shuffled:
        order = RandomSeedConfig(seed=config.run.seed, reseed_after_execution=True)
        dataset = dataset.randomize_block_order(seed=order)
    return dataset.map_batches(
        _read,
        fn_args=(streamed.decoding, cfg.stream_chunk),
        batch_size=1,
        num_cpus=0,
        compute=TaskPoolStrategy(size=cfg.stream_readers),
    )


def training_datasets(data: RunData, config: Config) -> tuple[dict[str, Any], Any]:
    """The datasets a streamed run hands its TorchTrainer, and Train's DataConfig for them:
    each pass may hold at most ``data.stream_buffer_mb`` of decoded blocks in Ray's object
    store ahead of the workers (Ray Data's own default, a share of the object store, would
    read a set of a few GB ahead whole)."""
    from ray.data import DataContext, ExecutionOptions, ExecutionResources
    from ray.train import DataConfig

    context = DataContext.get_current()
    context.enable_progress_bars = False  # one bar per pass per epoch would fill the console
    context.print_on_execution_start = False
    datasets = {
        TRAIN: image_dataset(data.train, config, shuffled=True),
        TRAIN_PASS: image_dataset(data.train, config, shuffled=False),
    }
    if has_eval_labels(data):
        datasets[EVAL_PASS] = image_dataset(data.eval, config, shuffled=False)
    # Train's default_ingest_options() sets a deprecated option (a warning on every run).
    current = context.execution_options
    options = ExecutionOptions(
        resource_limits=(current.resource_limits or ExecutionResources.for_limits()).copy(
            object_store_memory=config.data.stream_buffer_mb * 2**20
        ),
        preserve_order=current.preserve_order,
    )
    return datasets, DataConfig(datasets_to_split=[TRAIN], execution_options=options)


def worker_images(config: Config, data: RunData, ctx: WorkerContext) -> WorkerImages:
    """This Train worker's images: its shard of each epoch, and whole passes on demand."""
    import ray.train

    cfg, seed = config.data, config.run.seed
    shard = ray.train.get_dataset_shard(TRAIN)

    def checked(
        batches: Iterable[dict[str, torch.Tensor]], streamed: StreamedSet
    ) -> Iterator[Chunk]:
        for batch in batches:
            positions = batch["position"]
            if bool((positions < 0).any()):  # a reader's mark: read_or_mark
                streamed.raise_read_error(-int(positions.min()) - 1)
            yield (
                batch["image"].to(ctx.device, non_blocking=True),
                positions.to(ctx.device, non_blocking=True),
            )

    def epoch_batches(epoch: int, local_batch: int) -> Iterator[Chunk]:
        batches = shard.iter_torch_batches(
            batch_size=local_batch,
            drop_last=True,  # every rank then takes the same number of steps
            local_shuffle_buffer_size=max(cfg.shuffle_buffer, local_batch),
            local_shuffle_seed=(seed * 100_003 + epoch) * 1_009 + ctx.rank,
            dtypes=DTYPES,
        )
        return checked(batches, data.train)

    def whole(name: str, streamed: StreamedSet) -> Iterator[Chunk]:
        batches = ray.train.get_dataset_shard(name).iter_torch_batches(
            batch_size=cfg.stream_chunk, dtypes=DTYPES
        )
        return checked(batches, streamed)

    return WorkerImages(
        epoch_batches,
        lambda: whole(TRAIN_PASS, data.train),
        (lambda: whole(EVAL_PASS, data.eval)) if has_eval_labels(data) else None,
        coordinated=True,
    )
