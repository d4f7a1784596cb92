"""In-memory image datasets, their config, and the dataset registry.

Every dataset source returns a :class:`DataBundle`: train and test :class:`ImageSet` tensors in
pixel space (``uint8`` 0..255 or ``float32`` 0..1, shape ``[N, C, H, W]``), class names in label
order, and the normalisation that models expect. Normalisation is applied on the fly by training
code, so stored images always stay in pixel space.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import logging
import math
import numbers
import os
import unicodedata
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ddkit.config import FLOAT32_MAX, Checked, field, is_count, short_repr, summary_repr, to_dict
from ddkit.determinism import stage_modes
from ddkit.errors import ConfigError, DataError, DDKitError
from ddkit.registry import Registry, origin

logger = logging.getLogger(__name__)

SYSTEM_DATA_DIR = Path("/usr/share/datasets")
# a channel whose std is below this (in [0, 1] pixel space, far below one uint8 step of 1/255) is constant:
# what is left is float rounding, and normalising by it would divide by (almost) zero
CONSTANT_STD = 1e-6
#: the largest dataset.image_size: one decoded 3-channel image of 4096x4096 is 48 MiB, 1,000 of them 48 GB, beyond
#: any set this toolkit distils (ImageNet-scale work uses 224); a typo above it would decode into an out-of-memory crash
MAX_IMAGE_SIZE = 4096


@dataclass
class DatasetConfig(Checked):
    """Which dataset to load and how."""

    name: str = field("fashion-mnist", help="registered dataset key (`ddkit list datasets`)")
    path: str | None = field(None, help="explicit folder or file; default searches $DDKIT_DATA/<name>, then "
                                        "/usr/share/datasets/<name>")
    classes: list[str] | None = field(None,
                                      help="imagefolder: class names in label order (default: sorted folder names)")
    image_size: int | None = field(None, help="imagefolder: resize images to this square size")
    train_split: str = field("train", help="imagefolder: train split folder name")
    test_split: str = field("test", help="imagefolder: test split folder name")
    decode_cache: bool = field(True, added=True,
                               help="imagefolder: keep the decoded images in $DDKIT_CACHE/imagefolder (as large as "
                                    "the decoded pixels), memory-mapped by every later load and torchrun rank until "
                                    "a file changes; false decodes every file on every load")
    train_per_class: int | None = field(None, help="keep at most this many training images per class (quick runs)")
    test_per_class: int | None = field(None, help="keep at most this many test images per class (quick runs)")
    subset_seed: int = field(0, seed=True, help="seed for the per-class train/test subsets")
    options: dict = field({}, help="source-specific options (e.g. synthetic: num_classes, image_size)")

    def __post_init__(self) -> None:
        if not self.name.strip():
            # from_dict names the section
            raise ConfigError("name is empty; give a dataset key (`ddkit list datasets`)")
        if self.path is not None and not self.path.strip():
            raise ConfigError("path is empty; give the data's folder or file, or leave it out to search for it")
        for name in ("train_per_class", "test_per_class", "image_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")  # from_dict names the section
        if self.image_size is not None and self.image_size > MAX_IMAGE_SIZE:
            raise ConfigError(f"image_size must be at most {MAX_IMAGE_SIZE} (a decoded 3-channel image of that size "
                              f"is {3 * MAX_IMAGE_SIZE**2 / 2**20:.0f} MiB), got {self.image_size}; resize to a "
                              "smaller square")
        for name in ("train_split", "test_split"):
            value = getattr(self, name)
            # the root itself (or above it): the other split's class folders look like classes
            if not value.strip("./\\"):
                raise ConfigError(f"{name} must be the name of a folder in dataset.path, got {value!r}")

    def absolute(self) -> DatasetConfig:
        """This config with ``path`` made absolute (against the current folder), so that a record of it
        (a distilled set's ``dataset_config``) still finds the data from another working folder."""
        if self.path is None:
            return self
        return replace(self, path=str(Path(self.path).expanduser().absolute()))


def dataset_config(**kw) -> DatasetConfig:
    """``DatasetConfig(**kw)``, an unknown keyword being the one-line error YAML's would be."""
    from ddkit.config import from_dict

    return from_dict(DatasetConfig, kw, "dataset")


@dataclass
class ImageSet:
    """Images ``[N, C, H, W]`` (uint8 0..255 or float32 0..1) and int64 labels ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise DataError(f"images must have shape [N, C, H, W], got {tuple(self.images.shape)}")
        if self.labels.dim() != 1 or len(self.labels) != len(self.images):
            raise DataError(
                f"labels must have shape [{len(self.images)}], got {tuple(self.labels.shape)}; "
                "give one label per image"
            )
        if not (self.images.dtype == torch.uint8 or self.images.is_floating_point()):
            # int64 0..255 taken as float pixels would be 255x too bright
            raise DataError(f"images have dtype {self.images.dtype}; give uint8 0..255 or float 0..1 images "
                            "(images.to(torch.uint8) for integer pixels)")
        if self.images.dtype not in (torch.uint8, torch.float32):
            self.images = self.images.float()
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:  # the tensors' dtype and shape, not their values
        return summary_repr(self, images=self.images, labels=self.labels)

    def float_images(self) -> torch.Tensor:
        """Images as float32 in [0, 1] pixel space."""
        if self.images.dtype == torch.uint8:
            return self.images.float().div_(255.0)
        return self.images

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index])

    def class_counts(self, num_classes: int) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=num_classes)

    def indices_of(self, cls: int) -> torch.Tensor:
        return torch.nonzero(self.labels == cls, as_tuple=False).flatten()

    def class_indices(self, num_classes: int) -> list[torch.Tensor]:
        """``[indices_of(c) for c in range(num_classes)]`` in one pass (see :func:`class_indices`)."""
        return class_indices(self.labels, num_classes)


def class_indices(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """For each class ``c < num_classes``, the indices of ``labels == c`` in ascending order.

    One stable sort and one count: O(N log N), where a scan of every label per class is O(N * num_classes)
    (5 s for ImageNet-1k's 1.28 M labels and 1000 classes). Labels must be >= 0; larger ones are left out.
    """
    order = torch.argsort(labels, stable=True)  # stable: each class's indices stay ascending
    counts = torch.bincount(labels, minlength=num_classes)[:num_classes]
    return list(order[: int(counts.sum())].split(counts.tolist()))


#: the most bytes of a non-contiguous tensor :func:`hash_rows` copies at once to hash them
HASH_BLOCK_BYTES = 64 << 20


def hash_rows(h, t: torch.Tensor) -> None:
    """Feed ``t``'s bytes (in C order; ``t`` has at least one dimension) to ``h`` without copying them: hashlib
    reads the memory of byte views (so any dtype, bfloat16 too, which numpy lacks). Rows go in blocks, so a
    non-contiguous ``t`` is copied a block at a time, never whole (ImageNet's train set: 193 GB)."""
    rows = max(1, HASH_BLOCK_BYTES // max(1, t[0].numel() * t.element_size())) if len(t) else 1
    for block in t.split(rows):
        h.update(block.contiguous().view(torch.uint8).numpy())


def bad_class_name(name: str) -> tuple[str, str] | None:
    """Why ``name`` cannot name a class, as ``(name shown, problem)``, or None when it can: a name that is not valid
    UTF-8 (a folder name in another encoding, read with surrogate escapes), which no artifact can record as text,
    or one holding a control character (a newline would make the fingerprint of two class lists alike, and
    one-line messages span lines)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        try:
            shown = repr(os.fsencode(name))  # the folder name's bytes: b'\xffa'
        except UnicodeEncodeError:  # a surrogate no bytes give
            shown = ascii(name)
        return shown, "is not valid UTF-8"
    control = next((ch for ch in name if unicodedata.category(ch) == "Cc"), None)
    if control is not None:
        return repr(name), f"holds the control character {control!r}"
    return None


def channel_values(values: Any) -> Any:
    """A dataset's ``mean`` or ``std`` as the tuple of Python numbers every stage reads: a tensor's or NumPy array's
    values (``images.mean(dim=(0, 2, 3))``) and NumPy or one-value tensor elements as Python floats (float64 ones would
    make float64 inputs, which float32 weights refuse); Python ints and floats as they are. Anything else (one number,
    a string) comes back unchanged, for :class:`DataBundle` to refuse."""
    if isinstance(values, torch.Tensor) or type(values).__module__ == "numpy":
        try:
            return tuple(float(v) for v in values.tolist()) if values.ndim == 1 else values
        except (TypeError, ValueError):  # not numbers: refused as they are
            return values
    if not isinstance(values, (list, tuple)):
        return values
    return tuple(float(v) if (isinstance(v, torch.Tensor) and v.numel() == 1 and v.dtype != torch.bool)
                 or (type(v).__module__ == "numpy" and isinstance(v, numbers.Real) and not isinstance(v, bool)) else v
                 for v in values)


@dataclass
class DataBundle:
    """A loaded dataset: train/test image sets, classes and normalisation (``mean`` and ``std``: one number per
    channel, of pixels in 0..1; a tensor or NumPy array of them is taken as a tuple of floats)."""

    name: str
    train: ImageSet
    test: ImageSet
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""
    #: per split, how many files the source converted to fit the data ({"train": {"alpha_dropped": 3}}; empty when
    #: none were; see ddkit.data.sources.CONVERSIONS): recorded by :meth:`describe`, not part of the fingerprint.
    #: Counts cover every file the source read, before ``train_per_class``/``test_per_class`` keep a subset.
    conversions: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    #: the config :func:`load_dataset` loaded it with (None for data built by hand)
    config: DatasetConfig | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.classes) < 2:  # one class: every prediction is right, every accuracy a meaningless 100%
            where = f" ({self.source})" if self.source else ""
            raise DataError(f"dataset {self.name!r}{where} has {len(self.classes)} class {list(self.classes)}; "
                            "classification needs at least 2: give it images of two or more classes")
        for split, part in (("train", self.train), ("test", self.test)):
            if len(part) == 0:  # no test images: accuracy 0/0 = NaN; no train images: nothing to learn from
                where = f" ({self.source})" if self.source else ""
                raise DataError(f"dataset {self.name!r}{where} has an empty {split} split (0 images); "
                                f"give it at least one {split} image with its label")
        for name in self.classes:
            bad = bad_class_name(name) if isinstance(name, str) else None
            if bad is not None:
                where = f" ({self.source})" if self.source else ""
                raise DataError(f"dataset {self.name!r}{where}: class name {bad[0]} {bad[1]}; rename the class")
        c = self.train.images.shape[1]
        self.mean, self.std = channel_values(self.mean), channel_values(self.std)
        for key in ("mean", "std"):
            values = getattr(self, key)
            if not isinstance(values, tuple):
                raise DataError(f"dataset {self.name!r}: {key} must be a sequence of one number per channel ({c}), "
                                f"found {type(values).__name__} {short_repr(values)}; give a tuple of floats")
        if len(self.mean) != c or len(self.std) != c:
            raise DataError(f"dataset {self.name!r}: mean/std need {c} values (one per channel)")
        if self.test.images.shape[1:] != self.train.images.shape[1:]:
            raise DataError(
                f"dataset {self.name!r}: test images {tuple(self.test.images.shape[1:])} differ "
                f"from train images {tuple(self.train.images.shape[1:])}; give both splits the same "
                f"{'number of channels' if self.test.images.shape[1] != c else 'image size'}"
            )
        for split, part in (("train", self.train), ("test", self.test)):
            if len(part) and (part.labels.min() < 0 or part.labels.max() >= len(self.classes)):
                raise DataError(
                    f"dataset {self.name!r}: {split} labels must lie in [0, {len(self.classes) - 1}] "
                    f"for {len(self.classes)} classes"
                )

    def __repr__(self) -> str:  # a notebook's view of it: no pixel values (the dataclass repr printed them all)
        return summary_repr(self, name=self.name, classes=self.num_classes, train=self.train, test=self.test,
                            source=self.source or None)

    def check_train_classes(self) -> None:
        """Refuse, in one line, a class without training images (:func:`check_train_classes`): :func:`load_dataset`
        checks what every source loaded, a method what it is given."""
        where = f"dataset {self.name!r}" + (f" ({self.source})" if self.source else "")
        check_train_classes(self.train, self.classes, where)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    @property
    def fingerprint(self) -> str:
        """sha256 over train/test images, labels and class names (identifies the exact data). Remembered while the
        splits' tensors are the same objects, unmodified by in-place torch ops (their ``_version``; an edit through
        ``.data`` or ``.numpy()`` is not seen), and the class names the same: after such an edit or a new
        :class:`ImageSet` it is the new data's. Inference tensors, which keep no version, are hashed every time."""
        tensors = (self.train.images, self.train.labels, self.test.images, self.test.labels)
        if any(t.is_inference() for t in tensors):
            return self._hash_data()
        state = (tuple(t._version for t in tensors), tuple(self.classes))
        memo = self.__dict__.get("_fingerprint_memo")
        if memo is not None and memo[1] == state and all(ref() is t for ref, t in zip(memo[0], tensors)):
            return memo[2]
        fp = self._hash_data()
        # weak references: the memo keeps no replaced split alive
        self._fingerprint_memo = (tuple(weakref.ref(t) for t in tensors), state, fp)
        return fp

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_fingerprint_memo"}  # weak references do not pickle

    def _hash_data(self) -> str:
        h = hashlib.sha256()
        for part in (self.train, self.test):
            h.update(str(tuple(part.images.shape)).encode() + str(part.images.dtype).encode())
            hash_rows(h, part.images)
            hash_rows(h, part.labels)
        # one name per line: unambiguous, as no class name holds a newline (bad_class_name), and the hash of every
        # dataset that ever loaded stays as it was
        h.update("\n".join(self.classes).encode())
        return h.hexdigest()[:16]

    @property
    def normalisation(self) -> dict[str, list[float]]:
        """The per-channel mean/std inputs are normalised with, for keys of what depends on them (the
        fingerprint covers the raw pixels only)."""
        return {"mean": [float(m) for m in self.mean], "std": [float(s) for s in self.std]}

    def matches(self, described: dict) -> bool:
        """Whether ``described`` (an artifact's ``dataset`` entry, written by :meth:`describe`) is this
        data as the artifact saw it: the same pixels and labels and the same normalisation (a teacher
        trained on other mean/std sees shifted inputs)."""
        return (described.get("fingerprint") == self.fingerprint and described.get("mean") == list(self.mean)
                and described.get("std") == list(self.std))

    def config_record(self) -> dict | None:
        """The config this data was loaded with, as an artifact records it (``dataset_config``, with ``path``
        absolute: :meth:`DatasetConfig.absolute`), so the artifact can be made again from its record; None for
        data built by hand."""
        return to_dict(self.config.absolute()) if self.config is not None else None

    def describe(self) -> dict:
        out = {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "classes": list(self.classes),
            "image_shape": list(self.image_shape),
            "mean": list(self.mean),
            "std": list(self.std),
            "train_size": len(self.train),
            "test_size": len(self.test),
        }
        if self.conversions:  # only then: the description of data read as it is stays as it was
            out["conversions"] = {split: dict(counts) for split, counts in self.conversions.items()}
        return out


Loader = Callable[[DatasetConfig], DataBundle]
#: the DatasetConfig fields a source may read or not (``classes`` and the per-class subsets apply to every source)
SOURCE_SETTINGS = ("path", "image_size", "train_split", "test_split")


class DatasetRegistry(Registry[Loader]):
    """The dataset sources. A registration may declare what the source reads besides ``dataset.classes``:
    ``options`` (the ``dataset.options`` keys it takes; a dict of their defaults will do) and ``settings``
    (which of :data:`SOURCE_SETTINGS` it reads). :func:`load_dataset` then refuses the others, which a source
    would silently ignore. A source that declares neither is warned about instead (it may read them)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        #: per name: (the dataset.options keys, the SOURCE_SETTINGS it reads), None for one not declared
        self.declared: dict[str, tuple[frozenset[str] | None, frozenset[str] | None]] = {}

    def register(self, name: str, *, options=None, settings=None) -> Callable[[Loader], Loader]:
        """Decorator that registers a loader ``f(DatasetConfig) -> DataBundle`` under ``name``, e.g.
        ``@DATASETS.register("blobs", options={"num_classes": 3, "seed": 0}, settings=())``."""
        unknown = sorted(set(settings or ()) - set(SOURCE_SETTINGS))
        if unknown or isinstance(settings, str) or isinstance(options, str):
            raise DDKitError(f"dataset {name!r}: settings={settings!r}, options={options!r}; give settings as a "
                             f"list of {list(SOURCE_SETTINGS)} and options as a list (or dict) of option names")
        deco = super().register(name)

        def register(loader: Loader) -> Loader:
            loader = deco(loader)
            self.declared[name] = (None if options is None else frozenset(options),
                                   None if settings is None else frozenset(settings))
            return loader

        return register

    def add(self, name: str, obj: Loader, *, options=None, settings=None) -> Loader:
        return self.register(name, options=options, settings=settings)(obj)


DATASETS = DatasetRegistry("dataset")


def other_data_fix(cfg: DatasetConfig, recorded: dict) -> str:
    """How to load the data an artifact was made from when ``cfg`` loaded other pixels than the artifact's record
    (its ``dataset_config``, ``recorded``) says: point dataset.path at the same files. A source declared to read no
    files (see :class:`DatasetRegistry`) that was given the recorded settings is itself at fault: it loads other
    data on each load (an unseeded generator)."""
    settings = DATASETS.declared.get(cfg.name, (None, None))[1]
    if settings is not None and "path" not in settings and dataset_config(**recorded).absolute() == cfg.absolute():
        return (f"dataset source {cfg.name!r} ({origin(DATASETS.get(cfg.name))}) reads no files and was given the "
                "settings the set records, so it loaded other data than then: make it return the same data on every "
                "load (seed its generator), then make the set again")
    return "point dataset.path at the same files"
#: sources that put their classes in ``dataset.classes``' order (the others only check it against theirs)
CLASS_ORDER_SOURCES = frozenset({"imagefolder"})
#: sources that apply ``train_per_class``/``test_per_class`` themselves, with :func:`per_class_index` (the same
#: images :func:`load_dataset` would keep), so that they hold only the kept images in memory
SUBSET_SOURCES = frozenset({"imagefolder"})


def reorders_classes(data: DataBundle) -> bool:
    """Whether loading ``data`` again with ``dataset.classes`` in another order re-orders its classes
    (loaded by a source in :data:`CLASS_ORDER_SOURCES`; never for a bundle built by hand)."""
    return data.config is not None and data.config.name in CLASS_ORDER_SOURCES


def search_order(name: str, path: str | None) -> list[Path]:
    """The folders a dataset is looked for in, first first: ``path``, ``$DDKIT_DATA/<name>``, the system's."""
    order = [Path(path).expanduser()] if path else []
    if os.environ.get("DDKIT_DATA"):
        order.append(Path(os.environ["DDKIT_DATA"]).expanduser() / name)
    order.append(SYSTEM_DATA_DIR / name)
    return order


def find_data_dir(name: str, path: str | None, required: list[str], hint: str) -> Path:
    """Locate a dataset folder holding ``required`` files.

    Order: explicit ``path``, then ``$DDKIT_DATA/<name>``, then ``/usr/share/datasets/<name>``.
    Raises a DataError naming every place searched and ``hint`` (how to provide the files).
    """
    if path:
        # an explicit path never falls back to other places: a typo must not load different data
        cand = Path(path).expanduser()
        if not cand.is_dir():
            raise DataError(f"dataset {name!r} not found (searched {cand}); {hint}")
        missing = [f for f in required if not (cand / f).exists()]
        if missing:
            raise DataError(f"dataset {name!r}: {cand} lacks {', '.join(missing)}; put the files there")
        return cand
    candidates = search_order(name, None)
    for cand in candidates:
        if cand.is_dir() and all((cand / f).exists() for f in required):
            return cand
    searched = ", ".join(str(c) for c in candidates)
    raise DataError(f"dataset {name!r} not found (searched {searched}); {hint}")


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``; a host tensor goes to a GPU through pinned memory, asynchronously.

    A plain ``.to("cuda")`` of pageable memory waits until the GPU has finished all the work queued
    before it. Pinned memory copied with ``non_blocking`` does not, and PyTorch's pinned-memory
    allocator keeps the buffer until the copy is done, so ``t`` may change or go afterwards.
    """
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def per_class_index(labels: torch.Tensor, num_classes: int, per_class: int, seed: int) -> torch.Tensor:
    """The ascending indices of at most ``per_class`` images of each class, chosen with ``seed``: what
    :func:`per_class_subset` keeps. It needs only the labels, so a source can apply it before decoding images."""
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for idx in class_indices(labels, num_classes):
        perm = torch.randperm(len(idx), generator=gen)[:per_class]
        keep.append(idx[perm])
    return torch.cat(keep).sort().values


def per_class_subset(part: ImageSet, num_classes: int, per_class: int | None, seed: int) -> ImageSet:
    """At most ``per_class`` images of each class, chosen with ``seed``, in original order."""
    if per_class is None:
        return part
    return part.subset(per_class_index(part.labels, num_classes, per_class, seed))


def check_bundle(data: object, what: str = "data") -> None:
    """Refuse, in one line, a ``data`` argument that is not a loaded :class:`DataBundle`."""
    if not isinstance(data, DataBundle):
        raise DDKitError(f"{what} must be a loaded DataBundle, got {type(data).__name__} {data!r:.80}; load it with "
                         "ddkit.data.load_dataset(name or DatasetConfig)")


def check_mean_std(mean: tuple[float, ...], std: tuple[float, ...], where: str, fix: str) -> None:
    """Refuse, in one line naming ``where`` and ending with ``fix``, a normalisation no training can use: a value
    that is not finite, a std below :data:`CONSTANT_STD` (normalised pixels blow up, and training diverges with
    advice to lower its lr), or a mean or std above 1, which no pixels in 0..1 (uint8 images divided by 255) have:
    0..255-scale statistics squeeze every image to almost one value, which trains to chance."""
    for key, values in (("mean", mean), ("std", std)):
        if not all(isinstance(v, numbers.Real) for v in values):
            raise DataError(f"{where}: {key} must hold numbers (Python floats), found {list(values)}; {fix}")
        if not all(math.isfinite(v) for v in values):
            raise DataError(f"{where}: {key} must hold finite numbers, found {list(values)}; {fix}")
    if min(std) < CONSTANT_STD:
        raise DataError(f"{where}: std must be at least {CONSTANT_STD:g} (of pixels in 0..1; below it normalised "
                        f"pixels blow up), found {list(std)}; {fix}")
    if max(*mean, *std) > 1:
        raise DataError(f"{where}: mean {list(mean)} and std {list(std)} are not of pixels in 0..1 (whose mean and std "
                        "are at most 1; 0..255-scale values train to chance); divide them by 255")


def check_train_classes(train: ImageSet, classes: list[str], where: str,
                        fix: str = "give every class training images, or drop each such class (and its test "
                                   "images) from the data") -> None:
    """Refuse, in one line naming ``where`` and ending with ``fix``, the classes of which the train split ``train`` has
    no image: no teacher or method can learn them (a teacher trains as if they did not exist), yet their test images
    count against every accuracy."""
    counts = train.class_counts(len(classes))[: len(classes)].tolist()
    empty = [name for name, n in zip(classes, counts) if n == 0]
    if not empty:
        return
    if len(empty) == 1:
        said = f"class {empty[0]!r} has"
    else:
        shown = f"{empty}" if len(empty) <= 5 else f"[{', '.join(map(repr, empty[:5]))}, ...] ({len(empty)} in all)"
        said = f"classes {shown} have"
    raise DataError(f"{where}: {said} no training images; {fix}")


@stage_modes()
def load_dataset(cfg: DatasetConfig | str, **kw) -> DataBundle:
    """Load a registered dataset by config (or by name with config fields as keywords). What any source loaded is
    checked: its mean/std, the dataset settings it declares, and that every class has training images."""
    if isinstance(cfg, str):
        cfg = dataset_config(name=cfg, **kw)
    elif not isinstance(cfg, DatasetConfig):
        raise DDKitError(f"load_dataset takes a dataset name or a DatasetConfig, got {type(cfg).__name__} {cfg!r:.80}")
    loader = DATASETS.get(cfg.name)
    bundle = loader(cfg)
    where = f"dataset source {cfg.name!r} ({origin(loader)})"
    if not isinstance(bundle, DataBundle):
        raise DDKitError(f"{where} returned a {type(bundle).__name__}; a loader returns a "
                         "ddkit.data.DataBundle(name, train=ImageSet(images, labels), test=ImageSet(...), classes, "
                         "mean, std) (README, Models)")
    check_mean_std(bundle.mean, bundle.std, where, "return the per-channel mean and std of its training images "
                                                   "in 0..1")
    _check_source_settings(cfg, bundle)
    bundle.check_train_classes()  # before any train_per_class subset, which keeps at least one image of each class
    subset_here = cfg.name not in SUBSET_SOURCES
    if subset_here and (cfg.train_per_class is not None or cfg.test_per_class is not None):
        bundle = DataBundle(
            name=bundle.name,
            train=per_class_subset(bundle.train, bundle.num_classes, cfg.train_per_class, cfg.subset_seed),
            test=per_class_subset(bundle.test, bundle.num_classes, cfg.test_per_class, cfg.subset_seed + 1),
            classes=bundle.classes,
            mean=bundle.mean,
            std=bundle.std,
            source=bundle.source,
            conversions=bundle.conversions,
        )
    bundle.config = cfg
    return bundle


def check_class_order(cfg: DatasetConfig, classes: list[str]) -> None:
    """If the user pinned ``dataset.classes`` (e.g. a teacher's order), it must match the source."""
    if cfg.classes is not None and list(cfg.classes) != list(classes):
        raise DataError(
            f"dataset.classes {list(cfg.classes)} does not match the classes of {cfg.name!r} "
            f"{list(classes)}; remove dataset.classes or list exactly these names in this order"
        )


#: (dataset, settings) pairs already warned about as unchecked
_WARNED: set[tuple[str, tuple[str, ...]]] = set()


def _check_source_settings(cfg: DatasetConfig, bundle: DataBundle) -> None:
    """What every source gets, whoever wrote it: ``dataset.classes`` must be the loaded classes in their order,
    ``dataset.image_size`` the loaded size, and settings and options the source does not declare are refused
    (see :class:`DatasetRegistry`). Built-in sources refuse them themselves, before loading."""
    check_class_order(cfg, bundle.classes)
    options, settings = DATASETS.declared.get(cfg.name, (None, None))
    defaults = {f.name: f.default for f in dataclasses.fields(DatasetConfig) if f.name in SOURCE_SETTINGS}
    given = [name for name in SOURCE_SETTINGS if getattr(cfg, name) != defaults[name]]
    if settings is not None and set(given) - settings:
        unused = [name for name in given if name not in settings]
        reads = ("dataset." + ", ".join(sorted(settings)) if settings
                 else "none of dataset." + ", ".join(SOURCE_SETTINGS))
        raise ConfigError(f"dataset {cfg.name!r} does not read dataset.{', dataset.'.join(unused)}; remove "
                          f"{'them' if len(unused) > 1 else 'it'} (it reads {reads})")
    if options is not None and set(cfg.options) - options:
        unknown = sorted(set(cfg.options) - options)
        if not options:
            raise ConfigError(f"unknown dataset.options {unknown} for {cfg.name!r}; this source takes no options, "
                              "remove them")
        close = difflib.get_close_matches(unknown[0], sorted(options), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown dataset.options {unknown} for {cfg.name!r}; {hint}valid: {sorted(options)}")
    size = cfg.image_size
    if size is not None and tuple(bundle.image_shape[1:]) != (size, size):
        raise ConfigError(f"dataset.image_size {size} does not apply to {cfg.name!r}, which loaded "
                          f"{bundle.image_shape[1]}x{bundle.image_shape[2]} images; remove it")
    unchecked = ([f"dataset.{name}" for name in given if settings is None and name != "image_size"]
                 + ([f"dataset.options {sorted(cfg.options)}"] if options is None and cfg.options else []))
    if unchecked and (cfg.name, tuple(unchecked)) not in _WARNED:
        _WARNED.add((cfg.name, tuple(unchecked)))  # once per process: evaluation reloads the data per student
        logger.warning("dataset %r does not declare what it reads, so %s could not be checked (a source that "
                       "ignores them loads other data than asked); its author can declare them: "
                       "DATASETS.register(%r, options=[...], settings=[...])", cfg.name, " and ".join(unchecked),
                       cfg.name)


def make_synthetic(
    num_classes: int = 4,
    channels: int = 1,
    image_size: int = 16,
    train_per_class: int = 24,
    test_per_class: int = 12,
    seed: int = 0,
    noise: float = 0.15,
) -> DataBundle:
    """Generated data with class-dependent structure: each class is a noisy oriented pattern.

    Learnable in a few epochs by tiny models (so tests can measure learning) yet not trivially
    separable pixel by pixel. Deterministic for a given seed.
    """
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, image_size), torch.linspace(-1, 1, image_size), indexing="ij")
    protos = []
    for c in range(num_classes):
        angle = torch.pi * c / num_classes
        freq = 2.0 + (c % 3)
        wave = torch.sin(freq * torch.pi * (xs * torch.cos(torch.tensor(angle)) + ys * torch.sin(torch.tensor(angle))))
        base = 0.5 + 0.35 * wave
        protos.append(torch.stack([base * (0.7 + 0.3 * ((c + k) % 2)) for k in range(channels)]))
    protos_t = torch.stack(protos)

    def draw(per_class: int) -> ImageSet:
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        shift = torch.randint(-2, 3, (len(labels), 2), generator=gen)
        imgs = protos_t[labels].clone()
        for i in range(len(labels)):
            imgs[i] = torch.roll(imgs[i], shifts=(int(shift[i, 0]), int(shift[i, 1])), dims=(1, 2))
        imgs = imgs + noise * torch.randn(imgs.shape, generator=gen)
        imgs = (imgs.clamp(0, 1) * 255).round().to(torch.uint8)
        return ImageSet(imgs, labels)

    train = draw(train_per_class)
    test = draw(test_per_class)
    return DataBundle(
        name="synthetic",
        train=train,
        test=test,
        classes=[f"class{c}" for c in range(num_classes)],
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        source=f"generated(seed={seed})",
    )


SYNTHETIC_OPTIONS = {"num_classes", "channels", "image_size", "train_per_class", "test_per_class", "seed", "noise"}


@DATASETS.register("synthetic", options=SYNTHETIC_OPTIONS, settings=())
def _load_synthetic(cfg: DatasetConfig) -> DataBundle:
    """Generated class patterns (oriented waves, shifted, with noise) for tests and quick tries; no files needed."""
    allowed = SYNTHETIC_OPTIONS
    unknown = set(cfg.options) - allowed
    if unknown:
        raise ConfigError(f"unknown dataset.options {sorted(unknown)} for 'synthetic'; valid: {sorted(allowed)}")
    if cfg.path is not None or cfg.image_size is not None or (cfg.train_split, cfg.test_split) != ("train", "test"):
        raise ConfigError("dataset 'synthetic' is generated, so dataset.path, image_size and train_split/test_split do "
                          "not apply; remove them (its size is dataset.options.image_size)")
    if not cfg.decode_cache:
        raise ConfigError("dataset.decode_cache applies only to 'imagefolder' ('synthetic' decodes no image files); "
                          "remove it")
    for key, low in (("num_classes", 2), ("channels", 1), ("image_size", 1), ("train_per_class", 1),
                     ("test_per_class", 1), ("seed", 0)):
        v = cfg.options.get(key)
        if v is not None and not is_count(v, low):
            raise ConfigError(f"dataset.options.{key} must be an integer >= {low}, got {v!r}")
    if is_count(seed := cfg.options.get("seed"), 0) and seed >= 2**64:  # torch's generator takes 64 bits
        raise ConfigError(f"dataset.options.seed must be an integer in [0, 2^64) (what torch's generator takes), got "
                          f"{seed!r}")
    noise = cfg.options.get("noise")
    if (noise is not None
            and (not isinstance(noise, (int, float)) or isinstance(noise, bool) or not 0 <= noise <= FLOAT32_MAX)):
        raise ConfigError(f"dataset.options.noise must be a number in [0, {FLOAT32_MAX:.4g}] (float32's range, in "
                          f"which the images are drawn), got {noise!r}")
    return make_synthetic(**cfg.options)
