"""The distilled-set artifact: one directory format for every method.

Layout (every file named in ``manifest.json``):

- ``images.safetensors``: ``images`` [N, C, H, W] and ``labels`` int64 [N]. Images are uint8 pixels, or
  float32 where 0..1 is the real data's range; methods that optimise pixels without clamping them (DC, DM,
  MTT, ...) leave values outside it, which training uses as they are. The manifest's
  ``images.pixel_range`` records the range the set holds: [0, 255] for uint8, the true min and max for float;
  a float set stored as uint8 (``distill.image_dtype: uint8``) records ``images.quantised``: the float dtype and
  range it was rounded from and how many pixels lay outside 0..1 and were clipped
- ``soft_labels.safetensors`` (optional): ``logits`` [N, num_classes], the relabel stage's slot
- ``manifest.json``: schema version, dataset + fingerprint, classes, IPC, method + resolved config,
  seed, versions, bytes of images and of labels
- ``preview.png``: a grid, one row per class
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset

from ddkit.artifacts import (
    FILES_SHA256,
    MANIFEST,
    DescribesDataset,
    artifact_folder,
    atomic_dir,
    atomic_torch_save,
    base_manifest,
    check_classes,
    check_normalisation,
    check_schema_version,
    check_sha256,
    file_kind,
    folder_kind,
    load_tensors,
    member,
    quiet_torch_load,
    read_json,
    read_manifest,
    recorded_path,
    save_tensors,
    tensor_bytes,
    write_json,
)
from ddkit.config import is_count, short_repr, summary_repr
from ddkit.data.base import DataBundle, ImageSet
from ddkit.determinism import cpu_default_device
from ddkit.errors import ConfigError, DDKitError, printable
from ddkit.evaluate.tables import ipc_text  # noqa: F401  (defined here before)
from ddkit.training import check_teacher_bn

log = logging.getLogger(__name__)

KIND = "distilled-set"
IMAGES = "images.safetensors"
SOFT = "soft_labels.safetensors"
PREVIEW = "preview.png"


class DistilledSet(DescribesDataset, Dataset):
    """A distilled set as a torch ``Dataset`` of ``(image, label)``; images in pixel space [0, 1]
    (``normalize=True`` applies the dataset's mean/std)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        manifest: dict[str, Any],
        soft_labels: torch.Tensor | None = None,
        path: Path | None = None,
        normalize: bool = False,
    ) -> None:
        self.images = images
        self.labels = labels.long()
        self.soft_labels = soft_labels
        self.manifest = manifest
        self.path = path
        self.normalize = normalize

    # --- torch Dataset -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i]
        # a sample the caller owns: float32 images' row would be a view, and a caller's in-place transform
        # (x.clamp_(), x.mul_()) would rewrite the set (uint8 ones are converted into a new tensor already)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32, copy=True)
        if self.normalize:
            m = torch.tensor(self.mean, device=x.device).view(-1, 1, 1)  # the caller's default device aside
            s = torch.tensor(self.std, device=x.device).view(-1, 1, 1)
            x = (x - m) / s
        return x, int(self.labels[i])

    # --- description ---------------------------------------------------------------------------
    def __repr__(self) -> str:
        return summary_repr(self, method=(self.manifest.get("method") or {}).get("name"), **self.dataset_facts(),
                            ipc=self.ipc, images=self.images, soft_labels=self.soft_labels,
                            bytes=self.image_bytes + self.label_bytes, normalize=self.normalize or None,
                            path=recorded_path(self.path))

    @property
    def ipc(self) -> int | None:
        return self.manifest.get("ipc")

    @property
    def method(self) -> str:
        return self.manifest["method"]["name"]

    @property
    def image_bytes(self) -> int:
        return tensor_bytes(self.images)

    @property
    def label_bytes(self) -> int:
        return tensor_bytes(self.labels, self.soft_labels)

    def as_imageset(self) -> ImageSet:
        return ImageSet(self.images, self.labels)

    # --- building, saving, loading -------------------------------------------------------------
    @classmethod
    def build(
        cls,
        synthetic,
        data: DataBundle,
        *,
        method: str,
        method_config: dict,
        ipc: int | None,
        seed: int,
        config: dict,
        dataset_config: dict,
        teacher: dict | None = None,
        options_key: str = "distill.options",
        quantised: dict | None = None,
        method_source: dict | None = None,
    ) -> DistilledSet:
        """The artifact of a method's output (``options_key``: the config key of the method's options,
        which an error names; ``quantised``: the record :func:`store_images` returned, when it rounded the
        images to uint8; ``method_source``: where the method's code is, recorded beside its name)."""
        images, labels, soft = synthetic.images, synthetic.labels, synthetic.soft_labels
        held = check_pixels(images, data, method, method_config, options_key)
        if labels.dim() != 1 or len(labels) != len(images) or labels.is_floating_point():
            raise DDKitError(f"method {method!r} produced labels of shape {tuple(labels.shape)} ({labels.dtype}) for "
                             f"{len(images)} images, expected [N] class indices in "
                             f"0..{data.num_classes - 1}; this is a bug in the method")
        bad = ((labels < 0) | (labels >= data.num_classes)).nonzero().flatten()
        if len(bad):
            raise DDKitError(f"method {method!r} produced {len(bad)} label(s) outside the class indices "
                             f"0..{data.num_classes - 1}, the first {int(labels[bad[0]])} (image {int(bad[0])}); this "
                             "is a bug in the method")
        _check_meta(synthetic.meta, method)
        if soft is not None:
            by_teacher = bool((config.get("distill") or {}).get("soft_labels"))  # the pipeline's teacher labelled them
            whose = (f"the teacher's soft labels of the {method!r} set" if by_teacher
                     else f"the soft labels method {method!r} made")
            want = [len(labels), data.num_classes]
            if list(soft.shape) != want:  # every loader would refuse the set
                raise DDKitError(f"{whose} have shape {list(soft.shape)}, expected {want} (one row of logits per "
                                 f"image, one column per class of {data.num_classes}); this is a bug in the "
                                 f"{'teacher' if by_teacher else 'method'}")
            if soft.dtype != torch.float32:  # as the teacher's logits are, and counted at 4 bytes each
                raise DDKitError(f"{whose} are {str(soft.dtype).removeprefix('torch.')}, expected float32 logits; "
                                 "convert them with .float() in the method")
            check_soft_labels(soft, whose,
                              "the teacher's logits overflow on these images; check the teacher (diverged training? "
                              "huge weights?) and the images (diverged?)" if by_teacher
                              else "its labels diverged, or its teacher's logits overflow on its images; check the "
                              f"teacher and lower the learning rates in {options_key}")
        counts = torch.bincount(labels, minlength=data.num_classes).tolist()
        if ipc is not None and set(counts) != {ipc}:
            raise DDKitError(f"method {method!r} produced {counts} images per class for ipc {ipc}; this is a bug in "
                             "the method")
        manifest = base_manifest(KIND, config, seed)
        manifest.update(
            {
                "dataset": data.describe(),
                "dataset_config": dataset_config,
                "ipc": ipc,
                "num_images": len(labels),
                "class_counts": counts,
                "method": {"name": method, "config": method_config, **(method_source or {})},
                "teacher": teacher,
                "images": {"dtype": str(images.dtype).removeprefix("torch."), "pixel_range": held,
                           **({"quantised": quantised} if quantised is not None else {})},
                # the labels as the set holds (and saves) them: int64, whatever integer type the method gave
                "bytes": {"images": tensor_bytes(images), "labels": tensor_bytes(labels.long(), soft)},
                "files": {"images": IMAGES, "soft_labels": SOFT if soft is not None else None, "preview": PREVIEW},
                "meta": {k: v for k, v in synthetic.meta.items() if k != "source_index"},
            }
        )
        if "source_index" in synthetic.meta:
            manifest["source_index"] = synthetic.meta["source_index"]
        return cls(images, labels, manifest, soft)

    def check(self) -> None:
        """Refuse, in one line, tensors that :meth:`load` would refuse or that disagree with the manifest this set
        holds (its ``num_images``, ``class_counts``, ``ipc``, ``images.dtype``, ``images.pixel_range``, ``bytes``):
        the manifest records how the set was made (``config``, ``config_hash``), so an edited set is another set,
        which :meth:`save` does not write under the record of the first."""
        dataset = self.manifest.get("dataset") if isinstance(self.manifest.get("dataset"), dict) else {}
        fix = ("the manifest records the set its config made: save the set unedited, or make the manifest say what "
               "the tensors hold; nothing was saved")
        classes = dataset.get("classes")
        num_classes = len(classes) if isinstance(classes, list) else None
        check_set_tensors(self.images, self.labels, self.soft_labels, num_classes,
                          images_at="the set", fix=fix, soft_at="the set's soft labels",
                          image_shape=dataset.get("image_shape"))
        check_manifest_tensors(self.manifest, self.images, self.labels, self.soft_labels, images_at="the set",
                               manifest_at="the set's manifest", fix=fix, exact_range=not self._older_record)

    @property
    def _older_record(self) -> bool:
        """Whether the manifest is one a ddkit before 2026-12-07 saved (loaded, no ``files_sha256``), whose float
        ``images.pixel_range`` may be a nominal [0, 1] (before 2026-12-06) rather than the pixels' range."""
        return self.path is not None and FILES_SHA256 not in self.manifest

    @cpu_default_device()
    def save(self, out: str | Path) -> Path:
        """Write the set to the folder ``out`` (atomically): its tensors, preview and manifest; a set whose tensors
        disagree with its manifest is refused first (:meth:`check`)."""
        out = Path(out)
        if self.soft_labels is not None:  # every loader would refuse the set: write none
            check_soft_labels(self.soft_labels, "the set's soft labels", "check the teacher or method that made them")
        self.check()
        manifest = self.manifest
        if self._older_record and isinstance(manifest.get("images"), dict) and "pixel_range" in manifest["images"]:
            # saved with files_sha256, its range is compared on load: the pixels', not an older nominal [0, 1]
            manifest = {**manifest, "images": {**manifest["images"], "pixel_range": pixel_range(self.images)}}
        with atomic_dir(out, kind=KIND) as tmp:
            sums = {IMAGES: save_tensors(tmp / IMAGES, {"images": self.images, "labels": self.labels})}
            if self.soft_labels is not None:
                sums[SOFT] = save_tensors(tmp / SOFT, {"logits": self.soft_labels})
            save_grid(self.images, self.labels, self.classes, tmp / PREVIEW)
            self.manifest = {**manifest, FILES_SHA256: sums}
            write_json(tmp / "manifest.json", self.manifest)
        self.path = out.absolute()  # records name it from any working folder (not resolved: links stay)
        return out

    @classmethod
    @cpu_default_device()
    def load(cls, path: str | Path, normalize: bool = False) -> DistilledSet:
        if not isinstance(normalize, bool):
            raise DDKitError(f"normalize must be True or False, got {normalize!r}")
        path = artifact_folder(path, KIND)  # the manifest's path names its folder, as read_manifest takes it
        _refuse_export(path)
        manifest = read_manifest(path, KIND, require={
            "files.images": str, "num_images": int, "dataset": dict, "dataset_config": dict, "dataset.classes": list,
            "dataset.mean": list, "dataset.std": list, "method.name": str, "ipc": (int, type(None))})
        damaged = f"re-create the {KIND} artifact"
        recreate = "re-create the distilled set"
        tensors = load_tensors(member(path, manifest["files"]["images"], path / MANIFEST, "files.images", damaged),
                               what="distilled images")
        if "images" not in tensors or "labels" not in tensors:
            raise DDKitError(f"{path / IMAGES} lacks 'images' or 'labels'; {recreate}")
        images, labels = tensors["images"], tensors["labels"]
        num_classes = len(manifest["dataset"].get("classes") or []) or None
        soft, soft_at, redo = None, "the soft labels", recreate
        if manifest["files"].get("soft_labels"):
            stored = load_tensors(member(path, manifest["files"]["soft_labels"], path / MANIFEST, "files.soft_labels",
                                         damaged), what="soft labels")
            soft = stored.get("logits")
            # the pipeline's teacher made them (distill --soft-labels), or the method did
            by_teacher = ((manifest.get("config") or {}).get("distill") or {}).get("soft_labels") is True
            redo = ("re-run distill --soft-labels" if by_teacher else
                    f"re-create the distilled set (method {manifest['method']['name']!r} made them)")
            soft_at = f"soft labels {manifest['files']['soft_labels']!r} in {path}"
            if soft is None:
                raise DDKitError(f"{soft_at} hold no 'logits' tensor but the set has {len(labels)} images of "
                                 f"{num_classes} classes; {redo}")
        check_set_tensors(images, labels, soft, num_classes, images_at=str(path / IMAGES), fix=recreate,
                          soft_at=soft_at, soft_fix=redo, image_shape=manifest["dataset"].get("image_shape"))
        check_normalisation(manifest, images.shape[1], path, KIND)
        check_classes(manifest["dataset"]["classes"], path, KIND)
        check_label_records(manifest, path)
        check_dataset_config(manifest["dataset_config"], path / MANIFEST)
        # sets made before files_sha256 was recorded (2026-12-07) may record the nominal [0, 1] of a float set
        check_manifest_tensors(manifest, images, labels, soft, images_at=str(path / IMAGES),
                               manifest_at=repr(str(path / MANIFEST)), fix=recreate,
                               damaged=f"the manifest is damaged: {recreate}", exact_range=FILES_SHA256 in manifest)
        # last, so that a damaged file is refused for what is wrong with it; a whole file swapped for another here
        for what, name in (("distilled images", manifest["files"]["images"]),
                           ("soft labels", manifest["files"].get("soft_labels"))):
            if name:
                check_sha256(manifest, path, name, KIND, what, "re-create the distilled set")
        return cls(images, labels, manifest, soft, path.absolute(), normalize)

    @cpu_default_device()
    def save_grid(self, path: str | Path, per_class: int = 10) -> Path:
        """Write a PNG of the set to ``path`` (atomically): one row per class, named on the left, up to
        ``per_class`` images each (the set's ``preview.png`` shows 10); drawn as :func:`save_grid` says."""
        from ddkit.artifacts import _atomic_file

        path = Path(path)
        with _atomic_file(path) as tmp:
            save_grid(self.images, self.labels, self.classes, tmp, per_class=per_class)
        return path

    def export_record(self, kind: str) -> dict:
        """What an export of this set records beside its files: schema version, kind, the set's seed,
        ddkit/torch versions, the classes and which set it came from."""
        record = base_manifest(kind, {"source": recorded_path(self.path)}, self.manifest.get("seed"))
        record.update({"classes": self.classes, "ipc": self.ipc,
                       "source_config_hash": self.manifest.get("config_hash")})
        return record

    @cpu_default_device()
    def export(self, out: str | Path, fmt: str) -> Path:
        """Write as ``imagefolder`` (PNG per image, class folders in label order), ``ddranking``
        (:func:`ddkit.bench.export_for_ddranking`) or ``pt`` (tensors: float
        images, 0..1 the data's range, exactly as the set holds them; labels, the set's soft labels where it
        has them, mean/std, class-major). PNG holds 8-bit pixels: float pixels outside [0, 1] are clipped,
        which is logged and recorded (``clipped_pixels``, the fraction, in ``classes.json``); a set of other than
        1 or 3 channels is refused (PNG would store a 2nd or 4th one as transparency); a class without images (a set
        without an ipc) gets an empty folder, so folder order stays label order (torchvision's ``ImageFolder`` reads
        it with ``allow_empty=True``). An ``out`` holding an export of a newer ddkit (``schema_version``) is
        refused."""
        out = Path(out)
        if fmt == "pt":
            if out.is_dir():
                raise DDKitError(f"output {str(out)!r} is a folder; --format pt writes one file, give a file path")
            earlier = out.exists()
            if earlier and (record := _pt_export_record(out)) is None:
                raise DDKitError(f"output {str(out)!r} exists and is not a readable ddkit pt export; choose "
                                 "another --out or remove it")
            if earlier:  # one a newer ddkit wrote is refused, as its readers refuse it
                check_schema_version(record, out, "it is damaged: remove it or choose another --out", required=False)
            order = torch.argsort(self.labels, stable=True)  # class-major
            x = self.images[order]
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            soft = {"soft_labels": self.soft_labels[order]} if self.soft_labels is not None else {}
            atomic_torch_save({**self.export_record("pt-export"), "images": x, "labels": self.labels[order], **soft,
                               "mean": list(self.mean), "std": list(self.std), "pixel_range": pixel_range(x)}, out)
            if earlier:  # as a folder export does: a rerun with other settings must not replace it unannounced
                log.warning("replaced the earlier pt-export %s", out)
            return out
        if fmt == "imagefolder":
            from PIL import Image

            if self.images.shape[1] not in (1, 3):  # PNG would take a 2nd or 4th channel as alpha, drop a 5th
                raise DDKitError(f"the set's images have {self.images.shape[1]} channels and --format imagefolder "
                                 "writes PNG files of 1 (grey) or 3 (RGB); use --format pt, which keeps every channel")
            _refuse_newer_export(out, "imagefolder-export")
            # a refused --out first, then the warning
            with atomic_dir(out, kind="imagefolder-export", accept=older_imagefolder_export) as tmp:
                clipped = clipped_fraction(self.images)
                if clipped:
                    log.warning("%.2f%% of the set's pixels lie outside [0, 1] and are clipped in the PNG "
                                "files; export --format pt keeps them exactly", 100 * clipped)
                names = class_folder_names(self.classes)
                counters = [0] * len(names)
                for name in names:  # a class without images too (a set without an ipc): classes.json lists it
                    (tmp / name).mkdir()
                for img, y in zip(self.images, self.labels.tolist()):
                    folder = tmp / names[y]
                    arr = to_uint8(img).permute(1, 2, 0).numpy()  # one image at a time: no 8-bit copy of the set
                    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(folder / f"{counters[y]:05d}.png")
                    counters[y] += 1
                write_json(tmp / "classes.json", {**self.export_record("imagefolder-export"), "folders": names,
                                                  "source_dtype": str(self.images.dtype).removeprefix("torch."),
                                                  "pixel_range": pixel_range(self.images), "clipped_pixels": clipped})
            return out
        if fmt == "ddranking":
            from ddkit.bench import export_for_ddranking

            _refuse_newer_export(out, "ddranking-export")
            return export_for_ddranking(self, out)
        raise DDKitError(f"unknown export format {fmt!r}; use imagefolder, pt or ddranking")


def check_set_tensors(images: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor | None, num_classes: int | None,
                      *, images_at: str, fix: str, labels_at: str | None = None, soft_at: str = "the soft labels",
                      soft_fix: str | None = None, image_shape: list | None = None) -> None:
    """What every reader of a set's tensors checks, alike for a set's files (:meth:`DistilledSet.load`), a set about
    to be saved (:meth:`DistilledSet.save`) and an export's tensors (``ddkit show`` of a pt or DD-Ranking export):
    one integer label per image, in 0..``num_classes`` - 1 (None: not known, only >= 0); uint8 or floating-point
    images [N, C, H, W] (C, H, W: ``image_shape`` where given) with finite pixels; soft labels (where not None)
    finite floating-point logits [N, ``num_classes``]. One-line errors name where the tensors were read
    (``images_at``, ``labels_at`` (default ``images_at``), ``soft_at``) and end in ``fix`` (``soft_fix`` for the
    soft labels, default ``fix``)."""
    labels_at, soft_fix = labels_at or images_at, soft_fix or fix
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DDKitError(f"{labels_at} holds {str(labels.dtype).removeprefix('torch.')} labels of shape "
                         f"{list(labels.shape)}, not one class index (an integer) per image; {fix}")
    if not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise DDKitError(f"{images_at} holds {str(images.dtype).removeprefix('torch.')} images, not uint8 or "
                         f"floating-point pixels; {fix}")
    if images.dim() != 4 or (image_shape and list(images.shape[1:]) != list(image_shape)):
        raise DDKitError(f"{images_at} holds images of shape {list(images.shape)}, expected [N, "
                         f"{', '.join(map(str, image_shape or ['C', 'H', 'W']))}]; {fix}")
    if not all_finite(images, as_float32=False):
        raise DDKitError(f"{images_at} holds NaN or infinite pixels; {fix}")
    if len(images) != len(labels):
        held = f"{len(labels)} labels" if labels_at == images_at else f"{labels_at} {len(labels)} labels"
        raise DDKitError(f"{images_at} holds {len(images)} images but {held}; {fix}")
    if len(labels) and (int(labels.min()) < 0 or (num_classes and int(labels.max()) >= num_classes)):
        raise DDKitError(f"{labels_at} has labels outside 0..{(num_classes or 0) - 1} (found "
                         f"{int(labels.min())}..{int(labels.max())}); {fix}")
    if soft is None:
        return
    if soft.dim() != 2 or soft.shape[0] != len(labels) or (num_classes and soft.shape[1] != num_classes):
        raise DDKitError(f"{soft_at} have shape {list(soft.shape)} but the set has {len(labels)} images of "
                         f"{num_classes} classes; {soft_fix}")
    if not soft.is_floating_point():
        raise DDKitError(f"{soft_at} hold {str(soft.dtype).removeprefix('torch.')} values, not floating-point "
                         f"logits; {soft_fix}")
    if not torch.isfinite(soft).all():
        raise DDKitError(f"{soft_at} hold NaN or infinite logits; {soft_fix}")


def check_manifest_tensors(manifest: dict[str, Any], images: torch.Tensor, labels: torch.Tensor,
                           soft: torch.Tensor | None, *, images_at: str, manifest_at: str, fix: str,
                           exact_range: bool, damaged: str | None = None) -> None:
    """Refuse a set's manifest whose records of its tensors disagree with them (tensors checked by
    :func:`check_set_tensors`): ``images.dtype``, ``num_images``, ``class_counts``, ``ipc``, ``bytes`` (of the images;
    of the labels, as int64 or the narrower integer an older build counted, and soft labels) and
    ``images.pixel_range`` ([0, 255] for uint8; the min and max of float pixels where ``exact_range``: sets made
    before 2026-12-06 recorded a nominal [0.0, 1.0], and load compares only sets that record ``files_sha256``). A
    field the manifest lacks is not compared. ``damaged``: the fix where the manifest's own record is wrong (default
    ``fix``)."""
    damaged = damaged or fix
    described = manifest.get("images", {})
    if not isinstance(described, dict):
        raise DDKitError(f"{manifest_at} holds images {short_repr(described)}, not a mapping of their dtype and "
                         f"shape; {damaged}")
    dtype = described.get("dtype")
    if dtype and str(images.dtype).removeprefix("torch.") != dtype:
        raise DDKitError(f"{images_at} holds {str(images.dtype).removeprefix('torch.')} images "
                         f"but the manifest says {dtype}; {fix}")
    if manifest.get("num_images", len(labels)) != len(labels):
        raise DDKitError(f"{images_at} holds {len(labels)} images but the manifest says num_images "
                         f"{manifest['num_images']}; {fix}")
    classes = (manifest.get("dataset") or {}).get("classes")
    held = torch.bincount(labels, minlength=len(classes) if isinstance(classes, list) else 0).tolist()
    counts = manifest.get("class_counts")
    if counts is not None and counts != held:
        raise DDKitError(f"{images_at} holds {held} images per class but the manifest says {counts}; {fix}")
    ipc = manifest.get("ipc")  # the random baseline of an evaluation draws this many real images per class
    if ipc is not None and held and set(held) != {ipc}:
        raise DDKitError(f"{manifest_at} says ipc {ipc} but the set holds {held} images per class; {damaged}")
    recorded = manifest.get("bytes")
    if recorded is not None:
        holds = {"images": tensor_bytes(images), "labels": tensor_bytes(labels.long(), soft)}
        # sets built before 2026-12-08 counted the labels at the integer width their method gave (a plugin's int32),
        # though the set holds and saves them as int64
        narrower = [tensor_bytes(soft) + len(labels) * width for width in (1, 2, 4)]
        if not isinstance(recorded, dict) or recorded.get("images") != holds["images"] or (
                recorded.get("labels") != holds["labels"] and recorded.get("labels") not in narrower):
            raise DDKitError(f"{manifest_at} records bytes {short_repr(recorded)} but the set holds "
                             f"{holds['images']} image bytes and {holds['labels']} label bytes; {damaged}")
    span = described.get("pixel_range")
    if span is not None and (exact_range or images.dtype == torch.uint8) and span != (lies := pixel_range(images)):
        raise DDKitError(f"{manifest_at} records pixel_range {short_repr(span)} but the set's pixels lie in "
                         f"{lies}; {damaged}")


def check_dataset_config(recorded: Any, manifest: Path) -> None:
    """Refuse a set's ``dataset_config`` that does not read as a :class:`~ddkit.data.base.DatasetConfig` (an unknown
    key, a value of the wrong type): an evaluation loads the set's data with it."""
    from ddkit.config import from_dict
    from ddkit.data.base import DatasetConfig

    try:
        from_dict(DatasetConfig, recorded, "dataset_config")
    except ConfigError as exc:
        raise DDKitError(f"{str(manifest)!r} holds a dataset_config this ddkit does not read ({exc}); the manifest is "
                         "damaged: re-create the distilled set") from None


_MISSING = object()


def check_label_records(manifest: dict[str, Any], path: Path) -> None:
    """Refuse a set's manifest whose records of how its stored soft labels were made, which an evaluation reads
    to label the random subset beside the set alike, are damaged: ``meta`` (a mapping), a committee's
    ``meta.soft_labels`` (CV-DD: ``weights``, one per teacher in ``teachers``: ``path``, ``weights_sha``;
    ``teacher_bn``, ``teacher_bn_batch``) and ``config.distill.soft_labels_bn`` / ``soft_labels_bn_batch``.
    Other ``meta.soft_labels`` (RDED's description, a str) describe and are not read."""
    where = repr(str(path / "manifest.json"))

    def damaged(key: str, value: Any, want: str) -> DDKitError:
        held = f"lacks {key}, {want}" if value is _MISSING else f"holds {key} {short_repr(value)}, not {want}"
        return DDKitError(f"{where} {held}; the manifest is damaged: re-create the distilled set")

    def check_bn(record: dict, name: str) -> None:
        try:
            check_teacher_bn(record.get(name, "running"), record.get(f"{name}_batch"), name)
        except ConfigError as exc:
            raise DDKitError(f"{where}: {str(exc).split('; set ')[0]}; the manifest is damaged: re-create the "
                             "distilled set") from None

    meta = manifest.get("meta", {})
    if not isinstance(meta, dict):
        raise damaged("meta", meta, "a mapping of the method's records")
    committee = meta.get("soft_labels")
    if isinstance(committee, dict) and committee.get("kind") == "committee":
        weights = committee.get("weights", _MISSING)
        if not (isinstance(weights, list) and weights and all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights)):
            raise damaged("meta.soft_labels.weights", weights, "a list of the committee's votes (finite numbers)")
        if "teachers" in committee:  # sets made before the members were recorded name them in extra_teachers
            teachers = committee["teachers"]
            if not (isinstance(teachers, list) and len(teachers) == len(weights) and all(
                    isinstance(t, dict) and isinstance(t.get("path"), (str, type(None)))
                    and isinstance(t.get("weights_sha"), str) for t in teachers)):
                raise damaged("meta.soft_labels.teachers", teachers,
                              f"{len(weights)} records of a teacher's path and weights_sha, one per vote")
        else:
            options = manifest["method"].get("config")
            extra = options.get("extra_teachers") if isinstance(options, dict) else options
            if not (extra is None or (isinstance(extra, list) and all(isinstance(t, str) for t in extra))):
                raise damaged("method.config.extra_teachers", extra, "a list of teacher folders")
        check_bn({"meta.soft_labels.teacher_bn": committee.get("teacher_bn", "running"),
                  "meta.soft_labels.teacher_bn_batch": committee.get("teacher_bn_batch")},
                 "meta.soft_labels.teacher_bn")
    config = manifest.get("config", {})
    distill = config.get("distill") if isinstance(config, dict) else None
    if not isinstance(config, dict) or not isinstance(distill, (dict, type(None))):
        raise damaged("config" if not isinstance(config, dict) else "config.distill",
                      config if not isinstance(config, dict) else distill, "a mapping of settings")
    check_bn({f"config.distill.{k}": v for k, v in (distill or {}).items()}, "config.distill.soft_labels_bn")


def set_folder(path: str | Path, load_stage: str = "pass its stage folder {!r}") -> Path:
    """The folder of the distilled set that ``path`` names, as ``ddkit.load`` and the commands that read a set
    (``evaluate``, ``relabel``, ``export``) resolve it: a ``ddkit run`` folder's distilled stage
    (:func:`ddkit.describe.run_stage`, as ``ddkit show`` reads it), anything else ``path`` itself
    (:meth:`DistilledSet.load` checks it). A run folder without its manifest (killed before its last stage) is
    refused (:func:`ddkit.describe.check_run_finished`), naming its stage folder as ``load_stage`` says."""
    from ddkit.describe import check_run_finished, run_stage

    where = Path(path)
    if not where.is_dir():
        return where
    kind = folder_kind(where)
    if kind is None:
        check_run_finished(where, load_stage)
    if kind != "pipeline-run":
        return where
    return run_stage(where, read_manifest(where, kind), "distilled")


def _refuse_export(path: Path) -> None:
    """An export of a set given where the set is meant: say what it is and what to pass instead."""
    if path.is_file() and path.stat().st_size and (record := _pt_export_record(path)) is not None:
        what, use = "a pt export", f"torch.load({str(path)!r}, weights_only=True) reads it"
    elif path.is_dir() and folder_kind(path) == "imagefolder-export":
        record = read_json(path / "classes.json")
        what, use = "an imagefolder export", "PNG class folders for other tools"
    else:
        return
    source = (record.get("config") or {}).get("source")
    raise DDKitError(f"{str(path)!r} is {what} of a distilled set, not the set ({use}); pass the set's folder"
                     + (f" ({source})" if source else ""))


def _refuse_newer_export(out: Path, kind: str) -> None:
    """Refuse to replace a folder export of ``kind`` that a newer ddkit wrote (its ``schema_version``), as every
    reader refuses it."""
    where = out / ("classes.json" if kind == "imagefolder-export" else "meta.json")
    if file_kind(where) == kind:
        check_schema_version(read_json(where), where, "it is damaged: remove it or choose another --out",
                             required=False)

def _pt_export_record(path: Path) -> dict | None:
    """The record of a file an earlier ``export --format pt`` wrote, or None for any other file."""
    try:
        record = quiet_torch_load(path)
    except Exception:
        return None
    if isinstance(record, dict) and (record.get("kind") == "pt-export" or older_pt_export(record)):
        return record
    return None


def older_pt_export(record: Any) -> bool:
    """Whether ``record`` (a loaded ``.pt`` file) is an ``export --format pt`` of an older ddkit: the set's
    fields, no kind."""
    return isinstance(record, dict) and "kind" not in record and {"images", "labels", "classes", "mean",
                                                                   "std"} <= record.keys()


def older_imagefolder_export(folder: Path) -> bool:
    """Whether ``folder`` is an ``export --format imagefolder`` of an older ddkit: a classes.json of classes and
    folders, no kind, and nothing else but those class folders (one per class with images), each holding only
    image files. A hand-made folder with such a classes.json and anything more is not one: an export would
    replace it, files and all."""
    from ddkit.data.sources import IMAGE_SUFFIXES

    try:
        record = read_json(folder / "classes.json")
    except DDKitError:
        return False
    folders = record.get("folders")
    if ("kind" in record or not isinstance(record.get("classes"), list) or not isinstance(folders, list)
            or not all(isinstance(f, str) for f in folders)):
        return False
    try:
        for entry in folder.iterdir():
            if entry.name == "classes.json":
                continue
            if entry.name not in folders or entry.is_symlink() or not entry.is_dir():
                return False
            if any(f.is_symlink() or not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES
                   for f in entry.iterdir()):
                return False
    except OSError:
        return False
    return True


def class_folder_names(classes: list[str]) -> list[str]:
    """Folder names that sort in label order: ``003_Dress``; unsafe characters become ``_``."""
    width = max(3, len(str(len(classes) - 1)))
    return [f"{i:0{width}d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', c)}" for i, c in enumerate(classes)]


def pixel_range(images: torch.Tensor) -> list:
    """[0, 255] for uint8 pixels; the smallest and largest value for float ones (an empty set: [0.0, 1.0])."""
    if images.dtype == torch.uint8:
        return [0, 255]
    if images.numel() == 0:
        return [0.0, 1.0]
    return [float(images.min()), float(images.max())]


#: whole-set checks of pixels (finite, inside 0..1) read this many bytes of images at a time: one over the
#: whole tensor made temporaries of several times its size (a float32 copy of a uint8 set, 11x)
CHECK_BYTES = 64 * 2**20


def pixel_chunks(images: torch.Tensor) -> Iterator[torch.Tensor]:
    """``images`` as views of consecutive images, about :data:`CHECK_BYTES` each (at least one image)."""
    per_image = max(1, images[0].numel() * images.element_size()) if len(images) else 1
    rows = max(1, CHECK_BYTES // per_image)
    for start in range(0, len(images), rows):
        yield images[start : start + rows]


def all_finite(images: torch.Tensor, as_float32: bool = True) -> bool:
    """Whether every pixel is finite (``as_float32``: once converted to float32, as training reads it):
    always for integer pixels, checked a chunk at a time for float ones."""
    if not (images.is_floating_point() or images.is_complex()):
        return True  # an integer is finite, in float32 too
    return all(bool(torch.isfinite(chunk.float() if as_float32 else chunk).all()) for chunk in pixel_chunks(images))


def clipped_fraction(images: torch.Tensor) -> float:
    """The fraction of float pixels outside [0, 1], which 8-bit files (PNG) cannot hold: they are clipped."""
    if images.dtype == torch.uint8 or images.numel() == 0:
        return 0.0
    count = sum(int(torch.count_nonzero((chunk < 0) | (chunk > 1))) for chunk in pixel_chunks(images))
    # as the float32 mean of a 0/1 mask gives it (the number written before), without the 4-byte mask
    return float(torch.tensor(float(count)) / images.numel())


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def quantise(images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``images`` as 8-bit pixels, equal to :func:`to_uint8` (each pixel rounded to the nearest of 256 levels
    of 0..1), written a chunk at a time into one uint8 tensor (no float temporary of the set's size), and the
    number of pixels whose nearest level lies outside 0..255 and is clipped to 0 or 255 (a pixel that float
    rounding put a hair outside 0..1 is not one). uint8 images are returned as they are."""
    if images.dtype == torch.uint8:
        return images, 0
    out = torch.empty(images.shape, dtype=torch.uint8, device=images.device)
    clipped, start = 0, 0
    for chunk in pixel_chunks(images):
        levels = (chunk.float() * 255).round()
        clipped += int(torch.count_nonzero((levels < 0) | (levels > 255)))
        out[start : start + len(chunk)] = levels.clamp_(0, 255).to(torch.uint8)
        start += len(chunk)
    return out, clipped


def stored_pixels(images: torch.Tensor, image_dtype: str) -> torch.Tensor:
    """``images`` as a set with ``image_dtype`` stores them: unchanged for float32, :func:`quantise`-d for uint8."""
    return quantise(images)[0] if image_dtype == "uint8" else images


def check_pixels(images: torch.Tensor, data: DataBundle, method: str, method_config: dict,
                 options_key: str = "distill.options") -> list:
    """Refuse a method's images of the wrong shape or dtype (a set holds uint8 or float32 pixels, as every
    built-in method makes them and byte counts compare them) or with non-finite pixels, warn of pixels far
    outside 0..1 (diverged images); return their :func:`pixel_range`."""
    if images.dim() != 4 or tuple(images.shape[1:]) != tuple(data.image_shape):
        raise DDKitError(
            f"method {method!r} produced images of shape {tuple(images.shape)}, expected [N, "
            f"{', '.join(map(str, data.image_shape))}]; this is a bug in the method"
        )
    if images.dtype not in (torch.uint8, torch.float32):
        raise DDKitError(f"method {method!r} produced {str(images.dtype).removeprefix('torch.')} images; a set holds "
                         "uint8 0..255 or float32 0..1 pixels: convert them with .float() in the method")
    if not all_finite(images):
        raise DDKitError(f"method {method!r} produced non-finite pixels"
                         f"{' (its images diverged)' if _image_lr(method_config) else ''}; "
                         f"{_lower_lr(method_config, options_key)}")
    low, high = held = pixel_range(images)
    if max(-low, high - 1.0) > FAR_OUT:  # finite, but no image of the data looks like this
        log.warning("method %r produced pixels from %.3g to %.3g, far outside the data's 0..1 (its images likely "
                    "diverged); %s", method, low, high, _lower_lr(method_config, options_key))
    return held


def check_soft_labels(soft: torch.Tensor, what: str, fix: str) -> None:
    """Refuse soft labels (logits) with NaN or infinite values before a set is written: every loader would
    refuse it (``what``: whose labels they are; ``fix``: the cause to check)."""
    finite = torch.isfinite(soft)
    bad = ~(finite.flatten(1).all(dim=1) if soft.dim() > 1 else finite)  # per image
    if bad.any():
        raise DDKitError(f"{what} hold NaN or infinite logits for {int(bad.sum())} of {len(bad)} images (image "
                         f"{int(bad.nonzero()[0])} first): {fix}; nothing was saved")


def store_images(synthetic, image_dtype: str, data: DataBundle, method: str, method_config: dict,
                 options_key: str = "distill.options") -> dict | None:
    """Set ``synthetic.images`` to the pixels a set with ``image_dtype`` stores, before anything labels them
    (the labels must describe the stored images). uint8 rounds float pixels to 8 bits; pixels outside 0..1
    (methods that do not clamp: DC, DM, MTT, ...) are clipped, as 8-bit PNG files of the set would clip them,
    with a warning and their count in the returned record (the manifest's ``images.quantised``), rather than
    refused: the check can only run once the synthesis is done. None: nothing was converted."""
    images = synthetic.images
    if image_dtype == "float32" or images.dtype == torch.uint8:  # real pixels are kept as the data holds them
        return None
    held = check_pixels(images, data, method, method_config, options_key)  # a diverged set is refused, not rounded
    synthetic.images, clipped = quantise(images)
    if clipped:
        log.warning("%d of %d pixels (%.2f%%) of the %s set lie outside 0..1 and are clipped to 8 bits "
                    "(distill.image_dtype uint8; recorded as images.quantised.clipped_pixels in its manifest); "
                    "keep distill.image_dtype: float32 to store them exactly", clipped, images.numel(),
                    100 * clipped / images.numel(), method)
    return {"from": str(images.dtype).removeprefix("torch."), "pixel_range": held, "clipped_pixels": clipped}


#: the options that set the learning rate of a method's images, by the name its Config gives them
#: (``lr_img``: DC, DSA, DM, DataDAM and the trajectory-matching methods; ``lr``: the recovery methods)
IMAGE_LR_OPTIONS = ("lr_img", "lr")
# how far outside 0..1 a pixel may lie before a set is taken to have diverged: pixel-optimising methods
# leave 0..1 by a few units (ZCA-whitened sets by tens), a diverged one by orders of magnitude
FAR_OUT = 1000.0


def _image_lr(method_config: dict) -> tuple[str, float] | None:
    """The option of a method's image learning rate and its value, or None (a method that optimises none)."""
    for key in IMAGE_LR_OPTIONS:
        value = method_config.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return key, value
    return None


def _lower_lr(method_config: dict, options_key: str = "distill.options") -> str:
    """How to stop a method's images from diverging: lower the option of their learning rate."""
    if found := _image_lr(method_config):
        return (f"lower {options_key}.{found[0]} (now {found[1]:g}), or undo another option that makes the updates "
                "larger (a network's lr, a loss weight)")
    return (f"check the method (for optimising methods: lower the learning rate of its images in {options_key}, or "
            "undo another option that makes the updates larger)")


class _NotJSON(Exception):
    pass


def _not_json(obj: Any) -> Any:
    raise _NotJSON(obj)


def _meta_problem(value: Any, where: str = "") -> str | None:
    """What in ``value`` (at ``synthetic_.meta{where}``) JSON would hold otherwise than given (a key that is no str
    becomes one) or readers refuse (NaN, infinity), or None."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return (f"the key {key!r} ({type(key).__name__}) in synthetic_.meta{where}; meta is saved as JSON, "
                        f"whose keys are str: use {str(key)!r}")
            if found := _meta_problem(item, f"{where}[{key!r}]"):
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if found := _meta_problem(item, f"{where}[{i}]"):
                return found
    elif isinstance(value, float) and not math.isfinite(value):
        return (f"{value} in synthetic_.meta{where}; meta is saved as JSON, which holds no NaN or infinity: record "
                "it as None or a str")
    return None


def _check_meta(meta: dict, method: str) -> None:
    """Refuse a ``synthetic_.meta`` the manifest (JSON) cannot hold as given now, not at the save after the fit."""
    if not isinstance(meta, dict):
        raise DDKitError(f"method {method!r} set synthetic_.meta to a {type(meta).__name__}; it must be a dict of "
                         "JSON values (numbers, str, lists, dicts)")
    if found := _meta_problem(meta):
        raise DDKitError(f"method {method!r} put {found}")
    for key, value in meta.items():
        try:
            json.dumps({key: value}, default=_not_json)
        except _NotJSON as e:
            held = e.args[0]
            fix = " (.tolist())" if isinstance(held, torch.Tensor) or hasattr(held, "tolist") else ""
            raise DDKitError(f"method {method!r} put a {type(held).__name__} in synthetic_.meta[{key!r}]; meta is "
                             f"saved as JSON: convert it to lists, numbers or str{fix}") from None
        except (TypeError, ValueError) as e:  # a key JSON cannot hold (a tuple), a circular reference
            raise DDKitError(f"method {method!r} put a value in synthetic_.meta[{key!r}] that JSON cannot hold ({e}); "
                             "meta is saved as JSON: use str keys and lists, numbers or str") from None


#: the most pixels a preview grid holds (about 2000 x 2000 px, a few MB of PNG): a set with more classes and
#: columns gets smaller cells (a 100-class 224 px set's grid was 17.7M px, 24 MB and 20 s to write)
GRID_MAX_PIXELS = 4_000_000
#: a preview stretches a float set's pixels for display when more than this fraction lie outside 0..1
#: (ZCA-whitened and other pixel-optimising sets, which clipped to 0..1 look binarised)
STRETCH_FRACTION = 0.01
#: the stretch: pixels clipped to the set's mean ± this many stds, that range drawn black..white (as MTT's code
#: shows its sets)
STRETCH_STDS = 2.5


def display_range(images: torch.Tensor) -> tuple[float, float] | None:
    """The pixel range a preview draws black..white: None (0..1, pixels outside it clipped) unless more than
    :data:`STRETCH_FRACTION` of a float set's pixels lie outside 0..1; then the set's mean ± :data:`STRETCH_STDS`
    stds, inside its min..max (mean and std over every pixel and channel, a chunk at a time)."""
    if clipped_fraction(images) <= STRETCH_FRACTION:
        return None
    total = squares = 0.0
    for chunk in pixel_chunks(images):
        chunk = chunk.double()
        total, squares = total + float(chunk.sum()), squares + float((chunk * chunk).sum())
    mean = total / images.numel()
    std = math.sqrt(max(squares / images.numel() - mean * mean, 0.0))
    low, high = pixel_range(images)
    low, high = max(low, mean - STRETCH_STDS * std), min(high, mean + STRETCH_STDS * std)
    return (low, high) if high > low else None


def display_channels(images: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """``images`` [N, C, H, W] as a preview draws them, grey (C = 1) or RGB (C = 3), and a note where that is not
    every channel as it is: 2 channels as red and green (blue 0), 4 or more the first 3 as RGB."""
    c = images.shape[1]
    if c in (1, 3):
        return images, None
    if c == 2:
        return torch.cat([images, images[:, :1].new_zeros(images[:, :1].shape)], dim=1), (
            "channels 0 and 1 of 2 drawn as red and green")
    return images[:, :3], f"channels 0-2 of {c} drawn as RGB"


#: the size (px) of a preview grid's text (class names, caption lines): about 6 px a character, as Pillow's default
GRID_FONT_SIZE = 10


class GridFont(NamedTuple):
    """:func:`grid_font`'s answer."""

    font: Any  # a Pillow font
    draws: Callable[[str], bool]  # whether ``font`` has a glyph for a character


@functools.cache
def grid_font() -> GridFont:
    """The font a preview grid writes its class names and caption in, and whether it draws a character: DejaVu Sans,
    which matplotlib (a dependency of ddkit) ships, with Latin (accents too), Greek and Cyrillic letters (Pillow's
    default font drew every non-ASCII character as a box); where that cannot be loaded, Pillow's default, for ASCII."""
    from PIL import ImageFont

    try:
        import matplotlib
        from matplotlib.ft2font import FT2Font

        path = str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")
        glyphs, font = FT2Font(path), ImageFont.truetype(path, GRID_FONT_SIZE)
    except (ImportError, OSError, RuntimeError) as err:
        log.warning("preview grids write their class names in Pillow's default font, other characters than ASCII as "
                    "escapes (\\u732b): matplotlib's DejaVu Sans could not be loaded (%s)", err)
        return GridFont(ImageFont.load_default(), str.isascii)  # its size is 10 px too
    return GridFont(font, lambda char: glyphs.get_char_index(ord(char)) != 0)


def grid_text(text: str) -> str:
    """``text`` as a preview grid writes it: control characters (:func:`printable`) and characters that
    :func:`grid_font` lacks as their escapes (``\\u732b``), not as boxes that hide which character it was."""
    draws = grid_font().draws
    return "".join(char if draws(char) else ascii(char)[1:-1] for char in printable(text))


def _text_width(text: str) -> int:
    """The px a grid's line of ``text`` takes from the left edge: 4 px before it, at least 2 after it, and at least
    8 + 6 px a character (the width every grid had before its text was measured)."""
    return max(8 + 6 * len(text), 6 + math.ceil(grid_font().font.getlength(text)))


def _filler(channels: int, size: tuple[int, int]) -> torch.Tensor:
    """A grid cell where a class has fewer images than the grid has columns: light grey hatching, which no
    image of a set looks like (a black or white cell would pass for a black or white image)."""
    i, j = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    hatch = torch.where((i + j) % 6 == 0, 0.6, 0.9)
    return hatch.expand(1, channels, *size)


def save_grid(
    images: torch.Tensor, labels: torch.Tensor, classes: list[str], path: Path, per_class: int = 10, cell: int = 56,
    max_classes: int = 100, max_side: int = 128, max_pixels: int = GRID_MAX_PIXELS,
) -> None:
    """A PNG grid: one row per class (named on the left, as :func:`grid_text` writes the name), up to ``per_class``
    images each (as many columns as the fullest shown class has images, up to ``per_class``; a class with fewer gets
    hatched grey cells); small images enlarged to about ``cell`` px. A preview, bounded whatever the set's size: the
    first ``max_classes`` classes (a 1000-class set's grid was 226k px tall and took GBs to make), images larger than
    ``max_side`` px shrunk to it (the longer side), cells smaller still where the grid would exceed ``max_pixels``.

    Drawn as: 1 channel grey, 3 RGB, 2 as red and green, 4 or more the first 3 as RGB; float pixels 0..1 black
    to white, clipped outside it, unless more than 1 % lie outside (:func:`display_range`): then the set's mean ± 2.5
    stds is stretched to black..white. What the grid leaves out or draws otherwise (classes, images per class,
    channels, the stretch) is written above it and logged."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    if not is_count(per_class):
        raise DDKitError(f"per_class must be an integer >= 1 (the images shown per class), got {per_class!r}")
    notes = []
    if len(classes) > max_classes:
        notes.append(f"first {max_classes} of {len(classes)} classes")
        classes = classes[:max_classes]
    counts = torch.bincount(labels, minlength=len(classes))[: len(classes)]
    most = int(counts.max()) if len(counts) else 0
    cols = max(1, min(per_class, most))
    if most > cols:
        notes.append(f"first {cols} of {most} images per class")
    stretch = display_range(images)
    if stretch is not None:
        notes.append(f"pixels from {stretch[0]:.3g} to {stretch[1]:.3g} drawn black to white "
                     f"({100 * clipped_fraction(images):.0f} % lie outside 0..1)")
    c_, h, w = images.shape[1:]
    side = max(h, w)
    fit = max(12, math.isqrt(max_pixels // (len(classes) * cols)) - 2)  # the most px per cell side within max_pixels
    limit = min(max_side, fit)
    size = (max(1, h * limit // side), max(1, w * limit // side)) if side > limit else (h, w)
    rows, channels = [], None
    for c in range(len(classes)):  # one row at a time, shrunk before the next: memory of one row at full size
        sel = images[labels == c][:cols]
        if stretch is not None:
            sel = (sel.float().clamp(*stretch) - stretch[0]) / (stretch[1] - stretch[0])
        sel, channels = display_channels(to_uint8(sel).float() / 255.0)
        if len(sel) and size != (h, w):
            sel = torch.nn.functional.interpolate(sel, size=size, mode="area")
        rows.append(torch.cat([sel, _filler(sel.shape[1], size).expand(cols - len(sel), -1, -1, -1)]))
    if channels:
        notes.append(channels)
    grid_in = torch.cat(rows)
    scale = max(1, min(-(-cell // max(size)), fit // max(size)))  # by the longer side: neither passes max_side
    if scale > 1:
        grid_in = torch.nn.functional.interpolate(grid_in, scale_factor=scale, mode="nearest")
    grid = make_grid(grid_in, nrow=cols, padding=2, pad_value=1.0)
    arr = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    body = Image.fromarray(arr).convert("RGB")
    names = [grid_text(c) for c in classes]
    margin = max(map(_text_width, names))
    caption = [grid_text(line) for line in textwrap.wrap("; ".join(notes), 100)]
    for note in notes:
        log.info("the preview grid shows %s", note)
    top = 12 * len(caption) + 4 if caption else 0
    canvas = Image.new("RGB", (max(body.width + margin, max(map(_text_width, caption), default=0)), body.height + top),
                       "white")
    canvas.paste(body, (margin, top))
    draw, font = ImageDraw.Draw(canvas), grid_font().font
    for i, line in enumerate(caption):
        draw.text((4, 2 + 12 * i), line, fill=(90, 90, 90), font=font)
    row_h = grid_in.shape[-2] + 2
    for c, name in enumerate(names):
        draw.text((4, top + 2 + c * row_h + row_h // 2 - 6), name, fill=(0, 0, 0), font=font)
    canvas.save(path, format="PNG")  # named by the format, not by the path's suffix (a temporary file's)
