"""Differentiable batch augmentation with explicit, replayable parameters.

Every augmentation is split in two steps::

    params = aug.sample(n, generator, (H, W))   # dict of CPU tensors, first dim n (one row per image)
    out = aug.apply(x, params)                  # x [n, C, H, W] float -> same shape, dtype, device

Separating the random draw from the pixel work gives three things the methods need:

- **Siamese augmentation** (DSA): the same ``params`` applied to a real and a synthetic batch apply
  the same transform to both. A parameter tensor whose first dim is 1 is *shared*: ``apply``
  broadcasts it to every image, so ``sample(1, ...)`` gives one transform for batches of any size
  (what the DSA reference does with its ``Siamese`` flag).
- **Replay**: ``params`` can be stored (they are plain tensors) and applied again later, e.g. to
  reproduce the crops that stored soft labels were computed on (FKD-style relabelling).
- **Data parallel**: draw the parameters for the whole global batch from one seeded generator and
  give each rank ``slice_params(params, slice(lo, hi))``; results do not depend on the world size.

Every ``apply`` is differentiable with respect to the images (gathers, masks, ``grid_sample``), so
gradients reach synthetic pixels, and works on any device: parameters are moved to ``x.device``
and floating-point parameters are cast to ``x.dtype``.

Specs accepted by :func:`build_augment`: ``none``, ``dsa``, ``rrc_flip``, ``flip``, ``crop_flip``.
:class:`CutMix` is separate because it mixes pairs of images and therefore changes the labels.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from ddkit import determinism
from ddkit.config import Checked
from ddkit.data.base import to_device
from ddkit.errors import ConfigError, DDKitError

log = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]

__all__ = [
    "AUGMENTS",
    "DIGIT_DATASETS",
    "DSA",
    "DSA_OPS",
    "Augment",
    "CropFlip",
    "CutMix",
    "Flip",
    "RandomResizedCropFlip",
    "build_augment",
    "slice_params",
    "warn_digit_flips",
    "warn_digits_once",
]


@runtime_checkable
class Augment(Protocol):
    """A batch augmentation whose randomness lives entirely in explicit parameters."""

    def sample(self, n: int, generator: torch.Generator, image_size: tuple[int, int]) -> Params:
        """Parameters for ``n`` images of size ``(H, W)``: CPU tensors whose first dim is ``n``."""
        ...

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """Augment ``x`` ``[n, C, H, W]`` (float) with ``params``; same shape, dtype and device."""
        ...


def slice_params(params: Params, index: int | slice | torch.Tensor) -> Params:
    """The parameters of a sub-batch: every tensor indexed along its first dim.

    ``index`` is an int (kept as a one-row batch), a slice, or an index/bool tensor. Tensors whose
    first dim is 1 are shared by the whole batch (see the module docstring) and are returned
    unchanged. Do not slice :class:`CutMix` parameters: partners index into the full batch.
    """
    if isinstance(index, int):
        index = slice(index, index + 1 if index != -1 else None)
    out = {}
    for key, value in params.items():
        if value.shape[0] == 1:
            out[key] = value
        elif isinstance(index, torch.Tensor):
            out[key] = value[index.to(value.device)]
        else:
            out[key] = value[index]
    return out


# ------------------------------------------------------------------------------------------------
# random draws: always from the caller's generator (on its device), returned on the CPU


def _uniform(g: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return (torch.rand(shape, generator=g, device=g.device) * (high - low) + low).cpu()


def _randint(g: torch.Generator, low: int, high: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Integers in ``[low, high)``."""
    return torch.randint(low, high, shape, generator=g, device=g.device).cpu()


def _check_sample_args(n: int, image_size: tuple[int, int]) -> tuple[int, int]:
    if n < 0:
        raise DDKitError(f"cannot sample augmentation parameters for {n} images")
    h, w = (int(s) for s in image_size)
    if h < 1 or w < 1:
        raise DDKitError(f"image_size must be positive (H, W), got {tuple(image_size)}")
    return h, w


def _check_images(x: torch.Tensor) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise DDKitError(f"augmentation needs float images [n, C, H, W], got {x.dtype} {tuple(x.shape)}")


def _check_rows(key: str, value: torch.Tensor, n: int) -> None:
    """``value`` (parameter ``key``) has one row, shared by the batch, or one per image of ``n``."""
    if value.shape[0] not in (1, n):
        raise DDKitError(
            f"augmentation parameter {key!r} has {value.shape[0]} rows for a batch of {n} images; "
            "use slice_params to take the rows of this batch"
        )


def _param(params: Params, key: str, x: torch.Tensor) -> torch.Tensor:
    """``params[key]`` on ``x``'s device (floats in ``x.dtype``), broadcast to ``len(x)`` rows."""
    if key not in params:
        raise DDKitError(
            f"augmentation parameters lack {key!r} (have {sorted(params)}); "
            "sample them with the same augmentation that applies them"
        )
    value = params[key]
    n = x.shape[0]
    _check_rows(key, value, n)
    value = to_device(value, x.device)  # parameters are drawn on the host: no wait for the GPU's queue
    if value.is_floating_point():
        value = value.to(x.dtype)
    return value.expand(n, *value.shape[1:])


# ------------------------------------------------------------------------------------------------
# pixel operations: all differentiable with respect to x


def _flip(x: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
    """Mirror (last dim) the images where ``flag`` (bool ``[n]``) is set; exact, no resampling."""
    return torch.where(flag.view(-1, 1, 1, 1), x.flip(3), x)


def _translate(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Integer shift with zero fill: ``out[.., i, j] = x[.., i + dy, j + dx]``; ``shift`` is ``[n, 2]``
    (dy, dx). Same as zero-padding and cropping at offset ``pad + (dy, dx)``."""
    n, c, h, w = x.shape
    rows = torch.arange(h, device=x.device) + shift[:, :1]  # [n, H]
    cols = torch.arange(w, device=x.device) + shift[:, 1:]  # [n, W]
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    rows = rows.clamp(0, h - 1)[:, None, :, None].expand(n, c, h, w)
    cols = cols.clamp(0, w - 1)[:, None, None, :].expand(n, c, h, w)
    out = x.gather(2, rows).gather(3, cols)
    return out * inside[:, None].to(x.dtype)


def _box_mask(h: int, w: int, box: torch.Tensor) -> torch.Tensor:
    """Bool ``[n, 1, H, W]``, true inside the pixel boxes ``[n, 4]`` = (x0, y0, x1, y1), end exclusive."""
    ys = torch.arange(h, device=box.device)
    xs = torch.arange(w, device=box.device)
    in_y = (ys >= box[:, 1:2]) & (ys < box[:, 3:4])  # [n, H]
    in_x = (xs >= box[:, 0:1]) & (xs < box[:, 2:3])  # [n, W]
    return (in_y[:, :, None] & in_x[:, None, :])[:, None]


def _affine(x: torch.Tensor, theta: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Bilinear resampling on the grid ``theta`` ``[n, 2, 3]`` (output -> input, coordinates in
    [-1, 1], ``align_corners=False``, the default of ``affine_grid``/``grid_sample``).

    On CUDA with deterministic algorithms on (:mod:`ddkit.determinism`) the sampling is
    :func:`bilinear_gather`: ``grid_sample``'s CUDA backward adds with atomics in no fixed order."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if determinism.gather_resampling(x):
        return bilinear_gather(x, grid, padding_mode)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``interpolate(x, size, mode="bilinear", align_corners=False)``; on CUDA with deterministic
    algorithms on, the same resampling by :func:`bilinear_gather` (interpolate's CUDA backward adds
    with atomics)."""
    if not determinism.gather_resampling(x):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], device=x.device, dtype=x.dtype).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, [len(x), x.shape[1], *size], align_corners=False)
    return bilinear_gather(x, grid, "border")


def bilinear_gather(x: torch.Tensor, grid: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """``grid_sample(x, grid, "bilinear", padding_mode, align_corners=False)`` built from ``gather``.

    ``padding_mode``: ``zeros`` or ``border``. Equal to ``grid_sample`` up to float rounding; its
    backward is ``gather``'s, which has a deterministic CUDA kernel.
    """
    if padding_mode not in ("zeros", "border"):
        raise ValueError(f"padding_mode must be zeros or border, got {padding_mode!r}")
    n, c, h, w = x.shape
    ho, wo = grid.shape[1:3]
    ix = ((grid[..., 0] + 1) * w - 1) / 2  # unnormalise (align_corners=False)
    iy = ((grid[..., 1] + 1) * h - 1) / 2
    if padding_mode == "border":
        ix, iy = ix.clamp(0, w - 1), iy.clamp(0, h - 1)
    x0, y0 = ix.floor(), iy.floor()
    flat = x.reshape(n, c, h * w)
    out = x.new_zeros(n, c, ho, wo)
    for cx in (x0, x0 + 1):
        for cy in (y0, y0 + 1):
            weight = (1 - (ix - cx).abs()) * (1 - (iy - cy).abs())
            inside = (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1)
            idx = (cy.clamp(0, h - 1) * w + cx.clamp(0, w - 1)).long().reshape(n, 1, ho * wo).expand(n, c, ho * wo)
            out = out + flat.gather(2, idx).reshape(n, c, ho, wo) * (weight * inside)[:, None]
    return out


def _diag_theta(sx: torch.Tensor, sy: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros_like(sx)
    return torch.stack([torch.stack([sx, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)


# ------------------------------------------------------------------------------------------------
# DSA


#: Every DSA operation, in a fixed order: the ``op`` parameter indexes this tuple, so stored
#: parameters stay meaningful whatever strategy sampled them.
DSA_OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")


class _LazyParams:
    """``params`` as :func:`_param` gives them for ``x`` (on its device, in its dtype, ``len(x)``
    rows), each key converted when first read and kept for the other reads."""

    def __init__(self, params: Params, x: torch.Tensor) -> None:
        self.params, self.x, self.done = params, x, {}

    def __contains__(self, key: str) -> bool:
        return key in self.params

    def __iter__(self):
        return iter(self.params)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.done:
            self.done[key] = _param(self.params, key, self.x)
        return self.done[key]


@dataclass(frozen=True)
class DSA(Checked):
    """Differentiable Siamese Augmentation (Zhao & Bilen, ICML 2021).

    Follows ``DiffAugment`` with ``aug_mode='S'`` in the reference code
    (github.com/VICO-UoE/DatasetCondensation, ``utils.py``): for every batch ONE operation is drawn
    uniformly from the ``_``-separated strategy and applied to all its images, each image with its
    own random magnitude. ``color`` is brightness, saturation and contrast in sequence. The choice is
    the ``op`` parameter (an index into :data:`DSA_OPS`, repeated ``n`` times) so it slices and
    replays like the magnitudes; ``apply`` also accepts a different ``op`` per image.

    The reference's ``Siamese`` mode (one draw shared by the whole batch, the same for the real and
    the synthetic batch) is ``sample(1, ...)`` applied to both batches: one-row parameters broadcast.

    Parameters (per image): ``brightness`` offset, ``saturation`` and ``contrast`` factors,
    ``translate`` integer (dy, dx), ``cutout`` centre (cy, cx), ``flip`` flag, ``scale`` (sx, sy)
    grid factors, ``rotate`` angle in radians; only those of the strategy's operations are drawn.

    Differences from the reference: magnitudes come from the caller's generator instead of the
    global RNG, and the crop/cutout offsets of the rows and columns are drawn as one ``[n, 2]``
    tensor; the distributions are the reference's. ``scale`` and ``rotate`` resample with
    ``align_corners=False`` where the reference passes ``True``; for a map without translation both
    take output pixel ``x`` to input ``c + A (x - c)`` about the centre ``c = (size - 1) / 2``, so on
    square images the results equal the reference's up to float rounding (about 1e-5).
    """

    strategy: str = "color_crop_cutout_flip_scale_rotate"
    flip: bool = True
    """False drops ``flip`` from the strategy (digits and text, where mirroring changes the class)."""
    brightness: float = 1.0
    """added offset is U(-0.5, 0.5) * brightness (pixel units of the input, usually normalised)"""
    saturation: float = 2.0
    """factor U(0, saturation) on the deviation from the per-pixel channel mean"""
    contrast: float = 0.5
    """factor U(contrast, contrast + 1) on the deviation from the per-image mean"""
    crop_ratio: float = 0.125
    """integer translation up to round(ratio * size) pixels each way, zero fill"""
    cutout_ratio: float = 0.5
    """side of the zeroed square as a fraction of the image side"""
    flip_prob: float = 0.5
    scale_ratio: float = 1.2
    """grid scale factors U(1/ratio, ratio), independently for x and y"""
    rotate_degrees: float = 15.0
    """rotation U(-deg, +deg)"""

    def __post_init__(self) -> None:
        names = [p for p in self.strategy.split("_") if p]
        unknown = [p for p in names if p not in DSA_OPS]
        if unknown:
            raise ConfigError(
                f"unknown DSA operation(s) {unknown} in strategy {self.strategy!r}; "
                f"valid: {', '.join(DSA_OPS)}"
            )
        ops = tuple(p for p in names if self.flip or p != "flip")
        if not ops:
            raise ConfigError(f"DSA strategy {self.strategy!r} with flip={self.flip} has no operation left")
        if self.scale_ratio < 1:
            raise ConfigError(f"DSA scale_ratio must be >= 1 (factors 1/ratio..ratio), got {self.scale_ratio}")
        if not 0 <= self.flip_prob <= 1:
            raise ConfigError(f"DSA flip_prob must be in [0, 1], got {self.flip_prob}")
        for name in ("crop_ratio", "cutout_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"DSA {name} must be in [0, 1] (a fraction of the image size), got "
                                  f"{getattr(self, name)}")
        for name in ("brightness", "saturation", "contrast", "rotate_degrees"):
            if getattr(self, name) < 0:
                raise ConfigError(f"DSA {name} must be >= 0, got {getattr(self, name)}")
        object.__setattr__(self, "ops", ops)

    ops: tuple[str, ...] = dataclasses.field(init=False, default=(), repr=False)
    """the operations one is chosen from, in strategy order (duplicates raise their odds)"""

    def sample(self, n: int, generator: torch.Generator, image_size: tuple[int, int]) -> Params:
        h, w = _check_sample_args(n, image_size)
        g = generator
        choice = int(_randint(g, 0, len(self.ops), (1,)))
        params: Params = {"op": torch.full((n,), DSA_OPS.index(self.ops[choice]), dtype=torch.long)}
        used = set(self.ops)
        if "color" in used:
            params["brightness"] = _uniform(g, (n,), -0.5, 0.5) * self.brightness
            params["saturation"] = _uniform(g, (n,), 0.0, 1.0) * self.saturation
            params["contrast"] = _uniform(g, (n,), 0.0, 1.0) + self.contrast
        if "crop" in used:
            sy, sx = int(h * self.crop_ratio + 0.5), int(w * self.crop_ratio + 0.5)
            params["translate"] = torch.stack(
                [_randint(g, -sy, sy + 1, (n,)), _randint(g, -sx, sx + 1, (n,))], 1
            )
        if "cutout" in used:
            ch, cw = self._cutout_size(h, w)
            # centres as in the reference: an even-sized square may also hang off the far edge
            params["cutout"] = torch.stack(
                [_randint(g, 0, h + (1 - ch % 2), (n,)), _randint(g, 0, w + (1 - cw % 2), (n,))], 1
            )
        if "flip" in used:
            params["flip"] = _uniform(g, (n,), 0.0, 1.0) < self.flip_prob
        if "scale" in used:
            params["scale"] = _uniform(g, (n, 2), 1.0 / self.scale_ratio, self.scale_ratio)
        if "rotate" in used:
            params["rotate"] = _uniform(g, (n,), -1.0, 1.0) * math.radians(self.rotate_degrees)
        return params

    def _cutout_size(self, h: int, w: int) -> tuple[int, int]:
        return int(h * self.cutout_ratio + 0.5), int(w * self.cutout_ratio + 0.5)

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        _check_images(x)
        for key, value in params.items():  # every parameter's rows checked here, on the host
            _check_rows(key, value, len(x))
        full = _LazyParams(params, x)  # on the device when an operation first reads it: 1-3 of them
        # which operation applies where is decided on the host copy when there is one (sample()
        # draws on the host): asking a GPU tensor would wait for the GPU's queue at every operation
        op = params.get("op")
        op = op.expand(len(x)) if op is not None and op.device.type == "cpu" else _param(params, "op", x)
        out = x
        for k, name in enumerate(DSA_OPS):
            chosen = op == k
            if not bool(chosen.any()):
                continue
            if bool(chosen.all()):
                out = self._apply_op(name, out, full, None)
            else:  # images of one batch with different operations (e.g. concatenated parameters)
                idx = to_device(chosen.nonzero().squeeze(1), x.device)
                out = out.index_copy(0, idx, self._apply_op(name, out[idx], full, idx))
        return out

    def _apply_op(self, name: str, x: torch.Tensor, full: _LazyParams, idx: torch.Tensor | None) -> torch.Tensor:
        """Operation ``name`` on ``x``, the rows ``idx`` of the batch (None: all rows)."""

        def get(key: str) -> torch.Tensor:
            if key not in full:
                raise DDKitError(
                    f"DSA parameters lack {key!r} for operation {name!r} (have {sorted(full)}); "
                    "sample them with a DSA whose strategy includes it"
                )
            value = full.get(key)
            return value if idx is None else value[idx]

        if name == "color":
            x = x + get("brightness").view(-1, 1, 1, 1)
            mean = x.mean(dim=1, keepdim=True)
            x = (x - mean) * get("saturation").view(-1, 1, 1, 1) + mean
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            return (x - mean) * get("contrast").view(-1, 1, 1, 1) + mean
        if name == "crop":
            return _translate(x, get("translate"))
        if name == "cutout":
            h, w = x.shape[-2:]
            ch, cw = self._cutout_size(h, w)
            centre = get("cutout")
            y0, x0 = centre[:, 0] - ch // 2, centre[:, 1] - cw // 2
            box = torch.stack([x0, y0, x0 + cw, y0 + ch], 1)
            return x * (~_box_mask(h, w, box)).to(x.dtype)
        if name == "flip":
            return _flip(x, get("flip"))
        if name == "scale":
            s = get("scale")
            zero = torch.zeros_like(s[:, 0])
            return _affine(x, _diag_theta(s[:, 0], s[:, 1], zero, zero))
        if name == "rotate":
            a = get("rotate")
            cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
            theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
            return _affine(x, theta)
        raise AssertionError(f"unhandled DSA operation {name}")


# ------------------------------------------------------------------------------------------------
# classic training augmentations


@dataclass(frozen=True)
class Flip(Checked):
    """Horizontal flip with probability ``prob``. Parameter: ``flip`` bool ``[n]``."""

    prob: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.prob <= 1:
            raise ConfigError(f"flip prob must be in [0, 1], got {self.prob}")

    def sample(self, n: int, generator: torch.Generator, image_size: tuple[int, int]) -> Params:
        _check_sample_args(n, image_size)
        return {"flip": _uniform(generator, (n,), 0.0, 1.0) < self.prob}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        _check_images(x)
        return _flip(x, _param(params, "flip", x))


@dataclass(frozen=True)
class CropFlip(Checked):
    """Random crop of a zero-padded image + horizontal flip: the classic CIFAR recipe.

    The padding is ``pad`` pixels, or by default 4 for images of 32 pixels and more and 1/8 of the
    smaller side (at least 1) below that. Parameters: ``translate`` integer (dy, dx) in
    ``[-pad, pad]`` (the crop offset minus ``pad``) and ``flip`` bool.
    """

    pad: int | None = None
    flip_prob: float = 0.5

    def __post_init__(self) -> None:
        if self.pad is not None and self.pad < 0:
            raise ConfigError(f"crop_flip pad must be >= 0, got {self.pad}")

    def padding(self, image_size: tuple[int, int]) -> int:
        if self.pad is not None:
            return self.pad
        side = min(image_size)
        return 4 if side >= 32 else max(1, int(side / 8 + 0.5))

    def sample(self, n: int, generator: torch.Generator, image_size: tuple[int, int]) -> Params:
        h, w = _check_sample_args(n, image_size)
        p = self.padding((h, w))
        translate = _randint(generator, -p, p + 1, (n, 2))
        return {"translate": translate, "flip": _uniform(generator, (n,), 0.0, 1.0) < self.flip_prob}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        _check_images(x)
        return _flip(_translate(x, _param(params, "translate", x)), _param(params, "flip", x))


@dataclass(frozen=True)
class RandomResizedCropFlip(Checked):
    """RandomResizedCrop back to the input size + horizontal flip, batched with ``grid_sample``.

    Crop boxes are drawn like ``torchvision.transforms.RandomResizedCrop.get_params`` (area fraction
    U(scale_min, 1), log-uniform aspect ratio in ``ratio``, 10 tries, then a centre crop), per image.
    Parameters: ``box`` ``[n, 4]`` float = normalised (x0, y0, x1, y1), ``flip`` bool.

    Differences from torchvision: bilinear sampling without antialiasing (torchvision antialiases
    when shrinking); edge pixels are repeated outside the image (``padding_mode='border'``, as
    ``interpolate`` does); and the box is sampled from the whole image, not cut out first: near the
    box's edge a bilinear sample mixes in the image pixels just outside the box, where torchvision
    (crop, then resize) repeats the crop's own edge pixels, so the outer 1-2 rows and columns of an
    enlarged crop differ (by up to about 0.35 on uniform noise in [0, 1]); inside them the two agree
    to 1e-5, and a whole-image box gives the image. ``scale_min=0.5`` is EDC's "weak" augmentation.
    """

    scale_min: float = 0.08
    scale_max: float = 1.0
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.scale_min <= self.scale_max <= 1:
            raise ConfigError(
                f"rrc_flip needs 0 < scale_min <= scale_max <= 1, got {self.scale_min}, {self.scale_max}"
            )
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"rrc_flip ratio must be (low, high) with 0 < low <= high, got {self.ratio}")

    def sample(self, n: int, generator: torch.Generator, image_size: tuple[int, int]) -> Params:
        h, w = _check_sample_args(n, image_size)
        g, tries = generator, 10
        area = _uniform(g, (n, tries), self.scale_min, self.scale_max) * (h * w)
        aspect = torch.exp(_uniform(g, (n, tries), math.log(self.ratio[0]), math.log(self.ratio[1])))
        cw = torch.round(torch.sqrt(area * aspect))
        ch = torch.round(torch.sqrt(area / aspect))
        ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
        first = ok.int().argmax(1, keepdim=True)  # first successful try (0 if none)
        cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
        # fallback for images with no successful try: the largest centred box within the ratios
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            fw, fh = w, int(round(w / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            fw, fh = int(round(h * self.ratio[1])), h
        else:
            fw, fh = w, h
        found = ok.any(1)
        cw = torch.where(found, cw, torch.tensor(float(fw)))
        ch = torch.where(found, ch, torch.tensor(float(fh)))
        u = _uniform(g, (n, 2), 0.0, 1.0)
        top = torch.where(found, torch.floor(u[:, 0] * (h - ch + 1)), torch.tensor(float((h - fh) // 2)))
        left = torch.where(found, torch.floor(u[:, 1] * (w - cw + 1)), torch.tensor(float((w - fw) // 2)))
        box = torch.stack([left / w, top / h, (left + cw) / w, (top + ch) / h], 1)
        return {"box": box.float(), "flip": _uniform(g, (n,), 0.0, 1.0) < self.flip_prob}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        _check_images(x)
        box = _param(params, "box", x)
        # output coordinate u in [-1, 1] samples input (x0 + x1 - 1) + (x1 - x0) * u: the box's span
        theta = _diag_theta(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1],
                            box[:, 0] + box[:, 2] - 1, box[:, 1] + box[:, 3] - 1)
        return _flip(_affine(x, theta, padding_mode="border"), _param(params, "flip", x))


# ------------------------------------------------------------------------------------------------
# CutMix


def check_cutmix(prob: float, alpha: float) -> None:
    """Refuse CutMix settings no run can use: a probability outside [0, 1] or an alpha that is not a
    finite number > 0 (the one check of training configs, the bench's relabel section and ``relabel``)."""
    if not 0 <= prob <= 1:
        raise ConfigError(f"cutmix_prob must be in [0, 1] (0 disables CutMix), got {prob}")
    if not 0 < alpha < float("inf"):
        raise ConfigError("cutmix_alpha must be a finite number > 0 (CutMix's Beta(alpha, alpha); 1 is "
                          f"usual), got {alpha}")


@dataclass(frozen=True)
class CutMix(Checked):
    """CutMix (Yun et al., ICCV 2019): paste a box from a partner image of the same batch.

    Per image: with probability ``prob`` a box of area fraction ``1 - lam0``, ``lam0 ~ Beta(alpha,
    alpha)``, centred at a uniform pixel and clipped to the image (as in the authors' code), is
    replaced by the same box of its partner; partners are a random permutation of the batch. The
    reference draws one box and one decision per batch; here each image has its own, which keeps
    the parameters per-image like every other augmentation.

    Parameters: ``perm`` long ``[n]`` partner index *into the batch passed to apply* (the image's
    own index when not mixed), ``box`` long ``[n, 4]`` pixel (x0, y0, x1, y1), end exclusive,
    ``lam`` float ``[n]`` fraction of the image's own pixels kept after clipping, ``apply`` bool.
    Because partners index the whole batch, apply CutMix to the full (global) batch before taking a
    rank's slice; ``slice_params`` does not make sense for these parameters.

    ``apply`` returns ``(mixed, perm, lam)``; the caller mixes targets as
    ``lam * t + (1 - lam) * t[perm]`` (weights sum to 1).
    """

    alpha: float = 1.0
    prob: float = 1.0

    def __post_init__(self) -> None:
        if self.alpha <= 0:
            raise ConfigError(f"cutmix alpha must be > 0, got {self.alpha}")
        if not 0 <= self.prob <= 1:
            raise ConfigError(f"cutmix prob must be in [0, 1], got {self.prob}")

    def sample(self, n: int, generator: torch.Generator, image_size: tuple[int, int]) -> Params:
        h, w = _check_sample_args(n, image_size)
        g = generator
        mixed = _uniform(g, (n,), 0.0, 1.0) < self.prob
        lam0 = self._beta(g, n)
        cut = torch.sqrt(1.0 - lam0)
        cut_h, cut_w = (h * cut).long(), (w * cut).long()
        cy, cx = _randint(g, 0, h, (n,)), _randint(g, 0, w, (n,))
        box = torch.stack([(cx - cut_w // 2).clamp(0, w), (cy - cut_h // 2).clamp(0, h),
                           (cx + cut_w // 2).clamp(0, w), (cy + cut_h // 2).clamp(0, h)], 1)
        box = torch.where(mixed[:, None], box, torch.zeros_like(box))
        perm = torch.randperm(n, generator=g, device=g.device).cpu()
        perm = torch.where(mixed, perm, torch.arange(n))
        area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
        lam = 1.0 - area.float() / (h * w)
        return {"perm": perm, "box": box, "lam": lam, "apply": mixed}

    def _beta(self, g: torch.Generator, n: int) -> torch.Tensor:
        if self.alpha == 1.0:  # Beta(1, 1) is uniform: no detour needed
            return _uniform(g, (n,), 0.0, 1.0)
        # torch's gamma sampler takes no generator: seed the global CPU one from ours, for this draw alone
        seed = int(_randint(g, 0, 2**62, (1,)))
        with determinism.seeded_cpu_rng(seed):
            return torch.distributions.Beta(self.alpha, self.alpha).sample((n,))

    def apply(self, x: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _check_images(x)
        n, _, h, w = x.shape
        for key in ("perm", "box", "lam"):
            if key not in params or params[key].shape[0] != n:
                raise DDKitError(
                    f"cutmix parameter {key!r} must have one row per image of the batch ({n}); "
                    "sample them for the full batch that apply receives"
                )
        perm = to_device(params["perm"], x.device)
        mask = _box_mask(h, w, to_device(params["box"], x.device))
        mixed = torch.where(mask, x[perm], x)
        return mixed, perm, to_device(params["lam"], x.device)


# ------------------------------------------------------------------------------------------------
# factory


#: spec -> augmentation class (None: no augmentation)
AUGMENTS: dict[str, type | None] = {
    "none": None,
    "dsa": DSA,
    "rrc_flip": RandomResizedCropFlip,
    "flip": Flip,
    "crop_flip": CropFlip,
}


def build_augment(spec: str, **kw) -> Augment | None:
    """The augmentation named ``spec`` with options ``kw`` (fields of its class); None for 'none'.

    ``dsa``: ``strategy`` ('color_crop_cutout_flip_scale_rotate'), ``flip`` (False for digits) and
    the magnitudes of :class:`DSA`; ``rrc_flip``: ``scale_min`` (0.08; EDC uses 0.5);
    ``crop_flip``: ``pad``; ``flip``: ``prob``.
    """
    if spec not in AUGMENTS:
        raise DDKitError(f"unknown augmentation {spec!r}; valid: {', '.join(AUGMENTS)}")
    cls = AUGMENTS[spec]
    valid = [f.name for f in dataclasses.fields(cls) if f.init] if cls is not None else []
    unknown = sorted(set(kw) - set(valid))
    if unknown:
        raise ConfigError(
            f"augmentation {spec!r} has no option(s) {unknown}; valid: {', '.join(valid) or 'none'}"
        )
    if cls is None:
        return None
    from ddkit.config import from_dict

    return from_dict(cls, kw, "augment_options")  # typed: a string for a number is a config error, not a TypeError


#: datasets of digits, for which DSA's README drops flips (strategy ``color_crop_cutout_scale_rotate`` for MNIST
#: and SVHN: a mirrored digit is another symbol or none)
DIGIT_DATASETS = frozenset({"mnist"})
_warned_digits: set[tuple[str, str, str]] = set()


def warn_digits_once(logger: logging.Logger, message: str, dataset: str, options_key: str) -> None:
    """Log ``message % (dataset, options_key)`` as a warning with ``logger`` where ``dataset`` is one of
    :data:`DIGIT_DATASETS`, once per process for each message, dataset and ``options_key`` (the config key the
    message names)."""
    if dataset.lower() not in DIGIT_DATASETS or (message, dataset, options_key) in _warned_digits:
        return
    _warned_digits.add((message, dataset, options_key))
    logger.warning(message, dataset, options_key)


def warn_digit_flips(augment: Augment | None, dataset: str, options_key: str) -> None:
    """Log a warning, once per process for each dataset and ``options_key``, when ``augment`` is a :class:`DSA`
    that flips and ``dataset`` (a :class:`~ddkit.data.base.DataBundle`'s name) is one of :data:`DIGIT_DATASETS`.
    ``options_key``: the config key of the augmentation's options, which the message names
    (``{options_key}: {flip: false}`` drops ``flip`` from DSA's operations). Nothing is changed: the
    augmentation keeps its flips, as the config asked."""
    if isinstance(augment, DSA) and "flip" in augment.ops:
        warn_digits_once(log, "DSA augmentation flips the images of dataset %r, a digit dataset, where DSA's authors "
                         "drop flips (a mirrored digit is another symbol); set %s: {flip: false} to turn them off",
                         dataset, options_key)


def typed_augment(spec: str, options: dict) -> tuple[Augment | None, dict]:
    """The augmentation ``spec`` built with ``options`` (:func:`build_augment`), and ``options`` with each
    number as its field types it (``scale_min: 1`` as ``1.0``, numpy's as Python's), so that options written
    either way record and hash alike; options written as they resolve are returned unchanged."""
    from ddkit.config import to_dict, typed_numbers

    augment = build_augment(spec, **options)
    return augment, dict(options) if augment is None else typed_numbers(options, to_dict(augment))


def typed_augment_options(spec: str, options: dict) -> dict:
    """``options`` of the augmentation ``spec``, checked and typed as :func:`typed_augment` types them."""
    return typed_augment(spec, options)[1]
