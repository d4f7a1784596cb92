"""Stored per-epoch soft labels (FKD-style relabelling) and student training that replays them.

SRe2L, RDED, CDA and EDC train students on teacher logits of *augmented* views of the distilled
images. SRe2L's ImageNet-1K recipe (which CDA reuses) and EDC's code store them in a "relabel" stage:
for every epoch ``e`` and image ``i``, the augmentation of that view and the teacher's logits on it
(Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition", ECCV 2022 = FKD);
RDED's code and SRe2L's CIFAR-100 recipe (``relabel_cifar.py``) store nothing and query the teacher on
every batch instead (ddkit's label mode ``teacher``). Training then replays the very same views, so no teacher
is needed at training time, at the cost of storing labels (counted by :attr:`SoftLabelStore.nbytes`).

Everything is keyed by ``(epoch, image)``, never by batch: the parameters of epoch ``e`` are drawn
from an RNG seeded with ``(seed, e)`` for all ``N`` images at once, CutMix partners are *global*
image indices, so a replay works with any batch size, batch order or sampler.

**A view** of image ``i`` in epoch ``e`` (:func:`render`): normalise with the dataset mean/std, apply
the augmentation (default ``rrc_flip``: ``RandomResizedCropFlip`` params ``box``, ``flip``) with
``i``'s own parameters, and (CutMix, ``cutmix_prob > 0``) replace the pixel box ``mix.box[e, i]``
by the same box of the *partner's* view, partner ``j = mix.partner[e, i]`` augmented with ``j``'s
own epoch-``e`` parameters. The stored target is the teacher's logits on that mixed view, so no
label mixing is needed for the soft loss; ``lam`` (own-pixel fraction) is returned for the hard
part of ``mse_ce``.

**On-disk format** (a directory, written atomically, loaded with ``safetensors`` — no pickle):

- ``fkd_labels.safetensors`` with named tensors, first two dims ``[E, N]`` (epochs, images):
  ``aug.<key>`` every parameter of the augmentation (``aug.box`` float32 [E, N, 4] normalised
  (x0, y0, x1, y1), ``aug.flip`` bool [E, N]); ``mix.partner`` int32 [E, N] (global index, ``i``
  itself when not mixed) and ``mix.box`` int16 [E, N, 4] pixel (x0, y0, x1, y1), end exclusive,
  all zero when not mixed (present only with CutMix); and either ``logits`` float16 [E, N, C] or,
  with ``top_k``, ``topk.values`` float16 [E, N, K] (sorted, descending) + ``topk.indices``
  uint8/int16/int32 (smallest that fits C) [E, N, K].
- ``manifest.json``: ``kind: fkd-soft-labels``, ``schema_version``, ``format: 1``, teacher
  fingerprint and classes, distilled-set fingerprint, augmentation spec and options, CutMix
  prob/alpha, epochs, top_k, seed, ``teacher_bn`` / ``teacher_bn_batch`` (the teacher's BatchNorm
  mode; missing in older stores = running), ``teacher_batch_size`` (views per teacher forward in
  :func:`relabel`; missing in stores made before 2026-12-07, which used 256), tensor names/dtypes/shapes
  and bytes. ``batch_size_independent: true`` says that the targets are keyed by ``(epoch, image)``, so
  a student replays them with any batch size, order or sampler; it says nothing of the teacher's batch
  size in relabel, which can change a few logits by a float16 ulp.

**Teacher BatchNorm** (``teacher_bn``): ``running`` labels every view with the teacher in eval
mode. ``batch`` (CV-DD's batch-specific soft labels) normalises with the statistics of a group of
``teacher_bn_batch`` views (null: all views of the epoch) of the same epoch, the groups cut from a
permutation drawn from the epoch's generator after the views' own parameters (so both modes store
the same views). Groups do not depend on the relabel batch size nor on the student's batches.

**Top-k replay**: the dense target has the ``k`` stored logits and ``-inf`` elsewhere, so
``softmax(target / T)`` is exactly the teacher's distribution renormalised over its top ``k``
classes (FKD's renormalisation, at any temperature). ``-inf`` is only valid for the KL loss;
``mse_ce`` on top-k labels is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ddkit.artifacts import (
    FILES_SHA256,
    MANIFEST,
    artifact_folder,
    atomic_dir,
    base_manifest,
    check_classes,
    check_fields,
    check_output_dir,
    check_room,
    check_sha256,
    file_sha256,
    hidden_path,
    load_tensors,
    member,
    read_manifest,
    recorded_path,
    save_tensors,
    tensor_bytes,
    write_json,
)
from ddkit.config import (
    Checked,
    config_hash,
    field,
    is_count,
    keyed,
    plain_numbers,
    short_repr,
    summary_repr,
    to_dict,
)
from ddkit.data.augment import (
    AUGMENTS,
    CutMix,
    Params,
    build_augment,
    check_cutmix,
    slice_params,
    typed_augment,
    typed_augment_options,
)
from ddkit.data.base import ImageSet, hash_rows
from ddkit.determinism import cpu_default_device, stage_modes
from ddkit.errors import ConfigError, DDKitError, caller_stacklevel
from ddkit.training import (
    TeacherBN,
    TrainResult,
    check_teacher_bn,
    check_teacher_logits,
    keeps_teacher_modes,
    normalizer,
    omit_running_bn,
    teacher_labels,
    to_float,
    train_classifier,
)

log = logging.getLogger(__name__)
FP16_MAX = float(torch.finfo(torch.float16).max)

KIND = "fkd-soft-labels"
FILE = "fkd_labels.safetensors"
FORMAT = 1  # version of the tensor layout described in the module docstring
#: the teacher's batch size in :func:`relabel` (its forward runs in batches of this many views): another one can change
#: a few float16 logits by an ulp (float sums in the teacher are split differently), so a store records it
#: (``teacher_batch_size``) and its identity holds it where it is not this default (stores made before keep theirs)
TEACHER_BATCH = 256


def store_identity(store: str | Path | SoftLabelStore, *, legacy: bool = False) -> str:
    """What an evaluation that replays ``store`` (a store's folder, or a :class:`SoftLabelStore`) depends
    on, for cache keys: its manifest (settings, seed, teacher and set fingerprints, thread count, tensor
    layout) without the paths it was made from (an ensemble's extra teachers' too), the package versions,
    the number of processes (relabel gives the single-process bytes on any number: every store counts as made
    by one, so single-process stores keep their identity) and ``ddkit run``'s key of its labels stage (a store
    `ddkit relabel` makes with the same settings is the same). A moved or copied store keeps its identity; one
    re-made in place with other settings, for another set or by another teacher gets another. A store in memory
    that was never saved has the identity it will have once saved. ``legacy``: the identity ddkit until
    2026-12-07 gave it (process count and stage key in), which reports made then are keyed by. The teacher's batch
    size in relabel (``teacher_batch_size``) is in it only where it is not the default :data:`TEACHER_BATCH`, so
    stores made before it was recorded (and stores made with the default since) keep their identity."""
    if isinstance(store, SoftLabelStore):
        man = dict(store.manifest)
        if "tensors" not in man:  # never saved: the fields saving it adds
            spec = {k: (v.dtype, tuple(v.shape[1:])) for k, v in store.tensors.items()}
            man.update(_layout_fields(store.epochs, spec))
        man = json.loads(json.dumps(man))  # as saved and read back (tuples as lists)
    else:
        man = read_manifest(store, KIND)
    man.pop("versions", None)
    man.pop(FILES_SHA256, None)  # which bytes the file holds, not what made them (absent before a save)
    if man.get("teacher_batch_size") == TEACHER_BATCH:  # at the default: the identity stores had before it was recorded
        man.pop("teacher_batch_size")
    if not legacy:
        man.pop("config_hash", None)  # how a run asked for the store (its labels stage), not what it holds
        if isinstance(man.get("run"), dict):
            man["run"] = {**man["run"], "world_size": 1}
    for part in ("teacher", "distilled"):
        if isinstance(man.get(part), dict):
            man[part] = {k: v for k, v in man[part].items() if k not in ("path", "extra_teachers")}
    return config_hash(man)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """RNG of one epoch's views, derived from (seed, epoch): epochs can be relabelled independently."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + 101) % (2**63 - 1))


def set_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 (16 hex) of a distilled set's images and labels: ties a store to the set it labels."""
    h = hashlib.sha256()
    h.update(str(tuple(images.shape)).encode() + str(images.dtype).encode())
    hash_rows(h, images.detach().cpu())  # their own buffers, not a bytes copy (a set can be gigabytes)
    hash_rows(h, labels.detach().cpu().long())
    return h.hexdigest()[:16]


# set -> (its images and labels, weakly, their versions, their fingerprint): an evaluation checks its set against the
# store once and then for every student seed; fingerprinting reads every image, so it is done once per set
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def distilled_fingerprint(distilled) -> str:
    """:func:`set_fingerprint` of ``distilled``, remembered while its images and labels are the same
    tensors, unmodified in place (their ``_version``)."""
    images, labels = distilled.images, distilled.labels
    if images.is_inference() or labels.is_inference():  # they keep no version to tell an edit by
        return set_fingerprint(images, labels)
    try:
        memo = _FINGERPRINTS.get(distilled)
    except TypeError:  # an object that cannot be referenced weakly: fingerprinted every time
        return set_fingerprint(images, labels)
    if (memo is not None and memo[0]() is images and memo[1] == images._version
            and memo[2]() is labels and memo[3] == labels._version):
        return memo[4]
    fp = set_fingerprint(images, labels)
    _FINGERPRINTS[distilled] = (weakref.ref(images), images._version, weakref.ref(labels), labels._version, fp)
    return fp


@dataclass
class Replay:
    """One batch of views: everything needed to rebuild them and their targets.

    ``indices`` [B] global image indices; ``aug`` / ``partner_aug`` the augmentation parameters of
    the images and of their CutMix partners (empty dicts without augmentation); ``partner`` [B]
    global partner index; ``mix_box`` [B, 4] pixel box taken from the partner; ``lam`` [B] fraction
    of the image's own pixels; ``targets`` [B, C] float32 teacher logits (``-inf`` outside top-k),
    ``None`` while relabelling.
    """

    epoch: int
    indices: torch.Tensor
    aug: Params
    partner: torch.Tensor
    partner_aug: Params
    mix_box: torch.Tensor
    lam: torch.Tensor
    targets: torch.Tensor | None = None


def _lam(box: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    area = (box[:, 2] - box[:, 0]).clamp_min(0) * (box[:, 3] - box[:, 1]).clamp_min(0)
    return 1.0 - area.float() / (image_size[0] * image_size[1])


def render(replay: Replay, images: torch.Tensor, augment, norm: Callable, device) -> torch.Tensor:
    """The normalised, augmented, mixed views ``[B, C, H, W]`` of ``replay`` from pixel ``images`` [N, ...]."""
    x = norm(to_float(images[replay.indices], device))
    mixed = bool((replay.partner != replay.indices).any())
    if augment is not None:
        x = augment.apply(x, replay.aug)
    if not mixed:
        return x
    xp = norm(to_float(images[replay.partner], device))
    if augment is not None:
        xp = augment.apply(xp, replay.partner_aug)
    b = len(x)
    # ddkit's CutMix on [views; partner views]: row i takes its box from row B + i
    both = torch.cat([x, xp])
    params = {
        "perm": torch.cat([torch.arange(b) + b, torch.arange(b, 2 * b)]),
        "box": torch.cat([replay.mix_box.long(), torch.zeros_like(replay.mix_box, dtype=torch.long)]),
        "lam": torch.cat([replay.lam, torch.ones(b)]),
    }
    out, _, _ = CutMix().apply(both, params)
    return out[:b]


def _boxes_inside(box: torch.Tensor, top: tuple[float, float]) -> bool:
    """Whether every (x0, y0, x1, y1) box of ``box`` [..., 4] lies in 0..top[0] x 0..top[1] with x0 <= x1, y0 <= y1."""
    return (bool((box >= 0).all()) and bool((box[..., 2] <= top[0]).all() and (box[..., 3] <= top[1]).all())
            and bool((box[..., 0] <= box[..., 2]).all() and (box[..., 1] <= box[..., 3]).all()))


class SoftLabelStore:
    """Per-(epoch, image) augmentation parameters and teacher logits; see the module docstring.

    Build with :func:`relabel`, persist with :meth:`save` / :meth:`load`, replay with :meth:`replay`.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], manifest: dict[str, Any], path: Path | None = None) -> None:
        self.tensors = tensors
        self.manifest = manifest
        self.path = path
        self._norms: dict[tuple, Callable] = {}  # render's normalisers, one per (mean, std, device)
        self._check()
        try:
            self.augment = build_augment(manifest["augment"]["spec"], **manifest["augment"]["options"])
        except DDKitError as exc:  # only a damaged or foreign manifest names an augmentation this ddkit lacks
            where = f"{str(path / MANIFEST)!r}" if path is not None else "the store's manifest"
            raise DDKitError(f"{where} holds an augmentation this ddkit cannot replay ({str(exc).split(';')[0]}); "
                             "re-create the store with `ddkit relabel`") from None

    def __getstate__(self) -> dict:
        # render's normalisers are closures, which do not pickle (a spawn DataLoader worker, joblib): made again
        return {**self.__dict__, "_norms": {}}

    # --- description ---------------------------------------------------------------------------
    def __repr__(self) -> str:
        return summary_repr(self, epochs=self.epochs, images=self.num_images, classes=self.num_classes,
                            augment=self.manifest["augment"]["spec"], top_k=self.top_k,
                            teacher=self.manifest["teacher"]["fingerprint"],
                            bytes=self.nbytes, path=recorded_path(self.path))

    @property
    def epochs(self) -> int:
        return int(self.manifest["epochs"])

    @property
    def num_images(self) -> int:
        return int(self.manifest["num_images"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def top_k(self) -> int | None:
        return self.manifest["top_k"]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.manifest["image_size"])  # type: ignore[return-value]

    @property
    def teacher_bn(self) -> TeacherBN:
        return self.manifest.get("teacher_bn", "running")

    @property
    def teacher_bn_batch(self) -> int | None:
        return self.manifest.get("teacher_bn_batch")

    @property
    def mixed(self) -> bool:
        return "mix.partner" in self.tensors

    @property
    def nbytes(self) -> int:
        """Bytes of everything stored (parameters + logits): the label cost of this store."""
        return tensor_bytes(*self.tensors.values())

    @property
    def logit_nbytes(self) -> int:
        """Bytes of the stored logits alone (dense or top-k values + indices)."""
        return tensor_bytes(*(v for k, v in self.tensors.items() if k == "logits" or k.startswith("topk.")))

    def _check(self) -> None:
        m, t = self.manifest, self.tensors
        e, n, c = m["epochs"], m["num_images"], m["num_classes"]
        need = ["topk.values", "topk.indices"] if m["top_k"] else ["logits"]
        if m["cutmix"] is not None:
            need += ["mix.partner", "mix.box"]
        need += [f"aug.{k}" for k in m["augment"]["param_keys"]]
        where = str(self.path) if self.path else "soft-label store"
        missing = [k for k in need if k not in t]
        if missing:
            raise DDKitError(f"{where} lacks tensors {missing}; re-run `ddkit relabel`")
        for key, value in t.items():
            if tuple(value.shape[:2]) != (e, n):
                raise DDKitError(
                    f"{where}: tensor {key!r} has shape {tuple(value.shape)}, expected [{e}, {n}, ...] "
                    "(epochs, images); the store is corrupt, re-run `ddkit relabel`"
                )
        last = (m["top_k"],) if m["top_k"] else (c,)
        for key in need[:2] if m["top_k"] else need[:1]:
            if tuple(t[key].shape[2:]) != last:
                raise DDKitError(f"{where}: {key!r} has shape {tuple(t[key].shape)}; expected last dim {last[0]}")
        if (m["top_k"] and len(t["topk.indices"])
                and (int(t["topk.indices"].min()) < 0 or int(t["topk.indices"].max()) >= c)):
            raise DDKitError(f"{where}: top-k class indices outside [0, {c}); the store is corrupt, re-run "
                             "`ddkit relabel`")
        # value checks one epoch at a time: whole-store temporaries would be several times the store (which
        # may be tens of GB, memory-mapped), an epoch's are a few times N x C
        bad = [k for k, v in t.items() if v.is_floating_point() and not all(torch.isfinite(r).all() for r in v)]
        if bad:
            raise DDKitError(f"{where}: {bad} hold NaN or infinite values; the store is corrupt, re-run "
                             "`ddkit relabel`")
        if (self.mixed and len(t["mix.partner"])
                and (int(t["mix.partner"].min()) < 0 or int(t["mix.partner"].max()) >= n)):
            raise DDKitError(f"{where}: CutMix partners outside [0, {n}); the store is corrupt, re-run `ddkit relabel`")
        h, w = m["image_size"]
        for key, top, unit in (("aug.box", (1, 1), "normalised"), ("mix.box", (w, h), "pixel")):
            box = t.get(key)
            if box is None or not box.numel():
                continue
            if box.shape[-1] != 4 or not all(_boxes_inside(r.double(), top) for r in box):
                raise DDKitError(f"{where}: {key!r} holds boxes outside the {unit} image 0..{top[0]:g} x 0..{top[1]:g} "
                                 "(x0 <= x1, y0 <= y1); the store is corrupt, re-run `ddkit relabel`")

    def check_matches(self, distilled, teacher=None) -> None:
        """Fail unless the store labels exactly ``distilled`` (and was made by ``teacher``, if given)."""
        if list(self.image_size) != list(distilled.images.shape[-2:]):
            raise DDKitError(f"soft-label store was made for {list(self.image_size)} images but this set has "
                             f"{list(distilled.images.shape[-2:])}; re-run `ddkit relabel` on this set")
        if list(self.manifest["classes"]) != list(distilled.classes):
            raise DDKitError(f"soft-label store was made for classes {self.manifest['classes']} but this set has "
                             f"{list(distilled.classes)}; re-run `ddkit relabel` on this set")
        fp = distilled_fingerprint(distilled)
        if fp != self.manifest["distilled"]["fingerprint"]:
            raise DDKitError(
                "soft-label store was made for a distilled set with fingerprint "
                f"{self.manifest['distilled']['fingerprint']} but this set has {fp}; re-run `ddkit relabel` on this set"
            )
        if (teacher is not None and hasattr(teacher, "fingerprint")
                and not teacher.made(self.manifest["teacher"]["fingerprint"])):
            made = self.manifest["teacher"]
            if "extra_teachers" in made:  # an ensemble's store (run, bench, relabel --extra-teacher): name its members
                raise DDKitError(
                    f"soft-label store was made by the ensemble {made['fingerprint']} of teacher {made['path']!r} and "
                    f"extra_teachers {made['extra_teachers']}, not by {teacher.fingerprint}; pass that teacher with "
                    f"--set \"extra_teachers=[{','.join(map(str, made['extra_teachers']))}]\""
                )
            # an evaluation's ensemble (the protocol's extra_teachers) is relabelled with the same members
            again = ("re-run `ddkit relabel` with --extra-teacher DIR for each of the protocol's extra_teachers"
                     if len((getattr(teacher, "manifest", None) or {}).get("ensemble") or []) > 1
                     else "re-run `ddkit relabel`")
            raise DDKitError(
                f"soft-label store was made by teacher {made['fingerprint']}, not "
                f"{teacher.fingerprint}; pass the same teacher or {again}"
            )

    # --- replay --------------------------------------------------------------------------------
    def _params(self, epoch: int, idx: torch.Tensor) -> Params:
        return {k.removeprefix("aug."): v[epoch][idx] for k, v in self.tensors.items() if k.startswith("aug.")}

    @cpu_default_device()
    def targets(self, epoch: int, indices) -> torch.Tensor:
        """Teacher logits ``[B, C]`` float32 of the views of ``indices`` in ``epoch`` (``-inf`` outside top-k)."""
        idx = self._index(epoch, indices)
        if not self.top_k:
            return self.tensors["logits"][epoch][idx].float()
        out = torch.full((len(idx), self.num_classes), float("-inf"))
        return out.scatter_(1, self.tensors["topk.indices"][epoch][idx].long(),
                            self.tensors["topk.values"][epoch][idx].float())

    def _index(self, epoch: int, indices) -> torch.Tensor:
        if not 0 <= epoch < self.epochs:
            raise DDKitError(f"epoch {epoch} is outside the store's {self.epochs} epochs; relabel with more --epochs")
        idx = torch.as_tensor(indices, dtype=torch.long).flatten()
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= self.num_images):
            raise DDKitError(f"image indices must lie in [0, {self.num_images}), got {idx.tolist()[:8]}")
        return idx

    @cpu_default_device()
    def replay(self, epoch: int, indices) -> Replay:
        """The exact views (parameters) and targets of images ``indices`` in ``epoch``.

        Per (epoch, image): the result for ``[3, 1]`` is rows 3 and 1 of the full-epoch replay,
        whatever the batch size or order.
        """
        idx = self._index(epoch, indices)
        if self.mixed:
            partner = self.tensors["mix.partner"][epoch][idx].long()
            box = self.tensors["mix.box"][epoch][idx].long()
        else:
            partner, box = idx.clone(), torch.zeros((len(idx), 4), dtype=torch.long)
        return Replay(epoch, idx, self._params(epoch, idx), partner, self._params(epoch, partner), box,
                      _lam(box, self.image_size), self.targets(epoch, idx))

    @cpu_default_device()
    def render(self, replay: Replay, images: torch.Tensor, mean, std, device="cpu") -> torch.Tensor:
        """The normalised views of ``replay`` built from pixel-space ``images`` (the distilled set's)."""
        # made once per mean, std and device, not every training step: building it copies two small tensors to
        # the device, which waits for the device each time
        key = (tuple(map(float, mean)), tuple(map(float, std)), str(device))
        if key not in self._norms:
            self._norms[key] = normalizer(mean, std, device)
        return render(replay, images, self.augment, self._norms[key], device)

    # --- persistence ---------------------------------------------------------------------------
    @cpu_default_device()
    def save(self, out: str | Path) -> Path:
        """Write the store to the folder ``out`` (atomically), one epoch at a time."""
        out = Path(out)
        man = _write_store(out, self.manifest, self.epochs, list(self.tensors),
                           lambda e: {k: v[e] for k, v in self.tensors.items()})
        self.manifest, self.path = man, out.absolute()  # records name it from any working folder (links stay)
        return out

    @classmethod
    @cpu_default_device()
    def load(cls, path: str | Path) -> SoftLabelStore:
        path = artifact_folder(path, KIND)  # the manifest's path names its folder, as read_manifest takes it
        man = read_manifest(path, KIND, require={
            "epochs": int, "num_images": int, "num_classes": int, "image_size": list, "augment.spec": str,
            "augment.options": dict, "augment.param_keys": list, "distilled.fingerprint": str,
            "top_k": (int, type(None)), "cutmix": (dict, type(None)), "teacher.fingerprint": str, "classes": list,
            "tensors": dict})
        size = man["image_size"]
        if (len(man["classes"]) != man["num_classes"] or len(size) != 2 or min(man["epochs"], man["num_images"]) < 1
                or not all(map(is_count, size))):
            raise DDKitError(f"{str(path / MANIFEST)!r} holds {len(man['classes'])} classes for num_classes "
                             f"{man['num_classes']}, image_size {size!r}, {man['epochs']} epochs and "
                             f"{man['num_images']} images; the manifest is damaged: re-create the store with "
                             "`ddkit relabel`")
        if man["cutmix"] is not None:  # CutMix's settings, which a random-baseline relabel repeats
            check_fields(man, {"cutmix.prob": (int, float), "cutmix.alpha": (int, float)}, path, KIND)
        if man.get("format") != FORMAT:
            raise DDKitError(f"{path} has FKD store format {man.get('format')!r}; this ddkit reads format {FORMAT}")
        files = man.get("files", {})
        if not (isinstance(files, dict) and isinstance(files.get("labels", FILE), str)):
            raise DDKitError(f"{str(path / MANIFEST)!r} holds files {files!r}, not the name of its labels file; the "
                             "manifest is damaged: re-create the store with `ddkit relabel`")
        check_classes(man["classes"], path, KIND, key="classes")
        try:
            check_teacher_bn(man.get("teacher_bn", "running"), man.get("teacher_bn_batch"))
        except ConfigError as exc:
            raise DDKitError(f"{str(path / MANIFEST)!r}: {str(exc).split(';')[0]}; the manifest is damaged: re-create "
                             "the store with `ddkit relabel`") from None
        tensors = load_tensors(member(path, files.get("labels", FILE), path / MANIFEST, "files.labels",
                                      "re-create the store with `ddkit relabel`"), what="FKD soft labels")
        if set(man["tensors"]) != set(tensors):
            raise DDKitError(f"{path}: the manifest lists tensors {sorted(man['tensors'])} but the file holds "
                             f"{sorted(tensors)}; the store is corrupt, re-run `ddkit relabel`")
        for key, spec in man["tensors"].items():
            if (not isinstance(spec, dict) or str(tensors[key].dtype).removeprefix("torch.") != spec.get("dtype")
                    or list(tensors[key].shape) != spec.get("shape")):
                raise DDKitError(f"{path}: tensor {key!r} does not match its manifest entry; the store is corrupt, "
                                 "re-run `ddkit relabel`")
        # checks the values: a damaged file is refused for what is wrong with it
        store = cls(tensors, man, path.absolute())
        holds = {"total": store.nbytes, "logits": store.logit_nbytes}  # as the manifest's bytes were written
        if (recorded := man.get("bytes")) is not None and (
                not isinstance(recorded, dict) or {k: recorded.get(k) for k in holds} != holds):
            raise DDKitError(f"{str(path / MANIFEST)!r} records bytes {short_repr(recorded)} but the store holds "
                             f"{holds['total']} bytes, {holds['logits']} of them logits; the manifest is damaged: "
                             "re-create the store with `ddkit relabel`")
        check_sha256(man, path, files.get("labels", FILE), KIND, "FKD soft labels",
                     "re-create the store with `ddkit relabel`")
        return store


def _write_store(out: Path, manifest: dict[str, Any], epochs: int, names: list[str],
                 row: Callable[[int], dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Write a store folder at ``out`` (atomically) from ``row(e)``, the tensors ``names`` of epoch ``e``
    (the same shapes every epoch), reading one epoch at a time; returns the manifest written: ``manifest``
    with the tensor list, bytes and file name added. The labels file holds what ``save_file`` of the
    stacked ``[epochs, ...]`` tensors would, to the byte."""
    first = row(0)
    spec = {k: (first[k].dtype, tuple(first[k].shape)) for k in names}
    man = {**manifest, **_layout_fields(epochs, spec)}
    with atomic_dir(out, kind=KIND) as tmp:
        _write_epochs(tmp / FILE, spec, epochs, row, {"kind": KIND})  # the format is in the manifest
        # written a slice at a time out of order: hashed once whole, read back from the page cache
        man[FILES_SHA256] = {FILE: file_sha256(tmp / FILE)}
        write_json(tmp / "manifest.json", man)
    return man


def _layout_fields(epochs: int, spec: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> dict[str, Any]:
    """The manifest fields a saved store adds: its tensors' dtypes and shapes (``spec``: name -> dtype and
    shape of one epoch), their bytes and the labels file's name."""
    size = {k: epochs * math.prod(shape) * _itemsize(dtype) for k, (dtype, shape) in spec.items()}
    return {"tensors": {k: {"dtype": str(dtype).removeprefix("torch."), "shape": [epochs, *shape]}
                        for k, (dtype, shape) in spec.items()},
            "bytes": {"total": sum(size.values()),
                      "logits": sum(v for k, v in size.items() if k == "logits" or k.startswith("topk."))},
            "files": {"labels": FILE}}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _write_epochs(path: Path, spec: dict[str, tuple[torch.dtype, tuple[int, ...]]], epochs: int,
                  row: Callable[[int], dict[str, torch.Tensor]], metadata: dict[str, str]) -> None:
    """A safetensors file of tensors ``[epochs, *shape]`` (``spec``: name -> dtype, shape of one epoch),
    filled epoch by epoch from ``row(e)``. safetensors writes a little-endian u64 header length, a
    compact JSON header (``__metadata__``, then every tensor's dtype, shape and byte range, in the order
    of the data) padded with spaces to a multiple of 8, then each tensor's bytes back to back; since
    every epoch has the same shapes, the header comes first and each epoch's slice goes to its offset.
    The order of the tensors and the names of their dtypes are safetensors' own, read from a file of
    empty stand-ins."""
    probe = safetensors_bytes({k: torch.empty(0, dtype=dtype) for k, (dtype, _) in spec.items()})
    probe_header = json.loads(probe[8:8 + struct.unpack("<Q", probe[:8])[0]])
    header: dict[str, Any] = {"__metadata__": metadata}
    where, start = {}, 0
    for k in probe_header:  # safetensors' order: by dtype, then by name
        dtype, shape = spec[k]
        step = math.prod(shape) * _itemsize(dtype)  # bytes of one epoch's slice
        header[k] = {"dtype": probe_header[k]["dtype"], "shape": [epochs, *shape],
                     "data_offsets": [start, start + epochs * step]}
        where[k] = (start, step)
        start += epochs * step
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for e in range(epochs):
            tensors = row(e)
            found = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
            if found != spec:
                raise DDKitError(f"relabel epoch {e} holds tensors {found}, epoch 0 {spec}; delete the relabel work "
                                 "folder and relabel again")
            for k, (start, step) in where.items():
                f.seek(8 + len(text) + start + e * step)
                f.write(tensors[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _epoch_logits(model: nn.Module, images: torch.Tensor, augment, norm: Callable, device, epoch: int, aug: Params,
                  partner: torch.Tensor, box: torch.Tensor, gen: torch.Generator, batch_size: int, bn: TeacherBN,
                  group: int | None) -> torch.Tensor:
    """Teacher logits ``[N, C]`` of every view of one epoch; batch-statistics groups are drawn from
    ``gen`` after the views' own parameters (so both BatchNorm modes store the same views)."""
    size = tuple(images.shape[-2:])

    def views(idx: torch.Tensor) -> torch.Tensor:
        r = Replay(epoch, idx, slice_params(aug, idx) if aug else {}, partner[idx],
                   slice_params(aug, partner[idx]) if aug else {}, box[idx], _lam(box[idx], size))
        return render(r, images, augment, norm, device)

    return teacher_labels(model, views, len(partner), batch_size, bn, group, gen)


def _topk_index_dtype(num_classes: int) -> torch.dtype:
    if num_classes <= 256:
        return torch.uint8
    return torch.int16 if num_classes <= 2**15 else torch.int32


@stage_modes()
@torch.no_grad()
@keeps_teacher_modes
def relabel(
    distilled,
    teacher,
    epochs: int,
    augment: str = "rrc_flip",
    augment_options: dict | None = None,
    cutmix_prob: float = 1.0,
    seed: int = 0,
    top_k: int | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int, dict], None] | None = None,
    *,
    cutmix_alpha: float = 1.0,
    batch_size: int = TEACHER_BATCH,
    work_dir: str | Path | None = None,
    out: str | Path | None = None,
    manifest_extra: dict[str, Any] | None = None,
    teacher_bn: TeacherBN = "running",
    teacher_bn_batch: int | None = None,
    augment_spec: str | None = None,
) -> SoftLabelStore:
    """Store the teacher's logits on ``epochs`` augmented (and CutMix-ed) views of every image.

    ``distilled``: a :class:`~ddkit.distilled.DistilledSet` or its folder (or anything with ``images``,
    ``labels``, ``classes``, ``mean``, ``std``). ``teacher``: a :class:`~ddkit.teacher.Teacher` or its
    folder (or a bare module, then no class/fingerprint check). ``augment``/``augment_options``: any
    :func:`~ddkit.data.augment.build_augment` spec (SRe2L's ImageNet-1K relabel: ``rrc_flip`` with scale 0.08-1;
    RDED's views: RandomResizedCrop with scale 1/factor-1, i.e. the whole image at factor 1 (``flip``), ``rrc_flip``
    with ``scale_min: 0.5`` at factor 2 after shuffling the 2x2 patches, which ddkit does not do), as
    ``RelabelSpec.augment`` and ``--augment`` name it (``augment_spec=``: its old name, deprecated).
    ``cutmix_prob``: per-image CutMix probability (0 disables). ``top_k``: keep only the k largest
    logits per view. ``batch_size``: views per teacher forward; it changes speed and, as float sums in the teacher
    are split differently, can change a few stored float16 logits by an ulp: the store records it
    (``teacher_batch_size``) and its identity (:func:`store_identity`) holds it where it is not :data:`TEACHER_BATCH`.
    ``teacher_bn``/``teacher_bn_batch``: the teacher's BatchNorm mode and group size (module docstring).
    ``progress(done, epochs_of_this_rank, record)`` after every epoch.

    ``out``: save the store to this folder (atomically) and return it loaded from there (memory-mapped);
    ``manifest_extra``: fields added to its manifest (``ddkit run`` records its stage key).

    Epochs are independent (epoch ``e`` draws from a generator of ``(seed, e)``), so under
    ``torchrun`` rank ``r`` labels epochs ``e % world == r``: the result equals the single-process
    one. With ``work_dir`` every finished epoch is kept there (``epoch_<e>.safetensors``, in a folder
    named by the settings and the set's fingerprint) and a restarted run labels only the missing
    epochs; delete the folder once the store is saved.

    Memory: with ``out`` each rank holds one epoch at a time: the ranks write their epochs to the work
    folder (``work_dir``, or ``.<out name>.partial`` beside ``out``, which every rank must see: a
    shared filesystem, as ``out`` itself), rank 0 streams them into ``out`` and removes them, and every
    rank loads the store (memory-mapped, its pages shared). Without ``out`` the store is returned in
    memory (the whole ``[epochs, N, C]`` logits, for small sets and tests); under ``torchrun`` every
    rank then receives the other ranks' epochs one at a time.
    """
    import os
    import warnings

    from ddkit import distributed as ddist
    from ddkit.config import SEED_LIMIT

    if augment_spec is not None:
        if augment not in ("rrc_flip", augment_spec):
            raise ConfigError(f"relabel got augment={augment!r} and its old name augment_spec={augment_spec!r}; pass "
                              "augment= alone")
        # the caller's line: past the wrappers of stage_modes, no_grad and keeps_teacher_modes
        warnings.warn("relabel(augment_spec=) is deprecated; pass augment=", DeprecationWarning,
                      stacklevel=caller_stacklevel())
        augment = augment_spec
    augment_name = augment  # `augment` is the built augmentation from here on

    if isinstance(distilled, (str, os.PathLike)):  # artifact folders, as distill and evaluate take them
        from ddkit.distilled import DistilledSet

        distilled = DistilledSet.load(distilled)
    device = ddist.resolve_device(device)
    if isinstance(teacher, (str, os.PathLike)):
        from ddkit.teacher import Teacher

        teacher = Teacher.load(teacher, device)
    # before anything is labelled or the work folder made (NaN fails every comparison, so it fails these too)
    epochs, seed, batch_size, top_k = plain_numbers([epochs, seed, batch_size, top_k])  # numpy's ints as Python's
    if not is_count(epochs):
        raise ConfigError(f"relabel epochs must be an integer >= 1, got {epochs!r}")
    if batch_size < 1:
        raise ConfigError(f"relabel batch_size must be >= 1, got {batch_size}")
    check_cutmix(cutmix_prob, cutmix_alpha)
    if not is_count(seed, 0) or seed >= SEED_LIMIT:
        raise ConfigError(f"relabel seed must be an integer in [0, 2^32), got {seed!r}")
    check_teacher_bn(teacher_bn, teacher_bn_batch)
    augment, augment_options = typed_augment(augment_name, dict(augment_options or {}))  # options recorded typed
    cutmix = CutMix(cutmix_alpha, cutmix_prob) if cutmix_prob > 0 else None
    model: nn.Module = getattr(teacher, "model", teacher)
    if not isinstance(model, nn.Module):
        raise DDKitError(f"teacher must be a Teacher, its artifact folder or a module, got {type(teacher).__name__}")
    for name in ("images", "labels", "classes"):
        if not hasattr(distilled, name):
            raise DDKitError(f"distilled must be a DistilledSet or its artifact folder, got {type(distilled).__name__}")
    model = model.to(device).eval()
    classes = list(distilled.classes)
    if hasattr(teacher, "classes") and list(teacher.classes) != classes:
        raise DDKitError("teacher's classes (names or order) differ from the distilled set's; use the teacher "
                         "of this dataset")
    images, n = distilled.images, len(distilled.labels)
    expects = getattr(teacher, "manifest", {}).get("model", {}).get("input_shape")
    if expects is not None and list(expects) != list(images.shape[1:]):
        raise DDKitError(f"teacher expects images {list(expects)} but the distilled set's are "
                         f"{list(images.shape[1:])}; use the teacher of this dataset")
    size = tuple(images.shape[-2:])
    num_classes = len(classes)
    # one look at its logits before any labelling (a bare module had no contract check)
    check_teacher_logits(model, images.shape[1:], num_classes, device, "distilled set")
    if top_k is not None and not 1 <= top_k <= num_classes:
        raise ConfigError(f"top_k must lie in [1, {num_classes}] (or null for dense), got {top_k}")
    if top_k == num_classes:
        top_k = None  # all classes: store dense
    norm = normalizer(distilled.mean, distilled.std, device)
    config = {"epochs": epochs, "augment": augment_name, "augment_options": augment_options, "cutmix_prob": cutmix_prob,
              "cutmix_alpha": cutmix_alpha, "top_k": top_k, "seed": seed, "teacher_bn": teacher_bn,
              "teacher_bn_batch": teacher_bn_batch}
    omit_running_bn(config)  # at the default: work folders of older runs keep their key
    fingerprint = distilled_fingerprint(distilled)
    teacher_fp = getattr(teacher, "fingerprint", None)
    members = (getattr(teacher, "manifest", None) or {}).get("ensemble") or []
    if teacher_fp is None:  # a bare module: its weights identify it (resume must not reuse another's logits)
        from ddkit.teacher.squeeze import weights_sha

        teacher_fp = weights_sha(model)
    # the teacher's batch size where it is not the default (its logits can differ by an ulp): a work folder of another
    # one is not resumed (the default's key is the one work folders always had)
    batched = {"batch_size": batch_size} if batch_size != TEACHER_BATCH else {}
    ddist.agree_settings({"relabel": config, "set": fingerprint, "teacher": teacher_fp, **batched})
    own_work = out is not None and work_dir is None
    if out is not None:
        out = Path(out)
        check_output_dir(out, KIND)  # before any labelling
        if own_work:  # the epochs go to files that rank 0 then streams into the store: a folder beside it
            work_dir = hidden_path(out, ".partial")
    # the logits alone (float16; top-k also their indices), on out's disk or, returned in memory, in memory
    per_view = top_k * (2 + _topk_index_dtype(num_classes).itemsize) if top_k else num_classes * 2
    check_room(epochs * n * per_view, f"the store's logits ({epochs} epochs x {n} images x "
               f"{top_k or num_classes} logits)", "lower the relabel epochs (or keep fewer logits with top_k)", out)
    partial = None
    if work_dir is not None:
        key = config_hash({**config, "epochs": None, "set": fingerprint, "teacher": teacher_fp, **batched})[:16]
        partial = Path(work_dir) / f"relabel-{key}"  # made with the first finished epoch: a refusal leaves nothing
    info = ddist.current()
    mine = range(info.rank, epochs, info.world_size)
    tensors: dict[str, torch.Tensor] = {}  # the whole store, when it is returned in memory (no out)

    def keep(e: int, row: dict[str, torch.Tensor]) -> None:
        if out is not None:
            return
        if not tensors:  # resumed or not: one order
            tensors.update({k: torch.empty((epochs, *row[k].shape), dtype=row[k].dtype) for k in sorted(row)})
        for k, v in row.items():
            tensors[k][e] = v

    param_keys = sorted(augment.sample(1, torch.Generator().manual_seed(0), size)) if augment is not None else []
    for done, e in enumerate(mine, 1):
        path = partial / epoch_file(e) if partial is not None else None
        if path is not None and path.is_file():
            try:
                keep(e, load_tensors(path, what="relabel epoch"))
            except DDKitError as exc:  # damaged on disk (it was written atomically): label the epoch again
                log.warning("%s; labelling epoch %d again", exc, e)
                path.unlink(missing_ok=True)
            else:
                log.info("relabel epoch %d reused from %s", e, partial)
                if progress is not None:
                    progress(done, len(mine), {"epoch": e + 1, "reused": True})
                continue
        gen = epoch_generator(seed, e)
        aug = augment.sample(n, gen, size) if augment is not None else {}
        if cutmix is not None:
            mix = cutmix.sample(n, gen, size)
            partner, box = mix["perm"].long(), mix["box"].long()
        else:
            partner, box = torch.arange(n), torch.zeros((n, 4), dtype=torch.long)
        z = _epoch_logits(model, images, augment, norm, device, e, aug, partner, box, gen, batch_size, teacher_bn,
                          teacher_bn_batch)
        peak = float(z.abs().max()) if z.numel() else 0.0
        if not peak <= FP16_MAX:  # also NaN
            raise DDKitError(f"teacher logits reach {peak:.3g} in relabel epoch {e}, beyond float16's "
                             f"{FP16_MAX:g} that the label store keeps; check the teacher (diverged training?) or "
                             "evaluate with label mode teacher")
        row: dict[str, torch.Tensor] = {f"aug.{k}": v for k, v in aug.items()}
        if cutmix is not None:
            row["mix.partner"], row["mix.box"] = partner.to(torch.int32), box.to(torch.int16)
        if top_k:
            values, index = z.topk(top_k, dim=1)
            row["topk.values"], row["topk.indices"] = values.half(), index.to(_topk_index_dtype(num_classes))
        else:
            row["logits"] = z.half()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_tensors(path, row)
        keep(e, row)
        del z, row
        if progress is not None:
            progress(done, len(mine), {"epoch": e + 1})
    manifest = base_manifest(KIND, config, seed)
    manifest.update({
        "format": FORMAT,
        "epochs": epochs,
        "num_images": n,
        "num_classes": num_classes,
        "classes": classes,
        "image_size": list(size),
        "top_k": top_k,
        "topk_fill": "-inf" if top_k else None,
        "augment": {"spec": augment_name, "options": augment_options, "param_keys": param_keys},
        "cutmix": {"prob": cutmix_prob, "alpha": cutmix_alpha} if cutmix is not None else None,
        "view": "normalise -> augment(own params) -> CutMix box from partner's augmented view",
        "teacher_bn": teacher_bn,
        "teacher_bn_batch": teacher_bn_batch,
        "teacher_batch_size": batch_size,
        # keyed by (epoch, image): a student replays the store with any batch size (the teacher's is the field above)
        "batch_size_independent": True,
        "teacher": {"fingerprint": teacher_fp,
                    "path": recorded_path(getattr(teacher, "path", None)),
                    # an ensemble (the protocol's extra_teachers, see labelling_teacher): the others' folders, which
                    # an evaluation must pass again
                    **({"extra_teachers": [m["path"] for m in members[1:]]} if len(members) > 1 else {})},
        "distilled": {"fingerprint": fingerprint,
                      "path": recorded_path(getattr(distilled, "path", None))},
        **(manifest_extra or {}),
    })
    if out is None:
        if info.enabled:  # every rank gets each other rank's epochs, one epoch at a time
            for e in range(epochs):
                src = e % info.world_size
                row = ddist.broadcast_object({k: v[e].clone() for k, v in tensors.items()} if src == info.rank
                                             else None, src)
                if src != info.rank:
                    keep(e, row)
        store = SoftLabelStore(tensors, manifest)
    else:
        ddist.barrier()  # every rank's epochs are in the work folder
        if info.is_main:
            files = [partial / epoch_file(e) for e in range(epochs)]
            _write_store(out, manifest, epochs, sorted(load_tensors(files[0], what="relabel epoch")),
                         lambda e: load_tensors(files[e], what="relabel epoch"))
            shutil.rmtree(work_dir if own_work else partial, ignore_errors=True)
        ddist.barrier()
        store = SoftLabelStore.load(out)
    log.info("relabelled %d images x %d epochs: %d label bytes", n, epochs, store.nbytes)
    return store


def epoch_file(epoch: int) -> str:
    """Name of one labelled epoch's file in relabel's work folder."""
    return f"epoch_{epoch:05d}.safetensors"


@dataclass
class RelabelSpec(Checked):
    """How ``run`` and ``bench`` make a distilled set's FKD store for label mode ``fkd``: the settings
    of :func:`relabel` as a config section (``relabel:``)."""

    epochs: int | None = field(None, help="stored epochs (None: the protocol's training epochs)")
    augment: str = field("rrc_flip", help="augmentation of each stored view (SRe2L's ImageNet-1K relabel: rrc_flip "
                                          "0.08-1; RDED at factor 1: flip, the whole image)")
    augment_options: dict = field({}, help="options of the augmentation, e.g. {scale_min: 0.08}")
    cutmix_prob: float = field(1.0, help="per-image CutMix probability (0: off)")
    cutmix_alpha: float = field(1.0, help="CutMix Beta(alpha, alpha)")
    top_k: int | None = field(None, help="keep only the k largest logits per view (None: all, fp16)")
    seed: int = field(0, seed=True, help="seed of the views")
    teacher_bn: TeacherBN = field("running", help="teacher BatchNorm: running statistics, or batch: statistics of "
                                  "groups of views (CV-DD's batch-specific soft labels)")
    teacher_bn_batch: int | None = field(None, help="teacher_bn batch: views per BatchNorm group (null: all "
                                                    "views of an epoch)")

    def __post_init__(self) -> None:
        check_teacher_bn(self.teacher_bn, self.teacher_bn_batch)
        # numbers as relabel records them (1 and 1.0 key one store); what does not build, check_augment refuses
        with contextlib.suppress(DDKitError):
            self.augment_options = typed_augment_options(self.augment, self.augment_options)
        # what relabel would refuse only once a run or bench reaches it (teachers and sets made)
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1 (or null: the protocol's training epochs), got {self.epochs}")
        check_cutmix(self.cutmix_prob, self.cutmix_alpha)
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1 (or null: all logits), got {self.top_k}")

    def identity(self) -> dict:
        """Every field; the BatchNorm mode only when not running, so cell and store keys of
        benches written before it existed stay valid."""
        return omit_running_bn(to_dict(self, identity=True))

    def check_augment(self, where: str = "relabel") -> None:
        """Refuse an augmentation or option that relabel cannot build, naming the key under ``where``."""
        key = f"{where}.augment_options" if self.augment in AUGMENTS else f"{where}.augment"
        try:
            build_augment(self.augment, **self.augment_options)
        except DDKitError as e:
            raise keyed(key, e) from None

    def check(self, num_classes: int, dataset: str, losses: dict[str, str], fix: str, where: str = "relabel") -> None:
        """Refuse, naming the key under ``where``, what :func:`relabel` and FKD training would refuse only
        once they start: an augmentation or option relabel cannot build, a ``top_k`` outside ``dataset``'s
        ``num_classes``, and top-k labels (fewer than all classes) for a protocol whose loss is not kl.
        ``losses``: each protocol that replays the store, described, with its loss; ``fix``: how to give
        those protocols the kl loss."""
        self.check_augment(where)
        if self.top_k is None:
            return
        if not 1 <= self.top_k <= num_classes:
            raise ConfigError(f"{where}.top_k must lie in [1, {num_classes}] (dataset {dataset!r} has {num_classes} "
                              f"classes) or be null (all logits), got {self.top_k}")
        if self.top_k == num_classes:  # all classes: stored dense
            return
        for which, loss in losses.items():
            if loss != "kl":
                raise ConfigError(f"{where}.top_k = {self.top_k} stores top-k logits, which only train with loss 'kl', "
                                  f"but {which} uses loss {loss!r}; set {where}.top_k: null (dense labels) or {fix}")

    def key(self, distilled, teacher, protocol_epochs: int) -> str:
        """Identity of the store :meth:`make` would make: these settings, the epochs, the set's
        ``config_hash`` and the teacher's fingerprint (a stage whose stored key matches is reused)."""
        return config_hash({"relabel": self.identity(), "epochs": self.epochs or protocol_epochs,
                            "set": distilled.manifest.get("config_hash"), "teacher": teacher.fingerprint})

    def make(self, distilled, teacher, protocol_epochs: int | None = None, device: str | torch.device = "cpu",
             progress: Callable[[int, int, dict], None] | None = None,
             work_dir: str | Path | None = None, out: str | Path | None = None,
             manifest_extra: dict[str, Any] | None = None) -> SoftLabelStore:
        """The store of ``distilled`` by ``teacher`` with these settings (:func:`relabel`): ``epochs``
        views per image, or, where ``epochs`` is None, ``protocol_epochs`` (the training epochs of the
        protocol that replays it); saved to ``out`` (and loaded from there) when given."""
        if self.epochs is None and protocol_epochs is None:
            raise ConfigError("RelabelSpec.epochs is None (the protocol's training epochs), so make needs "
                              "protocol_epochs; pass protocol_epochs=N, or set epochs")
        return relabel(distilled, teacher, self.epochs or protocol_epochs, self.augment, dict(self.augment_options),
                       self.cutmix_prob, self.seed, self.top_k, device, progress, cutmix_alpha=self.cutmix_alpha,
                       work_dir=work_dir, out=out, manifest_extra=manifest_extra, teacher_bn=self.teacher_bn,
                       teacher_bn_batch=self.teacher_bn_batch)


@stage_modes()
def train_with_store(
    model: nn.Module,
    distilled,
    store: SoftLabelStore,
    cfg,
    seed: int,
    device: str | torch.device = "cpu",
    test=None,
    progress: Callable[[int, int, dict], None] | None = None,
    distributed: bool = False,
) -> TrainResult:
    """Train ``model`` on ``distilled`` with the stored views and teacher logits of ``store``.

    ``cfg``: a :class:`~ddkit.evaluate.protocol.ProtocolConfig` (uses ``train`` = optimizer, lr,
    schedule, epochs, batch size, EMA; ``loss`` = kl | mse_ce; ``temperature``). The store's
    augmentation and CutMix replace ``train.augment`` / ``train.cutmix_prob``. Student epoch ``e``
    replays store epoch ``e % store.epochs`` (a warning is logged when the store is shorter).
    Batch order comes from a generator seeded with ``seed``; dropout masks, as ``model``'s initial weights,
    from torch's global generators (evaluation holds :func:`~ddkit.determinism.global_rng` with the student's
    seed around both). The loop is
    :func:`ddkit.training.train_classifier` with label source ``fkd`` (so DDP, resume and EMA
    behave as everywhere else).
    """
    tc = cfg.train
    if cfg.loss == "ce":
        raise ConfigError("training with stored FKD labels needs loss 'kl' or 'mse_ce'; set loss=kl")
    if store.top_k and cfg.loss != "kl":
        raise ConfigError(f"top-k FKD labels (k={store.top_k}) only work with loss 'kl' (got {cfg.loss!r}); relabel "
                          "densely or use kl")
    store.check_matches(distilled)
    if tc.augment != "none" or tc.cutmix_prob > 0:
        log.info("FKD training replays the store's augmentation (%s); train.augment/cutmix_prob are ignored",
                 store.manifest["augment"]["spec"])
    if tc.epochs > store.epochs:
        log.warning("store has %d epochs but training runs %d: epochs are reused cyclically", store.epochs, tc.epochs)
    data = ImageSet(distilled.images, distilled.labels.long())
    return train_classifier(model, data, distilled.mean, distilled.std, tc, seed=seed, device=device,
                            label_source="fkd", loss=cfg.loss, temperature=cfg.temperature, fkd_store=store, test=test,
                            distributed=distributed, progress=progress)
