"""The small pieces the matching methods share (DM, DataDAM, DC, DSA; MTT's resume checks).

- :func:`derive_seed`: one independent RNG stream per (seed, purpose, class, iteration), so results
  do not depend on the order in which classes or iterations are visited;
- :func:`fresh_model`: a randomly initialised network whose weights depend only on a seed, without
  touching the global RNG (:func:`model_keys`: the config keys an error about it names);
- :class:`RealByClass`: normalised real images indexed by class, on the device;
- :func:`check_common`, :func:`check_model`: the config checks the matching methods share;
- :func:`state_fingerprint`, :func:`legacy_fingerprint`, :func:`resumable`, :func:`tree_to`: what a
  checkpoint must match to be resumed (now, and as written before ``flip_plugin``), the checkpoint with
  the state it holds, and moving its (optimiser) state between devices;
- :func:`fit_per_class`: the loop of every method whose loss splits into independent per-class terms
  (DM, DataDAM), and :func:`gather_result`, their classes from every rank as one synthetic set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ddkit import distributed as ddist
from ddkit.config import to_dict
from ddkit.data.augment import build_augment, typed_augment_options, warn_digit_flips
from ddkit.data.base import DataBundle, to_device
from ddkit.determinism import seeded_cpu_rng
from ddkit.errors import ConfigError, DDKitError
from ddkit.methods import common
from ddkit.methods.base import FitContext, SyntheticSet, check_ipc
from ddkit.methods.fyi import warn_digit_mirrors, with_mirror
from ddkit.models import configured_model
from ddkit.models.registry import resolve_model
from ddkit.training import sum_dtype

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# shared helpers


def derive_seed(*keys: Any) -> int:
    """A 63-bit seed that depends only on ``keys`` (e.g. ``(seed, "net", iteration)``)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def model_keys(ctx: FitContext) -> tuple[str, str]:
    """The config keys of a matching method's network (its Config's ``model`` and ``model_options``)."""
    return f"{ctx.options_key}.model", f"{ctx.options_key}.model_options"


def fresh_model(name: str, options: dict, real: DataBundle, seed: int, device: torch.device,
                keys: tuple[str, str] = ("distill.options.model", "distill.options.model_options")) -> nn.Module:
    """A randomly initialised ``name`` for ``real``'s images; weights depend only on ``seed``. A model
    that cannot take these images (too deep for their size) is an error naming ``keys``.

    The model is built on the CPU from the global CPU generator seeded with ``seed``
    (:func:`~ddkit.determinism.seeded_cpu_rng`), so the caller's RNG states, CUDA's too, are
    untouched, then moved to ``device``.
    """
    c, h, _ = real.image_shape
    with seeded_cpu_rng(seed):
        model = configured_model(keys, name, c, real.num_classes, h, options)
    return model.to(device).train()


class RealByClass:
    """Normalised real training images on ``device`` and the indices of each class."""

    def __init__(self, real: DataBundle, device: torch.device) -> None:
        self.images = common.to_normalized(real.train.float_images(), real).to(device)
        self.index = real.train.class_indices(real.num_classes)

    def draw(self, c: int, n: int, gen: torch.Generator) -> torch.Tensor:
        """The indices (on the host) of ``min(n, size of class c)`` random images of class ``c``
        (without replacement): what :meth:`batch` takes, drawn without touching the images."""
        idx = self.index[c]
        return idx[torch.randperm(len(idx), generator=gen)[:n]]

    def take(self, pick: torch.Tensor) -> torch.Tensor:
        """The images at the host indices ``pick``; a pinned, asynchronous copy of the indices does
        not wait for the GPU's queue."""
        return self.images[to_device(pick, self.images.device)]

    def batch(self, c: int, n: int, gen: torch.Generator) -> torch.Tensor:
        """``min(n, size of class c)`` random images of class ``c`` (without replacement)."""
        return self.take(self.draw(c, n, gen))


def tree_to(obj: Any, device: torch.device | str) -> Any:
    """``obj`` (dicts, lists and tuples of tensors and plain values, e.g. an optimiser's
    ``state_dict()``) with every tensor moved to ``device``; other values as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: tree_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree_to(v, device) for v in obj)
    return obj


def check_model(name: str, what: str = "model") -> None:
    """Raise ConfigError for an unknown model name (at config time, not after loading data)."""
    try:
        resolve_model(name)
    except DDKitError as err:
        raise ConfigError(f"{what}: {err}") from None


def check_common(cfg: Any) -> None:
    """Validation shared by the matching methods' configs."""
    if cfg.iterations < 1:
        raise ConfigError(f"iterations must be >= 1, got {cfg.iterations}")
    if cfg.checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be >= 1, got {cfg.checkpoint_every}")
    if cfg.init not in ("real", "noise"):
        raise ConfigError(f"init must be 'real' or 'noise', got {cfg.init!r}")
    if cfg.lr_img <= 0:
        raise ConfigError(f"lr_img must be > 0, got {cfg.lr_img}")
    if not 0 <= cfg.momentum_img < 1:
        raise ConfigError(f"momentum_img must lie in [0, 1), got {cfg.momentum_img}")
    if cfg.batch_real < 1:
        raise ConfigError(f"batch_real must be >= 1, got {cfg.batch_real}")
    check_model(cfg.model)
    if hasattr(cfg, "dsa_options"):
        try:  # unknown DSA options fail here; numbers as DSA types them (1 and 1.0 give one set)
            cfg.dsa_options = typed_augment_options("dsa", cfg.dsa_options)
        except ConfigError as e:  # named as the method's option, not build_augment's augment_options
            msg = str(e)
            raise ConfigError(f"dsa_options{msg.removeprefix('augment_options')}" if msg.startswith("augment_options")
                              else f"dsa_options: {msg}") from None


def state_fingerprint(cfg: Any, ipc: int, seed: int, real: DataBundle) -> str:
    """What a checkpoint must match to be resumed: config, IPC, seed, and the data (its fingerprint:
    pixels, labels and classes) with its normalisation. The config as its identity has it: a field
    added later (``flip_plugin``) is left out at its default, which reproduces the run from before it
    existed, so a checkpoint written then still resumes; operational settings (``checkpoint_every``) are
    held at their defaults, so a run resumed with another one keeps its checkpoint, as it keeps its set's
    identity."""
    return repr((to_dict(cfg, identity=True), ipc, seed, real.fingerprint, real.normalisation))


#: config fields that checkpoints written before them (up to bcee3df) do not hold: at their defaults those
#: runs are reproduced, so :func:`legacy_fingerprint` leaves them out
LEGACY_ABSENT = ("flip_plugin",)


def legacy_fingerprint(cfg: Any, ipc: int, seed: int, real: DataBundle) -> str | None:
    """The fingerprint that a checkpoint written before ``flip_plugin`` existed holds for this run: the
    whole config as written (``to_dict(cfg)``, operational settings included, ``added`` fields such as
    DC's ``bn_real_per_class`` included) without the fields of :data:`LEGACY_ABSENT`. None where one of
    those is set away from its default: no run from then wrote it. :func:`state_fingerprint` left that
    form when ``added`` fields at their defaults left it (6d7e2e6), which refused every dc/dsa checkpoint
    from before; the form is accepted on resume so those resume to the same bytes."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    whole = to_dict(cfg)
    for name in LEGACY_ABSENT:
        if name in whole and whole.pop(name) != defaults[name]:
            return None
    return repr((whole, ipc, seed, real.fingerprint, real.normalisation))


def check_resume(state: dict, fingerprint: str, path, legacy: str | None = None) -> None:
    """Refuse a checkpoint whose fingerprint is neither ``fingerprint`` nor ``legacy`` (:func:`legacy_fingerprint`)."""
    held = state.get("fingerprint")
    if held != fingerprint and (legacy is None or held != legacy):
        raise DDKitError(
            f"checkpoint {path} was written by a run with other settings (config, ipc, seed or data); "
            "delete it (or its work folder) to start afresh"
        )


def resumable(ctx: FitContext, every: int, tag: str, fingerprint: str,
              legacy: str | None = None) -> tuple[common.Checkpoint, dict | None]:
    """The method's checkpoint and the state it holds (None: start afresh); a state that a run with other
    settings wrote (another ``fingerprint``, and not the ``legacy`` one of :func:`legacy_fingerprint`) is
    refused. A resumed run saves its next checkpoints with ``fingerprint``."""
    ckpt = common.Checkpoint(ctx, every, tag=tag)
    state = ckpt.load()
    if state is not None:
        check_resume(state, fingerprint, ckpt.path, legacy)
    return ckpt, state


# ------------------------------------------------------------------------------------------------
# the per-class loop (DM, DataDAM)

#: loss(net, real_batch, synthetic_batch) -> scalar; both batches normalised and augmented alike
ClassLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def fit_per_class(
    cfg: Any,
    real: DataBundle,
    ctx: FitContext,
    classes: list[int],
    loss_fn: ClassLoss,
    tag: str,
) -> dict[int, torch.Tensor]:
    """Optimise the synthetic images of ``classes`` independently; returns pixel images per class.

    Iteration ``it`` uses one freshly initialised ``cfg.model`` for all classes (seeded from
    ``(seed, it)``, so every rank builds the same one) and, per class ``c``, a generator seeded from
    ``(seed, c, it)`` for the real batch and the one DSA draw applied to both batches (siamese). With
    ``cfg.flip_plugin`` (FYI) the synthetic batch is the class's images and their mirror images
    (:func:`~ddkit.methods.fyi.with_mirror`); DSA's flip, one draw for the whole batch, then swaps the
    two halves and keeps each pair mirrored.
    Each class has its own image tensor and SGD optimiser, so the images of a class do not depend on
    which other classes are fitted with it: sharding classes over ranks gives the single-process
    result. Checkpoints hold all classes (gathered from every rank, on the CPU) and the step.
    """
    ipc = check_ipc(real, ctx.ipc)
    device = torch.device(ctx.device)
    size = tuple(real.image_shape[1:])
    augment = build_augment("dsa", **cfg.dsa_options) if cfg.dsa else None
    warn_digit_flips(augment, real.name, f"{ctx.options_key}.dsa_options")
    warn_digit_mirrors(cfg, real.name, ctx.options_key)
    # real init: the same subset as the ``random`` method with this seed
    pixels, _ = common.init_images(real, ipc, cfg.init, ctx.seed)
    start = common.to_normalized(pixels, real)
    syn = {c: start[c * ipc:(c + 1) * ipc].clone().to(device).requires_grad_(True) for c in classes}
    opts = {c: torch.optim.SGD([syn[c]], lr=cfg.lr_img, momentum=cfg.momentum_img) for c in classes}

    fingerprint = state_fingerprint(cfg, ipc, ctx.seed, real)
    ckpt, state = resumable(ctx, cfg.checkpoint_every, tag, fingerprint,
                            legacy_fingerprint(cfg, ipc, ctx.seed, real))
    step = 0
    if state is not None:
        step = int(state["step"])
        for c in classes:
            with torch.no_grad():
                syn[c].copy_(state["images"][str(c)].to(device))
            opts[c].load_state_dict(tree_to(state["optim"][str(c)], device))
        log.info("%s: resumed from %s at iteration %d", tag, ckpt.path, step)

    data = RealByClass(real, device)
    for it in range(step, cfg.iterations):
        net = fresh_model(cfg.model, cfg.model_options, real, derive_seed(ctx.seed, tag, "net", it), device,
                          model_keys(ctx))
        for p in net.parameters():
            p.requires_grad_(False)
        total = 0.0
        for c in classes:
            gen = torch.Generator().manual_seed(derive_seed(ctx.seed, tag, "class", c, it))
            x_real = data.batch(c, cfg.batch_real, gen)
            x_syn = with_mirror(syn[c]) if getattr(cfg, "flip_plugin", False) else syn[c]
            if augment is not None:
                params = augment.sample(1, gen, size)  # one draw for both batches: siamese
                x_real = augment.apply(x_real, params)
                x_syn = augment.apply(x_syn, params)
            loss = loss_fn(net, x_real, x_syn)
            opts[c].zero_grad(set_to_none=True)
            syn[c].grad = torch.autograd.grad(loss, syn[c])[0]
            opts[c].step()
            # float64 as Python numbers (float32 on MPS); read (a device wait) only by a progress report
            total = total + loss.detach().to(sum_dtype(device))
        if ckpt.due(it + 1, cfg.iterations):
            # on the CPU: a pickled CUDA tensor is rebuilt on its rank's GPU by every peer
            parts = ddist.all_gather_objects({
                "images": {str(c): syn[c].detach().cpu() for c in classes},
                "optim": {str(c): tree_to(opts[c].state_dict(), "cpu") for c in classes},
            })
            merged: dict[str, dict] = {"images": {}, "optim": {}}
            for part in parts:
                merged["images"].update(part["images"])
                merged["optim"].update(part["optim"])
            ckpt.save({"step": it + 1, "fingerprint": fingerprint, **merged})
        common.report(ctx, it + 1, cfg.iterations, loss=total / max(1, len(classes)))
    return {c: common.to_pixels(syn[c].detach(), real).cpu() for c in classes}


def gather_result(per_class: dict[int, torch.Tensor], real: DataBundle, ipc: int, **meta: Any) -> SyntheticSet:
    """Every rank's classes, class-major, as float32 pixel images with int64 labels."""
    images = torch.cat(common.gather_classes(per_class, real.num_classes)).float()
    labels = torch.arange(real.num_classes, dtype=torch.int64).repeat_interleave(ipc)
    return SyntheticSet(images, labels, meta=dict(meta))
