"""Gradient matching: Dataset Condensation (``dc``) and its siamese-augmented variant (``dsa``).

Both keys run :func:`fit_gradient_matching`; ``dsa`` only adds one DSA draw per class step, applied
identically to the real and the synthetic batch, and DSA on the network's inner-loop training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ddkit import distributed as ddist
from ddkit.config import Checked, field
from ddkit.data.augment import Augment, build_augment, warn_digit_flips
from ddkit.data.base import DataBundle, to_device
from ddkit.errors import ConfigError, DDKitError, ImageTooSmall
from ddkit.methods import common
from ddkit.methods.base import METHODS, FitContext, Method, SyntheticSet, check_ipc
from ddkit.methods.fyi import flip_pair, pair_params, warn_digit_mirrors, with_mirror
from ddkit.methods.matching import (
    RealByClass,
    check_common,
    derive_seed,
    fresh_model,
    legacy_fingerprint,
    model_keys,
    resumable,
    state_fingerprint,
    tree_to,
)
from ddkit.training import batchnorm_layers, sum_dtype

log = logging.getLogger(__name__)

#: IPC -> (outer_loop, inner_loop) of the reference ``utils.get_loops``
LOOPS: dict[int, tuple[int, int]] = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


def loops_for(ipc: int, outer: int | None, inner: int | None) -> tuple[int, int]:
    """Explicit loops win; otherwise the reference table, at the nearest tabulated IPC."""
    nearest = min(LOOPS, key=lambda k: (abs(k - ipc), k))
    if (outer is None or inner is None) and nearest != ipc:
        log.info("no reference loops for ipc %d; using those of ipc %d: %s", ipc, nearest, LOOPS[nearest])
    o, i = LOOPS[nearest]
    return (o if outer is None else outer), (i if inner is None else inner)


def layer_distance(g_syn: torch.Tensor, g_real: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DC's per-layer distance: sum over output nodes of ``1 - cos(g_syn[i], g_real[i])``.

    Row ``i`` is everything that feeds output node ``i`` (a conv filter, a row of a linear weight).
    One-dimensional parameters (biases, norm scales) contribute 0, as in the reference
    ``distance_wb``; ``eps`` in the denominator as there.
    """
    if g_real.dim() <= 1:
        return g_real.new_zeros(())
    s = g_syn.reshape(g_syn.shape[0], -1)
    r = g_real.reshape(g_real.shape[0], -1)
    cos = (s * r).sum(-1) / (s.norm(dim=-1) * r.norm(dim=-1) + eps)
    return (1.0 - cos).sum()


def match_distance(grads_syn, grads_real) -> torch.Tensor:
    """Sum of :func:`layer_distance` over the network's parameters."""
    total = None
    for s, r in zip(grads_syn, grads_real, strict=True):
        d = layer_distance(s, r)
        total = d if total is None else total + d
    assert total is not None, "no parameters to match"
    return total


@dataclass
class DCConfig(Checked):
    """Gradient-matching settings (defaults: DC paper / reference ``main.py`` for ConvNet)."""

    iterations: int = field(1000, help="outer iterations, each with a freshly initialised network (paper: 1000)")
    model: str = field("convnet3", help="network whose gradients are matched")
    model_options: dict = field({}, help="options of the model (e.g. {width: 64})")
    init: Literal["real", "noise"] = field("real", help="initial images: random real ones (DSA, DM) or Gaussian noise "
                                                        "(the DC paper's Table 1)")
    outer_loop: int | None = field(None, help="image updates per network; null: by IPC (1->1, 10->10, 50->50)")
    inner_loop: int | None = field(None, help="network epochs on the synthetic set between image updates; null: by IPC "
                                              "(1->1, 10->50, 50->10)")
    lr_img: float = field(0.1, help="SGD learning rate of the synthetic images (normalised pixel units)")
    momentum_img: float = field(0.5, help="SGD momentum of the synthetic images")
    lr_net: float = field(0.01, help="SGD learning rate of the network in the inner loop (no momentum)")
    batch_real: int = field(256, help="real images per class per matching step")
    batch_train: int = field(256, help="batch size of the inner-loop network training on the synthetic set")
    checkpoint_every: int = field(10, operational=True, help="iterations between checkpoints in the work folder (not "
                                  "part of the set's identity)")
    bn_real_per_class: int = field(16, added=True, help="networks with BatchNorm: before each image update a forward "
                                   "pass over this many real images per class sets the running statistics, which stay "
                                   "frozen while gradients are matched (the reference's BNSizePC); 0: the "
                                   "statistics of each matched batch. No effect on the default instance-norm ConvNet")
    flip_plugin: bool = field(False, added=True, help="FYI (ECCV 2024): match each class's gradient on its synthetic "
                              "images together with their mirror images, and train the inner-loop network on batches "
                              "doubled likewise (DSA's per-batch flip kept)")

    def __post_init__(self) -> None:
        check_common(self)
        if self.bn_real_per_class < 0:
            raise ConfigError(f"bn_real_per_class must be >= 0, got {self.bn_real_per_class}")
        for name in ("outer_loop", "inner_loop"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 (or null for the IPC default), got {value}")
        if self.lr_net <= 0:
            raise ConfigError(f"lr_net must be > 0, got {self.lr_net}")
        if self.batch_train < 1:
            raise ConfigError(f"batch_train must be >= 1, got {self.batch_train}")


@dataclass
class DSAConfig(DCConfig):
    """DC settings plus the DSA augmentation (defaults: DSA paper / reference ``main.py --method DSA``)."""

    dsa_options: dict = field({}, help="DSA options, e.g. {flip: false} for digits; strategy "
                                       "color_crop_cutout_flip_scale_rotate")


#: image sides at which :func:`has_batchnorm` tries to build a model, smallest first: the data's size
#: is not known where it is asked (a set's identity), and a deep model needs large images
PROBE_SIZES = (32, 64, 128, 256, 512, 1024)


def has_batchnorm(model: str, options: dict) -> bool:
    """Whether ``model`` with ``options`` has BatchNorm layers (built on the meta device: no memory).

    The model is built at the first of :data:`PROBE_SIZES` it accepts (a depth-6 ConvNet needs 64 px),
    so any model that some data can use is answered for; whether it fits the data at hand is checked
    when the method builds it for that data.
    """
    from ddkit.models import create_model

    for size in PROBE_SIZES:
        try:
            with torch.device("meta"):
                net = create_model(model, 1, 2, size, **options)
        except ImageTooSmall as err:  # another error (a bad option) is the user's to fix, as it stands
            too_small = err
            continue
        return bool(batchnorm_layers(net))
    raise DDKitError(f"cannot tell whether model {model!r} has BatchNorm layers: it cannot be built for 1-channel "
                     f"images of {PROBE_SIZES[0]} to {PROBE_SIZES[-1]} px ({too_small})")


def _freeze_bn(net: nn.Module, bn: list[nn.Module], data, per_class: int, num_classes: int,
               gen: torch.Generator) -> None:
    """The reference's BatchNorm handling before an image update: one training-mode forward pass over
    ``per_class`` real images of every class updates the running statistics (momentum as the layer's),
    then the layers switch to eval mode, so the matched gradients use those statistics and not the
    statistics of each class's real or synthetic batch (a synthetic batch may be one image)."""
    net.train()
    with torch.no_grad():
        net(torch.cat([data.batch(c, per_class, gen) for c in range(num_classes)]))
    for m in bn:
        m.eval()


def _class_grads(net: nn.Module, x: torch.Tensor, label: int, create_graph: bool) -> tuple[torch.Tensor, ...]:
    y = torch.full((len(x),), label, dtype=torch.long, device=x.device)
    loss = F.cross_entropy(net(x), y)
    return torch.autograd.grad(loss, list(net.parameters()), create_graph=create_graph)


def fit_gradient_matching(cfg: DCConfig, real: DataBundle, ctx: FitContext, augment: Augment | None,
                          tag: str) -> SyntheticSet:
    """DC / DSA synthesis; returns float32 pixel images, class-major.

    Iteration ``it`` (seeded from ``(seed, it)``: network weights, real batches, augmentation,
    inner-loop shuffling) builds a fresh network, then ``outer_loop`` times: one image update on
    the summed per-class gradient distances (each class's differentiated on its own, into its rows
    of the images), followed (except after the last) by ``inner_loop``
    epochs of SGD on a detached copy of the synthetic set. With ``cfg.flip_plugin`` (FYI) a class's
    synthetic batch is its images and their mirror images (:func:`~ddkit.methods.fyi.with_mirror`),
    before the siamese DSA draw (whose flip, one for the batch, swaps the halves), and every
    inner-loop batch is doubled likewise, each mirror augmented with its image's draw.

    Under ``torchrun`` class ``c``'s gradient distance is computed by rank ``c % world`` and the
    image gradient is all-reduced: each class's images receive their gradient from one rank only
    (zeros elsewhere), so every rank holds the single-process gradient bit for bit, takes the same
    image step and trains the same inner-loop network. Every rank still draws every class's real
    batch and augmentation (gathering and augmenting only its own), so the random streams stay those
    of one process.
    """
    ipc = check_ipc(real, ctx.ipc)
    warn_digit_mirrors(cfg, real.name, ctx.options_key)
    outer, inner = loops_for(ipc, cfg.outer_loop, cfg.inner_loop)
    device = torch.device(ctx.device)
    size = tuple(real.image_shape[1:])
    nc = real.num_classes
    pixels, labels = common.init_images(real, ipc, cfg.init, ctx.seed)  # real: the `random` subset
    syn = common.to_normalized(pixels, real).to(device).requires_grad_(True)
    labels_dev = labels.to(device)
    opt_img = torch.optim.SGD([syn], lr=cfg.lr_img, momentum=cfg.momentum_img)

    fingerprint = state_fingerprint(cfg, ipc, ctx.seed, real)
    ckpt, state = resumable(ctx, cfg.checkpoint_every, tag, fingerprint,
                            legacy_fingerprint(cfg, ipc, ctx.seed, real))
    step = 0
    if state is not None:
        with torch.no_grad():
            syn.copy_(state["images"].to(device))
        opt_img.load_state_dict(tree_to(state["optim"], device))
        step = int(state["step"])
        log.info("%s: resumed from %s at iteration %d", tag, ckpt.path, step)

    data = RealByClass(real, device)
    info = ddist.current()
    for it in range(step, cfg.iterations):
        gen = torch.Generator().manual_seed(derive_seed(ctx.seed, tag, "iteration", it))
        net = fresh_model(cfg.model, cfg.model_options, real, derive_seed(ctx.seed, tag, "net", it), device,
                          model_keys(ctx))
        opt_net = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)
        bn = batchnorm_layers(net) if cfg.bn_real_per_class else []
        total = 0.0
        for ol in range(outer):
            if bn:
                _freeze_bn(net, bn, data, cfg.bn_real_per_class, nc, gen)
            # the classes' images are disjoint rows of syn: each class's distance is differentiated
            # on its own, into its rows, so only one class's double-backward graph is alive at a time
            # (the gradient of the summed distance, bit for bit)
            loss = syn.new_zeros(())
            grad = torch.zeros_like(syn)
            for c in range(nc):
                # every rank takes every class's random draws (the streams stay one process's) but
                # gathers and augments the images of its own classes only
                pick = data.draw(c, cfg.batch_real, gen)
                params = augment.sample(1, gen, size) if augment is not None else None  # siamese: both batches
                if c % info.world_size != info.rank:
                    continue  # another rank's class
                x_real = data.take(pick)
                rows = syn[c * ipc:(c + 1) * ipc]
                x_syn = with_mirror(rows) if cfg.flip_plugin else rows
                if params is not None:
                    x_real = augment.apply(x_real, params)
                    x_syn = augment.apply(x_syn, params)
                g_real = [g.detach() for g in _class_grads(net, x_real, c, create_graph=False)]
                g_syn = _class_grads(net, x_syn, c, create_graph=True)
                distance = match_distance(g_syn, g_real)
                grad[c * ipc:(c + 1) * ipc] += torch.autograd.grad(distance, rows)[0]
                loss = loss + distance.detach()
            opt_img.zero_grad(set_to_none=True)
            if info.enabled:
                ddist.all_reduce_sum(grad)
                loss = ddist.all_reduce_sum(loss.detach().clone())
            syn.grad = grad
            opt_img.step()
            # float64 as Python numbers (float32 on MPS); read (a device wait) only by a progress report
            total = total + loss.detach().to(sum_dtype(device))
            if ol == outer - 1:
                break
            train_x, n = syn.detach().clone(), len(labels_dev)
            net.train()  # BatchNorm trains on batch statistics again, as the reference's inner-loop epochs
            for _ in range(inner):
                # drawn on the host, moved once per epoch without waiting for the GPU's queue
                perm = to_device(torch.randperm(n, generator=gen), device)
                for lo in range(0, n, cfg.batch_train):
                    idx = perm[lo:lo + cfg.batch_train]
                    x, y = train_x[idx], labels_dev[idx]
                    params = augment.sample(len(idx), gen, size) if augment is not None else None
                    if cfg.flip_plugin:  # FYI: each image with its mirror, which takes the image's draw
                        x, y = flip_pair(x, y)
                        params = pair_params(params) if params is not None else None
                    if params is not None:
                        x = augment.apply(x, params)
                    step_loss = F.cross_entropy(net(x), y)
                    opt_net.zero_grad(set_to_none=True)
                    step_loss.backward()
                    opt_net.step()
        if ckpt.due(it + 1, cfg.iterations):
            ckpt.save({"step": it + 1, "fingerprint": fingerprint, "images": syn.detach().cpu(),
                       "optim": tree_to(opt_img.state_dict(), "cpu")})
        common.report(ctx, it + 1, cfg.iterations, loss=total / (outer * nc))
    images = common.to_pixels(syn.detach(), real).cpu().float()
    return SyntheticSet(images, labels.to(torch.int64),
                        meta={"seed": ctx.seed, "outer_loop": outer, "inner_loop": inner})


@METHODS.register("dc")
class DC(Method):
    """Dataset Condensation with gradient matching (Zhao, Mopuri & Bilen, ICLR 2021).

    Per class, the gradient of the cross-entropy on synthetic images is matched to the gradient on
    a real batch, layer by layer, with ``sum over output nodes of (1 - cosine similarity)``; the
    network is re-initialised every outer iteration and trained on the synthetic set between
    image updates. Defaults are the paper's / reference's: ConvNet-3, 1000 iterations, image SGD
    lr 0.1 momentum 0.5, network SGD lr 0.01, 256 real images per class, loops by IPC
    (1 -> (1, 1), 10 -> (10, 50), 50 -> (50, 10); other IPCs use the nearest tabulated one).

    Differences: default initialisation is ``real`` (random real images, as DSA's and DM's README
    commands), unlike the DC paper's Table-1 runs, which start from Gaussian noise (the reference
    ``main.py`` default; its README's DC command passes no ``--init``): the published DC numbers
    that ddkit's tables put beside ``dc`` come from noise initialisation, and ``init: noise``
    reproduces that setting (the full-tier DC configs set it). Images are returned as float32
    pixels; biases and normalisation parameters contribute nothing to the distance (as in the
    reference, not stated in the paper); each iteration draws from its own seeded generator instead
    of a global stream. For a network with BatchNorm (``model: convnet3-bn``) the running statistics
    are set from 16 real images per class before each image update and frozen while gradients are
    matched, as the reference does (``bn_real_per_class``; until 2026-12-05 ddkit matched with batch
    statistics).

    ``flip_plugin`` adds FYI (:mod:`ddkit.methods.fyi`), as the FYI authors' ``main.py``: each class's
    synthetic batch is concatenated with its mirror images for its gradient, and the inner-loop
    network trains on batches of the synthetic set doubled likewise (``batch_train`` images and their
    mirrors; DSA draws once per pair there, the authors per copy).
    """

    Config = DCConfig
    uses_teacher = False
    smoke_options = {"model": "tiny_convnet", "iterations": 3, "outer_loop": 2, "inner_loop": 1,
                     "batch_real": 8, "batch_train": 4, "checkpoint_every": 1}

    @classmethod
    def identity_tags(cls, options: dict) -> dict:
        # frozen BatchNorm statistics changed the sets of BatchNorm networks only: remake those
        cfg = DCConfig(**{k: options[k] for k in ("model", "model_options", "bn_real_per_class") if k in options})
        if cfg.bn_real_per_class and has_batchnorm(cfg.model, cfg.model_options):
            return {"bn_real_per_class": cfg.bn_real_per_class}
        return {}

    def fit(self, real: DataBundle, teachers: list, ctx: FitContext) -> DC:
        self.synthetic_ = fit_gradient_matching(self.cfg, real, ctx, None, tag="dc")
        return self


@METHODS.register("dsa")
class DSA(Method):
    """Dataset Condensation with Differentiable Siamese Augmentation (Zhao & Bilen, ICML 2021).

    DC (see :class:`DC`) where, for every class step, one DSA transform (strategy
    color_crop_cutout_flip_scale_rotate) is drawn and applied to both the real and the synthetic
    batch, and the network's inner-loop training on the synthetic set uses DSA with per-image
    magnitudes. Defaults as DC's (reference ``main.py --method DSA --init real``): image lr 0.1,
    1000 iterations, loops by IPC. Same differences from the reference as :class:`DC`; DSA keeps
    flips by default (Fashion-MNIST, CIFAR): pass ``dsa_options: {flip: false}`` for digits.
    """

    Config = DSAConfig
    uses_teacher = False
    smoke_options = DC.smoke_options
    identity_tags = DC.identity_tags

    def fit(self, real: DataBundle, teachers: list, ctx: FitContext) -> DSA:
        augment = build_augment("dsa", **self.cfg.dsa_options)
        warn_digit_flips(augment, real.name, f"{ctx.options_key}.dsa_options")
        self.synthetic_ = fit_gradient_matching(self.cfg, real, ctx, augment, tag="dsa")
        return self
