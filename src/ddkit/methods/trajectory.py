"""Expert trajectory buffers and the unrolled student shared by the trajectory-matching methods.

**Buffer stage.** :func:`train_experts` trains ``num_experts`` classifiers on the real training
set with the MTT recipe (Cazenavette et al., CVPR 2022, ``buffer.py``: plain SGD, lr 0.01, no
momentum, no weight decay, batch 256, DSA augmentation of every real batch, 50 epochs) and stores
every expert's flattened parameters after each epoch (epoch 0 = initialisation). Option
``sam_rho > 0`` trains the experts with sharpness-aware minimisation instead (SAM, Foret et al.,
ICLR 2021; ``sam_adaptive`` gives ASAM; ``sam_alpha > 0`` gives GSAM, Zhuang et al., ICLR 2022),
the "flat trajectory" experts of FTD (Du et al., CVPR 2023). Options ``clip_loss`` (per-epoch loss
factors), ``grad_penalty`` (input-gradient penalty) and ``lr_drop`` (one lr drop halfway) give the
smooth experts of AST (Shen et al., arXiv:2310.10541).

Artifact (``kind: expert-buffer``)::

    manifest.json            schema_version, kind, config, seed, dataset (with fingerprint),
                             versions, model {name, options, input_shape, num_classes},
                             params [{name, shape}] (flattening order), num_params,
                             experts [{file, test_accuracy, train_loss}]
    expert_000.safetensors   "trajectory": float32 [epochs + 1, num_params]
    ...

The stage is resumable per expert: finished experts are kept in a hidden sibling folder
(``.<name>.partial-<config hash>-<data fingerprint>``) until the artifact is renamed into place.
Under ``torchrun`` rank ``r`` trains experts ``r, r + world_size, ...`` and rank 0 writes the
artifact, which equals the single-process one.
:func:`load_experts` reads it back (strictly: every file, every shape).

With ``zca: true`` the experts train on ZCA-whitened images (:mod:`ddkit.data.zca`, fitted on the
raw pixels as MTT's kornia call; the manifest records ``zca_space: pixel``, and a buffer whitened the
way ddkit did before, on normalised images, is refused). Each expert's randomness (init, batch
order, augmentation) comes from its own seeded generator, so expert ``i`` does not depend on how
many experts were trained before it (or on a resume).

**Unrolled student.** :class:`FunctionalStudent` runs a model on a flat parameter vector
(``torch.func.functional_call``); :func:`trajectory_gradients` unrolls ``N`` SGD steps on synthetic
minibatches and returns the normalised matching loss
``||θ_N − θ*_{t+M}||² / ||θ*_t − θ*_{t+M}||²`` with its gradients for the images, the learnable
learning rate and (optionally) learnable soft labels, computed one of three ways:

- ``unroll``: back-propagation through the whole unrolled graph (MTT); memory grows with ``N``.
- ``exact``: the same gradient with the memory of one step: a first pass stores only the ``N``
  parameter vectors, then a reverse pass recomputes each step and propagates the adjoint
  ``λ_i = λ_{i+1} − α H_i λ_{i+1}`` with one Hessian-vector product per step.
- ``first_order``: TESLA's reference computation (Cui et al., ICML 2023): the adjoint is kept at
  ``λ_N`` (the dependence of θ_i on earlier batches is dropped), i.e. the gradient of
  ``||θ_0 − α Σ_i g_i − θ*||²`` through each ``g_i`` alone. Equal to ``unroll`` for ``N = 1``.

Option ``momentum`` (AST's student, ``distill.py --mom 0.9``) makes the inner steps heavy-ball SGD:
``v_0 = g_0``, ``v_i = m v_{i−1} + g_i``, ``θ_{i+1} = θ_i − α v_i``. Every mode supports it: the
reverse pass pulls back ``c_i = λ_{i+1} + m c_{i+1}`` (the adjoint of ``v_i`` is ``−α c_i``) through
``g_i`` instead of ``λ_{i+1}``; ``first_order`` again drops the Hessian terms.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ddkit import cache as ddcache
from ddkit import distributed as ddist
from ddkit.artifacts import (
    FILES_SHA256,
    MANIFEST,
    artifact_folder,
    atomic_dir,
    base_manifest,
    build_lock,
    check_output_dir,
    check_sha256,
    hidden_path,
    load_tensors,
    member,
    read_json,
    read_manifest,
    record_shared_cost,
    save_tensors,
    write_json,
)
from ddkit.artifacts import (
    cache_dir as cache_dir_of,
)
from ddkit.config import Checked, config_hash, field, to_dict
from ddkit.data.augment import build_augment, typed_augment_options, warn_digit_flips
from ddkit.data.base import DataBundle
from ddkit.data.zca import check_reg as check_zca_reg
from ddkit.determinism import global_rng, made_under, seeded_cpu_rng, stage_modes, use_deterministic_cuda
from ddkit.errors import ConfigError, DDKitError
from ddkit.methods.fyi import flip_pair, pair_params
from ddkit.models import configured_model, create_model
from ddkit.models.registry import model_config_hash
from ddkit.training import (
    Diverged,
    _last_one,
    accuracy,
    check_finite_weights,
    normalizer,
    one_image_batch,
    sum_dtype,
    to_float,
)

log = logging.getLogger(__name__)

KIND = "expert-buffer"
ZCA_SPACE = "pixel"  # where ZCA is fitted (MTT: raw pixels); buffers without this marker used normalised images
GradientMode = Literal["unroll", "exact", "first_order"]


@dataclass
class ExpertConfig(Checked):
    """How to train an expert trajectory buffer (defaults: MTT's ``buffer.py``)."""

    model: str = field("convnet3", help="registered model key of the experts (and of the student)")
    model_options: dict = field({}, help="keyword options for the model factory")
    num_experts: int = field(10, help="number of expert trajectories (MTT trains 100)")
    epochs: int = field(50, help="training epochs per expert; parameters are stored after each")
    lr: float = field(0.01, help="SGD learning rate of the experts (MTT lr_teacher)")
    momentum: float = field(0.0, help="SGD momentum (MTT: 0)")
    weight_decay: float = field(0.0, help="SGD weight decay (MTT: 0)")
    batch_size: int = field(256, help="expert training batch size (MTT batch_train)")
    augment: str = field("dsa", help="augmentation of real batches: dsa (MTT) | none | crop_flip | ...")
    augment_options: dict = field({}, help="options of the augmentation (dsa: flip=false for digits)")
    sam_rho: float = field(0.0, help="SAM neighbourhood radius; 0 = plain SGD (FTD: flat experts)")
    sam_adaptive: bool = field(False, help="adaptive SAM (ASAM): perturbation scaled by |w|")
    sam_alpha: float = field(
        0.0, help="GSAM surrogate-gap weight α (Zhuang et al., ICLR 2022): the update is the perturbed gradient "
        "minus α times the clean gradient's component orthogonal to it; needs sam_rho > 0; 0: plain SAM; "
        "FTD/DATM: 0.3 (CIFAR-10 IPC 1/10)")
    lr_drop: float = field(
        1.0, help="factor on the expert lr after epoch lr_drop_epoch, with a fresh optimiser (momentum reset), as "
        "AST's buffer.py (0.6, always on there; MTT's --decay: 0.1); 1: off")
    lr_drop_epoch: int | None = field(
        None, help="0-based epoch after which the lr drops (None: epochs // 2 + 1, the references' lr_schedule)")
    seed: int = field(0, seed=True, help="base seed; expert i uses its own generator derived from (seed, i)")
    zca: bool = field(False,
                      help="train on ZCA-whitened images (MTT/FTD/DATM --zca); the methods then optimise in that space")
    zca_reg: float = field(0.1, help="ZCA regularisation added to the covariance eigenvalues (kornia/MTT: 0.1)")
    clip_loss: list[float] = field(
        [], help="AST clipping loss: the cross-entropy of epoch e is multiplied by clip_loss[e] for the first "
        "len(clip_loss) epochs (slows the early, fastest parameter change); AST: 0.5, 0.55, ..., 0.95; []: off")
    grad_penalty: float = field(
        0.0, help="AST gradient penalty weight λ: adds λ·mean((||∂Σ logits/∂x||₂ over channels − 1)²) on the "
        "un-augmented batch to every step's loss (smoother experts); AST: 2; 0: off")

    def __post_init__(self) -> None:
        if any(not (isinstance(v, (int, float)) and v > 0) for v in self.clip_loss):
            raise ConfigError(f"clip_loss factors must all be > 0 (or the list empty), got {self.clip_loss}")
        if self.grad_penalty < 0:
            raise ConfigError(f"grad_penalty must be >= 0 (0 disables it), got {self.grad_penalty}")
        check_zca_reg(self.zca_reg)
        if self.num_experts < 1:
            raise ConfigError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.epochs < 1:
            raise ConfigError(f"expert epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise ConfigError(f"expert lr must be > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"expert momentum must lie in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"expert weight_decay must be >= 0, got {self.weight_decay}")
        if self.batch_size < 1:
            raise ConfigError(f"expert batch_size must be >= 1, got {self.batch_size}")
        if self.sam_rho < 0:
            raise ConfigError(f"sam_rho must be >= 0 (0 disables SAM), got {self.sam_rho}")
        if self.sam_alpha < 0:
            raise ConfigError(f"sam_alpha must be >= 0 (0: plain SAM), got {self.sam_alpha}")
        if self.sam_alpha > 0 and self.sam_rho == 0:
            raise ConfigError(f"sam_alpha {self.sam_alpha} is GSAM's weight and needs sam_rho > 0; set sam_rho "
                              "(FTD: 0.01) or sam_alpha: 0")
        if self.lr_drop <= 0:
            raise ConfigError(f"lr_drop must be > 0 (1 disables it), got {self.lr_drop}")
        if self.lr_drop_epoch is not None and self.lr_drop_epoch < 0:
            raise ConfigError(f"lr_drop_epoch must be >= 0 or null, got {self.lr_drop_epoch}")
        if self.lr_drop != 1.0 and self.lr_drop_epoch is not None and self.lr_drop_epoch >= self.epochs - 1:
            raise ConfigError(f"lr_drop_epoch {self.lr_drop_epoch} is at or after the last of {self.epochs} epochs, so "
                              f"the lr never drops; use 0..{self.epochs - 2}, or lr_drop 1 for no drop")
        try:  # fails early on a bad name/option; numbers as the augmentation types them (1 and 1.0 hash alike)
            self.augment_options = typed_augment_options(self.augment, self.augment_options)
        except DDKitError as exc:
            raise ConfigError(f"buffer augment: {exc}") from None


# ------------------------------------------------------------------------------------------------
# flat parameters


def param_spec(model: nn.Module) -> list[dict[str, Any]]:
    """Names and shapes of ``model``'s parameters, in the order they are flattened."""
    return [{"name": n, "shape": list(p.shape)} for n, p in model.named_parameters()]


def flatten_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).float().cpu()


class FunctionalStudent:
    """Run ``model`` with parameters taken from one flat vector (differentiable in that vector)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in model.named_parameters()]
        self.numels = [math.prod(s) for s in self.shapes]
        self.num_params = sum(self.numels)

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if flat.numel() != self.num_params:
            raise DDKitError(
                f"flat parameter vector has {flat.numel()} values but the student has {self.num_params}; "
                "use experts trained with the same model and options"
            )
        views = [t.view(s) for t, s in zip(flat.split(self.numels), self.shapes, strict=True)]
        return functional_call(self.model, dict(zip(self.names, views, strict=True)), (x,))


# ------------------------------------------------------------------------------------------------
# buffer artifact


class ExpertBuffer:
    """Expert trajectories (``trajectories[i]``: float32 ``[epochs + 1, num_params]``) + manifest."""

    def __init__(self, trajectories: list[torch.Tensor], manifest: dict[str, Any], path: Path | None = None) -> None:
        self.trajectories = trajectories
        self.manifest = manifest
        self.path = path

    @property
    def num_experts(self) -> int:
        return len(self.trajectories)

    @property
    def epochs(self) -> int:
        return int(self.trajectories[0].shape[0]) - 1

    @property
    def num_params(self) -> int:
        return int(self.manifest["num_params"])

    def params(self, expert: int, epoch: int) -> torch.Tensor:
        return self.trajectories[expert][epoch]

    def zca(self, data: DataBundle):
        """The whitening the experts were trained with (refitted on ``data``: deterministic), or None."""
        cfg = self.manifest.get("config", {})
        if not cfg.get("zca"):
            return None
        if not _zca_current(self.manifest):
            raise DDKitError(
                "this expert buffer was trained on images whitened by ddkit's older ZCA (fitted on normalised "
                "images, a weaker regularisation than MTT's); train it again with this version of ddkit"
            )
        if self.manifest["dataset"]["fingerprint"] != data.fingerprint:  # refitted on other data: another whitening
            raise DDKitError(
                f"expert buffer {str(self.path)!r} was trained on ZCA-whitened images of other data (fingerprint "
                f"{self.manifest['dataset']['fingerprint']}, this data {data.fingerprint}), and the "
                "whitening is refitted on the data being distilled; distil the data the experts saw, or train the "
                "buffer on this data"
            )
        from ddkit.data.zca import ZCA

        return ZCA.fit(data.train, data.mean, data.std, float(cfg.get("zca_reg", 0.1)))

    def build_model(self) -> nn.Module:
        """A model of the experts' architecture (its own parameters are irrelevant)."""
        m = self.manifest["model"]
        with seeded_cpu_rng(0):
            model = create_model(m["name"], m["input_shape"][0], m["num_classes"], m["input_shape"][-2], **m["options"])
        if param_spec(model) != self.manifest["params"]:
            raise DDKitError(
                f"expert buffer {str(self.path)!r}: model {m['name']!r} no longer has the parameters the "
                "buffer was trained with; re-create the buffer with this ddkit version"
            )
        return model

    def check_compatible(self, data: DataBundle) -> None:
        ds = self.manifest["dataset"]
        if list(ds["classes"]) != list(data.classes):
            raise DDKitError(
                f"expert buffer classes {ds['classes'][:4]}... differ from dataset {data.name!r} "
                f"{list(data.classes)[:4]}...; train the buffer on this dataset (same class order)"
            )
        if list(ds["image_shape"]) != list(data.image_shape):
            raise DDKitError(
                f"expert buffer was trained on images {ds['image_shape']} but dataset {data.name!r} has "
                f"{list(data.image_shape)}; train the buffer on this dataset"
            )
        if ds["fingerprint"] != data.fingerprint:
            log.warning("expert buffer was trained on data with fingerprint %s, this data has %s",
                        ds["fingerprint"], data.fingerprint)


def _expert_file(i: int) -> str:
    return f"expert_{i:03d}.safetensors"


def _sam_step(model: nn.Module, loss_fn: Callable[[], torch.Tensor], rho: float, adaptive: bool,
              alpha: float = 0.0) -> tuple[torch.Tensor, list]:
    """SAM: gradient at ``w + e``, ``e = rho * g / ||g||`` (ASAM: ``rho T_w² g / ||T_w g||``, ``T_w = |w|``).

    ``alpha > 0``: GSAM (Zhuang et al., ICLR 2022, as the FTD authors' ``gsam.py``): with ``g`` the
    clean and ``g_p`` the perturbed gradient, the update direction is ``g_p − alpha · g_⊥``,
    ``g_⊥ = g − cos(g, g_p) ||g|| g_p / ||g_p||`` (the part of ``g`` orthogonal to ``g_p``; plain
    norms, also for ASAM). Returns the clean loss and the update direction.
    """
    loss = loss_fn()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        scaled = [(p.abs() * g if adaptive else g) for p, g in zip(params, grads, strict=True)]
        norm = torch.sqrt(sum((s * s).sum() for s in scaled)) + 1e-12
        eps = [(p.abs() * s if adaptive else s) * (rho / norm) for p, s in zip(params, scaled, strict=True)]
        for p, e in zip(params, eps, strict=True):
            p.add_(e)
    perturbed = torch.autograd.grad(loss_fn(), params)
    with torch.no_grad():
        for p, e in zip(params, eps, strict=True):
            p.sub_(e)
        if alpha > 0:
            perturbed = _gsam_direction(list(grads), list(perturbed), alpha)
    return loss.detach(), list(perturbed)


def _gsam_direction(clean: list[torch.Tensor], perturbed: list[torch.Tensor], alpha: float) -> list[torch.Tensor]:
    """GSAM's gradient decomposition: ``g_p − alpha (g − cos · ||g|| g_p / ||g_p||)`` (eps 1e-12 as the reference)."""
    inner = sum((g * q).sum() for g, q in zip(clean, perturbed, strict=True))
    norm_p = torch.sqrt(sum((q * q).sum() for q in perturbed))
    norm_g = torch.sqrt(sum((g * g).sum() for g in clean))
    cosine = inner / (norm_p * norm_g + 1e-12)
    return [q - alpha * (g - cosine * norm_g * q / (norm_p + 1e-12)) for g, q in zip(clean, perturbed, strict=True)]


def input_gradient_penalty(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """AST's expert gradient penalty (without its weight): ``mean((||∂(Σ logits)/∂x||₂ − 1)²)``.

    As in the AST authors' ``epoch_gp``, the gradient of the sum of all logits is taken w.r.t. the
    un-augmented batch and its 2-norm runs over the channel axis, so the mean is over images and
    pixels (a WGAN-GP-style penalty, Gulrajani et al., 2017). Differentiable in the parameters.
    """
    x = x.detach().requires_grad_(True)
    grad = torch.autograd.grad(model(x).sum(), x, create_graph=True)[0]
    return (grad.norm(p=2, dim=1) - 1).pow(2).mean()


def fit_zca(data: DataBundle, cfg: ExpertConfig):
    """The ZCA transform of ``cfg`` fitted on ``data``'s training set, or None when ``cfg.zca`` is off."""
    if not cfg.zca:
        return None
    from ddkit.data.zca import ZCA

    return ZCA.fit(data.train, data.mean, data.std, cfg.zca_reg)


def train_one_expert(data: DataBundle, cfg: ExpertConfig, index: int, device: torch.device,
                     zca=None, on_epoch: Callable[[int], None] | None = None) -> tuple[torch.Tensor, dict]:
    """Train expert ``index`` (on ``zca``-whitened images if given); return its trajectory
    ``[epochs + 1, P]`` and a summary. ``on_epoch(e + 1)`` after each epoch ``e``. Its initial weights, and
    the dropout masks of a model with dropout, are drawn from the global generators seeded for it alone
    (:func:`global_rng`), as a teacher's are."""
    seed = cfg.seed * 1_000_003 + index
    with global_rng(seed, device):
        return _train_one_expert(data, cfg, seed, device, zca, on_epoch)


def _train_one_expert(data: DataBundle, cfg: ExpertConfig, seed: int, device: torch.device,
                      zca, on_epoch: Callable[[int], None] | None) -> tuple[torch.Tensor, dict]:
    c, h, _ = data.image_shape
    model = create_model(cfg.model, c, data.num_classes, h, **cfg.model_options)
    model = model.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    augment = build_augment(cfg.augment, **cfg.augment_options)
    norm = normalizer(data.mean, data.std, device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    drop_after = cfg.epochs // 2 + 1 if cfg.lr_drop_epoch is None else cfg.lr_drop_epoch
    snapshots = [flatten_params(model)]
    n = len(data.train)
    bs = min(cfg.batch_size, n)
    size = tuple(data.image_shape[-2:])
    loss_epoch = float("nan")
    for e in range(cfg.epochs):
        scale = float(cfg.clip_loss[e]) if e < len(cfg.clip_loss) else 1.0

        def loss_fn(x_aug: torch.Tensor, x_clean: torch.Tensor, y: torch.Tensor, scale: float = scale) -> torch.Tensor:
            loss = F.cross_entropy(model(x_aug), y)
            if scale != 1.0:
                loss = loss * scale
            if cfg.grad_penalty > 0:
                loss = loss + cfg.grad_penalty * input_gradient_penalty(model, x_clean)
            return loss

        perm = torch.randperm(n, generator=gen)
        total = torch.zeros((), dtype=sum_dtype(device), device=device)  # as train_classifier's
        for start in range(0, n, bs):
            idx = perm[start : start + bs]
            x = clean = norm(to_float(data.train.images[idx], device))
            if zca is not None:
                x = clean = zca(x)
            if augment is not None:
                x = augment.apply(x, augment.sample(len(idx), gen, size))
            y = data.train.labels[idx].to(device)
            opt.zero_grad(set_to_none=True)
            if cfg.sam_rho > 0:
                loss, grads = _sam_step(model, lambda x=x, c=clean, y=y: loss_fn(x, c, y), cfg.sam_rho,
                                        cfg.sam_adaptive, cfg.sam_alpha)
                for p, g in zip(model.parameters(), grads, strict=True):
                    p.grad = g
            else:
                loss = loss_fn(x, clean, y)
                loss.backward()
            opt.step()
            total += loss.detach().to(total.dtype) * len(idx)  # on the device: no host sync per step
        loss_epoch = float(total) / n
        snapshots.append(flatten_params(model))
        check_finite_weights(model, e + 1, cfg.epochs)  # no later epoch recovers a NaN weight: stop here
        if on_epoch is not None:
            on_epoch(e + 1)
        if cfg.lr_drop != 1.0 and e == drop_after:  # AST: lr × 0.6 once, with a new optimiser (momentum reset)
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr * cfg.lr_drop, momentum=cfg.momentum,
                                  weight_decay=cfg.weight_decay)
    acc = accuracy(model, data.test, data.mean, data.std, device, transform=zca) if len(data.test) else None
    return torch.stack(snapshots), {"test_accuracy": acc, "train_loss": loss_epoch}


def build_seconds(manifest: dict) -> float | None:
    """Seconds the buffer's experts took to train, summed over experts (None for buffers written
    before ddkit recorded them)."""
    seconds = [e.get("seconds") for e in manifest.get("experts", [])]
    return sum(seconds) if seconds and None not in seconds else None


def _zca_current(manifest: dict) -> bool:
    """False for a buffer trained on ddkit's older ZCA (fitted on normalised images, no ``zca_space``)."""
    return not manifest.get("config", {}).get("zca") or manifest.get("zca_space") == ZCA_SPACE


def _manifest(data: DataBundle, cfg: ExpertConfig, model: nn.Module, experts: list[dict]) -> dict:
    manifest = base_manifest(KIND, to_dict(cfg), cfg.seed)
    manifest.update({
        "dataset": data.describe(),
        "dataset_config": data.config_record(),  # not in buffers made before 2026-12-07
        "model": {"name": cfg.model, "options": dict(cfg.model_options), "input_shape": list(data.image_shape),
                  "num_classes": data.num_classes},
        "params": param_spec(model),
        "num_params": sum(p.numel() for p in model.parameters()),
        "epochs": cfg.epochs,
        "experts": experts,
        "config_hash": model_config_hash(cfg),
    })
    if cfg.zca:
        manifest["zca_space"] = ZCA_SPACE
    return manifest


def buffer_identity(path: str | Path) -> str | None:
    """What decides the trajectories of the expert buffer at ``path`` (recipe, data, its experts), or
    None when no buffer reads there. A set distilled from ``experts: PATH`` is keyed by it, not by
    the path alone, so a buffer retrained at the same path is not mistaken for the old one."""
    try:
        m = read_manifest(path, KIND)
        return config_hash({"recipe": m["config_hash"], "data": m["dataset"]["fingerprint"], "epochs": m["epochs"],
                            "normalisation": [m["dataset"].get("mean"), m["dataset"].get("std")],
                            "zca_space": m.get("zca_space"),
                            "experts": [{k: v for k, v in e.items() if k != "seconds"} for e in m["experts"]]})
    except (DDKitError, KeyError, TypeError, AttributeError):  # a damaged buffer: load_experts says what is wrong
        return None


@stage_modes()
def train_experts(
    data: DataBundle,
    cfg: ExpertConfig,
    out: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int, dict], None] | None = None,
    epoch_progress: Callable[[int, int, dict], None] | None = None,
    where: str = "experts",
) -> ExpertBuffer:
    """Train an expert buffer on ``data.train`` and (if ``out``) save it as an artifact; ``where``:
    the config key of ``cfg``, which errors in its model and lr name (a method's: ``distill.options.buffer``).

    Resumable per expert (finished experts live in a hidden sibling folder until the artifact is
    complete); ``progress(i + 1, num_experts, {"test_accuracy", "train_loss"})`` after expert ``i``;
    ``epoch_progress(done, total, {})`` after every expert epoch this process trains or reuses
    (``total``: its experts times ``epochs``), for a finer progress bar.

    Under ``torchrun`` expert ``i`` is trained by rank ``i % world_size``; each expert has its own
    seeded generator, so the buffer is the single-process one. The ranks exchange finished experts
    through the hidden folder (without ``out``: by all-gather), every rank returns the whole buffer
    and rank 0 alone writes the artifact.
    """
    device = torch.device(device)
    use_deterministic_cuda(device)
    info = ddist.current()
    ddist.agree_settings({where: cfg, "dataset": [data.fingerprint, data.normalisation]})
    if cfg.lr_drop != 1.0 and cfg.lr_drop_epoch is None and cfg.epochs // 2 + 1 >= cfg.epochs - 1:
        # an explicit lr_drop_epoch that late is refused; the default is AST's rule, kept as its code has it
        fix = f"set lr_drop_epoch 0..{cfg.epochs - 2} to drop it, or lr_drop 1" if cfg.epochs >= 2 else "set lr_drop 1"
        log.warning("the expert lr drop (x %g after epoch epochs // 2 + 1 = %d) never applies to %d-epoch experts; %s",
                    cfg.lr_drop, cfg.epochs // 2 + 1, cfg.epochs, fix)
    warn_digit_flips(build_augment(cfg.augment, **cfg.augment_options), data.name, f"{where}.augment_options")
    partial = None
    c, h, _ = data.image_shape
    with global_rng():  # a bad model fails here, before anything is written
        spec_model = configured_model((f"{where}.model", f"{where}.model_options"), cfg.model, c, data.num_classes, h,
                                      cfg.model_options)
    if out is not None:
        out = Path(out)
        check_output_dir(out, KIND)  # a folder we may not replace fails now, not after the training
        partial = _partial_dir(out, cfg, data)
        partial.mkdir(parents=True, exist_ok=True)
    finished: dict[int, tuple[torch.Tensor, dict]] = {}
    zca = None
    mine = range(info.rank, cfg.num_experts, info.world_size)  # every expert in one process
    # the cause of a batch of 1 image (see one_image_batch; spec_model: the experts' class, which the error names)
    one_image = functools.partial(_last_one, f"{where}.batch_size", cfg.batch_size, len(data.train), "batch")
    epochs_done = 0

    def epoch_done(e: int) -> None:
        if epoch_progress is not None:
            epoch_progress(epochs_done + e, len(mine) * cfg.epochs, {})

    for i in mine:
        done = partial / _expert_file(i) if partial is not None else None
        if done is not None and done.is_file() and (partial / f"expert_{i:03d}.json").is_file():
            finished[i] = (load_tensors(done, what="expert trajectory")["trajectory"],
                           read_json(partial / f"expert_{i:03d}.json"))
            log.info("expert %d/%d reused from %s", i + 1, cfg.num_experts, partial)
            epoch_done(cfg.epochs)
        else:
            if zca is None:
                zca = fit_zca(data, cfg)
            t0 = time.perf_counter()
            try:
                with one_image_batch(spec_model, one_image):  # a batch of 1 image at BatchNorm on a 1x1 map
                    traj, summary = train_one_expert(data, cfg, i, device, zca, epoch_done)
            except (Diverged, ConfigError) as exc:
                if partial is not None:  # the same settings fail again: nothing worth resuming
                    shutil.rmtree(partial, ignore_errors=True)
                if isinstance(exc, ConfigError):
                    raise
                raise DDKitError(f"expert {i}: {exc}; nothing was saved: lower {where}.lr (now {cfg.lr:g})") from None
            summary = {"file": _expert_file(i), **summary, "seconds": round(time.perf_counter() - t0, 3)}
            finished[i] = (traj, summary)
            if done is not None:
                save_tensors(done, {"trajectory": traj})
                write_json(partial / f"expert_{i:03d}.json", summary)
            log.info("expert %d/%d: test accuracy %s", i + 1, cfg.num_experts, summary["test_accuracy"])
        epochs_done += cfg.epochs
        if progress is not None:
            progress(i + 1, cfg.num_experts, {k: v for k, v in finished[i][1].items() if k != "file"})
    if info.enabled:  # collect the other ranks' experts
        if partial is not None:
            ddist.barrier()
            for i in range(cfg.num_experts):
                if i not in finished:
                    finished[i] = (load_tensors(partial / _expert_file(i), what="expert trajectory")["trajectory"],
                                   read_json(partial / f"expert_{i:03d}.json"))
            ddist.barrier()  # every rank has read the hidden folder before rank 0 removes it
        else:
            for part in ddist.all_gather_objects(finished):
                finished.update(part)
    trajectories = [finished[i][0] for i in range(cfg.num_experts)]
    summaries = [finished[i][1] for i in range(cfg.num_experts)]
    buffer = ExpertBuffer(trajectories, _manifest(data, cfg, spec_model, summaries))
    if out is not None:
        if info.is_main:
            with atomic_dir(out, kind=KIND) as tmp:
                sums = {_expert_file(i): save_tensors(tmp / _expert_file(i), {"trajectory": traj})
                        for i, traj in enumerate(trajectories)}
                buffer.manifest[FILES_SHA256] = sums
                write_json(tmp / "manifest.json", buffer.manifest)
            shutil.rmtree(partial, ignore_errors=True)
        ddist.barrier()
        buffer.path = out.absolute()  # records name it from any working folder (not resolved: links stay)
    return buffer


def read_experts_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the expert buffer at ``path``, checked for every field :func:`load_experts` reads
    (the files are not opened)."""
    path = artifact_folder(path, KIND)
    manifest = read_manifest(path, KIND, require={
        "epochs": int, "num_params": int, "experts": list, "params": list, "dataset": dict, "dataset.classes": list,
        "dataset.image_shape": list, "dataset.fingerprint": str, "model": dict, "model.name": str,
        "model.input_shape": list, "model.num_classes": int, "model.options": dict})
    seen: dict[Path, str] = {}
    for i, entry in enumerate(manifest["experts"]):
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)):
            raise DDKitError(f"{str(path / MANIFEST)!r} holds {entry!r} as experts[{i}], not a record with a 'file'; "
                             f"the manifest is damaged: re-create the {KIND} artifact")
        file = member(path, entry["file"], path / MANIFEST, f"experts[{i}].file", f"re-create the {KIND} artifact")
        real = file.resolve()
        if real in seen:  # one trajectory counted as two experts
            twice = (f"expert file {entry['file']!r} twice" if seen[real] == entry["file"] else
                     f"{seen[real]!r} and {entry['file']!r}, the same expert file")
            raise DDKitError(f"{str(path / MANIFEST)!r} names {twice} (experts[{i}]); the manifest is damaged: "
                             f"re-create the {KIND} artifact")
        seen[real] = entry["file"]
    return manifest


def load_experts(path: str | Path) -> ExpertBuffer:
    """Read an expert-buffer artifact (checks kind, schema version, every file and shape)."""
    path = artifact_folder(path, KIND)
    manifest = read_experts_manifest(path)
    trajectories = []
    want = (manifest["epochs"] + 1, manifest["num_params"])
    for entry in manifest["experts"]:
        tensors = load_tensors(path / entry["file"], what="expert trajectory")
        traj = tensors.get("trajectory")
        if traj is None or tuple(traj.shape) != want:
            got = None if traj is None else tuple(traj.shape)
            raise DDKitError(
                f"expert file {str(path / entry['file'])!r} holds trajectory {got}, manifest says {want}; "
                "the buffer is corrupt, re-create it"
            )
        if not torch.isfinite(traj).all():
            raise DDKitError(f"expert file {str(path / entry['file'])!r} holds NaN or infinite weights; the buffer is "
                             "corrupt, re-create it")
        check_sha256(manifest, path, entry["file"], KIND, "expert trajectory", "re-create the buffer")
        trajectories.append(traj.float())
    if not trajectories:
        raise DDKitError(f"expert buffer {str(path)!r} has no experts; re-create it")
    return ExpertBuffer(trajectories, manifest, path.absolute())


def _norm_tag(data: DataBundle) -> str:
    """The normalisation the experts train under, which the data fingerprint leaves out, as a short hash
    (part of the buffer's cache name and of its partial folder: experts of another mean/std are not reused)."""
    return config_hash({"mean": list(data.mean), "std": list(data.std)})[:8]


def _partial_dir(out: Path, cfg: ExpertConfig, data: DataBundle) -> Path:
    """Where :func:`train_experts` keeps the finished experts of a buffer for ``out`` until it is saved."""
    return hidden_path(out, f".partial-{model_config_hash(cfg)}-{data.fingerprint}-{_norm_tag(data)}")


def _cached_buffer(out: Path, cfg: ExpertConfig, data: DataBundle) -> ExpertBuffer | None:
    """The buffer cached at ``out`` if it is complete and made by ``cfg`` from ``data``; else None. The
    finished experts that a kill between the buffer's save and their removal left are removed."""
    if not (out / "manifest.json").is_file():
        return None
    with contextlib.suppress(DDKitError):
        found = load_experts(out)
        if (found.manifest.get("config_hash") == model_config_hash(cfg)
                and found.manifest["dataset"]["fingerprint"] == data.fingerprint
                # the fingerprint leaves out the normalisation the experts trained under
                and [found.manifest["dataset"].get(k) for k in ("mean", "std")] == [list(data.mean), list(data.std)]
                and _zca_current(found.manifest)):
            if ddist.current().is_main:
                shutil.rmtree(_partial_dir(out, cfg, data), ignore_errors=True)
            return found
    return None


def buffer_for(data: DataBundle, experts: str | None, cfg: ExpertConfig, work_dir: Path | None,
               device: torch.device, progress: Callable[[int, int, dict], None] | None = None,
               where: str = "distill.options.buffer") -> ExpertBuffer:
    """The buffer at ``experts``, or one trained with ``cfg`` (``progress``: per expert epoch, see
    :func:`train_experts`; ``where``: the config key of ``cfg``, which errors in its model name).

    A trained buffer is kept in the cache
    (``$DDKIT_CACHE/experts/<recipe hash>-<data fingerprint>-<normalisation hash>-<where hash>``, then ``-r<N>`` from
    :data:`~ddkit.cache.EXPERTS_REVISION` 2 on; where: the torch thread count and device type,
    :func:`~ddkit.determinism.made_under`, which change the trajectories' bytes) when ``work_dir`` is given, so every
    method, IPC and run with the same expert recipe on the same data and thread count shares one buffer (MTT, FTD,
    TESLA and DATM train theirs once, not per distilled set).
    """
    seconds_here = waited = 0.0  # what training the buffer took here (0 when loaded); waiting for another's build
    if experts:
        buffer = load_experts(experts)
    else:
        # a revision of the experts' training names new buffers (revision 1: the names before it was counted)
        revision = "".join(f"-r{r}" for r in ddcache.revised(ddcache.EXPERTS_REVISION).values())
        out = (cache_dir_of("experts") / f"{model_config_hash(cfg)[:16]}-{data.fingerprint[:16]}-{_norm_tag(data)}"
               f"-{config_hash(made_under(device))[:8]}{revision}" if work_dir is not None else None)
        # one builder per cache entry: a process that waited for another's build then finds it here
        with build_lock(out) if out is not None else contextlib.nullcontext() as lock:
            waited = lock.seconds if lock is not None else 0.0
            buffer = _cached_buffer(out, cfg, data) if out is not None else None
            if out is None or not ddist.agree_found(buffer is not None, f"the expert buffer {out.name}", out.parent):
                log.info("no expert buffer given (experts=...): training %d experts of %d epochs on the fly",
                         cfg.num_experts, cfg.epochs)
                t0 = time.perf_counter()  # the build alone, not the wait for another process's
                buffer = train_experts(data, cfg, out, device, epoch_progress=progress, where=where)
                seconds_here = time.perf_counter() - t0
    buffer.check_compatible(data)
    if buffer.path is not None:  # a buffer trained in memory (no work_dir) is this set's own cost
        record_shared_cost(KIND, buffer.path.name, build_seconds(buffer.manifest), seconds_here, waited)
    return buffer


# ------------------------------------------------------------------------------------------------
# the matching loss and its gradients


def student_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with hard labels (int) or with ``softmax(targets)`` for logit targets (DATM)."""
    if targets.dtype.is_floating_point:
        return -(F.softmax(targets, dim=1) * F.log_softmax(logits, dim=1)).sum(1).mean()
    return F.cross_entropy(logits, targets)


def matching_loss(final: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||final − target||² / ||start − target||²`` (MTT eq. 1; the 1/P factors cancel)."""
    return (final - target).pow(2).sum() / (start - target).pow(2).sum()


@dataclass
class Step:
    """One inner step: indices of the synthetic minibatch and its augmentation parameters."""

    index: torch.Tensor
    aug: dict | None


def plan_steps(n: int, syn_steps: int, batch: int, gen: torch.Generator, augment, image_size) -> list[Step]:
    """Minibatches as in the reference: chunks of a fresh permutation, popped from the end."""
    steps: list[Step] = []
    chunks: list[torch.Tensor] = []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.randperm(n, generator=gen).split(batch))
        idx = chunks.pop()
        aug = augment.sample(len(idx), gen, image_size) if augment is not None else None
        steps.append(Step(idx, aug))
    return steps


@dataclass
class Intermediate:
    """AST intermediate matching term: after ``step`` inner steps, match ``target`` with ``weight``."""

    step: int
    target: torch.Tensor
    weight: float = 1.0


def intermediate_terms(buffer_params: Callable[[int], torch.Tensor], syn_steps: int, expert_epochs: int,
                       scheme: str) -> list[Intermediate]:
    """AST's intermediate targets: for ``i = 1..M−1`` (``M = expert_epochs``) the student after
    ``i·(N // M)`` steps is matched with the expert at ``start + i`` (``buffer_params(i)``).

    ``scheme``: ``uniform`` weights every term 1 (the authors' ``--agg_middle_loss``, used in all
    their commands); ``linear`` weights term ``i`` by ``i / M`` (``--adaptive_middle_loss``);
    ``off``: no terms. Steps that fall outside ``1..N−1`` are dropped, as in the reference.
    """
    if scheme == "off":
        return []
    terms = []
    for i in range(1, expert_epochs):
        step = (syn_steps // expert_epochs) * i
        if 0 < step < syn_steps:
            weight = 1.0 if scheme == "uniform" else i / expert_epochs
            terms.append(Intermediate(step, buffer_params(i), weight))
    return terms


def perturb_start(student: FunctionalStudent, flat: torch.Tensor, alpha: float, gen: torch.Generator) -> torch.Tensor:
    """AST weight perturbation of the start parameters: every 4-D (convolution) weight ``W`` becomes
    ``W + α · (d / ||d||_F) ⊙ W`` with ``d ~ N(0, I)`` drawn from ``gen`` (CPU, so the same on every
    device); biases, norm and linear parameters are unchanged (as the authors' ``weightPerturb``)."""
    out = []
    for chunk, shape in zip(flat.split(student.numels), student.shapes, strict=True):
        if len(shape) == 4:
            d = torch.randn(chunk.numel(), generator=gen, dtype=torch.float32).to(device=chunk.device,
                                                                                  dtype=chunk.dtype)
            chunk = chunk + alpha * (d / d.norm()) * chunk
        out.append(chunk)
    return torch.cat(out)


@dataclass
class MatchResult:
    loss: torch.Tensor  # detached scalar
    grad_images: torch.Tensor
    grad_lr: torch.Tensor  # gradient w.r.t. the lr *parameter* (plain lr or log lr)
    grad_labels: torch.Tensor | None


def trajectory_gradients(
    student: FunctionalStudent,
    start: torch.Tensor,
    target: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr_param: torch.Tensor,
    steps: list[Step],
    augment=None,
    mode: GradientMode = "unroll",
    log_lr: bool = False,
    inner_scale: float = 1.0,
    intermediate: list[Intermediate] | None = None,
    momentum: float = 0.0,
    flip: bool = False,
) -> MatchResult:
    """Unroll ``len(steps)`` SGD steps of the student from ``start`` on ``images`` (normalised) and
    return the matching loss against ``target`` with its gradients (see the module docstring).

    ``labels``: int64 hard labels, or float logits (learnable if they require grad).
    ``lr_param``: the learnable lr (``log_lr``: its log). Tensors that need no gradient get zeros.
    ``inner_scale``: factor on every inner cross-entropy (AST's balanced inner loss).
    ``intermediate``: extra terms ``weight · ||θ_step − target||² / ||start − target||²`` (AST's
    intermediate matching; ``0 < step < len(steps)``), added to the loss in every mode: the reverse
    pass adds their gradient to the adjoint when it reaches ``θ_step``.
    ``momentum``: heavy-ball momentum ``m`` of the inner SGD (AST: 0.9; 0: MTT's plain steps).
    ``flip``: FYI (:mod:`ddkit.methods.fyi`): every step trains on its minibatch and the minibatch's
    mirror images (labels repeated); each mirror copy takes its image's augmentation draw.
    """
    learn_labels = labels.dtype.is_floating_point and labels.requires_grad
    images = images.detach().requires_grad_(True)
    lr_param = lr_param.detach().requires_grad_(True)
    ys = labels.detach().requires_grad_(True) if learn_labels else labels.detach()
    start = start.detach()
    target = target.detach()

    def batch(step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, aug = images[step.index], ys[step.index], step.aug
        if flip:
            x, y = flip_pair(x, y)
            aug = pair_params(aug) if aug is not None else None
        if augment is not None:
            x = augment.apply(x, aug)
        return x, y

    def inner(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = student_loss(student(theta, x), y)
        return loss * inner_scale if inner_scale != 1.0 else loss

    middle = {}
    for term in intermediate or []:
        if not 0 < term.step < len(steps):
            raise DDKitError(f"intermediate matching step {term.step} must lie in 1..{len(steps) - 1}")
        middle.setdefault(term.step, []).append(term)

    alpha = lr_param.exp() if log_lr else lr_param
    if mode == "unroll":
        theta = start.clone().requires_grad_(True)
        params = [theta]
        v = None
        for step in steps:
            x, y = batch(step)
            g = torch.autograd.grad(inner(params[-1], x, y), params[-1], create_graph=True)[0]
            if momentum:
                g = v = g if v is None else momentum * v + g
            params.append(params[-1] - alpha * g)
        loss = matching_loss(params[-1], start, target)
        for k, terms in middle.items():
            for term in terms:
                loss = loss + term.weight * matching_loss(params[k], start, term.target.detach())
        inputs = [images, lr_param] + ([ys] if learn_labels else [])
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        gx, glr = grads[0], grads[1]
        gy = grads[2] if learn_labels else None
        return MatchResult(loss.detach(), _zeros_if_none(gx, images), _zeros_if_none(glr, lr_param),
                           _zeros_if_none(gy, ys) if learn_labels else None)
    if mode not in ("exact", "first_order"):
        raise ConfigError(f"unknown gradient mode {mode!r}; use unroll, exact or first_order")

    # pass 1: the trajectory, one step's graph at a time; keep only the parameter vectors
    a = float(alpha.detach())
    thetas = [start]
    v = None
    for step in steps:
        with torch.no_grad():
            x, y = batch(step)
        theta = thetas[-1].clone().requires_grad_(True)
        g = torch.autograd.grad(inner(theta, x, y), theta)[0]
        if momentum:
            g = v = g if v is None else momentum * v + g
        thetas.append(thetas[-1] - a * g)
    final = thetas[-1]
    denom = (start - target).pow(2).sum()
    loss = (final - target).pow(2).sum() / denom
    lam = 2.0 * (final - target) / denom  # dL/dθ_N
    for k, terms in middle.items():
        for term in terms:
            loss = loss + term.weight * matching_loss(thetas[k], start, term.target.detach())

    # pass 2 (reverse): recompute each step's gradient and pull the adjoint back through it
    gx = torch.zeros_like(images)
    gy = torch.zeros_like(ys) if learn_labels else None
    dalpha = torch.zeros((), dtype=images.dtype, device=images.device)
    c = None  # momentum: c_i = λ_{i+1} + m c_{i+1}, pulled back through g_i in place of λ_{i+1}
    for i in range(len(steps) - 1, -1, -1):
        theta = thetas[i].clone().requires_grad_(True)
        x, y = batch(steps[i])
        g = torch.autograd.grad(inner(theta, x, y), theta, create_graph=True)[0]
        pull = lam  # what g_i is pulled back against: λ_{i+1}, or c_i with momentum
        if momentum:
            pull = c = lam if c is None else lam + momentum * c
        inputs = [images] + ([ys] if learn_labels else []) + ([theta] if mode == "exact" else [])
        back = torch.autograd.grad((g * pull).sum(), inputs, allow_unused=True)
        dalpha = dalpha - (g.detach() * pull).sum()
        gx = gx - a * _zeros_if_none(back[0], images)
        if learn_labels:
            gy = gy - a * _zeros_if_none(back[1], ys)
        if mode == "exact":
            lam = lam - a * _zeros_if_none(back[-1], theta)
        for term in middle.get(i, []):  # now lam is dL/dθ_i minus this step's own term: add it
            t = term.target.detach()
            lam = lam + term.weight * 2.0 * (thetas[i] - t) / (start - t).pow(2).sum()
    glr = dalpha * a if log_lr else dalpha
    return MatchResult(loss.detach(), gx, glr.reshape(lr_param.shape), gy)


def _zeros_if_none(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g
