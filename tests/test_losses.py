"""DCL, DDC and the pooled prior against method.md written out naively, plus analytic limits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from jdcl_ray.losses import (
    bounded_prior,
    dcl_loss,
    dcl_terms,
    ddc_loss,
    mixture_responsibilities,
    neighbour_consistency,
    pooled_tau_plus,
    relaxed_transport,
    size_prior_kl,
    weighted_cross_entropy,
)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- DCL


def _dcl_reference(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    tau_plus: float | torch.Tensor,
    images: range | None = None,
) -> tuple[float, list[bool]]:
    """method.md's DCL with explicit exponentials, one anchor at a time, in float64; the mean
    over the two views of ``images`` (default all).

    Returns the loss and, per anchor, whether the clamp N·e^(−1/t) decided Ng_i.
    """
    z = torch.cat([F.normalize(z1.double(), dim=1), F.normalize(z2.double(), dim=1)]).tolist()
    two_b = len(z)
    batch, num_neg = two_b // 2, two_b - 2
    images = range(batch) if images is None else images

    def sim(i: int, j: int) -> float:
        return sum(x * y for x, y in zip(z[i], z[j], strict=True)) / temperature

    losses, clamped = [], []
    for i in [*images, *(image + batch for image in images)]:
        tau = float(tau_plus[i]) if isinstance(tau_plus, torch.Tensor) else tau_plus
        positive = (i + batch) % two_b
        pos = math.exp(sim(i, positive))
        neg = sum(math.exp(sim(i, j)) for j in range(two_b) if j not in (i, positive))
        ng = (-tau * num_neg * pos + neg) / (1 - tau)
        floor = num_neg * math.exp(-1 / temperature)
        clamped.append(ng < floor)
        ng = max(ng, floor)
        losses.append(-math.log(pos / (pos + ng)))
    return sum(losses) / len(losses), clamped


def _nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent as a 2B-way classification of each anchor's other view."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T / temperature).fill_diagonal_(-math.inf)
    batch = z1.shape[0]
    labels = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)])
    return F.cross_entropy(logits, labels)


def _views(batch: int, dim: int, seed: int, noise: float | None = None) -> tuple[torch.Tensor, ...]:
    """Two random float64 views; with ``noise`` the second is the first plus that much noise."""
    gen = _generator(seed)
    z1 = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    other = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    z2 = other if noise is None else z1 + noise * other
    return z1, z2


def _tau(spec: str | float, batch: int) -> float | torch.Tensor:
    if spec == "per-anchor":
        return 0.6 * torch.rand(2 * batch, generator=_generator(7), dtype=torch.float64)
    return spec


@pytest.mark.parametrize("tau_spec", [0.0, 0.1, 0.3, "per-anchor"])
@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("dim", [3, 128])
@pytest.mark.parametrize("batch", [2, 8, 33])
def test_dcl_matches_reference(batch: int, dim: int, temperature: float, tau_spec) -> None:
    z1, z2 = _views(batch, dim, seed=batch * 1000 + dim)
    tau = _tau(tau_spec, batch)
    expected, clamped = _dcl_reference(z1, z2, temperature, tau)
    assert dcl_loss(z1, z2, temperature, tau).item() == pytest.approx(expected, rel=1e-10)
    _, floor_frac = dcl_terms(z1, z2, temperature, tau)
    assert floor_frac.item() == pytest.approx(sum(clamped) / len(clamped))


@pytest.mark.parametrize("tau_spec", [0.1, "per-anchor"])
def test_dcl_of_one_workers_images_matches_reference_and_sums_to_the_global_gradient(tau_spec):
    """A worker's anchors against every negative: the reference over its images, and the workers'
    gradients summed (as the gather's backward does) are W times the global loss's."""
    z1, z2 = (z.requires_grad_() for z in _views(12, 8, seed=5, noise=0.8))
    tau, workers = _tau(tau_spec, 12), (range(0, 4), range(4, 8), range(8, 12))
    total = 0.0
    for images in workers:
        loss, floor_frac = dcl_terms(z1, z2, 0.2, tau, slice(images.start, images.stop))
        expected, clamped = _dcl_reference(z1.detach(), z2.detach(), 0.2, tau, images)
        assert loss.item() == pytest.approx(expected, rel=1e-10)
        assert floor_frac.item() == pytest.approx(sum(clamped) / len(clamped))
        total = total + loss
    summed = torch.autograd.grad(total, (z1, z2))
    whole = torch.autograd.grad(len(workers) * dcl_loss(z1, z2, 0.2, tau), (z1, z2))
    for ours, theirs in zip(summed, whole, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_dcl_float32_matches_reference(temperature: float) -> None:
    z1, z2 = _views(16, 32, seed=3, noise=0.5)
    expected, _ = _dcl_reference(z1, z2, temperature, 0.1)
    loss = dcl_loss(z1.float(), z2.float(), temperature, 0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("batch", [2, 8, 33])
def test_dcl_without_debiasing_is_nt_xent(batch: int, temperature: float) -> None:
    z1, z2 = _views(batch, 16, seed=batch)
    expected = _nt_xent(z1, z2, temperature).item()
    assert dcl_loss(z1, z2, temperature, 0.0).item() == pytest.approx(expected, rel=1e-12)
    per_anchor_zero = torch.zeros(2 * batch, dtype=torch.float64)
    assert dcl_loss(z1, z2, temperature, per_anchor_zero).item() == pytest.approx(
        expected, rel=1e-12
    )


@pytest.mark.parametrize("tau_plus", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("batch", [2, 5, 16])
def test_dcl_all_samples_identical_gives_log_2b_minus_1(batch: int, tau_plus: float) -> None:
    # Every similarity is 1/t: pos = e^(1/t), Ng = N e^(1/t) whatever tau_plus, L = log(2B − 1).
    z = torch.ones(batch, 4, dtype=torch.float64)
    assert dcl_loss(z, z.clone(), 0.5, tau_plus).item() == pytest.approx(math.log(2 * batch - 1))


def test_dcl_orthonormal_aligned_views_clamp_inactive() -> None:
    # z1 = z2 = orthonormal rows: pos = e^(1/t), all N = 4 negatives are e^0 = 1.
    # t = 1, tau = 0.1: Ng = 4 (1 − 0.1 e) / 0.9 ≈ 3.236 > 4 e^(−1) ≈ 1.47, so the clamp is off.
    z = torch.eye(3, 4, dtype=torch.float64)
    ng = 4 * (1 - 0.1 * math.e) / 0.9
    expected = math.log(1 + ng / math.e)
    assert dcl_loss(z, z.clone(), 1.0, 0.1).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("temperature", [0.05, 0.1])
def test_dcl_orthonormal_aligned_views_clamp_active(temperature: float, dtype: torch.dtype) -> None:
    # As above with t ≤ 0.1: 4 − 0.1 · 4 e^(1/t) < 0, so Ng = 4 e^(−1/t) and
    # L = log(1 + 4 e^(−2/t)) ≈ 1.7e-17 at t = 0.05: log space must keep it, not round it to 0.
    z = torch.eye(3, 4, dtype=dtype)
    expected = math.log1p(4 * math.exp(-2 / temperature))
    assert dcl_loss(z, z.clone(), temperature, 0.1).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("temperature", "tau_spec", "noise", "clamp"),
    [
        (1.0, 0.1, None, "none"),  # random views: Σ neg dominates
        (0.1, 0.3, 0.01, "all"),  # positives far closer than negatives, large prior
        (0.1, "half", 0.01, "some"),  # prior 0 for half the anchors, 0.5 for the rest
    ],
)
def test_dcl_clamp_matches_reference(temperature: float, tau_spec, noise, clamp: str) -> None:
    batch = 8
    z1, z2 = _views(batch, 128, seed=11, noise=noise)
    if tau_spec == "half":
        tau = torch.tensor([0.0, 0.5], dtype=torch.float64).repeat(batch)
    else:
        tau = tau_spec
    expected, clamped = _dcl_reference(z1, z2, temperature, tau)
    assert {"none": not any(clamped), "all": all(clamped), "some": 0 < sum(clamped) < 2 * batch}[
        clamp
    ]
    assert dcl_loss(z1, z2, temperature, tau).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau_spec", [0.0, 0.1, 0.9, "per-anchor"])
@pytest.mark.parametrize("case", ["random", "aligned", "identical", "collapsed"])
def test_dcl_low_temperature_is_finite(case: str, tau_spec, dtype: torch.dtype) -> None:
    batch = 33
    z1, z2 = _views(batch, 128, seed=5, noise={"aligned": 1e-4, "identical": 0.0}.get(case))
    if case == "collapsed":  # every sample the same point: all negatives aligned too
        z1 = z2 = torch.ones(batch, 128, dtype=torch.float64)
    z1, z2 = (z.to(dtype).clone().requires_grad_() for z in (z1, z2))
    tau = _tau(tau_spec, batch)
    loss = dcl_loss(z1, z2, 0.05, tau)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


@pytest.mark.parametrize(
    ("temperature", "tau_spec", "noise"),
    [(0.5, 0.1, None), (0.2, "per-anchor", None), (0.1, 0.3, 0.05)],
)
def test_dcl_gradcheck(temperature: float, tau_spec, noise) -> None:
    z1, z2 = _views(3, 4, seed=2, noise=noise)
    tau = _tau(tau_spec, 3)
    assert torch.autograd.gradcheck(
        lambda a, b: dcl_loss(a, b, temperature, tau),
        (z1.requires_grad_(), z2.requires_grad_()),
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -0.5}, "temperature"),
        ({"tau_plus": -0.1}, "tau_plus"),
        ({"tau_plus": 1.0}, "tau_plus"),
        ({"tau_plus": torch.zeros(4)}, r"\(2B,\)"),
        ({"z2": torch.randn(4, 5)}, "z1 and z2"),
        ({"z1": torch.randn(4), "z2": torch.randn(4)}, "z1 and z2"),
        ({"z1": torch.randn(1, 3), "z2": torch.randn(1, 3)}, "B >= 2"),
    ],
)
def test_dcl_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"z1": torch.randn(4, 3), "z2": torch.randn(4, 3), "temperature": 0.5, "tau_plus": 0.1}
    with pytest.raises(ValueError, match=match):
        dcl_loss(**(args | kwargs))


# ---------------------------------------------------------------- DDC


def _ddc_reference(assignments: torch.Tensor, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """method.md's DDC with explicit loops over pairs, on float64 scalars that autograd follows."""
    a, h = assignments.double(), hidden.double()
    n, k = a.shape
    dist = [[((h[x] - h[y]) ** 2).sum() for y in range(n)] for x in range(n)]
    # torch.median's choice: the lower middle of all n² entries, diagonal zeros included;
    # float() detaches σ² as method.md asks.
    median = sorted(float(d.detach()) for row in dist for d in row)[(n * n - 1) // 2]
    sigma2 = max(0.15 * median, 1e-9)
    kernel = [[torch.exp(-dist[x][y] / (2 * sigma2)) for y in range(n)] for x in range(n)]

    def d_cs(m: torch.Tensor) -> torch.Tensor:
        def inner(i: int, j: int) -> torch.Tensor:
            return sum(m[x, i] * kernel[x][y] * m[y, j] for x in range(n) for y in range(n))

        norm = [inner(i, i) for i in range(k)]
        total = 0.0
        for i in range(k):
            for j in range(i + 1, k):
                total += max(inner(i, j), 1e-9) / max(norm[i] * norm[j], 1e-18) ** 0.5
        return 2 * total / (k * (k - 1))

    l2 = sum(a[x] @ a[y] for x in range(n) for y in range(x + 1, n)) * 2 / (n * (n - 1))
    corner = torch.eye(k, dtype=a.dtype)
    m = torch.stack(
        [
            torch.stack([torch.exp(-((a[x] - corner[j]) ** 2).sum()) for j in range(k)])
            for x in range(n)
        ]
    )
    l1, l3 = d_cs(a), d_cs(m)
    return {"l1": l1, "l2": l2, "l3": l3, "total": l1 + l2 + l3}


def _softmax_assignments(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.softmax(2 * torch.randn(n, k, generator=_generator(seed), dtype=torch.float64), 1)


@pytest.mark.parametrize("dim", [3, 16])
@pytest.mark.parametrize("k", [2, 5])
@pytest.mark.parametrize("n", [2, 7, 12])
def test_ddc_matches_reference(n: int, k: int, dim: int) -> None:
    assignments = _softmax_assignments(n, k, seed=n + k).requires_grad_()
    hidden = torch.randn(n, dim, generator=_generator(dim), dtype=torch.float64).requires_grad_()
    expected = _ddc_reference(assignments, hidden)
    terms = ddc_loss(assignments, hidden)
    assert set(terms) == {"l1", "l2", "l3", "total"}
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-9), name
    # Gradients too, σ² held fixed in both: this is what trains H through the kernel.
    got = torch.autograd.grad(terms["total"], (assignments, hidden))
    want = torch.autograd.grad(expected["total"], (assignments, hidden))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)


def test_ddc_empty_cluster_hits_the_floors() -> None:
    # Column 3 is all zero: its inner products floor to 1e-9, the norm products to 1e-18.
    assignments = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    hidden = torch.randn(4, 3, generator=_generator(0))
    expected = _ddc_reference(assignments, hidden)
    terms = ddc_loss(assignments.double(), hidden.double())
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-9), name


def test_ddc_hand_computed_three_points() -> None:
    # H = 0, 1, 2 on a line: D has three 0s, four 1s, two 4s, so median = 1, σ² = 0.15,
    # K_01 = K_12 = k1 = e^(−1/0.3), K_02 = k2 = e^(−4/0.3).
    assignments = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], dtype=torch.float64)
    hidden = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    k1, k2, e = math.exp(-1 / 0.3), math.exp(-4 / 0.3), math.exp
    # α1 = (1, .5, 0), α2 = (0, .5, 1): α1ᵀKα2 = .25 + k1 + k2, α1ᵀKα1 = α2ᵀKα2 = 1.25 + k1.
    l1 = (0.25 + k1 + k2) / (1.25 + k1)
    # Pairs: (0,1) → .5, (0,2) → 0, (1,2) → .5, averaged over 3 pairs.
    l2 = 1.0 / 3.0
    # M rows: (1, e^−2), (e^−.5, e^−.5), (e^−2, 1); its columns m1, m2 mirror each other.
    m11 = 1 + e(-1) + e(-4) + 2 * (e(-0.5) * k1 + e(-2) * k2 + e(-2.5) * k1)
    m12 = 2 * e(-2) + e(-1) + 2 * (e(-0.5) + e(-2.5)) * k1 + (1 + e(-4)) * k2
    l3 = m12 / m11
    terms = ddc_loss(assignments, hidden)
    assert terms["l1"].item() == pytest.approx(l1, rel=1e-12)
    assert terms["l2"].item() == pytest.approx(l2, rel=1e-12)
    assert terms["l3"].item() == pytest.approx(l3, rel=1e-12)
    assert terms["total"].item() == pytest.approx(l1 + l2 + l3, rel=1e-12)


def test_ddc_hand_computed_two_points_floor_sigma() -> None:
    # n = 2: D = (0, 9, 9, 0), the lower median is 0, σ² floors at 1e-9 and K = I.
    # One-hot A: α1ᵀKα2 = 0 → 1e-9, norms 1 → L1 = 1e-9; L2 = 0.
    # M = ((1, e^−2), (e^−2, 1)) with K = I: m1ᵀm2 = 2e^−2, |m1|² = 1 + e^−4.
    assignments = torch.eye(2, dtype=torch.float64)
    hidden = torch.tensor([[0.0], [3.0]], dtype=torch.float64)
    terms = ddc_loss(assignments, hidden)
    assert terms["l1"].item() == pytest.approx(1e-9, rel=1e-9)
    assert terms["l2"].item() == 0.0
    assert terms["l3"].item() == pytest.approx(2 * math.exp(-2) / (1 + math.exp(-4)), rel=1e-12)


def test_ddc_sigma_floor_on_tiny_distances() -> None:
    # n = 2: the median is a diagonal 0, so σ² = 1e-9 exactly; D_01 = (3e-5)² = 9e-10 gives
    # K_01 = e^(−9e-10 / 2e-9) = e^(−0.45). One-hot A: L1 = K_01 / sqrt(1 · 1).
    terms = ddc_loss(torch.eye(2, dtype=torch.float64), torch.tensor([[0.0], [3e-5]]).double())
    assert terms["l1"].item() == pytest.approx(math.exp(-0.45), rel=1e-6)


def test_ddc_prefers_clusters_that_match_separated_blobs() -> None:
    gen = _generator(4)
    labels = torch.arange(24) % 3
    centres = 10.0 * torch.eye(3, 6)
    hidden = centres[labels] + 0.1 * torch.randn(24, 6, generator=gen)
    one_hot = F.one_hot(labels, 3).float()
    uniform = torch.full((24, 3), 1 / 3)
    matched, flat = ddc_loss(one_hot, hidden), ddc_loss(uniform, hidden)
    # Blobs 10√2 apart with σ² = 0.15 · (a between-blob distance): K between blobs ≈ e^(−3.3).
    assert matched["l1"] < 0.05
    assert flat["l1"].item() == pytest.approx(1.0)  # identical columns
    assert matched["total"] < flat["total"]


def test_ddc_gradcheck_wrt_assignments() -> None:
    # σ² depends on H only (and is detached), so the assignments' gradient is exact.
    assignments = _softmax_assignments(6, 3, seed=1).requires_grad_()
    hidden = torch.randn(6, 4, generator=_generator(2), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: ddc_loss(a, hidden)["total"], (assignments,))


def test_ddc_gradient_reaches_hidden() -> None:
    assignments = _softmax_assignments(10, 3, seed=3)
    hidden = torch.randn(10, 4, generator=_generator(3), requires_grad=True)
    ddc_loss(assignments.float(), hidden)["total"].backward()
    assert torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("assignments", "hidden", "match"),
    [
        (torch.rand(5, 3), torch.rand(4, 2), "share n"),
        (torch.rand(5), torch.rand(5, 2), "share n"),
        (torch.rand(1, 3), torch.rand(1, 2), "n >= 2"),
        (torch.rand(5, 1), torch.rand(5, 2), "K >= 2"),
    ],
)
def test_ddc_rejects_bad_shapes(assignments, hidden, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ddc_loss(assignments, hidden)


# ---------------------------------------------------------------- pooled prior


def test_pooled_tau_plus_is_the_weighted_sum_of_proportions() -> None:
    assignments = _softmax_assignments(6, 4, seed=9).requires_grad_()
    proportions = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)
    expected = [
        sum(assignments[i, k].item() * proportions[k].item() for k in range(4)) for i in range(6)
    ]
    prior = pooled_tau_plus(assignments, proportions)
    assert prior.shape == (6,) and not prior.requires_grad
    assert prior.tolist() == pytest.approx(expected, rel=1e-12)


def test_pooled_tau_plus_one_hot_picks_the_cluster_proportion() -> None:
    proportions = torch.tensor([0.7, 0.2, 0.1])
    assignments = F.one_hot(torch.tensor([2, 0, 1, 0]), 3).float()
    assert pooled_tau_plus(assignments, proportions).tolist() == pytest.approx([0.1, 0.7, 0.2, 0.7])


def test_pooled_tau_plus_clamps_below_one() -> None:
    proportions = torch.tensor([1.0, 0.0])
    assignments = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert pooled_tau_plus(assignments, proportions).tolist() == pytest.approx([0.999, 0.0])


def test_pooled_tau_plus_rejects_mismatched_clusters() -> None:
    with pytest.raises(ValueError, match="share K"):
        pooled_tau_plus(torch.rand(4, 3), torch.rand(2))


# ---------------------------------------------------------------- clustering objectives' losses


def _softmax_rows(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.softmax(torch.randn(n, k, generator=_generator(seed), dtype=torch.float64), 1)


@pytest.mark.parametrize(("n", "k"), [(6, 3), (12, 5)])
def test_flipped_ddc_l2_is_the_column_formula_over_n(n, k):
    a = _softmax_rows(n, k, 3)
    hidden = torch.randn(n, 4, generator=_generator(4), dtype=torch.float64)
    expected = sum(
        sum(float(a[i, p] * a[i, q]) for i in range(n)) for p in range(k) for q in range(p + 1, k)
    ) * (2.0 / (k * (k - 1) * n))
    flipped = ddc_loss(a, hidden, flipped=True)
    plain = ddc_loss(a, hidden)
    assert float(flipped["l2"]) == pytest.approx(expected, rel=1e-12)
    assert float(flipped["l1"]) == pytest.approx(float(plain["l1"]), rel=1e-12)
    assert float(flipped["total"]) == pytest.approx(
        float(plain["l1"] + flipped["l2"] + plain["l3"]), rel=1e-12
    )


def test_flipped_ddc_l2_does_not_prefer_equal_sizes():
    """One-hot assignments: plain L2 grows with the size imbalance, the flipped one is 0."""
    hidden = torch.randn(10, 4, generator=_generator(5), dtype=torch.float64)
    balanced = F.one_hot(torch.tensor([0] * 5 + [1] * 5), 2).double()
    skewed = F.one_hot(torch.tensor([0] * 9 + [1]), 2).double()
    assert float(ddc_loss(skewed, hidden)["l2"]) > float(ddc_loss(balanced, hidden)["l2"])
    for a in (balanced, skewed):
        assert float(ddc_loss(a, hidden, flipped=True)["l2"]) == 0.0


def test_size_prior_kl_is_the_kl_and_with_a_uniform_prior_scans_entropy():
    a = _softmax_rows(9, 4, 6)
    prior = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    mean = [float(a[:, j].mean()) for j in range(4)]
    expected = sum(m * math.log(m / float(p)) for m, p in zip(mean, prior, strict=True))
    assert float(size_prior_kl(a, prior)) == pytest.approx(expected, rel=1e-12)
    entropy = -sum(m * math.log(m) for m in mean)
    uniform = torch.full((4,), 0.25, dtype=torch.float64)
    assert float(size_prior_kl(a, uniform)) == pytest.approx(-entropy + math.log(4), rel=1e-12)


def test_bounded_prior_lifts_small_clusters_to_the_floor():
    prior = bounded_prior(torch.tensor([0.9, 0.1, 0.0, 0.0]), floor=0.2)
    assert float(prior.sum()) == pytest.approx(1.0)
    assert float(prior.min()) == pytest.approx(
        0.05 / float(torch.tensor([0.9, 0.1, 0.05, 0.05]).sum())
    )
    assert torch.equal(bounded_prior(torch.full((4,), 0.25), 0.2), torch.full((4,), 0.25))


def test_neighbour_consistency_is_scans_formula():
    a = _softmax_rows(5, 3, 7)
    neighbours = torch.stack([_softmax_rows(2, 3, 8 + i) for i in range(5)])  # (5, 2, 3)
    expected = (
        -sum(
            math.log(sum(float(a[i, c] * neighbours[i, j, c]) for c in range(3)))
            for i in range(5)
            for j in range(2)
        )
        / 10
    )
    assert float(neighbour_consistency(a, neighbours)) == pytest.approx(expected, rel=1e-12)


def _unbalanced_sinkhorn_reference(p, mass, penalty, epsilon, iterations):
    """The same scaling iterations with explicit kernels, plain (not log-domain) float64."""
    n, k = p.shape
    kernel = p.double() ** (1.0 / epsilon)
    b = torch.full((k,), mass / k, dtype=torch.float64)
    if mass < 1:
        kernel = torch.cat([kernel, torch.ones(n, 1, dtype=torch.float64)], 1)
        b = torch.cat([b, torch.tensor([1.0 - mass], dtype=torch.float64)])
    a = torch.full((n,), 1.0 / n, dtype=torch.float64)
    power = torch.ones(len(b), dtype=torch.float64)
    power[:k] = penalty / (penalty + epsilon) if math.isfinite(penalty) else 1.0
    u, v = torch.ones(n, dtype=torch.float64), torch.ones(len(b), dtype=torch.float64)
    for _ in range(iterations):
        u = a / (kernel @ v)
        v = (b / (kernel.T @ u)) ** power
    return (u[:, None] * kernel * v[None])[:, :k]


@pytest.mark.parametrize(("mass", "penalty"), [(1.0, 1.0), (0.4, 1.0), (0.7, 10.0)])
def test_relaxed_transport_matches_the_plain_scaling_iterations(mass, penalty):
    p = _softmax_rows(8, 3, 9)
    plan = relaxed_transport(p.log(), mass, penalty, epsilon=0.5, iterations=200)
    reference = _unbalanced_sinkhorn_reference(p, mass, penalty, 0.5, 200)
    torch.testing.assert_close(plan, reference, rtol=1e-9, atol=1e-12)


def test_relaxed_transport_with_an_infinite_penalty_is_the_balanced_sinkhorn_plan():
    p = _softmax_rows(30, 3, 10) ** 3  # skewed: most mass wants cluster sizes far from equal
    plan = relaxed_transport((p / p.sum(1, keepdim=True)).log(), 1.0, math.inf, 0.1, 500)
    torch.testing.assert_close(plan.sum(0), torch.full((3,), 1 / 3, dtype=torch.float64))
    # Rows converge more slowly at a small epsilon: within 0.5 % after 500 iterations.
    torch.testing.assert_close(
        plan.sum(1), torch.full((30,), 1 / 30, dtype=torch.float64), rtol=5e-3, atol=0
    )
    relaxed = relaxed_transport((p / p.sum(1, keepdim=True)).log(), 1.0, 0.01, 0.1, 500)
    assert float((relaxed.sum(0) - 1 / 3).abs().max()) > float((plan.sum(0) - 1 / 3).abs().max())


def test_relaxed_transport_sends_the_chosen_mass_to_real_clusters():
    p = _softmax_rows(40, 4, 11)
    plan = relaxed_transport(p.log(), 0.3, math.inf, 0.1, 300)
    assert float(plan.sum()) == pytest.approx(0.3, rel=1e-6)


def test_weighted_cross_entropy_is_the_weighted_mean():
    targets, a = _softmax_rows(4, 3, 12), _softmax_rows(4, 3, 13)
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5], dtype=torch.float64)
    ce = [-sum(float(targets[i, c] * math.log(a[i, c])) for c in range(3)) for i in range(4)]
    expected = sum(w * c for w, c in zip(weights.tolist(), ce, strict=True)) / 3.5
    assert float(weighted_cross_entropy(targets, weights, a)) == pytest.approx(expected, rel=1e-12)


def test_mixture_responsibilities_are_bayes_rule_on_diagonal_gaussians():
    gen = _generator(14)
    h = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    mean = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    var = torch.rand(2, 3, generator=gen, dtype=torch.float64) + 0.5
    pi = torch.tensor([0.7, 0.3], dtype=torch.float64)
    for sharpen in (1.0, 2.0):
        r = mixture_responsibilities(h, mean, var, pi, sharpen)
        for i in range(5):
            joint = []
            for k in range(2):
                density = math.prod(
                    math.exp(-((h[i, d] - mean[k, d]) ** 2) / (2 * var[k, d]))
                    / math.sqrt(2 * math.pi * var[k, d])
                    for d in range(3)
                )
                joint.append((float(pi[k]) * float(density)) ** sharpen)
            for k in range(2):
                assert float(r[i, k]) == pytest.approx(joint[k] / sum(joint), rel=1e-9)


def test_bounded_prior_pushes_a_swallowing_cluster_back_under_the_ceiling():
    proportions = torch.tensor([0.7, 0.2, 0.06, 0.04])
    prior = bounded_prior(proportions, floor=0.2, ceiling=2.0)  # share at most 2/K = 0.5
    naive = torch.tensor([0.5, 0.2, 0.06, 0.05])
    torch.testing.assert_close(prior, naive / naive.sum())
    a = proportions.repeat(64, 1).requires_grad_(True)  # the mean assignment is the proportions
    # The KL now pulls the big cluster's share down and the others' up.
    size_prior_kl(a, prior).backward()
    assert a.grad[:, 0].mean() > a.grad[:, 1:].mean(0).max()
    torch.testing.assert_close(bounded_prior(proportions, 0.0), proportions)  # no bound
