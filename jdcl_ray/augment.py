"""SimCLR's augmentation, run on whole uint8 batches on the training device.

Per-PIL-image pipelines in loader processes starve a GPU; here every step is one batched tensor op
with per-image random parameters, all drawn on the images' device by a single ``torch.rand`` call
(no host round trips, no ``.item()``), so the loader only ships uint8 tensors.

Departures from torchvision's per-image SimCLR pipeline, each chosen for batching or speed:

- Random resized crop: the area fraction is uniform in ``crop_scale`` and the aspect ratio
  log-uniform in (3/4, 4/3) as in ``RandomResizedCrop``, but instead of its rejection loop a crop
  that does not fit keeps its area and has its overflowing side clamped to the image (its ratio
  gives way). Crop boxes are sub-pixel and resampled bilinearly (no antialiasing when shrinking).
- Colour jitter draws ColorJitter's factors and op order per image, as torchvision does per
  call. Each op alone equals torchvision's; but brightness, contrast and saturation on the same
  side of the hue shift run as one blend clipped once at its end, where torchvision clips after
  every op (they commute when unclipped): on smooth test images 7% of pixels differ by more than
  1/255 (mean 0.002), for two blend passes instead of six (1.2x faster overall). Hue is torchvision's
  HSV hue shift, computed in closed form from max, min and hue sextant without an HSV tensor; the
  cheaper YIQ rotation is a different op (it moves saturation and value too), so it is not used.
- Gaussian blur follows SimCLR (p=0.5 as ``blur_p``, sigma 0.1-2.0, kernel 10% of the side) with
  torchvision's ``gaussian_blur`` reflect padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jdcl_ray.config import AugmentConfig
from jdcl_ray.errors import UserError

_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
_BLUR_MIN_SIDE = 96
_BLUR_SIGMA = (0.1, 2.0)
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
_HUE_SCRATCH = 6  # planes adjust_hue_ works in
_CPU_CHUNK_PIXELS = 2**18  # pixels per thread in a plane of a CPU colour chunk (1 MB of float32)
_HUE_TRAPEZOID = ((3.0, 1.0), (2.0, -1.0), (4.0, -1.0))  # centre and slope for red, green, blue
# Columns of the one uniform draw per view.
_AREA, _RATIO, _X, _Y, _FLIP, _JITTER, _GRAY, _BLUR, _SIGMA = range(9)
_FACTORS = slice(9, 13)  # brightness, contrast, saturation, hue
_ORDER = slice(13, 17)
_N_UNIFORM = 17


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


def to_float(images: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 images to float32 in [0, 1]: the un-augmented evaluation path."""
    if out is None:
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    return out.copy_(images).div_(255)


class BatchAugment(torch.nn.Module):
    """SimCLR augmentation of a uint8 batch (B, C, H, W), C in {1, 3}, to float32 in [0, 1].

    ``output_size`` (int or (height, width)) defaults to the input's size. For grey images only
    brightness and contrast act: saturation, hue and grayscale leave them unchanged.

    Scratch tensors are kept between calls (the float input, the sampling grid and six colour
    planes: 26 MB for two views of 512 images of 32 px): fresh multi-MB CPU tensors cost page
    faults that rival the arithmetic, as glibc returns them to the OS when freed. So one module
    must not run in two threads at once.
    """

    def __init__(
        self,
        config: AugmentConfig = AugmentConfig(),
        output_size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.output_size = None if output_size is None else _size_pair(output_size)
        self._scratch: dict[str, torch.Tensor] = {}

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One augmented view; ``generator`` must live on the images' device."""
        _check(images)
        return self.apply(self._float(images), self.sample(images, generator))

    def stacked_views(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Two independently augmented views as one (2B, C, H, W) batch, view 1 then view 2,
        made in one pass (half the op calls, one output): the training step feeds it to the
        model as is, with no concatenation."""
        _check(images)
        x = self._float(images, copies=2)
        return self.apply(x, self.sample(x, generator))

    def two_views(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views of ``stacked_views`` as separate (B, C, H, W) tensors."""
        both = self.stacked_views(images, generator)
        return both[: images.shape[0]], both[images.shape[0] :]

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
            order=u[:, _ORDER].argsort(dim=1),  # a uniform permutation, read as positions
            grayscale=u[:, _GRAY] < cfg.grayscale_p,
            blur_sigma=sigma.masked_fill_(u[:, _BLUR] >= cfg.blur_p, 0),
        )

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Augment float images in [0, 1] with given parameters; ``images`` is not modified."""
        size = self.output_size or tuple(images.shape[-2:])
        batch = images.shape[0]
        grid = self._buffer("grid", (batch, *size, 2), images)
        x = resized_crop(images, params.box, params.flip, size, grid=grid)
        # Colour and blur make dozens of passes over the pixels: on CPU, run them on chunks whose
        # planes stay in each thread's L2 cache; on a GPU, on the whole batch.
        chunk_pixels = _CPU_CHUNK_PIXELS * torch.get_num_threads()
        step = max(1, chunk_pixels // math.prod(size)) if x.device.type == "cpu" else batch
        scratch = self._buffer("planes", (_HUE_SCRATCH, min(step, batch), 1, *size), images)
        to_grey = params.grayscale.to(x.dtype).view(-1, 1, 1, 1)
        blurs = self.config.blur
        blurs = blurs or (blurs is None and min(size) >= _BLUR_MIN_SIDE)
        for start in range(0, batch, step):
            chunk = x[start : start + step]
            part, planes = slice(start, start + len(chunk)), scratch[:, : len(chunk)]
            jitter_(chunk, params.factors[part], params.order[part], scratch=planes)
            if chunk.shape[1] == 3:
                chunk.lerp_(_luma(chunk, out=planes[0]).expand_as(chunk), to_grey[part])
            if blurs:
                chunk.copy_(gaussian_blur(chunk, params.blur_sigma[part]))
        return x

    def _float(self, images: torch.Tensor, copies: int = 1) -> torch.Tensor:
        """``images`` as float32, ``copies`` times along the batch, in a kept buffer."""
        batch = images.shape[0]
        shape = (copies * batch, *images.shape[1:])
        x = self._buffer("input", shape, images, torch.float32)
        to_float(images, out=x[:batch])
        x.view(copies, *images.shape)[1:] = x[:batch]
        return x

    def _buffer(
        self,
        name: str,
        shape: tuple[int, ...],
        like: torch.Tensor,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """The scratch tensor ``name``, reallocated only when shape, dtype or device change."""
        dtype = dtype or like.dtype
        kept = self._scratch.get(name)
        if kept is None or kept.shape != shape or kept.dtype != dtype or kept.device != like.device:
            kept = self._scratch[name] = torch.empty(shape, dtype=dtype, device=like.device)
        return kept


def _size_pair(size: object) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else size
    if not (
        isinstance(pair, (tuple, list))
        and len(pair) == 2
        and all(isinstance(side, int) and side > 0 for side in pair)
    ):
        raise UserError(
            f"augment.output_size={size!r} is out of range: expected a positive int or (height, width)"
        )
    return tuple(pair)


def _check(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"expected uint8 images (B, C, H, W) with C in {{1, 3}}, got {images.dtype} "
            f"{tuple(images.shape)}"
        )


def resized_crop(
    images: torch.Tensor,
    box: torch.Tensor,
    flip: torch.Tensor,
    size: tuple[int, int],
    grid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Crop each image to its box (fractions x0, y0, w, h), flip where asked, resize to ``size``:
    one bilinear ``grid_sample`` for the batch. ``grid``: optional scratch (B, *size, 2)."""
    if grid is None:
        grid = images.new_empty(images.shape[0], *size, 2)
    x0, y0, w, h = box.unbind(1)
    # grid_sample's coordinates (align_corners=False): -1 and 1 are the outer pixel edges.
    width = torch.where(flip, -w, w)
    centre_x = 2 * x0 + w - 1
    centre_y = 2 * y0 + h - 1
    xs = torch.addcmul(centre_x[:, None], width[:, None], _pixel_centres(size[1], images))
    ys = torch.addcmul(centre_y[:, None], h[:, None], _pixel_centres(size[0], images))
    grid[..., 0] = xs[:, None, :]
    grid[..., 1] = ys[:, :, None]
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _pixel_centres(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(n, device=like.device, dtype=like.dtype).mul_(2).add_(1).div_(n).sub_(1)


def jitter_(
    images: torch.Tensor,
    factors: torch.Tensor,
    order: torch.Tensor,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """ColorJitter in place with per-image factors (B, 4) applied in per-image order (B, 4).

    Brightness, contrast and saturation blend towards black, the mean grey and the pixel's grey;
    unclipped they commute (the grey of a grey is itself), so the ones on the same side of an
    image's hue shift make one blend x -> b c s x + b c (1 - s) grey + b (1 - c) mean grey,
    clipped once at its end. torchvision clips after each op: the results differ only where an
    intermediate value left [0, 1]. Two such blends with the hue shift between (one for grey
    images, which have no hue) instead of four ops. ``scratch``: optional (6, B, 1, H, W).
    """
    blends = factors[:, :3]
    if images.shape[1] == 3:
        before_hue = order[:, :3] < order[:, 3:]
        groups = torch.stack((before_hue, ~before_hue))
    else:
        groups = torch.ones_like(blends, dtype=torch.bool)[None]
    # Per group (rows) and image: weights of the image, of its grey and of its mean grey.
    b, c, s = torch.where(groups, blends, 1).unbind(2)
    weights = torch.stack((b * c * s, b * c * (1 - s), b * (1 - c)), dim=1)
    weights = weights.view(len(groups), 3, -1, 1, 1, 1)
    if scratch is None:
        scratch = images.new_empty(_HUE_SCRATCH, images.shape[0], 1, *images.shape[2:])
    grey = scratch[0]
    for group, (own, grey_weight, mean_weight) in enumerate(weights):
        if group == 1:
            adjust_hue_(images, factors[:, 3], scratch=scratch)
        _luma(images, out=grey)
        mean = grey.mean(dim=(1, 2, 3), keepdim=True).mul_(mean_weight)
        grey.mul_(grey_weight).add_(mean)
        torch.addcmul(grey, images, own, out=images).clamp_(0, 1)
    return images


def adjust_hue_(
    images: torch.Tensor, shift: torch.Tensor, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """torchvision's HSV hue shift in place, per-image ``shift`` (B,) in [-0.5, 0.5].

    Value (max) and chroma (max - min) are kept; six times the hue moves by 6 * shift and each
    channel is min + chroma * a trapezoid of it (the hexcone), with no HSV tensor. In-place float
    ops on one scratch tensor: ``torch.where``, bool masks and fresh temporaries are several
    times slower on CPU. ``scratch``: optional (6, B, 1, H, W).
    """
    r, g, b = images.unbind(1)
    if scratch is None:
        scratch = images.new_empty(_HUE_SCRATCH, *r.shape)
    high, low, chroma, h6, tmp, largest = scratch.view(_HUE_SCRATCH, *r.shape).unbind(0)
    torch.maximum(torch.maximum(r, g, out=high), b, out=high)
    torch.minimum(torch.minimum(r, g, out=low), b, out=low)
    torch.sub(high, low, out=chroma)
    # Six times the hue from the largest channel (red, else green, else blue; ties agree):
    # sign(high - x) is 0 where x is the largest, else 1, which lerp turns into a selection.
    torch.sub(b, r, out=tmp).add_(chroma, alpha=2)
    torch.sub(r, g, out=h6).add_(chroma, alpha=4)
    tmp.lerp_(h6, torch.sub(high, g, out=largest).sign_())
    torch.sub(g, b, out=h6).lerp_(tmp, high.sub_(r).sign_())
    h6.div_(chroma.clamp_(min=1e-12)).add_(shift.view(-1, 1, 1), alpha=6)
    h6.sub_(torch.div(h6, 6, out=tmp).floor_(), alpha=6)  # wrap into [0, 6)
    # red = low + chroma * clip(|h6 - 3| - 1) = low - chroma + chroma * clamp(|h6 - 3|, 1, 2),
    # green = low + chroma * clip(2 - |h6 - 2|) = low + 2 chroma - chroma * clamp(|h6 - 2|, 1, 2),
    # blue likewise around 4.
    red_base, green_blue_base = torch.sub(low, chroma, out=high), largest
    torch.add(low, chroma, alpha=2, out=green_blue_base)
    bases = (red_base, green_blue_base, green_blue_base)
    for channel, base, (centre, slope) in zip((r, g, b), bases, _HUE_TRAPEZOID, strict=True):
        torch.sub(h6, centre, out=tmp).abs_().clamp_(1, 2)
        torch.addcmul(base, chroma, tmp, value=slope, out=channel)
    return images


def _luma(images: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """torchvision's rgb_to_grayscale (B, 1, H, W); a copy for grey images."""
    if out is None:
        out = images.new_empty(images.shape[0], 1, *images.shape[2:])
    if images.shape[1] == 1:
        return out.copy_(images)
    r, g, b = images.unbind(1)
    grey = out.squeeze(1)
    torch.mul(r, _LUMA[0], out=grey).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2])
    return out


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with per-image ``sigma`` (B,), 0 meaning none; kernel 10% of each
    side (odd), reflect padding. One multiply-add per tap: a grouped ``conv2d`` with a kernel per
    image is 10x slower on CPU."""
    x = images
    for dim in (2, 3):
        side = images.shape[dim]
        half = int(0.1 * side) // 2
        taps = torch.arange(-half, half + 1, device=images.device, dtype=images.dtype)
        weights = torch.exp(-0.5 * (taps / sigma.clamp(min=1e-6)[:, None]) ** 2)
        weights = (weights / weights.sum(dim=1, keepdim=True)).view(-1, 2 * half + 1, 1, 1, 1)
        pad = (0, 0, half, half) if dim == 2 else (half, half, 0, 0)
        padded = F.pad(x, pad, mode="reflect")
        x = padded.narrow(dim, 0, side) * weights[:, 0]
        for tap in range(1, 2 * half + 1):
            x.addcmul_(padded.narrow(dim, tap, side), weights[:, tap])
    return x
