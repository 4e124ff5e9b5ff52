"""Two gloo workers with B/2 each must reproduce one process with B: losses, input gradients
(after DDP-style averaging) and, end to end, DDP parameter gradients.

The workers are spawned once for the module; each saves what it computed and the tests compare
it with the same computation done here, in this process, without a process group.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from jdcl_ray.config import load_config
from jdcl_ray.distributed import all_reduce_sum, gather_with_grad, is_distributed, own_rows
from jdcl_ray.losses import dcl_loss, dcl_terms, ddc_loss, pooled_tau_plus
from jdcl_ray.models import PooledStatistics
from jdcl_ray.objective import CLUSTERING_OBJECTIVES, GlobalBatch, clustering_objective

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
BATCH = 8  # global; BATCH // WORLD per worker
LOCAL = BATCH // WORLD
CLUSTERS = 3
TEMPERATURE = 0.2


def _inputs() -> dict[str, Tensor]:
    """The global batch, identical in every process."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return {
        "z1": randn(BATCH, 5),
        "z2": randn(BATCH, 5),
        "a1": torch.softmax(randn(BATCH, CLUSTERS), dim=1),
        "a2": torch.softmax(randn(BATCH, CLUSTERS), dim=1),
        "hidden": randn(BATCH, 4),
        "x1": randn(BATCH, 4),
        "x2": randn(BATCH, 4),
        "index": torch.arange(BATCH, dtype=torch.float64),  # each image's training-set row
    }


PROPORTIONS = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)


def _per_anchor_prior(a1: Tensor, a2: Tensor) -> Tensor:
    return pooled_tau_plus(torch.cat([gather_with_grad(a1), gather_with_grad(a2)]), PROPORTIONS)


def _dcl_pooled(t: dict[str, Tensor], images: slice = slice(None)) -> Tensor:
    """DCL with the pooled per-anchor prior on the gathered batch, over ``images``' anchors."""
    z1, z2 = gather_with_grad(t["z1"]), gather_with_grad(t["z2"])
    return dcl_terms(z1, z2, TEMPERATURE, _per_anchor_prior(t["a1"], t["a2"]), images)[0]


# Each loss from LOCAL tensors, as a worker computes it: gather, then the global-batch loss.
LOSSES: dict[str, tuple[tuple[str, ...], Callable[..., Tensor]]] = {
    "dcl_fixed_prior": (
        ("z1", "z2"),
        lambda t: dcl_loss(gather_with_grad(t["z1"]), gather_with_grad(t["z2"]), TEMPERATURE, 0.1),
    ),
    "dcl_pooled_prior": (("z1", "z2"), _dcl_pooled),
    # As the engine does: each rank its own images' anchors against every negative.
    "dcl_own_anchors": (("z1", "z2"), lambda t: _dcl_pooled(t, own_rows(len(t["z1"])))),
    "ddc": (
        ("a1", "hidden"),
        lambda t: ddc_loss(gather_with_grad(t["a1"]), gather_with_grad(t["hidden"]))["total"],
    ),
}


def _objective_state() -> dict[str, dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return {
        "neighbours": {
            "neighbours": torch.randint(0, BATCH, (BATCH, 2), generator=gen),
            "bank": torch.softmax(torch.randn(BATCH, CLUSTERS, generator=gen), 1).double(),
        },
        "pooled_mixture": {"initialised": torch.ones((), dtype=torch.bool)},
    }


def _objective_loss(name: str) -> Callable[[dict[str, Tensor]], Tensor]:
    """A registered clustering objective on the global batch gathered from local tensors."""

    def loss(t: dict[str, Tensor]) -> Tensor:
        def both(first: str, second: str) -> Tensor:
            return torch.stack([gather_with_grad(t[first]), gather_with_grad(t[second])], 1)

        batch = GlobalBatch(
            projections=both("z1", "z2"),
            assignments=both("a1", "a2"),
            hidden=both("hidden", "hidden"),
            features=both("x1", "x2"),
            indices=gather_with_grad(t["index"]).round().long(),
        )
        pooled = PooledStatistics(
            PROPORTIONS, torch.zeros(CLUSTERS, 4).double(), torch.ones(CLUSTERS, 4).double(), 1
        )
        state = _objective_state().get(name, {})
        return clustering_objective(name).compute(batch, pooled, state, _CONFIG, 1)["total"]

    return loss


_CONFIG = load_config(ROOT / "configs" / "digits_lt.yaml", {"model": {"num_clusters": CLUSTERS}})
for _name in CLUSTERING_OBJECTIVES:
    LOSSES[f"objective_{_name}"] = (("a1", "a2"), _objective_loss(_name))


def _losses_and_input_grads(tensors: dict[str, Tensor]) -> dict[str, tuple[Tensor, list[Tensor]]]:
    results = {}
    for name, (wrt, loss_fn) in LOSSES.items():
        leaves = {key: value.clone().requires_grad_(key in wrt) for key, value in tensors.items()}
        loss = loss_fn(leaves)
        grads = torch.autograd.grad(loss, [leaves[key] for key in wrt])
        results[name] = (loss.detach(), [grad.detach() for grad in grads])
    return results


def _model() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(4, 6).double()


def _joint_loss(model: nn.Module, x1: Tensor, x2: Tensor) -> Tensor:
    """DCL with the pooled prior + DDC on a tiny model, one forward for both views."""
    out = model(torch.cat([x1, x2]))
    z1, z2 = out.chunk(2)
    a1, a2 = (torch.softmax(z[:, :CLUSTERS], dim=1) for z in (z1, z2))
    prior = _per_anchor_prior(a1, a2)
    gathered = gather_with_grad(z1), gather_with_grad(z2)
    contrastive = dcl_terms(*gathered, TEMPERATURE, prior, own_rows(len(z1)))[0]
    return contrastive + ddc_loss(gather_with_grad(a1), gather_with_grad(z1))["total"]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        local = {key: value[rows] for key, value in _inputs().items()}
        summed = all_reduce_sum(torch.tensor([rank + 1.0, 10.0 * (rank + 1)]))

        model = DistributedDataParallel(_model())
        _joint_loss(model, local["x1"], local["x2"]).backward()

        torch.save(
            {
                "is_distributed": is_distributed(),
                "gathered": gather_with_grad(torch.full((2, 1), float(rank))),
                "summed": summed,
                "losses": _losses_and_input_grads(local),
                "param_grads": [p.grad for p in model.module.parameters()],
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.fixture(scope="module")
def single() -> dict[str, tuple[Tensor, list[Tensor]]]:
    return _losses_and_input_grads(_inputs())


def test_workers_see_a_process_group_and_this_process_does_not(ranks: list[dict]) -> None:
    assert all(result["is_distributed"] for result in ranks)
    assert not is_distributed()


def test_gather_concatenates_in_rank_order(ranks: list[dict]) -> None:
    expected = torch.tensor([[0.0], [0.0], [1.0], [1.0]])
    for result in ranks:
        assert torch.equal(result["gathered"], expected)


def test_all_reduce_sum_sums(ranks: list[dict]) -> None:
    for result in ranks:
        assert result["summed"].tolist() == [3.0, 30.0]


def test_identity_without_process_group() -> None:
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x
    assert all_reduce_sum(x) is x


@pytest.mark.parametrize("name", list(LOSSES))
def test_global_batch_loss_equals_single_process(ranks: list[dict], single, name: str) -> None:
    expected, _ = single[name]
    losses = [result["losses"][name][0].item() for result in ranks]
    if name == "dcl_own_anchors":  # each rank its own anchors' mean: the ranks' mean is L
        assert sum(losses) / WORLD == pytest.approx(expected.item(), rel=1e-12)
        assert losses[0] != pytest.approx(losses[1], rel=1e-6)
    else:
        assert losses == pytest.approx([expected.item()] * WORLD, rel=1e-12)


@pytest.mark.parametrize("name", list(LOSSES))
def test_input_gradients_match_after_averaging(ranks: list[dict], single, name: str) -> None:
    _, expected = single[name]
    for rank, result in enumerate(ranks):
        _, grads = result["losses"][name]
        for grad, full in zip(grads, expected, strict=True):
            # The backward SUM gives W · dL/dz; DDP's mean over W ranks divides it back.
            local_full = full[rank * LOCAL : (rank + 1) * LOCAL]
            torch.testing.assert_close(grad / WORLD, local_full, rtol=1e-10, atol=1e-12)


def test_ddp_parameter_gradients_match_single_process(ranks: list[dict]) -> None:
    inputs = _inputs()
    model = _model()
    _joint_loss(model, inputs["x1"], inputs["x2"]).backward()
    for result in ranks:
        for grad, expected in zip(result["param_grads"], model.parameters(), strict=True):
            torch.testing.assert_close(grad, expected.grad, rtol=1e-10, atol=1e-12)
