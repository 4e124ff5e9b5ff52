"""Batched SimCLR augmentation against torchvision's per-image ops and naive re-implementations."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from jdcl_ray.augment import (
    AugmentConfig,
    AugmentParams,
    BatchAugment,
    adjust_hue_,
    gaussian_blur,
    to_float,
)
from jdcl_ray.errors import UserError

IDENTITY = AugmentConfig(
    crop_scale=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0
)


def images(batch: int, channels: int, height: int, width: int | None = None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, channels, height, width or height)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def identity_params(x: torch.Tensor, **changes: torch.Tensor) -> AugmentParams:
    params = BatchAugment(IDENTITY).sample(x)
    return dataclasses.replace(params, **changes)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    ("input_hw", "output_size", "expected_hw"),
    [((32, 32), None, (32, 32)), ((28, 20), None, (28, 20)), ((32, 32), 24, (24, 24)),
     ((32, 32), (20, 36), (20, 36))],
)  # fmt: skip
def test_shape_dtype_and_range(channels, input_hw, output_size, expected_hw):
    x = images(6, channels, *input_hw)
    aug = BatchAugment(output_size=output_size)
    for out in (aug(x, seeded(0)), *aug.two_views(x, seeded(0))):
        assert out.shape == (6, channels, *expected_hw)
        assert out.dtype == torch.float32
        assert out.min() >= 0 and out.max() <= 1


def test_to_float_matches_torchvision():
    x = images(2, 3, 8)
    torch.testing.assert_close(
        to_float(x), TF.to_dtype(x, torch.float32, scale=True), rtol=0, atol=1e-7
    )


@pytest.mark.parametrize("channels", [1, 3])
def test_two_views_differ(channels):
    x = images(8, channels, 16)
    first, second = BatchAugment().two_views(x, seeded(3))
    assert first.shape == second.shape == (8, channels, 16, 16)
    assert (first - second).abs().amax(dim=(1, 2, 3)).min() > 0.01


def test_seed_reproduces_and_other_seed_differs():
    x = images(8, 3, 16)
    aug = BatchAugment()
    a1, b1 = aug.two_views(x, seeded(7))
    a2, b2 = aug.two_views(x, seeded(7))
    a3, _ = aug.two_views(x, seeded(8))
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.allclose(a1, a3)


@pytest.mark.parametrize("channels", [1, 3])
def test_identical_images_get_independent_parameters(channels):
    x = images(1, channels, 16).expand(16, -1, -1, -1).contiguous()
    out = BatchAugment()(x, seeded(0))
    flat = out.flatten(1)
    distinct = [
        not torch.allclose(flat[i], flat[j]) for i, j in itertools.combinations(range(16), 2)
    ]
    assert all(distinct)


@pytest.mark.parametrize(
    ("channels", "side", "config"),
    [
        (3, 32, IDENTITY),
        (1, 28, IDENTITY),
        # jitter always applied, but with zero strengths; blur on, but never drawn
        (3, 32, dataclasses.replace(IDENTITY, jitter=(0, 0, 0, 0), jitter_p=1.0, blur=True)),
        (3, 96, IDENTITY),
        (1, 20, dataclasses.replace(IDENTITY, grayscale_p=1.0)),  # grayscale: no-op for grey
    ],
)
def test_identity_configuration_returns_the_input(channels, side, config):
    x = images(4, channels, side)
    torch.testing.assert_close(BatchAugment(config)(x, seeded(0)), to_float(x), rtol=0, atol=1e-5)


def test_grayscale_always_gives_equal_channels_equal_to_torchvision():
    x = images(4, 3, 16)
    out = BatchAugment(dataclasses.replace(IDENTITY, grayscale_p=1.0))(x, seeded(0))
    reference = torch.stack([TF.rgb_to_grayscale(img, 3) for img in to_float(x)])
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)


def test_flip_with_full_crop_is_torch_flip():
    x = images(4, 3, 16, 12)
    out = BatchAugment(dataclasses.replace(IDENTITY, flip_p=1.0))(x, seeded(0))
    torch.testing.assert_close(out, torch.flip(to_float(x), dims=[-1]), rtol=0, atol=1e-5)


def naive_crop(img: torch.Tensor, box: torch.Tensor, flip: bool, out_h: int, out_w: int):
    """Bilinear sampling at the crop's output pixel centres, edge pixels repeated, loop by loop."""
    _, height, width = img.shape
    x0, y0, w, h = box.tolist()
    out = torch.empty(img.shape[0], out_h, out_w, dtype=torch.float64)
    for i, j in itertools.product(range(out_h), range(out_w)):
        jj = out_w - 1 - j if flip else j
        sx = min(max((x0 + (jj + 0.5) * w / out_w) * width - 0.5, 0), width - 1)
        sy = min(max((y0 + (i + 0.5) * h / out_h) * height - 0.5, 0), height - 1)
        ix, iy = min(int(sx), width - 2), min(int(sy), height - 2)
        fx, fy = sx - ix, sy - iy
        patch = img[:, iy : iy + 2, ix : ix + 2].double()
        out[:, i, j] = (
            patch[:, 0, 0] * (1 - fx) * (1 - fy)
            + patch[:, 0, 1] * fx * (1 - fy)
            + patch[:, 1, 0] * (1 - fx) * fy
            + patch[:, 1, 1] * fx * fy
        )
    return out.float()


def test_chunked_batch_equals_small_batches():
    # 600 images of 32 px are augmented in CPU chunks of 256; batches of 100 in one piece
    x = images(600, 3, 32)
    aug = BatchAugment(AugmentConfig(blur=True))
    params = aug.sample(x, seeded(0))
    pieces = [
        aug.apply(
            to_float(x[i : i + 100]), AugmentParams(*(p[i : i + 100] for p in params_of(params)))
        )
        for i in range(0, 600, 100)
    ]
    torch.testing.assert_close(aug.apply(to_float(x), params), torch.cat(pieces), rtol=0, atol=1e-6)


def params_of(params: AugmentParams) -> list[torch.Tensor]:
    return [getattr(params, field.name) for field in dataclasses.fields(params)]


def test_crop_matches_naive_bilinear_sampling():
    x = images(3, 3, 10, 9)
    box = torch.tensor([[0.1, 0.2, 0.5, 0.7], [0.0, 0.0, 1.0, 1.0], [0.55, 0.05, 0.45, 0.3]])
    flip = torch.tensor([False, True, True])
    aug = BatchAugment(IDENTITY, output_size=(6, 7))
    out = aug.apply(to_float(x), identity_params(x, box=box, flip=flip))
    reference = torch.stack(
        [
            naive_crop(img, b, bool(f), 6, 7)
            for img, b, f in zip(to_float(x), box, flip, strict=True)
        ]
    )
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("hw", [(32, 32), (24, 40)])
def test_crop_boxes_follow_random_resized_crop(hw):
    x = images(20000, 1, *hw)
    box = BatchAugment(AugmentConfig(crop_scale=(0.2, 0.9))).sample(x, seeded(0)).box
    x0, y0, w, h = box.unbind(1)
    assert x0.min() >= 0 and y0.min() >= 0
    assert (x0 + w).max() <= 1 + 1e-6 and (y0 + h).max() <= 1 + 1e-6
    area = w * h
    assert area.min() >= 0.2 - 1e-6 and area.max() <= 0.9 + 1e-6
    assert abs(area.mean().item() - 0.55) < 0.01  # uniform in scale
    ratio = (w * hw[1]) / (h * hw[0])
    in_range = (ratio >= 3 / 4 - 1e-4) & (ratio <= 4 / 3 + 1e-4)
    # a crop too large for its ratio spans a whole side and keeps its area
    assert (in_range | (w >= 1 - 1e-6) | (h >= 1 - 1e-6)).all()
    assert in_range.all() if hw[0] == hw[1] else in_range.float().mean() > 0.8


@pytest.mark.parametrize("hw", [(32, 32), (24, 40)])
def test_crop_ratio_is_log_uniform_where_crops_fit(hw):
    x = images(20000, 1, *hw)
    box = BatchAugment(AugmentConfig(crop_scale=(0.05, 0.3))).sample(x, seeded(1)).box
    log_ratio = torch.log(box[:, 2] * hw[1] / (box[:, 3] * hw[0]))
    quantiles = torch.quantile(log_ratio, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    expected = torch.linspace(math.log(3 / 4), math.log(4 / 3), 5)
    torch.testing.assert_close(quantiles, expected, rtol=0, atol=0.01)


def test_sampled_probabilities_and_factor_ranges():
    config = AugmentConfig(flip_p=0.3, jitter=(0.4, 0.2, 1.5, 0.1), jitter_p=0.6, grayscale_p=0.2)
    params = BatchAugment(config).sample(images(20000, 3, 4), seeded(0))
    assert abs(params.flip.float().mean().item() - 0.3) < 0.02
    assert abs(params.grayscale.float().mean().item() - 0.2) < 0.02
    jittered = (params.factors != torch.tensor([1.0, 1.0, 1.0, 0.0])).any(dim=1)
    assert abs(jittered.float().mean().item() - 0.6) < 0.02
    low, high = params.factors[jittered].aminmax(dim=0)
    expected_low = torch.tensor([0.6, 0.8, 0.0, -0.1])
    expected_high = torch.tensor([1.4, 1.2, 2.5, 0.1])
    assert (low >= expected_low - 1e-6).all() and (high <= expected_high + 1e-6).all()
    torch.testing.assert_close(low, expected_low, rtol=0, atol=0.01)
    torch.testing.assert_close(high, expected_high, rtol=0, atol=0.01)
    assert torch.equal(params.order.sort(dim=1).values, torch.arange(4).expand(20000, 4))
    assert len(torch.unique(params.order, dim=0)) == 24


TV_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def torchvision_jitter(img: torch.Tensor, factors: torch.Tensor, order: torch.Tensor):
    """ColorJitter on one image: op j runs at position order[j], clipping after each op."""
    for op in order.argsort().tolist():
        img = TV_JITTER[op](img, float(factors[op]))
    return img


def unclipped_blend(img: torch.Tensor, op: int, factor: float) -> torch.Tensor:
    grey = TF.rgb_to_grayscale(img) if img.shape[0] == 3 else img
    target = (torch.zeros_like(img), grey.mean().expand_as(img), grey.expand_as(img))[op]
    return factor * img + (1 - factor) * target


def clip_once_jitter(img: torch.Tensor, factors: torch.Tensor, order: torch.Tensor):
    """The documented semantics: the blends on each side of the hue shift clip once, at the end
    (grey images have no hue shift, so all their blends clip once)."""
    for op in order.argsort().tolist():
        if op < 3:
            img = unclipped_blend(img, op, float(factors[op]))
        elif img.shape[0] == 3:
            img = TF.adjust_hue(img.clamp(0, 1), float(factors[3]))
    return img.clamp(0, 1)


def jitter_case(x, factors, order, reference_fn, atol: float):
    out = BatchAugment(IDENTITY).apply(
        to_float(x), identity_params(x, factors=factors, order=order)
    )
    reference = torch.stack(
        [reference_fn(img, f, o) for img, f, o in zip(to_float(x), factors, order, strict=True)]
    )
    torch.testing.assert_close(out, reference, rtol=0, atol=atol)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("op", range(4))
def test_each_jitter_op_matches_torchvision(channels, op):
    batch = 8
    factors = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(batch, 1)
    factors[:, op] = torch.linspace(-0.5, 0.5, batch) if op == 3 else torch.linspace(0, 2, batch)
    order = torch.arange(4).repeat(batch, 1)
    x = images(batch, channels, 12, 10, seed=1)
    jitter_case(x, factors, order, torchvision_jitter, atol=1e-4 if op == 3 else 1e-6)


def every_order(strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    orders = torch.tensor(list(itertools.permutations(range(4)))).repeat(2, 1)
    factors = torch.rand(len(orders), 4, generator=seeded(5)) * 2 - 1
    factors[:, :3] = 1 + strength * factors[:, :3]
    factors[:, 3] /= 2
    return factors, orders


@pytest.mark.parametrize("channels", [1, 3])
def test_jitter_in_every_order_matches_torchvision_where_nothing_clips(channels):
    # pixels in [0.3, 0.7] and blend factors within 15% of 1 never leave [0, 1] on the way
    factors, orders = every_order(strength=0.15)
    x = images(len(orders), channels, 12, 10, seed=1) // 3 + 77
    jitter_case(x, factors, orders, torchvision_jitter, atol=1e-4)


@pytest.mark.parametrize("channels", [1, 3])
def test_jitter_in_every_order_clips_once_per_side_of_the_hue_shift(channels):
    factors, orders = every_order(strength=1.0)
    x = images(len(orders), channels, 12, 10, seed=1)
    jitter_case(x, factors, orders, clip_once_jitter, atol=1e-4)
    # ... which torchvision, clipping after every op, does not match everywhere
    out = BatchAugment(IDENTITY).apply(
        to_float(x), identity_params(x, factors=factors, order=orders)
    )
    clipped = [torchvision_jitter(*a) for a in zip(to_float(x), factors, orders, strict=True)]
    assert (out - torch.stack(clipped)).abs().max() > 0.05


def test_hue_is_exact_on_saturated_colours_and_keeps_greys():
    # pure red shifted by a sixth of the circle is yellow, by a third green; greys stay grey
    x = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.3, 0.3, 0.3]]).view(3, 3, 1, 1)
    out = adjust_hue_(x.clone(), torch.tensor([1 / 6, -1 / 3, 0.25]))
    expected = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.3, 0.3, 0.3]]).view(3, 3, 1, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_blur_matches_torchvision_per_image_sigma():
    x = to_float(images(3, 3, 96))
    sigma = torch.tensor([0.1, 1.3, 2.0])
    out = gaussian_blur(x, sigma)
    reference = torch.stack(
        [
            TF.gaussian_blur(img, [9, 9], [float(s), float(s)])
            for img, s in zip(x, sigma, strict=True)
        ]
    )
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(gaussian_blur(x, torch.zeros(3)), x, rtol=0, atol=0)


@pytest.mark.parametrize(("side", "blurred"), [(95, False), (96, True)])
def test_blur_activates_at_96_pixels(side, blurred):
    x = images(2, 3, side)
    out = BatchAugment(dataclasses.replace(IDENTITY, blur_p=1.0))(x, seeded(0))
    assert torch.allclose(out, to_float(x), atol=1e-5) is not blurred
    forced = BatchAugment(dataclasses.replace(IDENTITY, blur_p=1.0, blur=True))(x, seeded(0))
    assert not torch.allclose(forced, to_float(x), atol=1e-5)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("crop_scale", (0.0, 1.0)),
        ("crop_scale", (0.5, 0.2)),
        ("crop_scale", (0.1, 1.5)),
        ("crop_scale", (0.5,)),
        ("flip_p", -0.1),
        ("jitter", (0.4, -0.1, 0.4, 0.1)),
        ("jitter", (0.4, 0.4, 0.4, 0.6)),
        ("jitter", (0.4, 0.4, 0.4)),
        ("jitter_p", 1.5),
        ("grayscale_p", 2.0),
        ("blur", "yes"),
        ("blur_p", math.nan),
    ],
)
def test_bad_config_raises_user_error_naming_the_field(field, value):
    with pytest.raises(UserError, match=rf"augment\.{field}="):
        AugmentConfig(**{field: value})


@pytest.mark.parametrize("size", [0, (32,), (16, -1), 2.5])
def test_bad_output_size_raises_user_error(size):
    with pytest.raises(UserError, match=r"augment\.output_size="):
        BatchAugment(output_size=size)


@pytest.mark.parametrize("x", [torch.zeros(2, 3, 8, 8), torch.zeros(2, 4, 8, 8, dtype=torch.uint8)])
def test_rejects_non_uint8_or_wrong_channels(x):
    with pytest.raises(ValueError, match="uint8 images"):
        BatchAugment()(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_the_same_parameters():
    x = images(8, 3, 32)
    aug = BatchAugment()
    params = aug.sample(x.cuda(), torch.Generator("cuda").manual_seed(0))
    on_cpu = AugmentParams(*(p.cpu() for p in params_of(params)))
    out = aug.apply(to_float(x.cuda()), params)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), aug.apply(to_float(x), on_cpu), rtol=0, atol=1e-4)
