"""SimCLR's augmentation, run on whole uint8 batches on the training device.

Per-PIL-image pipelines in loader processes starve a GPU; here every step is one batched tensor op
with per-image random parameters, all drawn on the images' device by a single ``torch.rand`` call
(no host round trips, no ``.item()``), so the loader only ships uint8 tensors.

Departures from torchvision's per-image SimCLR pipeline, each chosen to stay batched:

- Random resized crop: the area fraction is uniform in ``crop_scale`` and the aspect ratio
  log-uniform in (3/4, 4/3) as in ``RandomResizedCrop``, but instead of its rejection loop a crop
  that does not fit keeps its area and has its overflowing side clamped to the image (its ratio
  gives way). Crop boxes are sub-pixel and resampled bilinearly (no antialiasing when shrinking).
- Colour jitter runs ColorJitter's four ops in a random order per image (torchvision draws one
  order per call, which is per image there too). Hue is torchvision's HSV hue shift, computed in
  closed form from max, min and hue sextant without building an HSV tensor; the cheaper YIQ
  rotation is a different op (it moves saturation and value too and needs clipping), so it is not
  used.
- Gaussian blur (SimCLR: p=0.5, sigma 0.1-2.0, kernel 10% of the side) uses reflect padding as
  torchvision's ``gaussian_blur``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jdcl_ray.errors import UserError

_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
_BLUR_MIN_SIDE = 96
_BLUR_SIGMA = (0.1, 2.0)
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
_HUE_TRAPEZOID = ((3.0, 1.0, -1.0), (2.0, -1.0, 2.0), (4.0, -1.0, 2.0))  # centre, slope, base
# Columns of the one uniform draw per view.
_AREA, _RATIO, _X, _Y, _FLIP, _JITTER, _GRAY, _BLUR, _SIGMA = range(9)
_FACTORS = slice(9, 13)  # brightness, contrast, saturation, hue
_ORDER = slice(13, 17)
_N_UNIFORM = 17


@dataclass(frozen=True)
class AugmentConfig:
    """SimCLR's augmentation strengths; the defaults are the paper's for CIFAR-sized images."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (
        0.4,
        0.4,
        0.4,
        0.1,
    )  # brightness, contrast, sat, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur: bool | None = None  # None: blur when the output side is >= 96 px
    blur_p: float = 0.5

    def __post_init__(self) -> None:
        lo, hi = _pair(self.crop_scale, "crop_scale")
        if not 0 < lo <= hi <= 1:
            _bad("crop_scale", self.crop_scale, "(min, max) with 0 < min <= max <= 1")
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


def _pair(value: tuple[float, float], name: str) -> tuple[float, float]:
    if len(value) != 2:
        _bad(name, value, "a pair (min, max)")
    return value


@dataclass(frozen=True)
class AugmentParams:
    """Random parameters of one view, one row per image (identity: box (0, 0, 1, 1), no flip,
    factors (1, 1, 1, 0), no grayscale, sigma 0)."""

    box: torch.Tensor  # (B, 4) crop x0, y0, width, height as fractions of the image's sides
    flip: torch.Tensor  # (B,) bool
    factors: torch.Tensor  # (B, 4) brightness, contrast, saturation factors and hue shift
    order: torch.Tensor  # (B, 4) position of brightness, contrast, saturation, hue in the jitter
    grayscale: torch.Tensor  # (B,) bool
    blur_sigma: torch.Tensor  # (B,) 0 where the image is not blurred


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float32 in [0, 1]: the un-augmented evaluation path."""
    return images.to(torch.float32).div_(255)


class BatchAugment(torch.nn.Module):
    """SimCLR augmentation of a uint8 batch (B, C, H, W), C in {1, 3}, to float32 in [0, 1].

    ``output_size`` (int or (height, width)) defaults to the input's size. For grey images only
    brightness and contrast act: saturation, hue and grayscale leave them unchanged.
    """

    def __init__(
        self,
        config: AugmentConfig = AugmentConfig(),
        output_size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if output_size is not None:
            size = (output_size, output_size) if isinstance(output_size, int) else output_size
            if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
                _bad("output_size", output_size, "a positive int or (height, width)")
            output_size = tuple(size)
        self.config = config
        self.output_size = output_size

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        _check(images)
        return self.apply(to_float(images), self.sample(images, generator))

    def two_views(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independently augmented views, sharing one uint8-to-float conversion."""
        _check(images)
        x = to_float(images)
        first = self.apply(x, self.sample(images, generator))
        return first, self.apply(x, self.sample(images, generator))

    def sample(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> AugmentParams:
        """Draw one view's parameters for ``images`` (only its shape and device are used)."""
        cfg = self.config
        batch, _, height, width = images.shape
        u = torch.rand(batch, _N_UNIFORM, generator=generator, device=images.device)

        lo, hi = cfg.crop_scale
        area = u[:, _AREA] * (hi - lo) + lo
        ratio = torch.exp(u[:, _RATIO] * (_LOG_RATIO[1] - _LOG_RATIO[0]) + _LOG_RATIO[0])
        # ratio is width/height in pixels; w and h below are fractions of the sides.
        w = (area * ratio * (height / width)).sqrt_().clamp_(max=1)
        h = (area / w).clamp_(max=1)
        w = area / h
        box = torch.stack((u[:, _X] * (1 - w), u[:, _Y] * (1 - h), w, h), dim=1)

        ranges = [(max(0.0, 1 - s), 1 + s) for s in cfg.jitter[:3]]
        ranges.append((-cfg.jitter[3], cfg.jitter[3]))
        factors = u[:, _FACTORS].clone()
        for i, (f_lo, f_hi) in enumerate(ranges):
            factors[:, i].mul_(f_hi - f_lo).add_(f_lo)
        unjittered = u[:, _JITTER] >= cfg.jitter_p
        factors[:, :3].masked_fill_(unjittered[:, None], 1)
        factors[:, 3].masked_fill_(unjittered, 0)

        sigma = u[:, _SIGMA] * (_BLUR_SIGMA[1] - _BLUR_SIGMA[0]) + _BLUR_SIGMA[0]
        return AugmentParams(
            box=box,
            flip=u[:, _FLIP] < cfg.flip_p,
            factors=factors,
            order=u[:, _ORDER].argsort(dim=1).argsort(dim=1),
            grayscale=u[:, _GRAY] < cfg.grayscale_p,
            blur_sigma=sigma.masked_fill_(u[:, _BLUR] >= cfg.blur_p, 0),
        )

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Augment float images in [0, 1] with given parameters; ``images`` is not modified."""
        size = self.output_size or tuple(images.shape[-2:])
        x = resized_crop(images, params.box, params.flip, size)
        jitter_(x, params.factors, params.order)
        if x.shape[1] == 3:
            x.lerp_(_luma(x).expand_as(x), params.grayscale.to(x.dtype).view(-1, 1, 1, 1))
        blur = self.config.blur
        if blur or (blur is None and min(size) >= _BLUR_MIN_SIDE):
            x = gaussian_blur(x, params.blur_sigma)
        return x


def _check(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"expected uint8 images (B, C, H, W) with C in {{1, 3}}, got {images.dtype} "
            f"{tuple(images.shape)}"
        )


def resized_crop(
    images: torch.Tensor, box: torch.Tensor, flip: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Crop each image to its box (fractions x0, y0, w, h), flip where asked, resize to ``size``:
    one bilinear ``grid_sample`` for the batch."""
    batch = images.shape[0]
    x0, y0, w, h = box.unbind(1)
    # grid_sample's coordinates (align_corners=False): -1 and 1 are the outer pixel edges.
    width = torch.where(flip, -w, w)
    centre_x = 2 * x0 + w - 1
    centre_y = 2 * y0 + h - 1
    grid = torch.empty(batch, *size, 2, device=images.device)
    grid[..., 0] = torch.addcmul(
        centre_x[:, None], width[:, None], _pixel_centres(size[1], images.device)
    )[:, None, :]
    grid[..., 1] = torch.addcmul(
        centre_y[:, None], h[:, None], _pixel_centres(size[0], images.device)
    )[:, :, None]
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _pixel_centres(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device, dtype=torch.float32).mul_(2).add_(1).div_(n).sub_(1)


def jitter_(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """ColorJitter in place with per-image factors (B, 4) applied in per-image order (B, 4).

    Brightness, contrast and saturation each blend towards a target (black, the mean grey, the
    pixel's grey) and clip, so one stage code does all three. Each image's blends before its hue
    shift go right-aligned into stages 0-2, those after it left-aligned into stages 3-5, with the
    hue shift of the whole batch between; unused stages blend with factor 1 (identity).
    Grey images have no hue, so three stages suffice.
    """
    rgb = images.shape[1] == 3
    hue_pos = order[:, 3:]
    blend_rank = order[:, :3] - (order[:, :3] > hue_pos).long()  # rank among the three blends
    stage = blend_rank + 3 - hue_pos if rgb else blend_rank
    n_stages = 6 if rgb else 3
    factor = factors.new_ones(len(factors), n_stages).scatter_(1, stage, factors[:, :3])
    blends = torch.arange(3.0, device=factors.device).expand_as(stage)  # brightness, contr., sat.
    kind = torch.zeros_like(factor).scatter_(1, stage, blends)
    # Per stage (rows) and image: factor, and weights of the mean grey and of the pixel's grey.
    factor, mean_weight, grey_weight = (
        torch.stack((factor, (1 - factor) * (kind == 1), (1 - factor) * (kind == 2)))
        .transpose(1, 2)
        .reshape(3, n_stages, -1, 1, 1, 1)
    )
    for s in range(n_stages):
        if rgb and s == 3:
            adjust_hue_(images, factors[:, 3])
        grey = _luma(images) if rgb else images
        mean = grey.mean(dim=(1, 2, 3), keepdim=True).mul_(mean_weight[s])
        target = torch.addcmul(mean, grey, grey_weight[s])
        torch.addcmul(target, images, factor[s], out=images).clamp_(0, 1)
    return images


def adjust_hue_(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's HSV hue shift in place, per-image ``shift`` (B,) in [-0.5, 0.5].

    Value (max) and chroma (max - min) are kept; six times the hue moves by 6 * shift and each
    channel is min + chroma * a trapezoid of it (the hexcone), with no HSV tensor. Float ops
    only: ``torch.where`` and bool masks are several times slower on CPU.
    """
    r, g, b = images.unbind(1)
    high = torch.maximum(r, g)
    torch.maximum(high, b, out=high)
    low = torch.minimum(r, g)
    torch.minimum(low, b, out=low)
    chroma = high - low
    # Six times the hue, from the largest channel (red, else green, else blue; ties agree);
    # sign(high - x) is 0 where x is the largest, else 1, which lerp turns into a selection.
    h6 = torch.sub(b, r).add_(chroma, alpha=2)
    h6.lerp_(torch.sub(r, g).add_(chroma, alpha=4), torch.sub(high, g).sign_())
    h6 = torch.sub(g, b).lerp_(h6, high.sub_(r).sign_())
    h6.div_(chroma.clamp(min=1e-12)).add_(shift.view(-1, 1, 1), alpha=6)
    h6.sub_(h6.div(6).floor_().mul_(6))
    # red = clip(|h6 - 3| - 1), green = clip(2 - |h6 - 2|), blue = clip(2 - |h6 - 4|), each
    # written as low + base * chroma + slope * chroma * clamp(|h6 - centre|, 1, 2).
    for channel, (centre, slope, base) in zip(images.unbind(1), _HUE_TRAPEZOID, strict=True):
        ramp = torch.sub(h6, centre).abs_().clamp_(1, 2)
        torch.addcmul(torch.add(low, chroma, alpha=base), chroma, ramp, value=slope, out=channel)
    return images


def _luma(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(1)
    return torch.mul(r, _LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with per-image ``sigma`` (B,), 0 meaning none; kernel 10% of each
    side (odd), reflect padding."""
    batch, channels, height, width = images.shape
    x = images.reshape(1, batch * channels, height, width)
    sigma = sigma.repeat_interleave(channels)
    for dim, side in ((2, height), (3, width)):
        size = int(0.1 * side) // 2 * 2 + 1
        taps = torch.arange(size, device=images.device, dtype=images.dtype) - size // 2
        kernel = torch.exp(-0.5 * (taps / sigma.clamp(min=1e-6)[:, None]) ** 2)
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).view(-1, 1, *_axis(size, dim))
        pad = (0, 0, size // 2, size // 2) if dim == 2 else (size // 2, size // 2, 0, 0)
        x = F.conv2d(F.pad(x, pad, mode="reflect"), kernel, groups=batch * channels)
    return x.view_as(images)


def _axis(size: int, dim: int) -> tuple[int, int]:
    return (size, 1) if dim == 2 else (1, size)
