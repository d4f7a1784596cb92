"""Dataset sources read from local files: Fashion-MNIST/MNIST, CIFAR-10/100, ImageFolder, tensors.

Each source is a function ``(DatasetConfig) -> DataBundle`` registered in :data:`DATASETS`. Nothing
here downloads anything: files are found in ``dataset.path``, ``$DDKIT_DATA/<name>`` or
``/usr/share/datasets/<name>`` (see :func:`find_data_dir`), and every problem with them raises a
:class:`DataError` that names the file and the fix.

Untrusted formats are read defensively: CIFAR pickles go through a restricted unpickler that only
rebuilds plain numpy arrays, tar members are read in memory (never extracted), and ``.pt`` files
are loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import hashlib
import io
import json
import logging
import math
import os
import pickle
import re
import shutil
import socket
import struct
import tarfile
import time
import warnings
import zipfile
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import numpy as np
import torch

from ddkit import distributed as ddist
from ddkit.artifacts import (
    atomic_dir,
    build_lock,
    cache_dir,
    check_normalisation,
    quiet_torch_load,
    remove_unused_lock,
    sweep_leftovers,
)
from ddkit.cache import DECODED_SCHEMA  # the layout and meaning of an entry (bump it there)
from ddkit.config import short_repr
from ddkit.data.base import (
    CONSTANT_STD,
    DATASETS,
    SOURCE_SETTINGS,
    DataBundle,
    DatasetConfig,
    ImageSet,
    bad_class_name,
    check_class_order,
    check_mean_std,
    check_train_classes,
    find_data_dir,
    per_class_index,
    search_order,
)
from ddkit.determinism import cpu_default_device
from ddkit.errors import ConfigError, DataError, DDKitError

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# shared helpers


def _put_files(cfg) -> str:
    """The fix for a dataset.path that lacks the files: the folder named like the dataset inside it (a data
    root such as $DDKIT_DATA given for the dataset's own folder), or putting the files there."""
    inner = Path(cfg.path).expanduser() / cfg.name
    return f"did you mean {str(inner)!r}?" if inner.is_dir() else "put the files there"


def _check_no_options(cfg: DatasetConfig) -> None:
    if cfg.options:
        raise ConfigError(
            f"unknown dataset.options {sorted(cfg.options)} for {cfg.name!r}; "
            "this source takes no options, remove them"
        )


def _check_fixed_source(cfg: DatasetConfig) -> None:
    """Settings that only imagefolder understands must not be silently ignored elsewhere."""
    _check_no_options(cfg)
    if cfg.image_size is not None:
        raise ConfigError(
            f"dataset.image_size applies only to 'imagefolder', not {cfg.name!r}; remove it"
        )
    if (cfg.train_split, cfg.test_split) != ("train", "test"):
        raise ConfigError(
            f"dataset.train_split/test_split apply only to 'imagefolder', not {cfg.name!r}; remove them"
        )
    if not cfg.decode_cache:
        raise ConfigError(f"dataset.decode_cache applies only to 'imagefolder' ({cfg.name!r} decodes no image files); "
                          "remove it")


_check_class_order = check_class_order  # the check load_dataset makes for every source, made here before the rest


def _search_rank(name: str, path: str | None, found: Path) -> int:
    """Position of ``found`` in find_data_dir's search order (lower wins)."""
    order = search_order(name, path)
    return order.index(found) if found in order else len(order)


def _locate(cfg: DatasetConfig, layouts: list[list[str]], hint: str) -> tuple[Path, int]:
    """The highest-priority folder holding any one of ``layouts``; returns (folder, layout index).

    An explicit ``dataset.path`` is authoritative: if it lacks the files we fail rather than
    silently load other data from ``$DDKIT_DATA``. Errors name the first layout's files.
    """
    if cfg.path and not Path(cfg.path).expanduser().exists():
        raise DataError(f"dataset.path {cfg.path} does not exist; fix dataset.path or unset it to search DDKIT_DATA")
    if cfg.path and not Path(cfg.path).expanduser().is_dir():
        raise DataError(f"dataset.path {cfg.path} is a file, not a folder; point dataset.path at the folder holding "
                        f"{', '.join(layouts[0])}")
    hits: list[tuple[int, int, Path]] = []
    first_error: DataError | None = None
    for i, required in enumerate(layouts):
        try:
            found = find_data_dir(cfg.name, cfg.path, required=required, hint=hint)
        except DataError as exc:
            first_error = first_error or exc
            continue
        hits.append((_search_rank(cfg.name, cfg.path, found), i, found))
    if cfg.path:
        hits = [h for h in hits if h[0] == 0]
        if not hits:
            missing = [f for f in layouts[0] if not (Path(cfg.path).expanduser() / f).exists()]
            raise DataError(f"dataset {cfg.name!r}: {cfg.path} lacks {', '.join(missing)}; {_put_files(cfg)}")
    if not hits:
        assert first_error is not None
        raise first_error
    _, layout, folder = min(hits)
    return folder, layout



#: images summed as one group by :class:`ChannelSums`, the group totals then added: channel_stats's chunk, always 4096
STATS_GROUP = 4096
#: the most float64 bytes of images :class:`ChannelSums` converts at once (at least one image)
STATS_BLOCK_BYTES = 128 << 20


class ChannelSums:
    """Per-channel float64 sums of ``[C, H, W]`` images (and of their squares) in [0, 1] pixel space, added a few
    at a time in order, and the mean/std they give: :func:`channel_stats` for images that come one by one. It holds
    at most :data:`STATS_BLOCK_BYTES` of float64 and a block of images.

    The sums are added in the order channel_stats always took them, so that mean/std, which teachers record and
    cache keys include, keep every bit: groups of :data:`STATS_GROUP` images, a group summed by one torch ``sum``
    over images, height and width when its float64 copy fits in STATS_BLOCK_BYTES. A larger group goes a block at
    a time, its images' sums over height and width added one after another: the order of that ``sum`` for images
    of several channels. (For one channel torch splits the sum between threads, in an order that depends on their
    number, so single-channel images too large for a group to fit could differ from it in the last bits anyway.)
    """

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, count: int) -> None:
        """Sums of ``count`` images of ``shape`` (C, H, W) and ``dtype`` (uint8 0..255 or float 0..1)."""
        self.block = max(1, STATS_BLOCK_BYTES // (math.prod(shape) * 8))  # images converted to float64 at once
        self.scale = 255.0 if dtype == torch.uint8 else 1.0
        self.expected = count
        self.buffer = np.empty((max(1, min(self.block, STATS_GROUP, count)), *shape),
                               dtype=torch.empty(0, dtype=dtype).numpy().dtype)
        self.filled = 0  # images waiting in the buffer
        self.count = 0  # images added
        self.sums = torch.zeros(2, shape[0], dtype=torch.float64)  # of the finished groups: pixels, squares
        self.group = torch.zeros(2, shape[0], dtype=torch.float64)  # of the current group, when it goes by blocks

    def add(self, images) -> None:
        """Add ``[n, C, H, W]`` images (a numpy array or CPU tensor of the shape and dtype given) after the others."""
        assert self.count + len(images) <= self.expected, "more images than ChannelSums was told of"
        done = 0
        while done < len(images):
            n = min(len(self.buffer) - self.filled, STATS_GROUP - self.count % STATS_GROUP, len(images) - done)
            self.buffer[self.filled : self.filled + n] = np.asarray(images[done : done + n])
            self.filled, self.count, done = self.filled + n, self.count + n, done + n
            if self.filled == len(self.buffer) or self.count % STATS_GROUP == 0:
                self._flush()
            if self.count % STATS_GROUP == 0:
                self._end_group()

    def _flush(self) -> None:
        x = torch.from_numpy(self.buffer[: self.filled]).to(torch.float64)
        x.div_(self.scale)
        if self.block >= STATS_GROUP:  # the buffer holds the whole group (or all the images)
            self.sums[0] += x.sum(dim=(0, 2, 3))
            self.sums[1] += x.mul_(x).sum(dim=(0, 2, 3))
        else:  # one image after another (cumsum adds in order)
            self.group[0] = torch.cat([self.group[0, None], _plane_sums(x)]).cumsum(0)[-1]
            self.group[1] = torch.cat([self.group[1, None], _plane_sums(x.mul_(x))]).cumsum(0)[-1]
        self.filled = 0

    def _end_group(self) -> None:
        self.sums += self.group  # (zeros when groups are summed whole)
        self.group.zero_()

    def mean_std(self, name: str = "the training images", fix: str = "check the images",
                 ) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and (population) std of the images added. A constant channel (std 0) cannot be
        normalised and raises DataError naming ``name`` and ``fix``."""
        if self.count == 0:
            raise DataError("cannot compute mean/std of an empty training set; add training images")
        if self.filled:
            self._flush()
        self._end_group()
        pixels = self.count * self.buffer[0, 0].size
        mean = self.sums[0] / pixels
        std = (self.sums[1] / pixels - mean * mean).clamp_min(0.0).sqrt()
        for ch, v in enumerate(std.tolist()):
            if v < CONSTANT_STD:
                raise DataError(f"channel {ch} of {name} is constant (std {v:.3g}), so normalising it divides by "
                                f"zero and training gives NaN; {fix}")
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _plane_sums(x: torch.Tensor) -> torch.Tensor:
    """``x.sum(dim=(2, 3))`` of contiguous ``[n, C, H, W]`` float64 images, the same bits however many threads."""
    rows = x.reshape(len(x) * x.shape[1], -1)
    if len(rows) == 1:  # torch splits a sum with one output between threads: sum it as one of two equal rows
        return rows.expand(2, -1).sum(1)[:1].reshape(1, 1)
    return rows.sum(1).reshape(x.shape[:2])


def channel_stats(
    images: torch.Tensor, name: str = "the training images", fix: str = "check the images",
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of ``[N, C, H, W]`` images in [0, 1] pixel space.

    Accumulates in float64 a block of at most :data:`STATS_BLOCK_BYTES` at a time (see :class:`ChannelSums`), so
    large uint8 sets need little memory. A constant channel (std 0) cannot be normalised and raises DataError
    naming ``name`` and ``fix``.
    """
    if len(images) == 0:
        raise DataError("cannot compute mean/std of an empty training set; add training images")
    sums = ChannelSums(tuple(images.shape[1:]), images.dtype, len(images))
    sums.add(images)
    return sums.mean_std(name, fix)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")  # terminal escape sequences (torch bolds words in its errors)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = _ANSI.sub("", str(exc)).strip().splitlines()
    line = text[0].strip() if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST / MNIST (IDX files)

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
MNIST_SIDE = 28

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
MNIST_CLASSES = [str(d) for d in range(10)]

# the published files of the two datasets share names, shapes and sizes; their first labels (train, test) tell them
# apart, so one named as the other is refused (its images would be recorded under the other's classes)
IDX_FIRST_LABELS = {"mnist": ([5, 0, 4, 1, 9, 2, 1, 3, 1, 4], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]),
                    "fashion-mnist": ([9, 0, 0, 3, 0, 2, 7, 2, 5, 5], [9, 2, 1, 1, 6, 1, 4, 6, 5, 7])}

_REDOWNLOAD = "re-download or re-install the file"

#: the fewest training images whose pixel mean and std :func:`_check_idx_statistics` compares with the dataset's
IDX_STATS_MIN_IMAGES = 100
#: how far (in 0..1 pixel space) their mean or std may lie from the dataset's published ones: Fashion-MNIST's and
#: MNIST's training sets lie within 0.001, KMNIST's (0.19, 0.35) or uniform noise (0.5, 0.29) far outside
IDX_STATS_TOLERANCE = 0.05
#: how many of the first training images :func:`_check_idx_statistics` reads (the files' order mixes the classes)
IDX_STATS_SAMPLE = 10000
#: (dataset, folder) pairs already checked by :func:`_check_idx_statistics`: once per process, as evaluation loads
#: the data again per student
_CHECKED_IDX: set[tuple[str, Path]] = set()


def _read_bytes(path: Path) -> bytes:
    """File contents, gunzipped when the name ends in ``.gz``; damage raises DataError."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is not a valid gzip file or is truncated ({exc}); {_REDOWNLOAD}") from None
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc}); check the file and its permissions") from None
    return raw


def read_idx(path: Path, kind: str) -> np.ndarray:
    """An IDX file as uint8: images ``[N, 1, 28, 28]`` (``kind='images'``) or labels ``[N]``."""
    raw = _read_bytes(path)
    magic_expected, header = (IDX_IMAGES_MAGIC, 16) if kind == "images" else (IDX_LABELS_MAGIC, 8)
    if len(raw) < header:
        raise DataError(
            f"{path} is truncated (expected at least a {header}-byte header, found {len(raw)} bytes); "
            f"{_REDOWNLOAD}"
        )
    magic = int.from_bytes(raw[:4], "big")
    if magic != magic_expected:
        raise DataError(
            f"{path} is not an IDX {kind} file (magic number {magic}, expected {magic_expected}); "
            f"check the file name or {_REDOWNLOAD}"
        )
    if kind == "images":
        n, rows, cols = struct.unpack(">III", raw[4:16])  # IDX sizes are unsigned 32-bit
        if (rows, cols) != (MNIST_SIDE, MNIST_SIDE):
            raise DataError(
                f"{path} holds images of {rows}x{cols} pixels, expected {MNIST_SIDE}x{MNIST_SIDE}; {_REDOWNLOAD}"
            )
        shape: tuple[int, ...] = (n, 1, rows, cols)
    else:
        (n,) = struct.unpack(">I", raw[4:8])
        shape = (n,)
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        problem = "is truncated" if len(raw) < expected else "has trailing data"
        raise DataError(f"{path} {problem} (expected {expected} bytes, found {len(raw)}); {_REDOWNLOAD}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _load_idx_dataset(
    cfg: DatasetConfig, classes: list[str], mean: tuple[float, ...], std: tuple[float, ...], hint: str
) -> DataBundle:
    _check_fixed_source(cfg)
    gz = [f + ".gz" for f in IDX_FILES.values()]
    plain = list(IDX_FILES.values())
    try:
        folder, _ = _locate(cfg, [gz, plain], hint)
    except DataError as exc:
        # some files gzipped and some not: the first searched folder with each file in either form (file()
        # below takes each in the form it has); an explicit dataset.path is the only folder searched
        lacks = lambda root: [f for f in plain if not ((root / f).exists() or (root / (f + ".gz")).exists())]
        order = search_order(cfg.name, cfg.path)[: 1 if cfg.path else None]
        folder = next((root for root in order if root.is_dir() and not lacks(root)), None)
        if folder is None:
            if cfg.path and order[0].is_dir():  # name what the folder lacks, in whichever form is missing
                missing = [f"{f} (or {f}.gz)" for f in lacks(order[0])]
                raise DataError(f"dataset {cfg.name!r}: {cfg.path} lacks {', '.join(missing)}; "
                                f"{_put_files(cfg)}") from None
            raise exc from None

    def file(stem: str) -> Path:
        return folder / (stem + ".gz") if (folder / (stem + ".gz")).exists() else folder / stem

    parts = {}
    for split in ("train", "test"):
        img_path, lab_path = file(IDX_FILES[f"{split}_images"]), file(IDX_FILES[f"{split}_labels"])
        images, labels = read_idx(img_path, "images"), read_idx(lab_path, "labels")
        if len(images) != len(labels):
            raise DataError(
                f"{lab_path} has {len(labels)} labels but {img_path} has {len(images)} images; "
                "the files do not belong together, re-install the dataset"
            )
        if len(labels) and int(labels.max()) >= len(classes):
            raise DataError(
                f"{lab_path} has label {int(labels.max())} but {cfg.name!r} has {len(classes)} classes; "
                f"{_REDOWNLOAD}"
            )
        parts[split] = ImageSet(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))
    heads = tuple(parts[split].labels[:10].tolist() for split in ("train", "test"))
    other = next((name for name, first in IDX_FIRST_LABELS.items() if name != cfg.name and first == heads
                  and (len(parts["train"]), len(parts["test"])) == (60000, 10000)), None)
    if other is not None:
        raise DataError(f"{folder} holds {other}'s files (their labels are {other}'s), not {cfg.name}'s; use "
                        f"--dataset {other}, or point dataset.path at the {cfg.name} files")
    _check_class_order(cfg, classes)
    _check_idx_statistics(cfg.name, folder, parts["train"].images, mean, std)
    logger.info("loaded %s from %s: %d train, %d test", cfg.name, folder, len(parts["train"]), len(parts["test"]))
    return DataBundle(cfg.name, parts["train"], parts["test"], list(classes), mean, std, source=str(folder))


def _check_idx_statistics(name: str, folder: Path, images: torch.Tensor, mean: tuple[float, ...],
                          std: tuple[float, ...]) -> None:
    """Warn when the training images are clearly not ``name``'s (other IDX data, such as KMNIST or an own export):
    they would be recorded under its class names and normalised with its published mean/std. Checked once per
    process and folder, on the first :data:`IDX_STATS_SAMPLE` images of train files (before any train_per_class
    subset) of at least :data:`IDX_STATS_MIN_IMAGES` images, from a histogram of the uint8 values (no float copy)."""
    if len(images) < IDX_STATS_MIN_IMAGES or (name, folder) in _CHECKED_IDX:
        return
    _CHECKED_IDX.add((name, folder))
    counts = np.bincount(images[:IDX_STATS_SAMPLE].numpy().reshape(-1), minlength=256).astype(np.float64)
    values = np.arange(256) / 255
    found_mean = float(counts @ values / counts.sum())
    found_std = math.sqrt(max(0.0, float(counts @ (values - found_mean) ** 2 / counts.sum())))
    if abs(found_mean - mean[0]) <= IDX_STATS_TOLERANCE and abs(found_std - std[0]) <= IDX_STATS_TOLERANCE:
        return
    logger.warning("%s: the training images in %s have pixel mean %.3f and std %.3f, but %s's have %.4g and %.4g: "
                   "these are not %s's files, yet they get its class names and mean/std; load other IDX data as a "
                   "tensors file (ddkit.data.save_tensors) or an imagefolder, which compute both and take the class "
                   "names", name, folder, found_mean, found_std, name, mean[0], std[0], name)


@DATASETS.register("fashion-mnist", options=(), settings=("path",))
def load_fashion_mnist(cfg: DatasetConfig) -> DataBundle:
    """Fashion-MNIST (Xiao et al., 2017): 60k/10k grayscale 28x28 images of 10 clothing classes."""
    hint = (
        "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
        "set DDKIT_DATA (files in $DDKIT_DATA/fashion-mnist/) or dataset.path to a folder with the four IDX files "
        "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz)"
    )
    return _load_idx_dataset(cfg, FASHION_MNIST_CLASSES, (0.2861,), (0.3530,), hint)


@DATASETS.register("mnist", options=(), settings=("path",))
def load_mnist(cfg: DatasetConfig) -> DataBundle:
    """MNIST (LeCun et al., 1998): 60k/10k grayscale 28x28 handwritten digits."""
    hint = (
        "set DDKIT_DATA (files in $DDKIT_DATA/mnist/) or dataset.path to a folder with the four "
        "MNIST IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)"
    )
    return _load_idx_dataset(cfg, MNIST_CLASSES, (0.1307,), (0.3081,), hint)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (official python pickles)

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
    from numpy._core.numeric import _frombuffer as _np_frombuffer
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct  # type: ignore[no-redef]
    from numpy.core.numeric import _frombuffer as _np_frombuffer  # type: ignore[no-redef]

# The only globals a CIFAR batch (written by numpy 1.x or 2.x) refers to: rebuilding plain arrays.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _np_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _np_frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list."""


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str):
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"it references {module}.{name}") from None

    def persistent_load(self, pid):
        raise _RefusedGlobal("it uses a persistent id")


def safe_unpickle(data: bytes, where: str) -> object:
    """Unpickle ``data`` (named ``where`` in errors) allowing only plain numpy array helpers."""
    try:
        return _ArrayOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise DataError(
            f"{where} is not a plain CIFAR batch ({exc}); refusing to load it, use the official archive"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, struct.error) as exc:  # fmt: skip
        raise DataError(f"{where} is corrupt ({type(exc).__name__}: {_one_line(exc)}); {_REDOWNLOAD}") from None


CIFAR = {
    "cifar10": {
        "archive": "cifar-10-python.tar.gz",
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "labels_key": "labels",
        "names_key": "label_names",
        "num_classes": 10,
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
    },
    "cifar100": {
        "archive": "cifar-100-python.tar.gz",
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "labels_key": "fine_labels",
        "names_key": "fine_label_names",
        "num_classes": 100,
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
    },
}


def _read_tar_members(archive: Path, folder: str, wanted: list[str]) -> dict[str, bytes]:
    """Contents of ``folder/<name>`` for each wanted name, read in memory in one pass."""
    targets = {f"{folder}/{name}": name for name in wanted}
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, mode="r|*") as tar:
            for member in tar:
                key = member.name[2:] if member.name.startswith("./") else member.name
                if key not in targets:
                    continue
                if not member.isreg():
                    raise DataError(
                        f"{archive}: member {member.name} is not a regular file; "
                        "refusing it, use the official archive"
                    )
                if targets[key] in out:
                    raise DataError(f"{archive}: member {member.name} appears twice; use the official archive")
                fobj = tar.extractfile(member)
                assert fobj is not None  # regular files always have contents
                out[targets[key]] = fobj.read()
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{archive} is not a valid tar.gz archive or is truncated ({exc}); {_REDOWNLOAD}") from None
    except OSError as exc:
        raise DataError(f"cannot read {archive} ({exc}); check the file and its permissions") from None
    missing = [f"{folder}/{n}" for n in wanted if n not in out]
    if missing:
        raise DataError(f"{archive} lacks {', '.join(missing)}; use the official archive")
    return out


def _read_folder_files(folder: Path, wanted: list[str]) -> dict[str, bytes]:
    out = {}
    for name in wanted:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path} is missing or not a regular file; re-extract the official archive")
        try:
            out[name] = path.read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read {path} ({exc}); check the file and its permissions") from None
    return out


def _get(d: dict, key: str, where: str):
    """``d[b'key']`` (official py2 pickles) or ``d['key']`` (re-pickled under Python 3)."""
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataError(f"{where} has no {key!r} entry; {_REDOWNLOAD}")


def _cifar_batch(blob: bytes, where: str, labels_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = safe_unpickle(blob, where)
    if not isinstance(batch, dict):
        raise DataError(f"{where} holds a {type(batch).__name__}, expected a dict; {_REDOWNLOAD}")
    data = _get(batch, "data", where)
    labels = _get(batch, labels_key, where)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DataError(f"{where}: 'data' must be a uint8 array [N, 3072], found {type(data).__name__} {shape}; "
                        f"{_REDOWNLOAD}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {labels_key!r} is not a list of integers; {_REDOWNLOAD}") from None
    if labels.shape != (len(data),):
        raise DataError(f"{where} has {labels.size} labels for {len(data)} images; {_REDOWNLOAD}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{where} has labels outside [0, {num_classes - 1}]; {_REDOWNLOAD}")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_names(blob: bytes, where: str, names_key: str, num_classes: int) -> list[str]:
    meta = safe_unpickle(blob, where)
    if not isinstance(meta, dict):
        raise DataError(f"{where} holds a {type(meta).__name__}, expected a dict; {_REDOWNLOAD}")
    names = _get(meta, names_key, where)
    if not isinstance(names, list) or len(names) != num_classes or not all(isinstance(n, (str, bytes)) for n in names):
        raise DataError(f"{where}: {names_key!r} must list {num_classes} class names; {_REDOWNLOAD}")
    return [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]


def _load_cifar(cfg: DatasetConfig) -> DataBundle:
    _check_fixed_source(cfg)
    spec = CIFAR[cfg.name]
    files = [spec["meta"], *spec["train"], *spec["test"]]
    where_root: Path
    if cfg.path and Path(cfg.path).expanduser().is_file():
        where_root = Path(cfg.path).expanduser()
        blobs = _read_tar_members(where_root, spec["folder"], files)
        where = {n: f"{where_root}:{spec['folder']}/{n}" for n in files}
    else:
        hint = (
            f"set DDKIT_DATA (files in $DDKIT_DATA/{cfg.name}/) or dataset.path to {spec['archive']} "
            f"or to a folder holding it or the extracted {spec['folder']}/"
        )
        layouts = [files, [f"{spec['folder']}/{n}" for n in files], [spec["archive"]]]
        try:
            folder, layout = _locate(cfg, layouts, hint)
        except DataError:
            if cfg.path and Path(cfg.path).expanduser().is_dir():
                raise DataError(
                    f"dataset {cfg.name!r}: {cfg.path} holds neither {spec['archive']} nor a complete "
                    f"{spec['folder']}/ folder; point dataset.path at the archive or the extracted folder"
                ) from None
            raise
        if layout == 2:
            where_root = folder / spec["archive"]
            blobs = _read_tar_members(where_root, spec["folder"], files)
            where = {n: f"{where_root}:{spec['folder']}/{n}" for n in files}
        else:
            where_root = folder if layout == 0 else folder / spec["folder"]
            blobs = _read_folder_files(where_root, files)
            where = {n: str(where_root / n) for n in files}

    classes = _cifar_names(blobs[spec["meta"]], where[spec["meta"]], spec["names_key"], spec["num_classes"])
    parts = {}
    for split in ("train", "test"):
        batches = [_cifar_batch(blobs[n], where[n], spec["labels_key"], spec["num_classes"]) for n in spec[split]]
        images = np.concatenate([b[0] for b in batches])
        labels = np.concatenate([b[1] for b in batches])
        parts[split] = ImageSet(torch.from_numpy(images), torch.from_numpy(labels))
    _check_class_order(cfg, classes)
    logger.info("loaded %s from %s: %d train, %d test", cfg.name, where_root, len(parts["train"]), len(parts["test"]))
    return DataBundle(cfg.name, parts["train"], parts["test"], classes, spec["mean"], spec["std"],
                      source=str(where_root))


@DATASETS.register("cifar10", options=(), settings=("path",))
def load_cifar10(cfg: DatasetConfig) -> DataBundle:
    """CIFAR-10 (Krizhevsky, 2009): 50k/10k RGB 32x32 images of 10 classes."""
    return _load_cifar(cfg)


@DATASETS.register("cifar100", options=(), settings=("path",))
def load_cifar100(cfg: DatasetConfig) -> DataBundle:
    """CIFAR-100 (Krizhevsky, 2009): 50k/10k RGB 32x32 images of 100 fine classes."""
    return _load_cifar(cfg)


# ---------------------------------------------------------------------------------------------
# ImageFolder: root/<split>/<class>/<image>

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
_GRAY_MODES = {"1", "L", "LA"}
_WIDE_GRAY_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # 16-bit grayscale (PNG/TIFF): scaled to 8 bits


def _class_dirs(split_dir: Path) -> dict[str, Path]:
    found = {p.name: p for p in sorted(split_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    for name in found:  # before anything is decoded: the name is the class name every artifact records
        bad = bad_class_name(name)
        if bad is not None:
            raise DataError(f"class folder name {bad[0]} in {split_dir} {bad[1]}; rename it")
    return found


def _image_files(class_dir: Path, skipped: dict[str, int] | None = None) -> list[Path]:
    """The image files (by :data:`IMAGE_SUFFIXES`) under ``class_dir``, sorted. Hidden files and folders
    (.ipynb_checkpoints, ...) are not images of the class; symlinked folders are searched like the others, each
    folder once (a link to a folder searched already, such as a link loop, is skipped with a warning); a broken
    link named like an image is listed, for reading it to fail as a damaged file does. ``skipped`` counts the other
    files per suffix (lower case, ``""`` for none)."""
    found = []
    seen = set()
    for folder, dirs, files in os.walk(class_dir, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            logger.warning("imagefolder: skipping %s, a link to a folder searched already (a link loop, or two links "
                           "to one folder)", folder)
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # in order: the same link is the one skipped
        for name in files:
            path = Path(folder, name)
            if name.startswith(".") or not (path.is_file() or (path.is_symlink() and not path.exists())):
                continue
            suffix = path.suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                found.append(path)
            elif skipped is not None:
                skipped[suffix] = skipped.get(suffix, 0) + 1
    return sorted(found)


_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
#: what :func:`load_imagefolder` counts and records (``DataBundle.conversions``), in log order, with its words
CONVERSIONS = {
    "grayscale_to_rgb": "grayscale repeated to RGB",
    "palette_to_rgb": "palette expanded to RGB",
    "other_to_rgb": "other colour modes (CMYK, YCbCr, ...) converted to RGB",
    "16bit_to_8bit": "16-bit grayscale scaled to 8 bits",
    "alpha_dropped": "alpha dropped",
}


#: what :func:`_read_image` says of a file over PIL's pixel limit (up to twice it: PIL refuses larger ones)
OVER_PIXEL_LIMIT = "over_pixel_limit"


def _read_image(path: Path, size: int | None) -> tuple[np.ndarray, list[str]]:
    """``[H, W]`` uint8 for grayscale files, ``[H, W, 3]`` for everything else, and what was converted
    (keys of :data:`CONVERSIONS`; ``"transparent"`` too when the dropped alpha held transparent pixels;
    :data:`OVER_PIXEL_LIMIT` for a file over PIL's pixel limit, which PIL warns of in several lines of stderr:
    callers ignore that warning and log one line per load, see :func:`_decode_imagefolder`)."""
    from PIL import Image

    try:
        im = Image.open(path)  # refuses images over twice PIL's pixel limit (DecompressionBombError, below)
        with im:
            limit = Image.MAX_IMAGE_PIXELS
            done = [OVER_PIXEL_LIMIT] if limit and im.width * im.height > limit else []
            im.load()
            if im.mode in _WIDE_GRAY_MODES:  # convert("L") would clip, not scale, 16-bit values
                wide = np.asarray(im, dtype=np.float64)
                if wide.size and (wide.min() < 0 or wide.max() > 65535):
                    raise DataError(f"image {path} holds values outside 0-65535 (mode {im.mode}); "
                                    "store 8- or 16-bit images")
                im = Image.fromarray(np.rint(wide * (255 / 65535)).astype(np.uint8))
                done.append("16bit_to_8bit")
            if im.mode in ("P", "PA"):
                done.append("palette_to_rgb")
            elif im.mode not in _GRAY_MODES | _ALPHA_MODES | {"RGB"}:
                done.append("other_to_rgb")
            if im.mode in _ALPHA_MODES or "transparency" in im.info:  # an alpha band, or a colour key / palette alpha
                # (a palette's alpha warns in convert("RGB"))
                rgba = im if im.mode in _ALPHA_MODES else im.convert("RGBA")
                done.append("alpha_dropped")
                if rgba.getchannel("A").getextrema()[0] < 255:
                    done.append("transparent")
                im = rgba if im.mode in ("P", "PA") else im
            im = im.convert("L" if im.mode in _GRAY_MODES else "RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8), done
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # a file that cannot be opened (a broken link): its error without the path, said already
        why = exc.strerror if isinstance(exc, OSError) and exc.filename and exc.strerror else _one_line(exc)
        raise DataError(f"cannot read image {path} ({why}); replace or delete the file") from None


#: threads that decode image files (PIL releases the GIL while it decodes and resizes); 1 decodes in the caller
DECODE_WORKERS = min(8, os.cpu_count() or 1)


def _read_images(paths: list[Path], size: int | None) -> Iterator[tuple[np.ndarray, list[str]]]:
    """:func:`_read_image` of each path, in order, :data:`DECODE_WORKERS` threads decoding at most a few files
    ahead. The first unreadable file (in order) raises its DataError. Close the generator when done with it."""
    if DECODE_WORKERS <= 1:
        yield from (_read_image(path, size) for path in paths)
        return
    with ThreadPoolExecutor(DECODE_WORKERS, thread_name_prefix="ddkit-decode") as pool:
        ahead: deque[Future] = deque()
        try:
            for path in paths:
                ahead.append(pool.submit(_read_image, path, size))
                if len(ahead) > 4 * DECODE_WORKERS:  # bounded: decoded images wait only a short while
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:
            for future in ahead:  # an error, or the caller stopped: decode no further
                future.cancel()


def _split_files(cfg: DatasetConfig, split_dir: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """The image files of a split, class by class in label order, and their labels."""
    files: list[Path] = []
    labels: list[int] = []
    skipped: dict[str, int] = {}
    for label, name in enumerate(classes):
        found = _image_files(split_dir / name, skipped)
        if not found:
            raise DataError(
                f"class folder {split_dir / name} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); add "
                f"images, or remove the class folder {name!r} from both splits ({cfg.train_split}/ and "
                f"{cfg.test_split}/)" + (" and from dataset.classes" if cfg.classes is not None else "")
            )
        files += found
        labels += [label] * len(found)
    if skipped:
        said = ", ".join(f"{suffix or 'no suffix'}: {n}" for suffix, n in sorted(skipped.items()))
        logger.info("imagefolder %s: skipped %d files that are not %s images (%s)", split_dir, sum(skipped.values()),
                    "/".join(sorted(IMAGE_SUFFIXES)), said)
    return files, labels


def _imagefolder_classes(cfg: DatasetConfig, split_dirs: dict[str, Path]) -> list[str]:
    found = {split: _class_dirs(d) for split, d in split_dirs.items()}
    if cfg.classes is not None:
        classes = list(cfg.classes)
        dupes = sorted({c for c in classes if classes.count(c) > 1})
        if dupes:
            raise ConfigError(f"dataset.classes lists {dupes} more than once; list each class once")
        for split, dirs in found.items():
            missing = [c for c in classes if c not in dirs]
            if missing:
                raise DataError(
                    f"dataset.classes lists {missing} but {split_dirs[split]} has no such folders; "
                    "fix dataset.classes or add the folders"
                )
            extra = sorted(set(dirs) - set(classes))
            if extra:
                raise DataError(
                    f"{split_dirs[split]} has class folders {extra} not in dataset.classes; "
                    "add them to dataset.classes or remove the folders"
                )
        return classes
    train, test = (set(found[s]) for s in split_dirs)
    if train != test:
        raise DataError(
            f"class folders differ between {split_dirs['train']} and {split_dirs['test']} "
            f"(only in train: {ascii(sorted(train - test))}, only in test: {ascii(sorted(test - train))}; names "
            "as ascii(), so names that differ only in Unicode form show apart); give both splits the same class folders"
        )
    if not train:
        raise DataError(f"{split_dirs['train']} has no class folders; expected <split>/<class>/<image>")
    return sorted(train)


def _check_split_dirs(cfg: DatasetConfig, root: Path, split_dirs: dict[str, Path]) -> None:
    """Both split folders must exist. Two layouts that lack them are told apart, as their fix is another: class
    folders of images right under ``root`` (torchvision's ImageFolder layout, which has no held-out split), and a
    ``root`` that is a split folder itself (dataset.path one level too deep)."""
    missing = [split for split, d in split_dirs.items() if not d.is_dir()]
    if not missing:
        return
    full = root.resolve()
    if full.name in (cfg.train_split, cfg.test_split) and (full.parent / cfg.train_split).is_dir():
        parent = root.parent if root.name == full.name else full.parent  # as given, unless it ends in "." or ".."
        raise DataError(f"imagefolder root {root} is the {full.name}/ split folder itself, not the folder holding "
                        f"the splits; point dataset.path at {parent} (the folder holding {cfg.train_split}/)")
    flat = [name for name, d in _class_dirs(root).items()
            if d not in split_dirs.values() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.iterdir())]
    if flat:
        shown = ", ".join(flat[:3]) + (f", ... ({len(flat)} in all)" if len(flat) > 3 else "")
        lacks = " and ".join(f"{split_dirs[split].name}/" for split in missing)
        raise DataError(
            f"imagefolder root {root} has class folders of images ({shown}) but no {lacks} split "
            f"folder{'s' if len(missing) > 1 else ''}; ddkit needs root/{cfg.train_split}/<class>/ and "
            f"root/{cfg.test_split}/<class>/ (a held-out test split): move the class folders into "
            f"{root / cfg.train_split} and put held-out images of each class in {root / cfg.test_split}/<class>/"
        )
    split = missing[0]
    raise DataError(f"imagefolder has no {split} split folder {split_dirs[split]}; create it or set "
                    f"dataset.{split}_split")


@DATASETS.register("imagefolder", options=(), settings=SOURCE_SETTINGS)
def load_imagefolder(cfg: DatasetConfig) -> DataBundle:
    """Images in ``root/<train_split>/<class>/*`` and ``root/<test_split>/<class>/*``.

    Class folders are searched recursively (hidden files and folders skipped, symlinked folders followed, each
    folder once; the files of other suffixes are counted in one log line per split). Class order is
    ``dataset.classes`` when given (checked against both splits), else sorted folder names. Images
    become RGB, or single-channel when every file is grayscale; what that converted (grayscale
    repeated, palettes expanded, alpha dropped, ...) is logged once per split and recorded in
    ``DataBundle.conversions``. Sizes must agree unless ``dataset.image_size`` resizes them
    (bilinear). mean/std come from the whole train split.

    Files are decoded by :data:`DECODE_WORKERS` threads, in order, straight into one uint8 array per
    split. With ``train_per_class``/``test_per_class`` only the kept images are held (the ones
    :func:`~ddkit.data.base.per_class_subset` keeps), but every file is still read: mean/std and the
    conversions record cover them all.

    With ``dataset.decode_cache`` (the default) the decoded images are kept in ``$DDKIT_CACHE/imagefolder``
    (see :func:`_decode_cached`): a later load with the same files and settings, or another torchrun rank,
    memory-maps them instead of decoding every file again.
    """
    _check_no_options(cfg)
    if not cfg.path:
        raise ConfigError("dataset 'imagefolder' needs a root folder; set dataset.path=<root>")
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise DataError(f"imagefolder root {root} is not a folder; set dataset.path to root/<split>/<class>/<image>")
    split_dirs = {"train": root / cfg.train_split, "test": root / cfg.test_split}
    if split_dirs["train"].resolve() == split_dirs["test"].resolve():
        raise ConfigError(f"dataset.train_split and test_split both name {split_dirs['train']}, so accuracy would be "
                          f"measured on training images; set dataset.test_split to a held-out folder")
    _check_split_dirs(cfg, root, split_dirs)
    classes = _imagefolder_classes(cfg, split_dirs)
    listing = {split: _split_files(cfg, split_dir, classes) for split, split_dir in split_dirs.items()}
    if cfg.decode_cache:
        decoded = _decode_cached(cfg, root, split_dirs, classes, listing)
    else:
        decoded = _decode_imagefolder(cfg, split_dirs, classes, listing)
    bundle = decoded.bundle(classes, cfg.name, str(root))
    logger.info("loaded imagefolder %s: %d classes, %d train, %d test", root, len(classes), len(bundle.train),
                len(bundle.test))
    return bundle


@dataclasses.dataclass
class _Decoded:
    """An imagefolder decoded (what its cache entry holds): per split the kept images ``[N, C, H, W]`` uint8 and
    their int64 labels, mean/std of every training image, the conversions record (``DataBundle.conversions``)
    and the number of files read per split."""

    images: dict[str, np.ndarray]
    labels: dict[str, torch.Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    conversions: dict[str, dict[str, int]]
    files_read: dict[str, int]
    _bundle: DataBundle | None = dataclasses.field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.images.values()) + sum(t.numel() * 8 for t in self.labels.values())

    def bundle(self, classes: list[str], name: str = "imagefolder", source: str = "") -> DataBundle:
        """The images as the DataBundle that loading returns, made once: its fingerprint, hashed to check a cache
        entry or to record one, is remembered for the stages that ask for it. A later call gives the same bundle with
        its ``name`` and ``source`` set (neither is part of the fingerprint)."""
        if self._bundle is None:
            parts = {split: ImageSet(torch.from_numpy(self.images[split]), self.labels[split])
                     for split in ("train", "test")}
            self._bundle = DataBundle(name, parts["train"], parts["test"], list(classes), self.mean, self.std,
                                      source=source, conversions=self.conversions)
        self._bundle.name, self._bundle.source = name, source
        return self._bundle


def _decode_imagefolder(cfg: DatasetConfig, split_dirs: dict[str, Path], classes: list[str],
                        listing: dict[str, tuple[list[Path], list[int]]]) -> _Decoded:
    """Decode every file of ``listing`` (per split, :func:`_split_files`' files and labels); logs the conversions."""
    from PIL import Image

    images: dict[str, np.ndarray] = {}  # per split, the kept images [N, C, H, W] (C 1 until a colour image comes)
    kept_labels: dict[str, torch.Tensor] = {}
    # split -> CONVERSIONS key (or "transparent") -> files
    converted: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    gray_files = {"train": 0, "test": 0}  # files read as grayscale
    files_read = {"train": 0, "test": 0}
    first: tuple[Path, tuple[int, int]] | None = None
    colour = False  # whether any file so far (either split) is in colour: then every image is RGB
    # mean/std of every training image (kept or not), by channels: 1 and 3 while all images so far are grayscale
    stats: dict[int, ChannelSums] = {}
    subsets = {"train": (cfg.train_per_class, cfg.subset_seed), "test": (cfg.test_per_class, cfg.subset_seed + 1)}
    large: list[Path] = []  # files over PIL's pixel limit
    with warnings.catch_warnings():
        # PIL warns (on stderr, several lines, per image) of images between its pixel limit and twice that: a large
        # photo is read and resized like any other, and said once per load below (warning filters are
        # process-wide, so the decoding threads see this one)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for split in split_dirs:
            files, labels = listing[split]
            files_read[split] = len(files)
            # train_per_class/test_per_class: the images load_dataset's per_class_subset would keep, chosen from the
            # labels, so that only they are held. Every file is still read: mean/std and the conversions record
            # cover them all, as they did when the subset was taken after loading
            kept_labels[split] = torch.tensor(labels)
            slot = np.arange(len(files))  # file -> its row in images[split], -1 if not kept
            per_class, seed = subsets[split]
            if per_class is not None:
                keep = per_class_index(kept_labels[split], len(classes), per_class, seed)
                kept_labels[split] = kept_labels[split][keep]
                slot[:] = -1
                slot[keep.numpy()] = np.arange(len(keep))
            with closing(_read_images(files, cfg.image_size)) as decoded:
                for path, row, (arr, done) in zip(files, slot, decoded):
                    for what in done:
                        if what == OVER_PIXEL_LIMIT:
                            large.append(path)
                        else:
                            converted[split][what] = converted[split].get(what, 0) + 1
                    hw = arr.shape[:2]
                    if first is None:
                        first = (path, hw)
                    elif hw != first[1]:
                        raise DataError(
                            f"image {path} is {hw[1]}x{hw[0]} but {first[0]} is {first[1][1]}x{first[1][0]}; "
                            "set dataset.image_size to resize all images to one size"
                        )
                    gray_files[split] += arr.ndim == 2
                    colour = colour or arr.ndim == 3
                    chw = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
                    if split not in images:
                        images[split] = np.empty((len(kept_labels[split]), 3 if colour else 1, *hw), np.uint8)
                    elif colour and images[split].shape[1] == 1:  # the first colour image: RGB from now on
                        images[split] = np.repeat(images[split], 3, axis=1)
                    if row >= 0:
                        images[split][row] = chw
                    if split == "train":
                        if not stats:
                            stats = {c: ChannelSums((c, *hw), torch.uint8, len(files)) for c in (1, 3)}
                        if colour:
                            stats.pop(1, None)
                        for channels, sums in stats.items():
                            sums.add(np.broadcast_to(chw, (channels, *hw))[None])

    if large:
        _log_large(large)
    for split in ("train", "test"):
        if colour and images[split].shape[1] == 1:
            images[split] = np.repeat(images[split], 3, axis=1)
        if colour and gray_files[split]:
            converted[split]["grayscale_to_rgb"] = gray_files[split]
        _log_conversions(split_dirs[split], converted[split], files_read[split])
    mean, std = stats[3 if colour else 1].mean_std(name=f"the training images in {split_dirs['train']}",
                                                   fix="check the images (a folder of blank images?)")
    conversions = {split: {k: counts[k] for k in [*CONVERSIONS, "transparent"] if k in counts}
                   for split, counts in converted.items() if counts}
    return _Decoded(images, kept_labels, mean, std, conversions, files_read)


def _log_large(files: list[Path]) -> None:
    """One warning for the files over PIL's pixel limit that a load decoded, naming the largest: each takes
    memory and time of its full size to decode (up to DECODE_WORKERS at once), however small it is on disk."""
    from PIL import Image

    from ddkit.cache import size_text

    def pixels(path: Path) -> tuple[int, int]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # the header only
                return im.size

    sizes = {path: pixels(path) for path in files}
    path = max(files, key=lambda p: sizes[p][0] * sizes[p][1])
    (w, h), others = sizes[path], len(files) - 1
    others_text = f" ({others} other file{'s' if others > 1 else ''} too)" if others else ""
    logger.warning("imagefolder: %s is %dx%d = %s pixels (%s on disk), over PIL's decompression-bomb limit of %s "
                   "pixels%s; decoded anyway, which takes memory and time of its full size: shrink or remove such "
                   "files if they are not meant to be there", path, w, h, f"{w * h:,}", size_text(path.stat().st_size),
                   f"{Image.MAX_IMAGE_PIXELS:,}", others_text)


def _log_conversions(split_dir: Path, counts: dict[str, int], total: int) -> None:
    """One line per split saying what was converted: info, or a warning when transparency was lost."""
    if not counts:
        return
    said = ", ".join(f"{words}: {counts[k]}" for k, words in CONVERSIONS.items() if k in counts)
    if counts.get("transparent"):
        logger.warning("imagefolder %s (%d images): %s (%d with transparent pixels, which now show the colour stored "
                       "under them; flatten them onto a background first to choose it)", split_dir, total, said,
                       counts["transparent"])
    else:
        logger.info("imagefolder %s (%d images): %s", split_dir, total, said)


# ---------------------------------------------------------------------------------------------
# the decoded-image cache of imagefolder: $DDKIT_CACHE/imagefolder/<settings>-<files>/

DECODED_KIND = "imagefolder-decoded"


def _decoded_key(cfg: DatasetConfig, root: Path, classes: list[str],
                 listing: dict[str, tuple[list[Path], list[int]]]) -> tuple[str, str, dict]:
    """``(slot, key, settings)`` of the cache entry of this load: ``slot`` hashes the settings that decide what
    is decoded (resolved root, split names, classes in order, image_size, the per-class subset, the schema),
    ``key`` the slot, the decoding libraries' versions and every file's path, size, mtime_ns, inode and ctime_ns
    (stat only: no file is read). A changed, added or removed file gives a new key in the same slot, as does one
    replaced by another of the same size and mtime (``cp -p``, ``rsync -a``, ``tar -x``: none sets the ctime)."""
    settings = {"schema": DECODED_SCHEMA, "root": str(root.resolve()), "splits": [cfg.train_split, cfg.test_split],
                "classes": list(classes), "image_size": cfg.image_size, "train_per_class": cfg.train_per_class,
                "test_per_class": cfg.test_per_class, "subset_seed": cfg.subset_seed}
    slot = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    h = hashlib.sha256(slot.encode())
    h.update(json.dumps(_decoding_versions(), sort_keys=True).encode())
    skip = len(str(root / "_")) - 1  # root's part of a file's path (none for "."): cheaper than relative_to
    for split in ("train", "test"):
        files, _ = listing[split]
        h.update(f"{split} {len(files)}\n".encode())
        for path in files:
            try:
                st = path.stat()
            except OSError as exc:
                raise DataError(f"cannot read image {path} ({exc.strerror}); replace or delete the file") from None
            stamp = f"\0{st.st_size} {st.st_mtime_ns} {st.st_ino} {st.st_ctime_ns}\n"
            h.update(os.fsencode(str(path)[skip:]) + stamp.encode())
    return slot, h.hexdigest()[:16], settings


def _decoding_versions() -> dict[str, str]:
    """The versions of the libraries that decode (Pillow) and sum (numpy, torch), which the cache key pins (ddkit's
    own changes to the decoding bump :data:`DECODED_SCHEMA`)."""
    import PIL

    return {"pillow": PIL.__version__, "numpy": np.__version__, "torch": str(torch.__version__)}


def _decode_cached(cfg: DatasetConfig, root: Path, split_dirs: dict[str, Path], classes: list[str],
                   listing: dict[str, tuple[list[Path], list[int]]]) -> _Decoded:
    """:func:`_decode_imagefolder` through the cache: the entry of these files and settings, memory-mapped, when
    it exists; else decode, write the entry and map it. The images are mapped copy-on-write: every process that
    maps an entry (torchrun ranks, later runs) shares the file's pages, and a write into the images stays private
    to the process (the file never changes).

    One process builds an entry (under :func:`build_lock`; every rank takes the lock on its own, so the first
    decodes and the others wait, then map its result). A damaged entry is decoded again, with a warning; an
    entry that cannot be written (no cache folder, a read-only one, too little free space) leaves the images
    decoded in memory, with a warning; an entry in a read-only folder is mapped all the same. Writing an entry
    removes the entries of earlier states of the same files (same slot) that this host wrote, or that are a day
    old (nodes sharing the cache folder may map their own); each load removes the temporary folders of killed
    decodes of the slot (see :func:`sweep_leftovers`)."""
    slot, key, settings = _decoded_key(cfg, root, classes, listing)
    folder = cache_dir("imagefolder")
    entry = folder / f"{slot}-{key}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _uncached(cfg, split_dirs, classes, listing, f"cannot create the decoded-image cache {folder}", exc)
    # each rank on its own: the ranks of one machine, or of nodes sharing the cache, decode once between them
    with ddist.single_process(), contextlib.ExitStack() as stack:
        try:
            stack.enter_context(build_lock(entry))
        except OSError as exc:  # no lock to be had there: use the entry as it is, or do without the cache
            found = _cached_entry(entry, key)
            if found is not None:
                return _cache_hit(entry, found, split_dirs)
            return _uncached(cfg, split_dirs, classes, listing, f"cannot lock the decoded-image cache {entry}", exc)
        _sweep_killed(folder, slot)
        found = _cached_entry(entry, key)
        if found is not None:
            return _cache_hit(entry, found, split_dirs)
        if not os.access(folder, os.W_OK):
            return _uncached(cfg, split_dirs, classes, listing, f"cannot write the decoded-image cache {folder}",
                             OSError(errno.EACCES, "not writable"))
        start = time.perf_counter()
        decoded = _decode_imagefolder(cfg, split_dirs, classes, listing)
        seconds = time.perf_counter() - start
        # what the entry records, and data that is no DataBundle (one class, ...) refused before it is written
        fingerprint = decoded.bundle(classes, cfg.name, str(root)).fingerprint
        try:
            need, free = decoded.nbytes + _free_margin(decoded.nbytes), shutil.disk_usage(folder).free
            if free < need:
                logger.warning("not writing the decoded-image cache %s: it needs %s (with %s left free) and %s is "
                               "free; the images stay decoded in memory (free some space, set DDKIT_CACHE to "
                               "another folder, or dataset.decode_cache=false)", entry, _size_text(need),
                               _size_text(need - decoded.nbytes), _size_text(free))
                return decoded
            _write_entry(entry, key, settings, decoded, seconds, fingerprint)
            # the file's pages, shared, for the decoded copy in this process (hashed: they are what was decoded)
            mapped = _read_entry(entry, key)
        except (OSError, ValueError, KeyError, TypeError, DDKitError) as exc:
            logger.warning("cannot write the decoded-image cache %s (%s); the images stay decoded in memory",
                           entry, _one_line(exc))
            return decoded
        _remove_old_states(folder, slot, entry)
    logger.info("decoded images cached in %s (%s, decoded in %.1f s; dataset.decode_cache=false decodes every load)",
                entry, _size_text(mapped.nbytes), seconds)
    return mapped


def _uncached(cfg: DatasetConfig, split_dirs: dict[str, Path], classes: list[str],
              listing: dict[str, tuple[list[Path], list[int]]], problem: str, exc: OSError) -> _Decoded:
    logger.warning("%s (%s); decoding every file (set DDKIT_CACHE to a writable folder, or "
                   "dataset.decode_cache=false)", problem, exc.strerror or exc)
    return _decode_imagefolder(cfg, split_dirs, classes, listing)


def _cache_hit(entry: Path, found: _Decoded, split_dirs: dict[str, Path]) -> _Decoded:
    logger.info("decoded images from the cache %s (%s)", entry, _size_text(found.nbytes))
    for split, split_dir in split_dirs.items():
        _log_conversions(split_dir, found.conversions.get(split, {}), found.files_read[split])
    return found


def _free_margin(nbytes: int) -> int:
    """The free space an entry of ``nbytes`` must leave on its disk: a tenth of it, and at least 1 GiB (what the
    runs and checkpoints written beside the cache need)."""
    return max(nbytes // 10, 2**30)


#: an entry of an earlier state of the files that another host wrote is removed only once it is this old (seconds):
#: that host may map it still, and deleting mapped files on NFS breaks the mapping (SIGBUS, ESTALE) there
FOREIGN_ENTRY_AGE = 24 * 3600


def _sweep_killed(folder: Path, slot: str) -> None:
    """Remove the temporary folders that killed decodes of ``slot`` left in ``folder`` (of any key: the files may
    have changed since), as :func:`sweep_leftovers` does: only dead processes' of this host."""
    names = set()
    with contextlib.suppress(OSError):
        for path in folder.iterdir():
            found = re.fullmatch(rf"\.({slot}-[0-9a-f]+)\.(?:tmp|old)-.+", path.name)
            if found is not None:
                names.add(found[1])
    for name in sorted(names):
        sweep_leftovers(folder / name)


def _remove_old_states(folder: Path, slot: str, entry: Path) -> None:
    """Remove the entries of ``slot`` besides ``entry`` (earlier states of the same files, never used again here)
    that this host wrote or that are :data:`FOREIGN_ENTRY_AGE` old, and the lock files of gone entries."""
    host = socket.gethostname()
    for old in folder.glob(f"{slot}-*"):
        if old == entry or not old.is_dir():
            continue
        try:
            ours = json.loads((old / "manifest.json").read_text()).get("host") == host
        except (OSError, ValueError, AttributeError, RecursionError):
            ours = False
        with contextlib.suppress(OSError):
            if ours or time.time() - old.stat().st_mtime > FOREIGN_ENTRY_AGE:
                shutil.rmtree(old, ignore_errors=True)
                logger.info("removed the decoded-image cache %s of files that have changed since", old)
    for lock in folder.glob(f".{slot}-*.lock"):
        name = lock.name[1:-len(".lock")]
        if name != entry.name and not (folder / name).exists():
            remove_unused_lock(folder / name)


def _size_text(n: int) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB"


def _cached_entry(entry: Path, key: str) -> _Decoded | None:
    """The cache entry mapped, or None when there is none; a damaged one is removed (with a warning)."""
    if not entry.exists():
        return None
    try:
        return _read_entry(entry, key)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.warning("the decoded-image cache %s is damaged (%s); removing it and decoding the images again",
                       entry, _one_line(exc))
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _read_entry(entry: Path, key: str) -> _Decoded:
    """Map an entry written by :func:`_write_entry`; ValueError (or OSError, KeyError) when it is damaged: a
    manifest that is not this schema's and key's, a mean or std that normalising cannot use (not finite, a std
    of 0), arrays of other shapes or sizes than it records, or images and labels whose fingerprint is not the one it
    records (a changed byte; an entry of a ddkit that recorded none is decoded again too). The check hashes the
    images once, as loading does anyway: the returned entry's :meth:`_Decoded.bundle` remembers the fingerprint."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
    except RecursionError:
        raise ValueError("its manifest.json nests arrays or objects too deep") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"its manifest.json holds a JSON {type(manifest).__name__}, not an object")
    if (manifest.get("schema_version"), manifest.get("kind"), manifest.get("key")) != (DECODED_SCHEMA, DECODED_KIND,
                                                                                      key):
        raise ValueError("its manifest.json is not an entry of this key")
    images, labels = {}, {}
    for split in ("train", "test"):
        shape = tuple(manifest["shapes"][split])
        path = entry / f"{split}_images.npy"
        arr = np.load(path, mmap_mode="c")  # raises ValueError when the file is shorter than its header says
        if (arr.dtype != np.uint8 or len(shape) != 4 or arr.shape != shape
                or arr.offset + arr.nbytes != path.stat().st_size):
            raise ValueError(f"{path.name} holds {arr.dtype} {arr.shape} in {path.stat().st_size} bytes, "
                             f"not uint8 {shape}")
        lab = np.load(entry / f"{split}_labels.npy")
        if lab.dtype != np.int64 or lab.shape != shape[:1]:
            raise ValueError(f"{split}_labels.npy holds {lab.dtype} {lab.shape}, not int64 {shape[:1]}")
        images[split], labels[split] = np.asarray(arr), torch.from_numpy(lab)
    try:  # what normalising the images divides by: finite, the std positive, one per channel
        check_normalisation({"dataset": {"mean": manifest.get("mean"), "std": manifest.get("std")}},
                            images["train"].shape[1], entry, DECODED_KIND)
    except DDKitError as exc:
        raise ValueError(str(exc).split("; ")[0]) from None
    if not (isinstance(manifest.get("conversions"), dict)
            and all(isinstance(counts, dict) for counts in manifest["conversions"].values())):
        raise ValueError(f"its manifest.json holds conversions {short_repr(manifest.get('conversions'))}, not a "
                         "mapping")
    conversions = {split: {k: int(n) for k, n in counts.items()} for split, counts in manifest["conversions"].items()}
    found = _Decoded(images, labels, tuple(float(v) for v in manifest["mean"]),
                     tuple(float(v) for v in manifest["std"]), conversions,
                     {split: int(manifest["files_read"][split]) for split in ("train", "test")})
    recorded = manifest.get("fingerprint")
    if not isinstance(recorded, str):
        raise ValueError("its manifest.json records no fingerprint of the images")
    try:
        fingerprint = found.bundle(manifest["settings"]["classes"]).fingerprint
    except DDKitError as exc:
        raise ValueError(_one_line(exc)) from None
    if fingerprint != recorded:
        raise ValueError(f"its images and labels have fingerprint {fingerprint}, not the {recorded} it was written "
                         "with")
    return found


def _write_entry(entry: Path, key: str, settings: dict, decoded: _Decoded, seconds: float, fingerprint: str) -> None:
    """Write ``decoded``, whose DataBundle has ``fingerprint``, as the cache entry ``entry``: a temporary folder renamed
    into place (see :func:`atomic_dir`), each file on the disk before the rename, so that an entry is whole or
    absent."""
    from ddkit import __version__

    with atomic_dir(entry, accept=lambda _: True) as tmp:
        for split in ("train", "test"):
            _write_synced(tmp / f"{split}_images.npy", decoded.images[split])
            _write_synced(tmp / f"{split}_labels.npy", decoded.labels[split].numpy())
        manifest = {"schema_version": DECODED_SCHEMA, "kind": DECODED_KIND, "key": key, "settings": settings,
                    "host": socket.gethostname(),
                    "shapes": {split: list(a.shape) for split, a in decoded.images.items()},
                    "mean": list(decoded.mean), "std": list(decoded.std), "conversions": decoded.conversions,
                    # the data's fingerprint (DataBundle.fingerprint), which every load of the entry checks
                    "fingerprint": fingerprint,
                    "files_read": decoded.files_read, "bytes": decoded.nbytes, "decode_seconds": round(seconds, 3),
                    "versions": {"ddkit": __version__, **_decoding_versions()}}
        _write_synced(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())


def _write_synced(path: Path, data: np.ndarray | bytes) -> None:
    """A new read-only file of ``data`` (an array as ``.npy``), flushed to the disk. Read-only: processes map the
    arrays, and a file changed in place (not replaced) would change their images under them."""
    with open(path, "xb") as f:
        if isinstance(data, bytes):
            f.write(data)
        else:
            np.save(f, data, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o444)


# ---------------------------------------------------------------------------------------------
# tensors: one .safetensors or .pt file

TENSOR_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{path} is not a valid safetensors file ({_one_line(exc)}); re-create the file") from None
    classes = None
    if "classes" in metadata:
        try:
            classes = json.loads(metadata["classes"])
        except (ValueError, RecursionError) as exc:  # not JSON, a 5000-digit number, arrays nested too deep
            raise DataError(
                f"{path}: metadata 'classes' is not valid JSON ({exc.__class__.__name__}); store "
                "json.dumps(list_of_names)"
            ) from None
    return tensors, classes


def _read_pt(path: Path) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    try:
        obj = quiet_torch_load(path)
    except pickle.UnpicklingError as exc:
        if not zipfile.is_zipfile(path):  # no torch.save archive at all: its bytes are no pickle either
            raise DataError(f"{path} is not a readable torch file (neither a torch.save archive nor a pickle); "
                            "re-create it with torch.save") from None
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        why = _one_line(exc, 160) if refused is None else f"unsupported global {refused[1]}"
        fix = ("numpy arrays are not tensors: save torch.from_numpy(a)" if refused and refused[1].startswith("numpy")
               else "save only a dict of tensors plus an optional list of class names")
        raise DataError(f"{path} holds objects that safe (weights_only) loading refuses ({why}); {fix}") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError, ImportError) as exc:
        raise DataError(f"{path} is not a readable torch file ({_one_line(exc)}); re-create it "
                        "with torch.save") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors; save a dict with "
                        f"{list(TENSOR_KEYS)}")
    classes = obj.get("classes")
    tensors = {k: v for k, v in obj.items() if k != "classes"}
    return tensors, classes


def _tensor_images(t: object, key: str, path: Path) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise DataError(f"{path}: {key} is a {type(t).__name__}, expected a tensor")
    if t.dim() != 4:
        raise DataError(f"{path}: {key} has shape {tuple(t.shape)}, expected [N, C, H, W]; reshape it")
    if t.shape[-1] in (1, 3, 4) and t.shape[1] > 4 and t.shape[2] > 4:  # [N, 12, 12, 3]: channels last
        # (12 channels of 12x3 images is no image data; a shape with 1-4 in two places, [N, 3, 32, 3],
        # [N, 4, 4, 4] or 8-channel 4x4 maps [N, 8, 4, 4], stays read as [N, C, H, W])
        raise DataError(f"{path}: {key} has shape {tuple(t.shape)}, which looks like [N, H, W, C] (channels last) "
                        f"but is read as [N, C, H, W]; save images.permute(0, 3, 1, 2) instead")
    if t.dtype == torch.uint8:
        # only 0s and 1s: float 0..1 images cast with .byte() (or masks), which read as near-black pixels of 0 and
        # 1/255. Train images only, as a few test images may well be that dark (all 0s: a std of 0, refused below)
        if key == "train_images" and t.numel() and int(t.max()) == 1:
            raise DataError(f"{path}: uint8 {key} hold only 0s and 1s (of 0..255), which read as black pixels; "
                            "store them as float 0..1 or multiply them by 255")
        return t.contiguous()
    if not t.is_floating_point():
        raise DataError(f"{path}: {key} has dtype {t.dtype}; store uint8 0..255 or float 0..1 images")
    t = t.float().contiguous()
    if t.numel() and not torch.isfinite(t).all():
        raise DataError(f"{path}: float {key} hold NaN or infinite pixels; give finite pixels in [0, 1]")
    if t.numel() and (t.min() < 0 or t.max() > 1):
        low, high = float(t.min()), float(t.max())
        # 0..255 floats are 8-bit pixels; other ranges (a distilled set's optimised pixels) are no image data
        fix = "divide by 255 or store uint8" if low >= 0 and high > 2 else "clamp them to [0, 1]"
        raise DataError(f"{path}: float {key} must lie in [0, 1], found [{low:.4g}, {high:.4g}]; {fix}")
    return t


def _tensor_labels(t: object, key: str, path: Path) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise DataError(f"{path}: {key} is a {type(t).__name__}, expected a tensor")
    if t.dim() == 2 and t.shape[1] > 1 and t.shape[0] > 1:  # a row per image (one-hot, scores): not flatten
        raise DataError(f"{path}: {key} has shape {tuple(t.shape)}, expected [N] class indices; store "
                        f"{key}.argmax(1) for one-hot or score rows")
    if t.dim() != 1:
        raise DataError(f"{path}: {key} has shape {tuple(t.shape)}, expected [N]; flatten it")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise DataError(f"{path}: {key} has dtype {t.dtype}; store integer class indices")
    t = t.long()
    if t.numel() and t.min() < 0:
        raise DataError(f"{path}: {key} has negative labels; store class indices 0..K-1")
    return t


def _tensor_norm(tensors: dict, channels: int, path: Path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    if "mean" not in tensors and "std" not in tensors:
        return None
    if "mean" not in tensors or "std" not in tensors:
        raise DataError(f"{path} has only one of mean/std; store both or neither (then they are computed)")
    out = []
    for key in ("mean", "std"):
        t = tensors[key]
        if not isinstance(t, torch.Tensor) or t.numel() != channels or not t.is_floating_point():
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise DataError(f"{path}: {key} must be a float tensor of {channels} values (one per channel), "
                            f"found {shape}")
        out.append(tuple(float(v) for v in t.flatten()))
    check_mean_std(out[0], out[1], str(path), "store the training images' mean and std, or neither mean nor std "
                                              "(then they are computed)")
    return out[0], out[1]


def _label_set(labels: list[int]) -> str:
    """``{3, 7}``; a long set as its first and last values and its size."""
    if len(labels) <= 8:
        return "{" + ", ".join(map(str, labels)) + "}"
    return "{" + ", ".join(map(str, labels[:5])) + f", ..., {labels[-1]}}} ({len(labels)} values)"


def _labels_not_0_to_k(path: Path, train: list[int], test: list[int]) -> None:
    """Without 'classes' the labels name the classes 0..K-1, each of which needs training images."""
    test_only = sorted(set(test) - set(train))
    found = (f"train_labels hold {_label_set(train)}"
             + (f" and test_labels also {_label_set(test_only)}" if test_only else ""))
    fixes = []
    if test_only:  # first: a remap of labels that still include them would keep them
        fixes.append("drop the test images whose labels no training image has")
    if train != list(range(len(train))):
        fixes.append("remap the labels to 0..K-1 (torch.unique(labels, return_inverse=True)[1] over the train and test "
                     "labels together)")
    raise DataError(f"{path}: {found}, but without 'classes' the labels must be 0..K-1, each with training images; "
                    f"{', then '.join(fixes)}")


@DATASETS.register("tensors", options=(), settings=("path",))
def load_tensors(cfg: DatasetConfig) -> DataBundle:
    """Train/test tensors from one ``.safetensors`` or ``.pt`` file (see module docs for keys).

    Class names: ``classes`` (a list of str) in a ``.pt`` dict, or JSON in the safetensors metadata
    field ``classes``; default ``"0".."K-1"``. ``mean``/``std`` tensors are optional.
    """
    _check_fixed_source(cfg)
    if not cfg.path:
        raise ConfigError("dataset 'tensors' needs a file; set dataset.path=<file.safetensors or file.pt>")
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"tensors file {path} {what}; set dataset.path to a .safetensors or .pt file")
    if path.suffix == ".safetensors":
        tensors, classes = _read_safetensors(path)
    elif path.suffix in (".pt", ".pth"):
        tensors, classes = _read_pt(path)
    else:
        raise DataError(f"tensors file {path} has suffix {path.suffix!r}; use a .safetensors or .pt file")

    missing = [k for k in TENSOR_KEYS if k not in tensors]
    if missing:
        raise DataError(
            f"{path} lacks {missing}; a tensors file needs {list(TENSOR_KEYS)} "
            "(optional: mean, std, classes)"
        )
    extra = sorted(set(tensors) - set(TENSOR_KEYS) - {"mean", "std"})
    if extra:
        logger.warning("%s: ignoring unknown entries %s", path, extra)
    parts = {}
    for split in ("train", "test"):
        images = _tensor_images(tensors[f"{split}_images"], f"{split}_images", path)
        labels = _tensor_labels(tensors[f"{split}_labels"], f"{split}_labels", path)
        if len(images) != len(labels):
            raise DataError(f"{path}: {split}_images has {len(images)} images but {split}_labels has "
                            f"{len(labels)} labels")
        parts[split] = ImageSet(images, labels)

    top = max((int(p.labels.max()) for p in parts.values() if len(p)), default=-1)
    if classes is None:
        seen = torch.unique(parts["train"].labels).tolist()
        if len(seen) < top + 1:  # labels {3, 7} or a stray 255, 10**6: name them, never build top + 1 names
            _labels_not_0_to_k(path, seen, torch.unique(parts["test"].labels).tolist())
        classes = [str(c) for c in range(top + 1)]
    elif not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{path}: 'classes' must be a list of str, found {type(classes).__name__}")
    elif len(set(classes)) != len(classes):
        raise DataError(f"{path}: 'classes' has duplicate names; give each class a unique name")
    elif top >= len(classes):
        raise DataError(f"{path}: labels go up to {top} but 'classes' names only {len(classes)} classes; "
                        "list every class")
    bad = next(filter(None, map(bad_class_name, classes)), None)
    if bad is not None:
        raise DataError(f"{path}: class name {bad[0]} in 'classes' {bad[1]}; rename it")
    _check_class_order(cfg, classes)

    if 0 in parts["train"].images.shape[1:]:
        raise DataError(f"{path}: images have shape {list(parts['train'].images.shape[1:])} (C, H, W); store images "
                        "as [N, C, H, W] with C, H and W >= 1")
    check_train_classes(parts["train"], classes, str(path), "check the labels (train_labels, test_labels), or drop "
                        "each such class from 'classes'")
    norm = _tensor_norm(tensors, parts["train"].images.shape[1], path)
    mean, std = norm if norm is not None else channel_stats(
        parts["train"].images, name=f"train_images in {path}",
        fix="store mean and std in the file to give them explicitly, or check the images")
    logger.info("loaded tensors %s: %d train, %d test", path, len(parts["train"]), len(parts["test"]))
    return DataBundle(cfg.name, parts["train"], parts["test"], list(classes), mean, std, source=str(path))


@cpu_default_device()
def save_tensors(data: DataBundle, path: str | Path) -> DatasetConfig:
    """Write ``data`` (a bundle built by hand, or any loaded one) as a file the ``tensors`` source reads,
    and return the :class:`DatasetConfig` that loads it: the pipeline's stages record that config, so a
    set made from the data evaluates from it later. A loaded bundle keeps the config it was loaded with
    (``distill`` refuses it paired with the returned one): distil ``load_dataset`` of the returned config.
    ``path`` ends in ``.safetensors``; written atomically, holding :data:`TENSOR_KEYS`, ``mean``/``std``
    (float64, as given) and the class names (metadata). Images are kept as uint8 or stored as float32 (the
    source's dtypes), labels as int64, so ``load_dataset`` of the result has ``data``'s fingerprint when its
    tensors had those dtypes."""
    from ddkit.artifacts import save_tensors as write_tensors

    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise ConfigError(f"save_tensors writes a .safetensors file, got {str(path)!r}; give a path ending in "
                          ".safetensors")
    tensors = {}
    for split in ("train", "test"):
        part = getattr(data, split)
        images = part.images if part.images.dtype == torch.uint8 else part.images.float()
        if images.dtype != torch.uint8 and images.numel() and not (images.min() >= 0 and images.max() <= 1):
            raise DataError(f"{split} images hold pixels outside [0, 1] ([{float(images.min()):.4g}, "
                            f"{float(images.max()):.4g}]), which the tensors source refuses; scale them to 0..1")
        tensors[f"{split}_images"], tensors[f"{split}_labels"] = images, part.labels.long()
    # safetensors refuses tensors that share memory (one ImageSet as both splits, or views of one tensor):
    # each is written from its own contiguous copy then, which changes no value
    storages = [t.untyped_storage().data_ptr() for t in tensors.values()]
    if len(set(storages)) < len(storages):
        tensors = {k: t.contiguous().clone() for k, t in tensors.items()}
    tensors["mean"] = torch.tensor(data.mean, dtype=torch.float64)
    tensors["std"] = torch.tensor(data.std, dtype=torch.float64)
    write_tensors(path, tensors, metadata={"classes": json.dumps(list(data.classes))})
    logger.info("saved %s (%d train, %d test images) to %s", data.name, len(data.train), len(data.test), path)
    return DatasetConfig(name="tensors", path=str(path.absolute()))
