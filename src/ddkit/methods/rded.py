"""RDED: realistic and diverse patches of real images, selected by a teacher and stitched."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ddkit import distributed as ddist
from ddkit.artifacts import check_room
from ddkit.config import Checked, field
from ddkit.data.augment import RandomResizedCropFlip
from ddkit.data.base import DataBundle
from ddkit.errors import ConfigError, DataError, DDKitError
from ddkit.methods import common
from ddkit.methods.base import METHODS, FitContext, Method, SyntheticSet, check_ipc
from ddkit.training import normalizer, to_float

log = logging.getLogger(__name__)

#: images at least this many pixels on their smaller side are stitched from 2x2 patches by default
AUTO_FACTOR2_MIN_SIDE = 128


@dataclass
class RDEDConfig(Checked):
    """RDED settings; defaults are the reference repository's scripts (LINs-lab/RDED, ``scripts/``)."""

    mipc: int = field(300,
                      help="real images drawn per class as crop sources (reference: 300); capped at the class size")
    num_crop: int = field(5, help="random-resized crops scored per real image; the best one survives (reference: 5)")
    factor: int | None = field(
        None, help="stitch factor x factor patches per image; None: 2 for images >= 128 px, else 1 (reference scripts)"
    )
    scale_min: float = field(0.08,
                             help="RandomResizedCrop smallest area fraction of a candidate crop (torchvision default)")
    scale_max: float = field(1.0, help="RandomResizedCrop largest area fraction of a candidate crop")
    batch_size: int = field(256, help="teacher forward batch size while scoring (does not change the result)")
    soft_labels: bool = field(True, help="store the teacher's logits of each stitched image as static soft labels")

    def __post_init__(self) -> None:
        if self.mipc < 1 or self.num_crop < 1:
            raise ConfigError(f"rded mipc and num_crop must be >= 1, got {self.mipc}, {self.num_crop}")
        if self.factor is not None and self.factor < 1:
            raise ConfigError(f"rded factor must be >= 1 (or null for auto), got {self.factor}")
        if not 0 < self.scale_min <= self.scale_max <= 1:
            raise ConfigError(f"rded needs 0 < scale_min <= scale_max <= 1, got {self.scale_min}, {self.scale_max}")
        if self.batch_size < 1:
            raise ConfigError(f"rded batch_size must be >= 1, got {self.batch_size}")


def resolve_factor(factor: int | None, image_size: tuple[int, int], key: str = "distill.options.factor") -> int:
    """The stitch factor: ``factor`` or, when None, 2 for images of >= 128 px and 1 below (``key``: the
    config key of ``factor``, which an error names)."""
    if factor is not None:
        if factor > min(image_size):
            raise ConfigError(f"rded factor {factor} is larger than the image side {min(image_size)}; lower {key}")
        return factor
    return 2 if min(image_size) >= AUTO_FACTOR2_MIN_SIDE else 1


def cell_sizes(size: int, factor: int) -> list[int]:
    """Side lengths of the ``factor`` cells along one axis; the first ``size % factor`` get one more pixel."""
    s, rem = divmod(size, factor)
    return [s + 1 if i < rem else s for i in range(factor)]


def class_generator(seed: int, c: int) -> torch.Generator:
    """Per-class RNG derived from (seed, class) so class shards under torchrun draw what one process draws."""
    return torch.Generator().manual_seed((seed * 1_000_003 + c * 7_919 + 17) % (2**63 - 1))


def crop_patches(images: torch.Tensor, boxes: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """Crop ``images`` [m, C, H, W] (float) to the normalised pixel ``boxes`` [k*m, 4] = (x0, y0, x1, y1)
    and resize each crop to ``patch`` (bilinear with antialiasing, like torchvision's
    ``RandomResizedCrop(antialias=True)`` in the reference). Box ``j`` crops image ``j % m``: several
    crops of every image without a repeated copy of the images. Crops of the same size are resized
    in one call (a crop's result does not depend on the others in the batch), into one output tensor."""
    h, w = images.shape[-2:]
    m = len(images)
    assert len(boxes) == 0 or (m > 0 and len(boxes) % m == 0), "crop_patches needs a multiple of len(images) boxes"
    out = images.new_empty((len(boxes), images.shape[1], *patch))
    starts, by_size = [], {}  # (x0, y0) of each crop; the crops of each (height, width)
    for j, box in enumerate(boxes.tolist()):
        x0, y0 = int(round(box[0] * w)), int(round(box[1] * h))
        x1, y1 = int(round(box[2] * w)), int(round(box[3] * h))
        starts.append((x0, y0))
        by_size.setdefault((max(y1, y0 + 1) - y0, max(x1, x0 + 1) - x0), []).append(j)
    for (ch, cw), rows in by_size.items():
        crops = torch.stack([images[j % m, :, starts[j][1] : starts[j][1] + ch, starts[j][0] : starts[j][0] + cw]
                             for j in rows])
        out[rows] = F.interpolate(crops, size=patch, mode="bilinear", align_corners=False, antialias=True)
    return out


def pad_to(x: torch.Tensor, size: tuple[int, int], value: float = 0.0) -> torch.Tensor:
    """Centre ``x`` [n, C, h, w] on a canvas of ``size`` filled with ``value``."""
    n, c, h, w = x.shape
    top, left = (size[0] - h) // 2, (size[1] - w) // 2
    canvas = x.new_full((n, c, *size), value)
    canvas[:, :, top : top + h, left : left + w] = x
    return canvas


def stitch(patches: torch.Tensor, n: int, factor: int, size: tuple[int, int]) -> torch.Tensor:
    """``n`` images of ``size`` from ``n * factor**2`` patches: image ``t`` gets patch ``k*n + t`` in
    cell ``k = row*factor + col`` (row-major), resized to the cell when the size does not divide
    evenly (as the reference's ``mix_images``)."""
    assert len(patches) == n * factor * factor, "stitch needs n * factor**2 patches"
    out = patches.new_zeros((n, patches.shape[1], *size))
    hs, ws = cell_sizes(size[0], factor), cell_sizes(size[1], factor)
    k, y = 0, 0
    for ch in hs:
        x = 0
        for cw in ws:
            part = patches[k * n : (k + 1) * n]
            if tuple(part.shape[-2:]) != (ch, cw):
                part = F.interpolate(part, size=(ch, cw), mode="bilinear", align_corners=False, antialias=True)
            out[:, :, y : y + ch, x : x + cw] = part
            x += cw
            k += 1
        y += ch
    return out


@torch.no_grad()
def _forward(model, x: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


def check_sources(cfg: RDEDConfig, real: DataBundle, ipc: int,
                  options_key: str = "distill.options") -> tuple[int, int, tuple[int, int]]:
    """The stitch factor, the source images each class needs (``ipc * factor**2``) and the patch size of RDED on
    ``real`` at ``ipc``; refused in one line naming the setting to change (``options_key``: the config key of the
    method's options) where a class has too few images, ``mipc`` draws too few, or a class's crops would not fit
    in memory."""
    size = tuple(real.image_shape[-2:])
    factor = resolve_factor(cfg.factor, size, f"{options_key}.factor")
    need = ipc * factor * factor
    patch = (size[0] // factor, size[1] // factor)
    # what lowers the need: the images per class, and the patches per image while there are several
    lower = f"--ipc or {options_key}.factor" if factor > 1 else "--ipc"
    counts = real.train.class_counts(real.num_classes)
    if int(counts.min()) < need:
        c = int(counts.argmin())
        raise DataError(
            f"rded needs {need} real images per class (ipc {ipc} x factor {factor}^2) but class "
            f"{real.classes[c]!r} has {int(counts.min())}; lower {lower}"
        )
    # checked after the class sizes: raising mipc cannot help a class too small
    if cfg.mipc < need:  # the pool each class draws its crops' sources from holds min(mipc, class size) images
        raise ConfigError(
            f"rded needs {need} source images per class (ipc {ipc} x factor {factor}^2) but mipc is {cfg.mipc}; "
            f"raise {options_key}.mipc to at least {need}, or lower {lower}"
        )
    # a class's crops are scored from one float32 tensor: refuse a num_crop no memory holds before any class
    sources = min(cfg.mipc, int(counts.max()))
    check_room(cfg.num_crop * sources * real.image_shape[0] * patch[0] * patch[1] * 4,
               f"rded's {cfg.num_crop} crops of each of {sources} source images per class",
               f"lower {options_key}.num_crop")
    return factor, need, patch


@torch.no_grad()
def select_patches(
    model, images: torch.Tensor, label: int, num_crop: int, n_keep: int, patch: tuple[int, int],
    image_size: tuple[int, int], mean, std, gen: torch.Generator, scale: tuple[float, float],
    batch_size: int, device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RDED's selector: ``num_crop`` square random-resized crops per real image (pixel space, float),
    each scored by the teacher's cross-entropy w.r.t. ``label`` with the patch centred on a canvas
    of the dataset mean (zero after normalisation, as the reference pads normalised tensors with
    zeros); the best crop per image is kept, then the ``n_keep`` best images' crops, best first.

    Returns (patches [n_keep, C, ph, pw] in pixel space, their cross-entropies [n_keep]).
    """
    m = len(images)
    sampler = RandomResizedCropFlip(scale_min=scale[0], scale_max=scale[1], ratio=(1.0, 1.0), flip_prob=0.0)
    # crop-major like the reference: row j*m + i is crop j of image i
    boxes = torch.cat([sampler.sample(m, gen, image_size)["box"] for _ in range(num_crop)])
    crops = crop_patches(images, boxes, patch)
    norm = normalizer(mean, std, "cpu")
    # padded to the image size one forward batch at a time, not all crops at once
    logits = torch.cat([_forward(model, pad_to(norm(crops[i : i + batch_size]), image_size, 0.0), batch_size, device)
                        for i in range(0, len(crops), batch_size)])
    ce = F.cross_entropy(logits, torch.full((len(crops),), label, dtype=torch.long), reduction="none").view(num_crop, m)
    best = ce.argmin(0)  # first crop on ties
    ce_best = ce[best, torch.arange(m)]
    order = torch.argsort(ce_best, stable=True)[:n_keep]
    chosen = crops.view(num_crop, m, *crops.shape[1:])[best[order], order]
    return chosen, ce_best[order]


@METHODS.register("rded")
class RDED(Method):
    """RDED (Sun et al., "On the Diversity and Realism of Distilled Dataset: An Efficient Dataset
    Distillation Paradigm", CVPR 2024; code: github.com/LINs-lab/RDED). No optimisation.

    Per class: draw ``mipc`` real images, take ``num_crop`` square random-resized crops of each at
    the patch size (image size // ``factor``), score every crop by the teacher's cross-entropy with
    the class (realism; lower is better), keep the best crop per image, then the ``ipc * factor**2``
    best across images (diversity comes from one patch per source image), and stitch ``factor x
    factor`` of them into each synthetic image. With ``soft_labels`` the teacher's logits of each
    stitched image are stored as static soft labels.

    Differences from the reference:

    - RDED relabels every *region* of a stitched image on every training epoch (FKD-style). The
      static ``soft_labels`` here are only the whole-image logits; use :func:`ddkit.labels.relabel`
      to store per-epoch, per-crop teacher logits that approximate the per-region labels.
    - ``factor`` defaults to 1 below 128 px: the reference scripts use ``--factor 1`` for CIFAR-10/100
      (32 px) and Tiny-ImageNet (64 px) and ``--factor 2`` for ImageNet subsets (128/224 px). For
      Fashion-MNIST (28 px) we therefore use 1: a 14 px patch of a garment rarely keeps its class.
    - Crops are drawn with ddkit's seeded RandomResizedCrop (square, scale 0.08-1) and resized with
      antialiased bilinear interpolation; real images are drawn per class with an RNG derived from
      (seed, class), so results do not depend on the number of ranks.
    - The reference errors if the class has fewer than ``mipc`` images only implicitly; we cap
      ``mipc`` at the class size and fail clearly if ``mipc`` or the class holds fewer than
      ``ipc * factor**2`` images.
    - Evaluation is not part of the method. RDED's own (``validation/main.py``) queries the teacher on
      every batch of views cropped at scale 1/factor-1 (the whole image at factor 1) + flip, CutMix, KL at
      T 20, AdamW 1e-3 with a cosine that ends at half the lr, batch 10/50/100 at IPC 1/10/50 (10 classes);
      ``soft-kl`` differs (crops 0.08-1, no CutMix, T 4, cosine to 0, batch 64). RDED's ``--mix-type
      mixup`` (T 4) is not reachable: ddkit has no MixUp.
      ``configs/fashion-mnist/rded/ipc10-fkd.yaml`` follows RDED where ddkit can, and names what differs.
    """

    Config = RDEDConfig
    needs_teacher = True
    smoke_options = {"mipc": 12, "num_crop": 3, "factor": 2, "batch_size": 64}

    @classmethod
    def stores_soft_labels(cls, cfg) -> bool:
        return cfg.soft_labels  # the teacher's logits of each stitched image, as distill.soft_labels would make them

    @classmethod
    def check_data(cls, cfg: RDEDConfig, real: DataBundle, ipc: int, options_key: str = "distill.options") -> None:
        """What :meth:`fit` refuses of ``real`` at ``ipc`` (:func:`check_sources`), for a run or bench to check
        before any stage: the teacher is trained first there."""
        check_sources(cfg, real, ipc, options_key)

    def fit(self, real: DataBundle, teachers: list, ctx: FitContext) -> RDED:
        """Under torchrun each rank makes its classes (:func:`common.my_classes`) and sends them to rank 0,
        which alone holds, labels and returns the set (the other ranks' ``synthetic_`` is None)."""
        cfg: RDEDConfig = self.cfg
        done, ipc, model, factor, patch, (mean, std) = self._classes(real, teachers, ctx)
        k, shape = real.num_classes, tuple(real.image_shape)
        images = torch.empty(k * ipc, *shape) if ddist.current().is_main else None

        def place(c: int, part: torch.Tensor) -> None:
            images[c * ipc : (c + 1) * ipc] = part

        common.gather_units(done, [(ipc, *shape)] * k, place)
        if images is None:
            self.synthetic_ = None
            return self
        labels = torch.arange(real.num_classes).repeat_interleave(ipc)
        soft = None
        if cfg.soft_labels:
            norm = normalizer(mean, std, "cpu")  # one forward batch at a time, not a normalised copy of the set
            # the images as the set stores them (8-bit with distill.image_dtype uint8): the labels describe those
            soft = torch.cat([_forward(model, norm(to_float(ctx.as_stored(images[i : i + cfg.batch_size]), "cpu")),
                                       cfg.batch_size, ctx.device) for i in range(0, len(images), cfg.batch_size)])
        self.synthetic_ = SyntheticSet(
            images, labels, soft,
            meta={"factor": factor, "patch_size": list(patch), "soft_labels": "teacher logits of the stitched image"},
        )
        return self

    def initial_rows(self, real: DataBundle, teachers: list, ctx: FitContext, rows: torch.Tensor) -> torch.Tensor:
        """The images at ``rows`` (positions in the class-major set) of the set :meth:`fit` makes, unlabelled:
        another method's initialisation (``init: rded``), of which each rank of a torchrun job holds only
        its own rows. Each rank makes its classes and hands the rows of them to the ranks that need them."""
        done, ipc, *_ = self._classes(real, teachers, ctx)
        return common.exchange_rows(done, ipc, rows, tuple(real.image_shape))

    def _classes(self, real: DataBundle, teachers: list,
                 ctx: FitContext) -> tuple[dict[int, torch.Tensor], int, Any, int, tuple[int, int], tuple]:
        """The stitched images of each class of this rank (class -> [ipc, C, H, W], pixel space, float32),
        ipc, the teacher's model, the stitch factor, the patch size and the teacher's (mean, std)."""
        cfg: RDEDConfig = self.cfg
        if not teachers:
            raise DDKitError("method 'rded' needs a teacher to score patches; pass --teacher DIR (see `ddkit teacher`)")
        teacher = teachers[0]
        if hasattr(teacher, "check_compatible"):
            teacher.check_compatible(real)
        common.check_float32_teacher(getattr(teacher, "model", teacher), "rded")
        model = getattr(teacher, "model", teacher).to(ctx.device).eval()
        ipc = check_ipc(real, ctx.ipc)
        size = tuple(real.image_shape[-2:])
        factor, need, patch = check_sources(cfg, real, ipc, ctx.options_key)
        mean, std = getattr(teacher, "mean", real.mean), getattr(teacher, "std", real.std)

        mine = common.my_classes(real.num_classes)
        # the teacher scores the patches: a rerun with another teacher must not resume this one's classes
        key = (f"rded|seed={ctx.seed}|ipc={ipc}|factor={factor}|{cfg}|{real.fingerprint}"
               f"|teacher={getattr(teacher, 'fingerprint', None)}")
        done: dict[int, torch.Tensor] = {}
        by_class = real.train.class_indices(real.num_classes)
        for step, c in enumerate(mine, start=1):
            # one checkpoint file per class, written once when the class is done (by the rank that owns it)
            ckpt = common.Checkpoint(ctx, every=1, tag=f"rded-class{c}", per_rank=True)
            state = ckpt.load()
            if state is not None and state.get("key") == key:
                done[c] = state["images"]
                log.info("rded: resumed class %d from %s", c, ckpt.path)
            else:
                gen = class_generator(ctx.seed, c)
                pool = by_class[c]
                pool = pool[torch.randperm(len(pool), generator=gen)[: min(cfg.mipc, len(pool))]]
                src = real.train.subset(pool).float_images()
                patches, _ = select_patches(
                    model, src, c, cfg.num_crop, need, patch, size, mean, std, gen,
                    (cfg.scale_min, cfg.scale_max), cfg.batch_size, ctx.device,
                )
                done[c] = stitch(patches, ipc, factor, size).clamp_(0.0, 1.0)
                if ckpt.due(step, len(mine)):
                    ckpt.save({"key": key, "images": done[c]})
            common.report(ctx, step, len(mine), **{"class": float(c)})
        return done, ipc, model, factor, patch, (mean, std)
