"""Statistics machinery of the decoupled "squeeze-recover-relabel" family (SRe2L, CDA, G-VBSM, EDC).

Three pieces, shared by every recover-style method:

1. **Hooks** (:class:`FeatureHooks`): forward hooks that capture, per layer, the *input* of each
   BatchNorm layer (key ``bn:<module name>``; SRe2L matches its per-channel mean/variance to the
   layer's running statistics) and the *output* of each convolution (key ``conv:<module name>``;
   G-VBSM's "convolution statistics", which work for any teacher, BatchNorm or not) or, with
   ``conv_features: input``, its *input* (key ``convin:<module name>``), as G-VBSM's and EDC's code
   hook them. On a BatchNorm teacher a conv output is the next BN layer's input, so ``conv`` keys
   match the BN terms' tensors again (against real-data instead of running statistics), while
   ``convin`` keys add the post-activation features and, at the first convolution, the images.
   Each teacher is hooked at the layers of the kinds asked for that it has, as the G-VBSM/EDC
   code's per-module-type hooks are: under ``stats: bn+conv`` a teacher without BatchNorm (their
   pools' instance-norm ConvNets) matches its convolution statistics alone (:func:`_teacher_layers`).
   Convolution features can also be matched per spatial patch (:func:`patch_moments`, G-VBSM's
   patch statistics).
2. **Real-data statistics** (:func:`real_statistics`): global and per-class per-channel mean and
   variance at every hooked layer, plus the teacher's mean logits per class, computed once per
   (teacher, dataset) over the un-augmented training set (G-VBSM's and EDC's code pass the images
   through their training crop + flip first), with progress reported through a callback, and cached
   as an artifact (``statistics.safetensors`` + ``manifest.json``, written atomically, loaded without
   unpickling) under ``<cache>/statistics/<key>``, the key hashing the
   schema, the teacher fingerprint, the data fingerprint, the normalisation, the layer list and the
   patch size.
3. **The loss** (:func:`statistics_loss`): sum over layers of
   ``||mu_syn - mu_real||_2 + ||var_syn - var_real||_2`` (SRe2L's R_BN), with EDC's soft
   category-aware matching ``alpha * global + (1 - alpha) * class-conditional`` (alpha = 1 is
   plain global matching and never reads class statistics), G-VBSM's moving average of the
   synthetic statistics (:class:`StatsEMA`), patch statistics and random dropping of
   convolution terms.

:func:`recover` is the optimisation loop every method here is a preset of (see ``sre2l.py`` and
``edc.py``): images optimised by Adam under a cosine schedule against teacher cross-entropy plus
the statistics loss, optional flatness regularisation, logit matching, G-VBSM's data densification
and the FYI flip plug-in, resumable from checkpoints and sharded over ranks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ddkit import distributed as ddist
from ddkit.artifacts import (
    atomic_dir,
    base_manifest,
    build_lock,
    load_tensors,
    read_manifest,
    record_shared_cost,
    recorded_path,
    save_tensors,
    write_json,
)
from ddkit.artifacts import (
    cache_dir as cache_dir_of,
)
from ddkit.cache import STATISTICS_SCHEMA, STATISTICS_TENSORS
from ddkit.config import Checked, config_hash, field, field_default, from_dict, short_repr, to_dict
from ddkit.data.augment import build_augment, resize_bilinear
from ddkit.data.base import DataBundle
from ddkit.determinism import stage_modes
from ddkit.errors import ConfigError, DDKitError
from ddkit.methods import common
from ddkit.methods.base import METHODS, FitContext, Method, SyntheticSet, check_ipc
from ddkit.methods.fyi import flip_pair, warn_digit_mirrors
from ddkit.training import sum_dtype

log = logging.getLogger(__name__)

KIND = "statistics"
SCHEMA = STATISTICS_SCHEMA  # in the cache key and the manifest (ddkit.cache holds it: bump it there)
TENSORS = STATISTICS_TENSORS
LOGITS = "logits"

Progress = Callable[[int, int, dict], None]

# ------------------------------------------------------------------------------------------------
# hooks


def statistic_layers(model: nn.Module, kinds: tuple[str, ...] = ("bn", "conv")) -> list[str]:
    """Keys ``bn:<name>`` (BatchNorm inputs), ``conv:<name>`` (conv outputs) and ``convin:<name>``
    (conv inputs) of the ``kinds`` asked for, in module order."""
    keys = []
    for name, mod in model.named_modules():
        if "bn" in kinds and isinstance(mod, nn.modules.batchnorm._BatchNorm):
            keys.append(f"bn:{name}")
        elif isinstance(mod, nn.modules.conv._ConvNd):
            keys += [f"{kind}:{name}" for kind in ("conv", "convin") if kind in kinds]
    return keys


CONV_KIND = {"output": "conv", "input": "convin"}  # conv_features -> the key kind of its statistics
# classes per optimised batch when class_batch is None: the --batch-size of SRe2L's ImageNet-1K and Tiny-ImageNet
# recover scripts; at most 100 classes (CIFAR-100 and smaller) stay in one batch
CLASS_BATCH = 100


def is_conv_key(key: str) -> bool:
    """Whether ``key`` names convolution features (matched against real-data statistics)."""
    return key.split(":", 1)[0] in ("conv", "convin")


class FeatureHooks:
    """Context manager: while active, ``features[key]`` holds the last tensor seen at each layer.

    BatchNorm (``bn:``) and ``convin:`` keys capture the layer's input, ``conv:`` keys its output. The
    tensors keep their graph, so losses on them reach the input images.
    """

    def __init__(self, model: nn.Module, keys: list[str]) -> None:
        self.model, self.keys = model, list(keys)
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> FeatureHooks:
        modules = dict(self.model.named_modules())
        for key in self.keys:
            kind, name = key.split(":", 1)
            if name not in modules:
                raise DDKitError(f"layer {name!r} not found in the teacher; statistics do not fit this model")
            if kind in ("bn", "convin"):
                hook = (lambda m, inp, out, key=key: self.features.__setitem__(key, inp[0]))
            else:
                hook = (lambda m, inp, out, key=key: self.features.__setitem__(key, out))
            self._handles.append(modules[name].register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x`` ``[N, C, ...]`` over every other dim."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=False)


def class_moments(x: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class per-channel mean and biased variance ``[len(classes), C]`` of ``x`` ``[N, C, ...]``."""
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    m1, v1 = flat.mean(2), flat.var(2, unbiased=False)  # per image, over positions (same pixel count each)
    onehot = (labels[None, :] == classes[:, None]).to(x.dtype)  # [k, N]
    count = onehot.sum(1, keepdim=True).clamp_min(1)
    mean = onehot @ m1 / count
    # within-image variance plus the spread of image means about their class mean: no E[x^2] - E[x]^2,
    # which cancels catastrophically when |mean| >> std (images of classes not asked for weigh 0)
    var = onehot @ (v1 + (m1 - onehot.t() @ mean) ** 2) / count
    return mean, var


def _whole_patches(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``x`` ``[N, C, H, W]`` resized (bilinear) up to the next multiple of ``patch_size`` in H and W,
    as G-VBSM's code does, so every feature map of any size gives whole patches."""
    h, w = x.shape[-2:]
    hh, ww = -(-h // patch_size) * patch_size, -(-w // patch_size) * patch_size
    return x if (hh, ww) == (h, w) else resize_bilinear(x, (hh, ww))


def patch_grid(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``x`` ``[N, C, H, W]`` cut into ``patch_size`` x ``patch_size`` pixel patches: ``[N, P, C * p * p]``
    (after :func:`_whole_patches`)."""
    x = _whole_patches(x, patch_size)
    n, c, hh, ww = x.shape
    p = patch_size
    x = x.reshape(n, c, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5)  # [N, U, V, C, p, p]
    return x.reshape(n, (hh // p) * (ww // p), c * p * p)


def patch_moments(x: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per patch position ``[P]``, over batch, channels and patch pixels."""
    g = patch_grid(x, patch_size)
    g = g.transpose(0, 1).reshape(g.shape[1], -1)
    return g.mean(1), g.var(1, unbiased=False)


# ------------------------------------------------------------------------------------------------
# real-data statistics and their cache


def sums_device(device: torch.device) -> torch.device:
    """Where the real-data pass keeps its float64 sums across images: on ``device`` (no host sync per
    batch), or on the CPU for a device without float64 (Apple MPS), where float32 sums over a whole
    dataset would lose the variance (E[x^2] - E[x]^2 of nearly equal numbers)."""
    return device if sum_dtype(device) == torch.float64 else torch.device("cpu")


def _image_sums(f: torch.Tensor, acc: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image per-channel sums of ``x`` and ``x^2`` of ``f`` ``[N, C, ...]``: float64 ``[N, C]`` on
    ``acc`` (the device of the sums across images; see :func:`compute_real_statistics`).

    The sum over one image's pixels runs in ``f``'s dtype (float32: relative error ~1e-7, well
    below what float32 statistics hold); only the sums across images need float64. Casting whole
    feature maps to float64 first made the real-data pass 5x slower on the CPU.
    """
    flat = f.reshape(f.shape[0], f.shape[1], -1)
    return flat.sum(2).to(acc).double(), (flat * flat).sum(2).to(acc).double()


def _patch_sums(f: torch.Tensor, patch_size: int, acc: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-image sums of ``x`` and ``x^2`` per patch position, float64 ``[N, P]``, of ``f``
    ``[N, C, H, W]`` over channels and patch pixels, in :func:`patch_grid`'s position order, and the
    number of values each position sums per image (``C * p * p``)."""
    f = _whole_patches(f, patch_size)
    s1 = F.avg_pool2d(f, patch_size, divisor_override=1)  # [N, C, U, V]: per-patch sums
    s2 = F.avg_pool2d(f * f, patch_size, divisor_override=1)
    n, c = f.shape[:2]
    return (s1.to(acc).double().sum(1).reshape(n, -1), s2.to(acc).double().sum(1).reshape(n, -1),
            c * patch_size ** 2)


@torch.no_grad()
def compute_real_statistics(
    model: nn.Module,
    real: DataBundle,
    keys: list[str],
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: Progress | None = None,
    patch_size: int = 0,
) -> dict[str, torch.Tensor]:
    """Global and per-class channel statistics at ``keys`` and mean logits per class, one pass.

    Returns float32 tensors ``<key>/mean`` and ``<key>/var`` ``[C]``, ``<key>/class_mean`` and
    ``<key>/class_var`` ``[K, C]``, ``logits/class_mean`` ``[K, K]``; with ``patch_size > 0`` also
    ``<key>/patch_mean`` and ``<key>/patch_var`` ``[P]`` at every conv key (see
    :func:`patch_moments`; global, over the whole set). Sums across images are accumulated in
    float64 over the whole (un-augmented) training set, on ``device`` and without a host sync per
    batch, so the result does not depend on ``batch_size`` beyond float64 rounding. G-VBSM's and EDC's
    code take their statistics, class-conditional ones included, on augmented images instead (CIFAR:
    ``RandomCrop(32, padding=4)`` + flip; ImageNet: ``RandomResizedCrop`` + flip): a difference of the
    ``gvbsm`` and ``edc`` presets.
    ``progress(done_images, total_images, {})`` is called after every batch.

    Under ``torchrun`` batch ``i`` is processed by rank ``i % world`` and the float64 sums are
    all-reduced, so every rank returns the statistics of the whole set (equal to one process up
    to float64 summation order); ``progress`` then counts this rank's images.
    """
    info = ddist.current()
    device = torch.device(device)
    acc = sums_device(device)
    model = model.to(device).eval()
    k = real.num_classes
    patched = [key for key in keys if patch_size > 0 and is_conv_key(key)]
    s1: dict[str, torch.Tensor] = {}  # [K, C] per-class sums of x, x^2
    s2: dict[str, torch.Tensor] = {}
    pix: dict[str, int] = {}
    p1: dict[str, torch.Tensor] = {}  # [P] sums over every image
    p2: dict[str, torch.Tensor] = {}
    pcount: dict[str, int] = {}
    count = torch.zeros(k, dtype=torch.float64, device=acc)
    logit_sum = torch.zeros(k, k, dtype=torch.float64, device=acc)
    classes = torch.arange(k, device=acc)
    total = len(real.train)
    starts = list(range(0, total, batch_size))[info.rank :: info.world_size]
    mine = sum(min(batch_size, total - lo) for lo in starts)

    def accumulate(features: dict[str, torch.Tensor], onehot: torch.Tensor) -> None:
        # onehot [K, n] float64 (an all-zero column adds nothing): class sums are one deterministic
        # matmul (no atomics on CUDA), patch sums over images its column sums times the per-image sums
        weight = onehot.sum(0)
        for key in keys:
            f = features[key]
            a, b = _image_sums(f, acc)
            if key not in s1:
                s1[key] = torch.zeros(k, f.shape[1], dtype=torch.float64, device=acc)
                s2[key] = torch.zeros_like(s1[key])
                pix[key] = f[0, 0].numel()
            s1[key] += onehot @ a
            s2[key] += onehot @ b
        for key in patched:
            a, b, pcount[key] = _patch_sums(features[key], patch_size, acc)
            if key not in p1:
                p1[key], p2[key] = a.new_zeros(a.shape[1]), b.new_zeros(b.shape[1])
            p1[key] += weight @ a
            p2[key] += weight @ b

    done = 0
    with FeatureHooks(model, keys) as hooks:
        if info.enabled:  # create every accumulator (zero weight), even on a rank without batches
            model(common.to_normalized(real.train.subset(torch.arange(1)).float_images().to(device), real))
            accumulate(hooks.features, torch.zeros(k, 1, dtype=torch.float64, device=acc))
            hooks.features.clear()
        for lo in starts:
            part = real.train.subset(torch.arange(lo, min(lo + batch_size, total)))
            x = common.to_normalized(part.float_images().to(device), real)
            y = part.labels.to(acc)
            onehot = (y[None, :] == classes[:, None]).double()  # [K, n]
            logits = model(x)
            logit_sum += onehot @ logits.to(acc).double()
            count += onehot.sum(1)
            accumulate(hooks.features, onehot)
            hooks.features.clear()
            done += len(y)
            if progress is not None:
                progress(done, mine, {})
    if info.enabled:
        for t in (count, logit_sum, *s1.values(), *s2.values(), *p1.values(), *p2.values()):
            ddist.all_reduce_sum(t)
    count, logit_sum = count.cpu(), logit_sum.cpu()
    out: dict[str, torch.Tensor] = {}
    per_class = count.clamp_min(1)[:, None]
    for key in keys:
        n_pix = pix[key]
        a, b = s1[key].cpu(), s2[key].cpu()
        cm = a / (per_class * n_pix)
        out[f"{key}/class_mean"] = cm.float()
        out[f"{key}/class_var"] = (b / (per_class * n_pix) - cm * cm).clamp_min(0).float()
        tot = count.sum() * n_pix
        gm = a.sum(0) / tot
        out[f"{key}/mean"] = gm.float()
        out[f"{key}/var"] = (b.sum(0) / tot - gm * gm).clamp_min(0).float()
    for key in patched:
        n_per_patch = count.sum() * pcount[key]
        pm = p1[key].cpu() / n_per_patch
        out[f"{key}/patch_mean"] = pm.float()
        out[f"{key}/patch_var"] = (p2[key].cpu() / n_per_patch - pm * pm).clamp_min(0).float()
    out[f"{LOGITS}/class_mean"] = (logit_sum / per_class).float()
    return out


def statistics_key(teacher, real: DataBundle, keys: list[str], patch_size: int = 0) -> str:
    # the statistics are of normalised inputs, and the data fingerprint leaves the normalisation out
    norm = ",".join(f"{v:.6g}" for v in (*real.mean, *real.std))
    blob = f"{KIND}|{SCHEMA}|{teacher.fingerprint}|{real.fingerprint}|norm={norm}|{','.join(keys)}"
    if patch_size > 0:  # left out without patches, so caches made before patch statistics stay valid
        blob += f"|patch{patch_size}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_cached(path: Path, teacher, real: DataBundle, keys: list[str],
                 patch_size: int = 0) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The cached statistics at ``path`` and their manifest, or None when absent or unusable."""
    if not (path / "manifest.json").is_file():
        return None
    try:
        manifest = read_manifest(path, KIND)
        if manifest.get("teacher") != teacher.fingerprint or manifest.get("data") != real.fingerprint:
            raise DDKitError("teacher or data fingerprint differs")
        stats = load_tensors(path / TENSORS, what="cached statistics")
        want = {f"{key}/{part}" for key in keys for part in ("mean", "var", "class_mean", "class_var")}
        if patch_size > 0:
            want |= {f"{key}/{part}" for key in keys if is_conv_key(key) for part in ("patch_mean", "patch_var")}
        missing = sorted(want - set(stats))
        if missing or f"{LOGITS}/class_mean" not in stats:
            raise DDKitError(f"missing {missing[:2]}")
        broken = [k for k, v in stats.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if broken:
            raise DDKitError(f"non-finite values in {broken[:2]}")
        return stats, manifest
    except DDKitError as exc:
        log.warning("ignoring cached statistics at %s (%s); recomputing", path, str(exc).splitlines()[0])
        return None


@stage_modes()
def real_statistics(
    teacher,
    real: DataBundle,
    device: torch.device | str = "cpu",
    cache_dir: str | Path | None = None,
    batch_size: int = 256,
    progress: Progress | None = None,
    patch_size: int = 0,
    conv_features: str = "output",
) -> tuple[dict[str, torch.Tensor], Path]:
    """Real-data statistics of ``teacher`` at every BN and conv layer, from the cache if present.

    ``patch_size > 0`` adds patch statistics at the conv layers (a separate cache entry);
    ``conv_features: input`` takes the conv layers' inputs instead of their outputs (one too).

    The cache lives in ``cache_dir`` (default ``$DDKIT_CACHE/statistics`` or
    ``~/.cache/ddkit/statistics``), one artifact directory per key. Under torchrun every rank
    computes a shard of the pass (see :func:`compute_real_statistics`) and rank 0 writes the
    artifact. Returns ``(statistics, artifact path)``.
    """
    keys = statistic_layers(teacher.model, ("bn", CONV_KIND[conv_features]))
    root = Path(cache_dir) if cache_dir is not None else cache_dir_of("statistics")
    path = root / statistics_key(teacher, real, keys, patch_size)
    info = ddist.current()
    ddist.agree_settings({"statistics": {"batch_size": batch_size, "patch_size": patch_size, "layers": keys},
                          "dataset": [real.fingerprint, real.normalisation], "teacher": teacher.fingerprint})
    with build_lock(path) as waited:  # one builder per entry: a process that waited finds the other's result here
        cached = _load_cached(path, teacher, real, keys, patch_size)
        if ddist.agree_found(cached is not None, f"the real-data statistics {path.name}", root):
            log.info("loaded real-data statistics from %s", path)
            record_shared_cost(KIND, path.name, cached[1].get("build_seconds"), waited_seconds=waited.seconds)
            return cached[0], path
        log.info("computing real-data statistics of teacher %s over %d images (cached at %s)",
                 teacher.fingerprint, len(real.train), path)
        t0 = time.perf_counter()
        stats = compute_real_statistics(teacher.model, real, keys, device, batch_size, progress, patch_size)
        seconds = time.perf_counter() - t0
        record_shared_cost(KIND, path.name, seconds, seconds, waited.seconds)
        if info.is_main:
            manifest = base_manifest(KIND, {"layers": keys, "batch_size": batch_size, "patch_size": patch_size}, None)
            # the key's SCHEMA, so that `ddkit cache` tells the entries of an older one (never read again)
            manifest.update({"statistics_schema": SCHEMA, "teacher": teacher.fingerprint, "data": real.fingerprint,
                             "dataset": real.name, "num_classes": real.num_classes,
                             "build_seconds": round(seconds, 3)})
            with atomic_dir(path, kind=KIND) as tmp:
                save_tensors(tmp / TENSORS, stats)
                write_json(tmp / "manifest.json", manifest)
        ddist.barrier()
    return stats, path


# ------------------------------------------------------------------------------------------------
# targets and the loss


@dataclass
class StatTargets:
    """What the synthetic statistics are matched to, for one teacher."""

    keys: list[str]
    mean: dict[str, torch.Tensor]
    var: dict[str, torch.Tensor]
    class_mean: dict[str, torch.Tensor] | None = None  # [K, C]
    class_var: dict[str, torch.Tensor] | None = None
    class_logits: torch.Tensor | None = None  # [K, K]
    patch_mean: dict[str, torch.Tensor] | None = None  # conv keys: [P], when patch statistics were computed
    patch_var: dict[str, torch.Tensor] | None = None


class StatsEMA:
    """G-VBSM's moving average of the synthetic statistics (``--training-momentum``).

    ``ema(name, value)`` updates ``avg = momentum * avg + (1 - momentum) * value`` (the first call
    sets ``avg = value``) and returns a tensor whose *value* is the new average and whose
    *gradient* is that of the current batch's ``value``, so the images are pushed by this step's
    statistics while the matched quantity is smoothed over the steps of the batch.
    """

    def __init__(self, momentum: float) -> None:
        self.momentum = momentum
        self.values: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, value: torch.Tensor) -> torch.Tensor:
        cur = value.detach()
        prev = self.values.get(name)
        avg = cur if prev is None else self.momentum * prev + (1 - self.momentum) * cur
        self.values[name] = avg
        return avg + (value - cur)


def build_targets(model: nn.Module, keys: list[str], real_stats: dict[str, torch.Tensor] | None,
                  device: torch.device | str = "cpu") -> StatTargets:
    """BN keys: global target = the layer's running statistics (SRe2L); conv keys: real-data
    global statistics. Class targets (and class logits) come from ``real_stats`` when given."""
    modules = dict(model.named_modules())
    mean, var = {}, {}
    for key in keys:
        kind, name = key.split(":", 1)
        if kind == "bn":
            bn = modules[name]
            if bn.running_mean is None or bn.running_var is None:
                raise DDKitError(f"BatchNorm layer {name!r} tracks no running statistics; use stats: conv")
            mean[key], var[key] = bn.running_mean.detach().float(), bn.running_var.detach().float()
        else:
            if real_stats is None:
                raise DDKitError("convolution statistics need real-data statistics")
            mean[key], var[key] = real_stats[f"{key}/mean"], real_stats[f"{key}/var"]
    targets = StatTargets(keys, {k: v.to(device) for k, v in mean.items()}, {k: v.to(device) for k, v in var.items()})
    if real_stats is not None:
        targets.class_mean = {k: real_stats[f"{k}/class_mean"].to(device) for k in keys}
        targets.class_var = {k: real_stats[f"{k}/class_var"].to(device) for k in keys}
        targets.class_logits = real_stats[f"{LOGITS}/class_mean"].to(device)
        patched = [k for k in keys if f"{k}/patch_mean" in real_stats]
        if patched:
            targets.patch_mean = {k: real_stats[f"{k}/patch_mean"].to(device) for k in patched}
            targets.patch_var = {k: real_stats[f"{k}/patch_var"].to(device) for k in patched}
    return targets


def statistics_loss(
    features: dict[str, torch.Tensor],
    targets: StatTargets,
    labels: torch.Tensor,
    alpha: float = 1.0,
    first_multiplier: float = 1.0,
    var_weight: float = 1.0,
    patch_size: int = 0,
    ema: StatsEMA | None = None,
    drop: frozenset[str] = frozenset(),
) -> torch.Tensor:
    """``sum_l w_l [alpha * G_l + (1 - alpha) * C_l]`` with ``w_0 = first_multiplier``, else 1.

    ``G_l = ||mu_syn - mu||_2 + v ||var_syn - var||_2`` over the whole batch (SRe2L's R_BN; ``v =
    var_weight`` is 1 there and DWA's ``r_var`` = 11), plus the same distance between per-patch
    moments (:func:`patch_moments`) at conv layers when ``patch_size > 0`` and the targets hold
    patch statistics (G-VBSM);
    ``C_l`` is the same per class present in ``labels`` against that class's real statistics,
    averaged over those classes (EDC's soft category-aware matching). A class with one image in the
    batch (``slots_per_batch: 1``: SRe2L's batches, and ddkit's ``edc`` default, where EDC's code batches
    every IPC slot of a few classes) contributes that image's own moments
    over positions, so ``C_l`` asks each image to carry its class's mean and spread over images and
    positions; ``slots_per_batch: None`` puts every IPC slot of a class in the batch, whose moments
    then pool over images. This is ddkit's reading of the paper: EDC's code (``category_aware:
    global``) takes as a class's target the mean over its images of their own moments over positions
    (the within-image spread, without the spread between images; on Fashion-MNIST features ddkit's
    pooled variance is 1.05-1.08x that) and matches the batch's moving-average moments against the
    mean of those targets over the batch's labels; at conv layers it also matches class-conditional per-patch
    moments (per-image 4x4-patch moments averaged over the class, matched crosswise: its saved class patch means
    and variances swap keys), which ``C_l`` has none of (``patch_size`` adds patch terms to ``G_l`` only).
    ``alpha = 1`` never touches class statistics. With ``ema`` every
    synthetic moment is replaced by its moving average (:class:`StatsEMA`); layers in ``drop`` contribute nothing this
    step (G-VBSM's drop rate).
    """
    total = torch.zeros((), device=labels.device)
    classes = labels.unique() if alpha < 1 else None
    if alpha < 1 and (targets.class_mean is None or targets.class_var is None):
        raise DDKitError("category-aware matching (alpha < 1) needs class statistics of the real data")

    def dist(a, b, va, vb, dim=None):
        return torch.norm(a - b, 2, dim=dim) + var_weight * torch.norm(va - vb, 2, dim=dim)

    for i, key in enumerate(targets.keys):
        if key in drop:
            continue
        f = features[key].float()
        smooth = (lambda name, v: v) if ema is None else (lambda name, v, key=key: ema(f"{key}/{name}", v))
        loss = torch.zeros((), device=f.device)
        if alpha > 0:
            mu, var = channel_moments(f)
            glob = dist(smooth("mean", mu), targets.mean[key], smooth("var", var), targets.var[key])
            if patch_size > 0 and targets.patch_mean is not None and key in targets.patch_mean:
                pm, pv = patch_moments(f, patch_size)
                glob = glob + dist(smooth("patch_mean", pm), targets.patch_mean[key], smooth("patch_var", pv),
                                   targets.patch_var[key])
            loss = loss + alpha * glob
        if alpha < 1:
            cm, cv = class_moments(f, labels, classes)
            cm, cv = smooth("class_mean", cm), smooth("class_var", cv)
            per_class = dist(cm, targets.class_mean[key][classes], cv, targets.class_var[key][classes], dim=1)
            loss = loss + (1 - alpha) * per_class.mean()
        total = total + (first_multiplier if i == 0 else 1.0) * loss
    return total


def logit_matching_loss(logits: torch.Tensor, labels: torch.Tensor, class_logits: torch.Tensor) -> torch.Tensor:
    """Mean over classes present of ``||mean synthetic logits of c - mean real logits of c||_2``."""
    classes = labels.unique()
    onehot = (labels[None, :] == classes[:, None]).to(logits.dtype)
    mean = onehot @ logits / onehot.sum(1, keepdim=True)
    return torch.norm(mean - class_logits[classes], 2, dim=1).mean()


def densification_loss(inputs: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """G-VBSM's data densification: sum over classes of ``KL(softmax(l / tau) || softmax(l))``.

    ``l`` are the eigenvalues of the Gram matrix ``X X^T`` of the flattened images of one class
    in the batch; the target ``softmax(l / tau)`` (``tau > 1``, no gradient) is flatter than
    ``softmax(l)``, so the loss spreads the spectrum: the class's images stop collapsing onto a
    few directions and become more diverse. A class with one image in the batch contributes 0.
    """
    flat = inputs.flatten(1).float()
    total = torch.zeros((), device=inputs.device)
    for c in labels.unique():
        x = flat[labels == c]
        if len(x) < 2:
            continue
        eig = torch.linalg.eigvalsh(x @ x.T)
        total = total + F.kl_div(F.log_softmax(eig, 0), F.softmax(eig.detach() / tau, 0), reduction="sum")
    return total


# ------------------------------------------------------------------------------------------------
# the shared recover loop


@dataclass
class RecoverConfig(Checked):
    """Settings shared by every recover-style method (each method overrides the defaults)."""

    iterations: int = field(1000, help="optimisation steps per batch of synthetic images")
    lr: float = field(0.25, help="Adam learning rate on normalised pixels, cosine-annealed to 0")
    beta1: float = field(0.5, help="Adam beta1 (SRe2L: 0.5)")
    beta2: float = field(0.9, help="Adam beta2 (SRe2L: 0.9)")
    r_stats: float = field(0.01, help="weight of the statistics loss (SRe2L's r_bn)")
    first_multiplier: float = field(10.0, help="extra weight on each teacher's first matched layer (SRe2L/G-VBSM "
                                               "code: 10)")
    stats: Literal["bn", "conv", "bn+conv"] = field("bn", help="layers matched: BN inputs vs running stats, conv "
                                                               "outputs vs real data, or both (G-VBSM; a teacher "
                                                               "without BN matches its conv layers alone)")
    alpha: float = field(1.0,
                         help="EDC soft category-aware matching: alpha*global + (1-alpha)*per-class; 1 = global only")
    r_logit: float = field(0.0,
                           help="weight of per-class mean-logit matching to the real data (G-VBSM's logit matching)")
    init: Literal["noise", "real", "rded"] = field("noise", help="start from Gaussian noise, a random real subset, or "
                                                                 "the registered 'rded' method's output")
    rded_options: dict = field({}, help="options of the 'rded' method when init: rded")
    augment: Literal["rrc_flip", "crop_flip", "none"] = field("rrc_flip",
                                                              help="augmentation of the synthetic batch at every step")
    scale_min: float = field(0.08, help="RandomResizedCrop area lower bound (EDC's weak augmentation: 0.5)")
    curriculum: Literal["none", "step", "linear", "cosine"] = field("none", help="CDA: anneal scale_min from 1 down to "
                                                                                 "scale_min (easy -> hard)")
    augment_per: Literal["image", "batch"] = field(
        "image", added=True,
        help="draw the crop box and flip per image (ddkit's default) or once for the whole batch, as "
        "the SRe2L/CDA/G-VBSM/EDC code does by applying torchvision's RandomResizedCrop and flip to the batch tensor")
    conv_features: Literal["output", "input"] = field(
        "output", added=True,
        help="convolution statistics of each conv's output (ddkit's default; on a BatchNorm teacher "
        "the next BN's input) or its input (G-VBSM/EDC code: post-activation features, the images at the first conv)")
    milestone: float = field(1.0, help="CDA: fraction of the iterations over which the curriculum runs")
    jitter: int = field(0, help="random roll of the batch by up to this many pixels (SRe2L: 32 at 224 px, 4 on "
                                "CIFAR-100 and Tiny-ImageNet)")
    jitter_mode: Literal["positive", "symmetric"] = field(
        "positive", help="shifts of the roll: positive draws each in [0, jitter] (SRe2L's ImageNet-1K and CIFAR-100 "
        "recover scripts, CDA's, DWA's and CV-DD's), symmetric in [-jitter, jitter] (SRe2L's Tiny-ImageNet script, "
        "DeepInversion)")
    flatness_weight: float = field(0.0, help="EDC flatness regularisation weight (0 = off; ddkit's edc: 0.25, EDC's "
                                             "recover scripts: off)")
    flatness_beta: float = field(0.99, help="EMA rate of the image copy used by the flatness term")
    flatness_tau: float = field(4.0, help="softmax temperature of the flatness KL")
    flip_plugin: bool = field(False, help="FYI (ECCV 2024): match each image together with its mirror image")
    stats_momentum: float = field(0.0,
                                  help="G-VBSM: moving average of the synthetic statistics over the steps of a batch "
                                  "(value = average, gradient = this step's batch); 0 = off, G-VBSM: 0.8")
    patch_size: int = field(0, help="G-VBSM: also match per-patch moments of conv outputs, patches of this many pixels "
                            "a side (0 = off, G-VBSM: 4); needs stats conv or bn+conv")
    conv_drop_rate: float = field(0.0, help="G-VBSM: probability of dropping each conv layer's statistics term at a "
                                            "step (G-VBSM: 0.4)")
    densify_weight: float = field(0.0, help="G-VBSM data densification weight: KL on the Gram eigenvalues of each "
                                  "class's images (0 = off, G-VBSM: 1); needs several images of a class per batch "
                                  "(slots_per_batch), so it does nothing at IPC 1 without flip_plugin (as in "
                                  "G-VBSM's code)")
    densify_tau: float = field(4.0, help="G-VBSM data densification temperature (G-VBSM: 4)")
    slots_per_batch: int | None = field(1, help="IPC slots per optimised batch: 1 = one image of each class (SRe2L); "
                                        "None = every slot, class-major (G-VBSM's batches)")
    var_weight: float = field(1.0, help="weight of the variance term against the mean term of the statistics loss "
                                        "(DWA's r_var: 11)")
    extra_teachers: list[str] = field([], help="more teacher artifacts (folders) beside the pipeline's teacher: "
                                               "G-VBSM/EDC backbones, a CV-DD committee")
    committee_size: int | None = field(None, help="None: sample one teacher per step (G-VBSM); k: a committee of k "
                                                  "teachers per IPC slot, all used every step with voting "
                                                  "weights (CV-DD)")
    committee_choice: Literal["random", "best", "cycle"] = field(
        "random", added=True,
        help="how each IPC slot's committee is chosen: random (ddkit's default: a draw per slot, seeded by the run's "
        "seed and the slot; CV-DD's IPC-50 scripts), best (the committee_size teachers of highest recorded test "
        "accuracy, for every slot: CV-DD's IPC-1 scripts) or cycle (the combinations of committee_size of the teachers "
        "in their order, slot s taking combination s mod their count: CV-DD's IPC-10 scripts, every pair once)")
    committee_weights: Literal["prior", "equal"] = field("prior", help="CV-DD voting: softmax(prior / "
                                                                       "committee_temperature) of each teacher's test "
                                                                       "accuracy in %, or equal weights")
    committee_temperature: float = field(5.0, help="CV-DD voting temperature (paper code: 5)")
    perturb_rho: float = field(0.0, help="DWA directed weight adjustment: total norm of the per-batch teacher weight "
                                         "perturbation (0 = off; DWA: 0.015)")
    perturb_steps: int = field(12, help="DWA: normalised gradient-ascent steps of size perturb_rho / "
                                        "perturb_steps (DWA: 12)")
    class_batch: int | None = field(None, help="at most this many classes per optimised batch (None: all classes "
                                               f"up to {CLASS_BATCH}, in chunks of {CLASS_BATCH} beyond, as SRe2L's "
                                               "ImageNet-1K recover script)")
    checkpoint_every: int = field(50, operational=True, help="steps between resumable checkpoints (not part of the "
                                  "set's identity)")
    stats_batch_size: int = field(256, help="batch size of the real-data statistics pass")
    cache_dir: str | None = field(None, operational=True, help="statistics cache (default $DDKIT_CACHE/statistics; "
                                  "not part of the set's identity)")

    def __post_init__(self) -> None:
        checks = [
            (self.iterations >= 1, f"iterations must be >= 1, got {self.iterations}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
             f"Adam betas must be in [0, 1), got {self.beta1}, {self.beta2}"),
            (self.r_stats >= 0 and self.r_logit >= 0 and self.flatness_weight >= 0 and self.first_multiplier >= 0,
             "loss weights (r_stats, r_logit, flatness_weight, first_multiplier) must be >= 0"),
            (0 <= self.alpha <= 1, f"alpha must be in [0, 1] (1 = global statistics only), got {self.alpha}"),
            (0 < self.scale_min <= 1, f"scale_min must be in (0, 1], got {self.scale_min}"),
            (0 <= self.milestone <= 1, f"milestone must be in [0, 1], got {self.milestone}"),
            (self.jitter >= 0, f"jitter must be >= 0, got {self.jitter}"),
            (0 <= self.flatness_beta < 1, f"flatness_beta must be in [0, 1), got {self.flatness_beta}"),
            (self.flatness_tau > 0, f"flatness_tau must be > 0, got {self.flatness_tau}"),
            (self.class_batch is None or self.class_batch >= 1, f"class_batch must be >= 1, got {self.class_batch}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.stats_batch_size >= 1, f"stats_batch_size must be >= 1, got {self.stats_batch_size}"),
            (self.var_weight >= 0, f"var_weight must be >= 0, got {self.var_weight}"),
            (0 <= self.stats_momentum < 1, f"stats_momentum must be in [0, 1), got {self.stats_momentum}"),
            (self.patch_size >= 0, f"patch_size must be >= 0, got {self.patch_size}"),
            (self.patch_size == 0 or self.stats != "bn",
             "patch_size > 0 matches conv statistics but stats is bn; set stats: bn+conv or patch_size: 0"),
            (0 <= self.conv_drop_rate < 1, f"conv_drop_rate must be in [0, 1), got {self.conv_drop_rate}"),
            (self.densify_weight >= 0, f"densify_weight must be >= 0, got {self.densify_weight}"),
            (self.densify_tau > 0, f"densify_tau must be > 0, got {self.densify_tau}"),
            (self.densify_weight == 0 or self.slots_per_batch != 1 or self.flip_plugin,
             "densify_weight > 0 spreads the images of a class in a batch, but slots_per_batch: 1 puts one image of "
             "each class in a batch; set slots_per_batch: null (or >= 2), or densify_weight: 0"),
            (self.slots_per_batch is None or self.slots_per_batch >= 1,
             f"slots_per_batch must be >= 1 or None, got {self.slots_per_batch}"),
            (self.committee_size is None or self.committee_size >= 1,
             f"committee_size must be >= 1, got {self.committee_size}"),
            (self.committee_weights in ("prior", "equal"),
             f"committee_weights must be prior or equal, got {self.committee_weights!r}"),
            (self.committee_choice in ("random", "best", "cycle"),
             f"committee_choice must be random, best or cycle, got {self.committee_choice!r}"),
            (self.committee_temperature > 0, f"committee_temperature must be > 0, got {self.committee_temperature}"),
            (self.perturb_rho >= 0, f"perturb_rho must be >= 0, got {self.perturb_rho}"),
            (self.perturb_steps >= 1, f"perturb_steps must be >= 1, got {self.perturb_steps}"),
            (self.stats in ("bn", "conv", "bn+conv"), f"stats must be bn, conv or bn+conv, got {self.stats!r}"),
            (self.init in ("noise", "real", "rded"), f"init must be noise, real or rded, got {self.init!r}"),
            (self.augment in ("rrc_flip", "crop_flip", "none"),
             f"augment must be rrc_flip, crop_flip or none, got {self.augment!r}"),
            (self.curriculum in ("none", "step", "linear", "cosine"),
             f"curriculum must be none, step, linear or cosine, got {self.curriculum!r}"),
        ]
        defaults = {f.name: field_default(f) for f in dataclasses.fields(self)}  # this class's (a preset's own)
        if self.augment != "rrc_flip":  # the crop-scale settings only shape RandomResizedCrop
            moved = [k for k in ("scale_min", "curriculum", "milestone")  # (curriculum none is no curriculum)
                     if getattr(self, k) != defaults[k] and not (k == "curriculum" and self.curriculum == "none")]
            if moved:
                checks.append((False, f"{', '.join(moved)} {'apply' if len(moved) > 1 else 'applies'} only to "
                                      f"augment: rrc_flip, but augment is "
                                      f"{self.augment}; remove them or set augment: rrc_flip"))
            elif self.curriculum != "none":  # a preset's own curriculum (CDA's) would silently do nothing
                checks.append((False, f"curriculum {self.curriculum} (this method's) shapes RandomResizedCrop's scale, "
                                      f"but augment is {self.augment}; set curriculum: none or augment: rrc_flip"))
        # settings of a part that is off: they would do nothing, yet give the set another identity (a setting at
        # this class's default is taken: a preset's own value, when an ablation turns its part off)
        if self.jitter == 0 and self.jitter_mode != defaults["jitter_mode"]:
            checks.append((False,
                           f"jitter_mode {self.jitter_mode} applies only with jitter > 0; remove it or set jitter"))
        if self.augment == "none" and self.augment_per != defaults["augment_per"]:
            checks.append((False, f"augment_per {self.augment_per} applies only with an augmentation, but augment is "
                                  "none; remove it or set augment"))
        for names, off, part, why, fix in self.off_parts():
            for name in names:
                value = getattr(self, name)
                if off and value != defaults[name]:
                    shown = short_repr(value, 80) if isinstance(value, (dict, list)) else value
                    checks.append((False, f"{name} {shown} applies only with {part}, but {why}; remove it or {fix}"))
        errors = [msg for ok, msg in checks if not ok]
        if errors:
            raise ConfigError("; ".join(errors))

    def off_parts(self) -> list[tuple[tuple[str, ...], bool, str, str, str]]:
        """Settings of a part that may be off, each row (settings, whether their part is off, the part, why it is
        off, how to turn it on): a setting other than this class's default while its part is off is refused (it
        would do nothing, yet give the set another identity). A method adds rows for settings of its own."""
        voting, committee = self.uses_votes(), self.committee_size is not None
        return [
            (("flatness_beta", "flatness_tau"), self.flatness_weight == 0, "flatness_weight > 0",
             "flatness_weight is 0", "set flatness_weight"),
            (("densify_tau",), self.densify_weight == 0, "densify_weight > 0", "densify_weight is 0",
             "set densify_weight"),
            (("committee_weights",), not voting, "a committee", "committee_size is null", "set committee_size"),
            (("committee_temperature", "committee_choice"), not committee, "a committee", "committee_size is null",
             "set committee_size"),
            (("committee_temperature",), committee and self.committee_weights == "equal", "committee_weights prior",
             "committee_weights is equal", "set committee_weights: prior"),
            (("perturb_steps",), self.perturb_rho == 0, "perturb_rho > 0", "perturb_rho is 0", "set perturb_rho"),
            (("milestone",), self.augment == "rrc_flip" and self.curriculum == "none", "a curriculum",
             "curriculum is none", "set curriculum"),  # (with another augment: refused by __post_init__)
            (("conv_features",), self.stats == "bn", "convolution statistics (stats conv or bn+conv)",
             "stats is bn", "set stats"),
            (("rded_options",), self.init != "rded", "init: rded", f"init is {self.init}", "set init: rded"),
            (("patch_size",), self.alpha == 0, "global statistics (alpha > 0)", "alpha is 0", "set alpha"),
        ]

    def uses_votes(self) -> bool:
        """Whether ``committee_weights`` decides anything: a committee per IPC slot (``committee_size``),
        whose votes alone ``committee_temperature`` weighs."""
        return self.committee_size is not None


def crop_scale_min(cfg: RecoverConfig, it: int) -> float:
    """RRC area lower bound at step ``it``: CDA's easy-to-hard curriculum 1 -> scale_min."""
    end = cfg.milestone * cfg.iterations
    if cfg.curriculum == "none" or it >= end:
        return cfg.scale_min
    if cfg.curriculum == "step":
        return 1.0
    if cfg.curriculum == "linear":
        return cfg.scale_min + (1.0 - cfg.scale_min) * (1 - it / end)
    return cfg.scale_min + (1.0 - cfg.scale_min) * (1 + math.cos(math.pi * it / end)) / 2


def _augment(cfg: RecoverConfig, it: int, flip: bool):
    if cfg.augment == "none":
        return None
    if cfg.augment == "crop_flip":
        return build_augment("crop_flip", flip_prob=0.5 if flip else 0.0)
    return build_augment("rrc_flip", scale_min=crop_scale_min(cfg, it), flip_prob=0.5 if flip else 0.0)


def class_chunk(cfg: RecoverConfig, num_classes: int) -> int:
    """Classes per optimised batch: ``class_batch``, or with None every class up to ``CLASS_BATCH``
    and chunks of ``CLASS_BATCH`` beyond (one 1000-image batch at ImageNet-1K would take several
    times the memory the papers' recover steps take)."""
    return cfg.class_batch or min(num_classes, CLASS_BATCH)


def _unit_seed(seed: int, slot: int, chunk: int) -> int:
    return (seed * 1_000_003 + slot * 10_007 + chunk * 101 + 17) % (2**63)


class RecoverMethod(Method):
    """Base of the methods that synthesise with :func:`recover` (SRe2L, CDA, G-VBSM, EDC, DWA, CV-DD)."""

    @classmethod
    def identity_tags(cls, options: dict) -> dict:
        """Changes to the shared loop's output, as identity tags of the sets they touch (each preset's
        ``revision`` covers only its own changes): a set cached before such a change is made again,
        those the change left alone keep their identity."""
        def option(name: str):
            return options.get(name, cls.Config.__dataclass_fields__[name].default)

        tags: dict[str, Any] = {}
        # until 2026-12-04 the roll's shifts were drawn in [-jitter, jitter]; `jitter_mode` now decides
        if isinstance(option("jitter"), int) and option("jitter") > 0:
            tags["jitter_mode"] = options.get("jitter_mode", "positive")
        # 2026-12-05: class-conditional variances computed without cancellation (alpha < 1 uses them)
        if isinstance(option("alpha"), (int, float)) and option("alpha") < 1:
            tags["class_var"] = 2
        # 2026-12-05: the flatness KL taken as EDC's code takes it (KL(ema || images), mean over classes)
        if isinstance(option("flatness_weight"), (int, float)) and option("flatness_weight") > 0:
            tags["flatness_kl"] = 2
        return tags

    @classmethod
    def check_data(cls, cfg: RecoverConfig, real: DataBundle, ipc: int, options_key: str = "distill.options") -> None:
        """What :func:`recover` refuses before its first teacher pass, for a run or bench to check before any stage
        (the teacher is trained first there): a committee larger than the pipeline's teacher and the
        ``extra_teachers``."""
        check_committee(cfg, 1 + len(cfg.extra_teachers), options_key)

    @classmethod
    def data_identity_tags(cls, options: dict, num_classes: int) -> dict:
        # 2026-12-06: class_batch None splits more than CLASS_BATCH classes into batches (all in one before)
        if options.get("class_batch") is None and num_classes > CLASS_BATCH:
            return {"class_chunk": CLASS_BATCH}
        return {}


@dataclass
class _TeacherState:
    teacher: object
    keys: list[str]
    targets: StatTargets


def _teacher_name(t) -> str:
    """A teacher as errors name it: its model, and its folder where it has one (an extra teacher's)."""
    arch = t.manifest.get("model", {}).get("name", "?") if isinstance(t.manifest, dict) else "?"
    return f"teacher model {arch!r}" + (f" ({recorded_path(t.path)})" if getattr(t, "path", None) else "")


def _teacher_layers(name: str, cfg: RecoverConfig, teachers: list, kinds: tuple[str, ...]) -> list[list[str]]:
    """The statistic keys of each teacher: the layers of the ``kinds`` asked for that it has.

    As the G-VBSM/EDC code's hooks are per module type, a teacher without BatchNorm matches, under
    ``stats: bn+conv``, its convolution statistics alone (G-VBSM's and EDC's pools mix BatchNorm
    backbones with instance-norm ConvNets). Refused: a teacher that would match no statistics (``stats:
    bn`` and no BatchNorm), and a pool of which no teacher has BatchNorm while ``stats`` asks for it
    (the BatchNorm terms would silently be none: ``stats: conv`` says so). The main teacher is one of
    the pool as any other (teachers are sampled alike), so it too may lack BatchNorm in a mixed pool.
    """
    layers = [statistic_layers(t.model, kinds) for t in teachers]
    for t, keys in zip(teachers, layers):
        if keys:
            continue
        if kinds == ("bn",) and statistic_layers(t.model, ("conv",)):
            raise DDKitError(
                f"method {name!r} with stats: bn needs teachers with BatchNorm layers, but {_teacher_name(t)} has "
                "none, so it would match no statistics; use a teacher with BatchNorm (e.g. convnet3-bn or "
                "resnet18_cifar), or set stats: bn+conv (BatchNorm statistics where a teacher has them, convolution "
                "statistics of every teacher) or stats: conv"
            )
        raise DDKitError(f"{_teacher_name(t)} has no BatchNorm or convolution layers to match statistics at; "
                         f"method {name!r} cannot use it")
    if "bn" not in kinds:
        return layers
    no_bn = [t for t, keys in zip(teachers, layers) if not any(key.startswith("bn:") for key in keys)]
    if len(no_bn) == len(teachers):
        which = (f"{_teacher_name(teachers[0])} has none" if len(teachers) == 1 else
                 f"none of its {len(teachers)} teachers has any")
        raise DDKitError(
            f"method {name!r} with stats: {cfg.stats} needs a teacher with BatchNorm layers, but {which}; use e.g. "
            "convnet3-bn or resnet18_cifar (as the teacher or among extra_teachers), or set stats: conv to match "
            "convolution statistics of the real data instead"
        )
    for t in no_bn:
        log.info("%s: %s has no BatchNorm layers; it matches its convolution statistics only", name, _teacher_name(t))
    return layers


def _prepare_teachers(name: str, cfg: RecoverConfig, real: DataBundle, teachers: list,
                      ctx: FitContext) -> tuple[list[_TeacherState], list[str]]:
    if not teachers:
        raise DDKitError(f"method {name!r} needs a teacher; pass --teacher DIR")
    conv = CONV_KIND[cfg.conv_features]
    kinds = {"bn": ("bn",), "conv": (conv,), "bn+conv": ("bn", conv)}[cfg.stats]
    need_real = conv in kinds or cfg.alpha < 1 or cfg.r_logit > 0
    states, paths = [], []
    for t in teachers:  # every one before the first statistics pass
        common.check_float32_teacher(t.model, name)
    layers = _teacher_layers(name, cfg, teachers, kinds)
    for t, keys in zip(teachers, layers):
        t.check_compatible(real)
        model = t.model.to(ctx.device).eval()
        real_stats = None
        if need_real:
            # the one-off statistics pass reports its own progress (images done / total), marked
            # with ``statistics_pass`` so a progress bar can label it
            def bar(done: int, total: int, rec: dict) -> None:
                common.report(ctx, done, total, statistics_pass=1.0)

            real_stats, path = real_statistics(t, real, ctx.device, cfg.cache_dir, cfg.stats_batch_size, progress=bar,
                                               patch_size=cfg.patch_size, conv_features=cfg.conv_features)
            paths.append(str(path))
        states.append(_TeacherState(t, keys, build_targets(model, keys, real_stats, ctx.device)))
    return states, paths


def _initial_images(name: str, cfg: RecoverConfig, real: DataBundle, teachers: list, ipc: int, ctx: FitContext,
                    rows: torch.Tensor) -> torch.Tensor:
    """Initial pixel-space images of the positions ``rows`` of the class-major ``[K * ipc, C, H, W]``
    set, equal to those rows of the whole set. Noise and real images are made for ``rows`` alone;
    ``init: rded`` runs the rded method, whose classes are made round-robin over the ranks of a
    torchrun job, each rank receiving only the rows it asks for (:meth:`RDED.initial_rows`)."""
    if cfg.init in ("noise", "real"):
        return common.init_images(real, ipc, cfg.init, ctx.seed, rows)[0]
    if "rded" not in METHODS:
        raise DDKitError(f"method {name!r}: init: rded needs the 'rded' method, which is not registered; "
                         "use init: real")
    cls = METHODS.get("rded")
    sub = FitContext(ipc=ipc, seed=ctx.seed, device=ctx.device,
                     work_dir=Path(ctx.work_dir) / "rded" if ctx.work_dir is not None else None,
                     options_key=f"{ctx.options_key}.rded_options")
    method = cls(from_dict(cls.Config, dict(cfg.rded_options), f"{ctx.options_key}.rded_options"))
    return method.initial_rows(real, teachers, sub, rows)


def load_extra_teachers(cfg: RecoverConfig, teachers: list, device) -> list:
    """The pipeline's teachers followed by those named in ``cfg.extra_teachers``."""
    from ddkit.teacher import Teacher

    extra = []
    for path in cfg.extra_teachers:
        if not Path(path).exists():
            raise DDKitError(f"extra teacher {path!r} not found; give the folder of a `ddkit teacher` artifact")
        extra.append(Teacher.load(path, device))
    return list(teachers) + extra


def check_committee(cfg: RecoverConfig, teachers: int, where: str = "") -> None:
    """Refuse a committee (``committee_size``) larger than the ``teachers`` it is chosen from; ``where``: the config
    key of the options (``distill.options``), which the error names."""
    if cfg.committee_size is not None and cfg.committee_size > teachers:
        at = f"{where}." if where else ""
        raise DDKitError(f"{at}committee_size {cfg.committee_size} exceeds the {teachers} teacher(s) given; add "
                         f"teachers with {at}extra_teachers or lower {at}committee_size")


def committee_for(cfg: RecoverConfig, states: list[_TeacherState], seed: int,
                  slot: int) -> list[tuple[int, float]] | None:
    """CV-DD's committee of one IPC slot, as ``committee_choice`` picks ``committee_size`` of the teachers
    (indices, in order) -- random: drawn without replacement by a generator of (seed, slot), so every rank
    draws the same; best: those of highest recorded test accuracy (earlier teachers first on a tie), the
    same for every slot; cycle: combination ``slot mod C(n, k)`` of the teachers in lexicographic order --
    and their voting weights, ``softmax(test_accuracy_% / T)`` over the members ("prior") or equal. None
    when committees are off. ``recover`` has refused a committee larger than ``states`` (:func:`check_committee`)."""
    if cfg.committee_size is None:
        return None
    n, k = len(states), cfg.committee_size
    if cfg.committee_choice == "best":
        priors = _priors([st.teacher for st in states], "committee_choice 'best'",
                         "set committee_choice: random or cycle")
        members = sorted(sorted(range(n), key=lambda i: -priors[i])[:k])
    elif cfg.committee_choice == "cycle":
        members = list(next(itertools.islice(itertools.combinations(range(n), k), slot % math.comb(n, k), None)))
    else:
        gen = torch.Generator().manual_seed(_unit_seed(seed, slot, 0) ^ 0x5EED)
        members = sorted(torch.randperm(n, generator=gen)[:k].tolist())
    return list(zip(members, committee_weights_of(cfg, [states[i].teacher for i in members])))


def _priors(teachers: list, what: str, fix: str) -> list[float]:
    """CV-DD's prior of each of ``teachers``: its recorded test accuracy in %; ``what`` needs them and ``fix``
    avoids it (for the error on a teacher without one)."""
    priors = []
    for t in teachers:
        if t.test_accuracy is None:
            raise DDKitError(f"{what} needs each teacher's recorded test accuracy, and one teacher has none; {fix}")
        priors.append(100.0 * float(t.test_accuracy))
    return priors


def committee_weights_of(cfg: RecoverConfig, teachers: list, temperature: float | None = None) -> list[float]:
    """CV-DD voting weights of ``teachers``: ``softmax(100 * test_accuracy / T)`` ("prior") or equal;
    ``temperature``: T (None: ``committee_temperature``, the recover loss's)."""
    if cfg.committee_weights == "equal":
        return [1.0 / len(teachers)] * len(teachers)
    priors = _priors(teachers, "committee_weights 'prior'", "set committee_weights: equal")
    t = cfg.committee_temperature if temperature is None else temperature
    return torch.softmax(torch.tensor(priors, dtype=torch.float64) / t, 0).tolist()


def directed_weight_adjustment(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, rho: float,
                               steps: int) -> nn.Module:
    """DWA's per-batch teacher: a copy of ``model`` moved ``steps`` times by ``rho / steps`` along the
    normalised gradient that *increases* its cross-entropy on ``images`` (the batch's initial real
    images), so ``||delta theta|| <= rho``. BatchNorm running statistics (the matching targets) stay
    as they are; the copy is in eval mode and its parameters do not require gradients."""
    import copy

    adjusted = copy.deepcopy(model).eval()
    params = list(adjusted.parameters())
    for p in params:
        p.requires_grad_(True)
    step = rho / steps
    for _ in range(steps):
        loss = F.cross_entropy(adjusted(images), labels)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        norm = torch.norm(torch.stack([g.norm(2) for g in grads if g is not None]), 2)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p.add_(g, alpha=step / (float(norm) + 1e-12))  # (a few waits per batch, not per step)
    for p in params:
        p.requires_grad_(False)
    return adjusted


def flatness_loss(logits: torch.Tensor, ema_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """EDC's flatness term: ``KL(softmax(ema_logits / tau) || softmax(logits / tau))`` averaged over
    images and classes (EDC's code: ``F.kl_div`` with its default ``mean`` reduction)."""
    return F.kl_div(F.log_softmax(logits / tau, 1), F.log_softmax(ema_logits / tau, 1),
                    reduction="batchmean", log_target=True) / logits.shape[1]


def _member_loss(cfg: RecoverConfig, st: _TeacherState, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                 ema_inputs: torch.Tensor | None, stats_ema: StatsEMA | None = None,
                 drop: frozenset[str] = frozenset()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One teacher's objective: ``CE + r_stats * statistics + r_logit * logit matching + flatness``, and
    its terms (detached tensors: reading them as numbers waits for the device, so only a progress
    report or a checkpoint does)."""
    with FeatureHooks(model, st.keys) as hooks:
        logits = model(inputs)
    loss_ce = F.cross_entropy(logits, labels)
    loss_stats = statistics_loss(hooks.features, st.targets, labels, cfg.alpha, cfg.first_multiplier, cfg.var_weight,
                                 patch_size=cfg.patch_size, ema=stats_ema, drop=drop)
    loss = loss_ce + cfg.r_stats * loss_stats
    record = {"loss_ce": loss_ce.detach(), "loss_stats": loss_stats.detach()}
    if cfg.r_logit > 0:
        loss_logit = logit_matching_loss(logits, labels, st.targets.class_logits)
        loss = loss + cfg.r_logit * loss_logit
        record["loss_logit"] = loss_logit.detach()
    if ema_inputs is not None:
        with torch.no_grad():
            ema_logits = model(ema_inputs)
        flat = flatness_loss(logits, ema_logits, cfg.flatness_tau)
        loss = loss + cfg.flatness_weight * flat
        record["loss_flat"] = flat.detach()
    return loss, record


def _slot_groups(cfg: RecoverConfig, ipc: int) -> list[list[int]]:
    """IPC slots optimised together: groups of ``slots_per_batch`` (None: all ``ipc`` in one)."""
    n = cfg.slots_per_batch or ipc
    return [list(range(lo, min(lo + n, ipc))) for lo in range(0, ipc, n)]


def _conv_drop(cfg: RecoverConfig, st: _TeacherState, gen: torch.Generator) -> frozenset[str]:
    """Conv keys whose statistics term is dropped this step (G-VBSM's drop rate); no draw when off."""
    if cfg.conv_drop_rate <= 0:
        return frozenset()
    conv = [key for key in st.keys if is_conv_key(key)]
    draws = torch.rand(len(conv), generator=gen)
    return frozenset(key for key, d in zip(conv, draws.tolist()) if d < cfg.conv_drop_rate)


def recover(name: str, cfg: RecoverConfig, real: DataBundle, teachers: list, ctx: FitContext) -> SyntheticSet | None:
    """Optimise ``ipc`` images per class against the teachers; the loop every preset here shares.

    Work units are (group of IPC slots, chunk of ``class_batch`` classes): one batch holds, for
    every class of the chunk, the images of the group's slots, class-major -- one image per class
    with ``slots_per_batch: 1`` (SRe2L), every image of the chunk's classes with ``None``
    (G-VBSM). Units are split round-robin over ranks, each rank starting from its own units'
    initial images alone, and gathered on rank 0, which alone returns the set (the other ranks of a
    torchrun job return None); each unit's random draws come from its own generator seeded by
    (seed, first slot, chunk), so the result does not depend on the number of ranks. Each step:
    augment the batch (RRC + flip, optional CDA curriculum and jitter; with ``flip_plugin`` the
    batch is the images plus their mirror images and the random flip is off), sample one teacher
    (or use the CV-DD committee), and minimise ``CE + r_stats * statistics + r_logit * logit
    matching + flatness + densify_weight * densification``; Adam with a cosine learning rate,
    images clamped to the valid pixel range after every step. The statistics moving average
    (``stats_momentum``) starts afresh with each unit.

    Checkpoints (with a ``ctx.work_dir``): a finished unit is written once, to a file of its own;
    every ``checkpoint_every`` steps a rank's rolling checkpoint holds the state of its unit in
    progress (images, optimiser, generator, EMA copies), so the bytes written grow linearly with
    the set. A rolling checkpoint of ddkit's earlier layout (every finished unit inside it, as
    ``done_<unit>``) is resumed too: its finished units move to their files.
    """
    ipc = check_ipc(real, ctx.ipc)
    check_committee(cfg, len(teachers) + len(cfg.extra_teachers), ctx.options_key)  # before any teacher pass
    warn_digit_mirrors(cfg, real.name, ctx.options_key)
    teachers = load_extra_teachers(cfg, teachers, ctx.device)
    states, stat_paths = _prepare_teachers(name, cfg, real, teachers, ctx)
    k = real.num_classes
    cb = class_chunk(cfg, k)
    units = [(group, lo) for group in _slot_groups(cfg, ipc) for lo in range(0, k, cb)]
    mine = common.my_classes(len(units))  # round-robin over units (helper is generic over indices)

    def positions(u: int) -> torch.Tensor:
        """Class-major indices into the ``[K * ipc]`` set of unit ``u``'s images."""
        group, clo = units[u]
        return (torch.arange(clo, min(clo + cb, k))[:, None] * ipc + torch.tensor(group)[None, :]).reshape(-1)

    spans = [positions(u) for u in mine]
    # this rank's units' initial images only, as the whole set's would be
    init = _initial_images(name, cfg, real, teachers, ipc, ctx,
                           torch.cat(spans) if spans else torch.zeros(0, dtype=torch.int64))
    init = dict(zip(mine, torch.split(init, [len(r) for r in spans])))
    device = ctx.device
    c = real.image_shape[0]
    mean = torch.tensor(real.mean, device=device).view(1, c, 1, 1)
    std = torch.tensor(real.std, device=device).view(1, c, 1, 1)
    lo_px, hi_px = (0 - mean) / std, (1 - mean) / std
    h, w = real.image_shape[1:]
    total = len(mine) * cfg.iterations
    info = ddist.current()
    # the checkpoint names pin everything that decides the result, so a stale one is never resumed; the
    # number of ranks too, since it decides which units a rank holds (each rank writes its own checkpoint)
    key = {"cfg": to_dict(cfg, identity=True), "ipc": ipc, "seed": ctx.seed, "data": real.fingerprint,
           "norm": real.normalisation, "teachers": [t.fingerprint for t in teachers], "world": info.world_size}
    if cb < k and cfg.class_batch is None:  # None meant every class in one batch before 2026-12-06
        key["class_chunk"] = cb
    run_id = config_hash(key)[:12]
    ckpt = common.Checkpoint(ctx, cfg.checkpoint_every, tag=f"{name}-{run_id}-rank{info.rank}", per_rank=True)

    def unit_file(u: int) -> common.Checkpoint:
        """Where unit ``u`` is written once finished (by the rank that made it)."""
        return common.Checkpoint(ctx, 1, tag=f"{name}-{run_id}-unit{u}", per_rank=True)

    state = ckpt.load()  # the unit in progress
    if state is not None and state.get("layout") != 2:
        state = _from_old_layout(name, state, mine, unit_file)
    done: dict[int, torch.Tensor] = {}
    last: dict[str, torch.Tensor | float] = {}  # the losses of the latest step (the set's final_losses)

    for ui, u in enumerate(mine):
        saved = unit_file(u).load()
        if saved is not None:
            done[u], last = saved["images"], dict(saved["last"])
            del init[u]
            log.info("%s: unit %d was finished before, in %s", name, u, unit_file(u).path)
            continue
        group, clo = units[u]
        slot = group[0]
        labels = torch.arange(clo, min(clo + cb, k)).repeat_interleave(len(group)).to(device)
        x0 = init.pop(u).to(device)
        x = ((x0 - mean) / std).clone().requires_grad_(True)
        gen = torch.Generator().manual_seed(_unit_seed(ctx.seed, slot, clo))
        committee = committee_for(cfg, states, ctx.seed, slot)
        models = [st.teacher.model for st in states]
        if cfg.perturb_rho > 0:  # DWA: each batch gets its own adjusted copy of the teacher(s) it uses
            used = range(len(states)) if committee is None else [i for i, _ in committee]
            for i in used:
                models[i] = directed_weight_adjustment(models[i], x.detach(), labels, cfg.perturb_rho,
                                                       cfg.perturb_steps)
        opt = torch.optim.Adam([x], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
        ema = x.detach().clone() if cfg.flatness_weight > 0 else None
        stats_emas = [StatsEMA(cfg.stats_momentum) for _ in states] if cfg.stats_momentum > 0 else None
        it0 = 0
        if state is not None and int(state["unit"]) == u:
            with torch.no_grad():
                x.copy_(state["x"].to(device))
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            if ema is not None:
                ema = state["ema"].to(device)
            if stats_emas is not None:
                for se, values in zip(stats_emas, state["stats_ema"]):
                    se.values = {key: v.to(device) for key, v in values.items()}
            it0, last = int(state["it"]), dict(state["last"])
            state = None
            log.info("%s: resuming unit %d at step %d", name, u, it0)
        for it in range(it0, cfg.iterations):
            for group_ in opt.param_groups:  # cosine from lr to 0, no warm-up (SRe2L's lr_cosine_policy)
                group_["lr"] = 0.5 * (1 + math.cos(math.pi * it / cfg.iterations)) * cfg.lr
            aug = _augment(cfg, it, flip=not cfg.flip_plugin)
            batch, blabels = (flip_pair(x, labels) if cfg.flip_plugin else (x, labels))
            # augment_per batch: one crop box and flip, which apply() broadcasts to every image of the batch
            draws = 1 if cfg.augment_per == "batch" else len(batch)
            params = aug.sample(draws, gen, (h, w)) if aug is not None else None
            shifts = None
            if cfg.jitter > 0:
                low = -cfg.jitter if cfg.jitter_mode == "symmetric" else 0
                shifts = torch.randint(low, cfg.jitter + 1, (2,), generator=gen).tolist()
            if committee is None:  # G-VBSM: one teacher sampled per step
                members = [(int(torch.randint(len(states), (1,), generator=gen)) if len(states) > 1 else 0, 1.0)]
            else:  # CV-DD: every committee member votes with its weight
                members = committee
            drops = [_conv_drop(cfg, states[ti], gen) for ti, _ in members]

            def view(images, aug=aug, params=params, shifts=shifts):
                out = aug.apply(images, params) if aug is not None else images
                return torch.roll(out, shifts=shifts, dims=(2, 3)) if shifts is not None else out

            inputs = view(batch)
            ema_inputs = view(flip_pair(ema, labels)[0] if cfg.flip_plugin else ema) if ema is not None else None
            loss = torch.zeros((), device=device)
            record: dict[str, torch.Tensor] = {}
            for (ti, weight), drop in zip(members, drops):
                part, rec = _member_loss(cfg, states[ti], models[ti], inputs, blabels, ema_inputs,
                                         stats_emas[ti] if stats_emas is not None else None, drop)
                loss = loss + weight * part
                for key, v in rec.items():  # summed in float64 (float32 on MPS), as Python numbers were
                    record[key] = record.get(key, 0.0) + weight * v.to(sum_dtype(device))
            if cfg.densify_weight > 0:
                dense = densification_loss(inputs, blabels, cfg.densify_tau)
                loss = loss + cfg.densify_weight * dense
                record["loss_densify"] = dense.detach()
            (grad,) = torch.autograd.grad(loss, [x])
            if ema is not None:  # EDC updates the copy with this step's images, before their update
                with torch.no_grad():
                    ema.mul_(cfg.flatness_beta).add_(x, alpha=1 - cfg.flatness_beta)
            x.grad = grad
            opt.step()
            with torch.no_grad():
                x.copy_(torch.max(torch.min(x, hi_px), lo_px))
            record["loss"] = loss.detach()
            last = record
            step = ui * cfg.iterations + it + 1
            if it + 1 == cfg.iterations:  # finished: written once, to its own file
                done[u] = (x.detach() * std + mean).clamp(0, 1).cpu()
                if (file := unit_file(u)).path is not None:
                    file.save({"images": done[u], "last": common.floats(last)})
            elif ckpt.due(step, total):
                snap = {"layout": 2, "unit": u, "it": it + 1, "last": common.floats(last), "x": x.detach().cpu(),
                        "opt": opt.state_dict(), "gen": gen.get_state()}
                if ema is not None:
                    snap["ema"] = ema.cpu()
                if stats_emas is not None:
                    snap["stats_ema"] = [{key: v.cpu() for key, v in se.values.items()} for se in stats_emas]
                ckpt.save(snap)
            common.report(ctx, step, total, **record)
    images = torch.empty(k * ipc, *real.image_shape) if info.is_main else None

    def place(u: int, part: torch.Tensor) -> None:
        images[positions(u)] = part

    common.gather_units(done, [(len(positions(u)), *real.image_shape) for u in range(len(units))], place)
    # final_losses: the last unit's last step, as one process records them (not rank 0's last unit's)
    final = max(ddist.all_gather_objects((mine[-1] if mine else -1, common.floats(last))), key=lambda p: p[0])[1]
    if images is None:
        return None
    labels_all = torch.arange(k).repeat_interleave(ipc)
    meta = {
        "teachers": [t.fingerprint for t in teachers],
        "statistics": stat_paths,
        "layers_matched": {s.teacher.fingerprint: s.keys for s in states},
        "final_losses": final,
    }
    return SyntheticSet(images, labels_all, meta=meta)


def _from_old_layout(name: str, state: dict, mine: list[int], unit_file) -> dict | None:
    """A rolling checkpoint of the layout before finished units had files of their own (``done_<unit>``
    entries, the unit in progress as an index into ``mine``): its finished units are written to their
    files, and the state of its unit in progress (None: there is none) is returned in the new layout."""
    last = common.floats(dict(state.get("last", {})))
    finished = {int(key.split("_")[1]): v for key, v in state.items() if key.startswith("done_")}
    for u, images in finished.items():
        unit_file(u).save({"images": images, "last": last})
    ui = int(state["unit"])
    log.info("%s: resuming a checkpoint of the earlier layout (%d finished unit(s) moved to files of their own)",
             name, len(finished))
    if "x" not in state or ui >= len(mine):
        return None
    return {**{key: v for key, v in state.items() if not key.startswith("done_")}, "layout": 2, "unit": mine[ui],
            "last": last}
