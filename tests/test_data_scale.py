"""Real data at scale: what loading holds, copies and scans, and that the results keep their bits.

Each test compares with the code it replaced (copied here as ``old_*``) and asserts on what is held or
passed around (allocations, hashed buffers, tensor ops), never on time.
"""

from __future__ import annotations

import hashlib
import tracemalloc
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from ddkit.data import base, load_dataset, sources
from ddkit.data.base import DataBundle, ImageSet, class_indices, per_class_subset
from ddkit.errors import DataError
from ddkit.methods.random import stratified_indices

# ------------------------------------------------------------------------------------------------
# the code replaced, as it was


def old_channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].to(torch.float64) / scale
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = images.numel() // c
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0.0).sqrt()
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def old_load_imagefolder(root: Path, size: int) -> tuple[ImageSet, ImageSet, tuple, tuple]:
    """Every file decoded into a list, stacked, made NCHW; mean/std of the whole train split."""
    classes = sorted(p.name for p in (root / "train").iterdir())
    arrays: dict[str, list] = {"train": [], "test": []}
    labels: dict[str, list] = {"train": [], "test": []}
    for split in ("train", "test"):
        for label, name in enumerate(classes):
            for path in sources._image_files(root / split / name):
                arrays[split].append(sources._read_image(path, size)[0])
                labels[split].append(label)
    gray = all(a.ndim == 2 for part in arrays.values() for a in part)
    parts = {}
    for split in ("train", "test"):
        if gray:
            images = np.stack(arrays[split])[:, None]
        else:
            images = np.stack([a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2) for a in arrays[split]])
            images = images.transpose(0, 3, 1, 2)
        parts[split] = ImageSet(torch.from_numpy(np.ascontiguousarray(images)), torch.tensor(labels[split]))
    return parts["train"], parts["test"], *old_channel_stats(parts["train"].images)


def old_indices_of(labels: torch.Tensor, c: int) -> torch.Tensor:
    return torch.nonzero(labels == c, as_tuple=False).flatten()


def old_stratified_indices(labels: torch.Tensor, num_classes: int, ipc: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(num_classes):
        idx = old_indices_of(labels, c)
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:ipc]])
    return torch.cat(picks)


def old_per_class_subset(part: ImageSet, num_classes: int, per_class: int, seed: int) -> ImageSet:
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(num_classes):
        idx = old_indices_of(part.labels, c)
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    return part.subset(torch.cat(keep).sort().values)


def old_fingerprint(data: DataBundle) -> str:
    h = hashlib.sha256()
    for part in (data.train, data.test):
        h.update(str(tuple(part.images.shape)).encode() + str(part.images.dtype).encode())
        h.update(part.images.contiguous().numpy().tobytes())
        h.update(part.labels.contiguous().numpy().tobytes())
    h.update("\n".join(data.classes).encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# fixtures


def write_mixed_folder(root: Path, train: list[int], test: list[int], seed: int = 0) -> None:
    """Classes with the given file counts; files of several sizes and modes (grayscale, palette, RGBA, RGB JPEG)."""
    rng = np.random.default_rng(seed)
    for split, counts in (("train", train), ("test", test)):
        for c, count in enumerate(counts):
            folder = root / split / f"k{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = (int(v) for v in rng.integers(9, 30, 2))
                rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                kind = (i + c) % 4
                if kind == 0:
                    Image.fromarray(rgb[..., 0]).save(folder / f"{i:03d}.png")
                elif kind == 1:
                    Image.fromarray(rgb).convert("P").save(folder / f"{i:03d}.png")
                elif kind == 2:
                    alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
                    Image.fromarray(np.concatenate([rgb, alpha], 2)).save(folder / f"{i:03d}.png")
                else:
                    Image.fromarray(rgb).save(folder / f"{i:03d}.jpg")


def write_rgb_folder(root: Path, classes: int, train: int, test: int, size: int) -> None:
    rng = np.random.default_rng(1)
    for split, count in (("train", train), ("test", test)):
        for c in range(classes):
            (root / split / f"k{c}").mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    root / split / f"k{c}" / f"{i:03d}.png")


class TensorsMade(TorchDispatchMode):
    """Records every tensor that torch ops make (or are given), by dtype and size."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[torch.dtype, int]] = []
        self.inputs: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.inputs += [a.numel() for a in args if isinstance(a, torch.Tensor)]
        self.made += [(t.dtype, t.numel() * t.element_size()) for t in (out if isinstance(out, (tuple, list))
                                                                       else [out]) if isinstance(t, torch.Tensor)]
        return out


# ------------------------------------------------------------------------------------------------
# item: imagefolder keeps only the per-class subset, decoded into one array


@pytest.mark.parametrize("workers", [1, 3])
def test_imagefolder_subset_is_the_old_paths_subset(tmp_path, monkeypatch, workers):
    """train_per_class/test_per_class are applied as files are read, not after the whole split is held: the
    same images in the same order as before (per_class_subset of everything, seed and seed + 1), mean/std
    and the conversions record of every file, and the images the old code built."""
    monkeypatch.setattr(sources, "DECODE_WORKERS", workers)
    write_mixed_folder(tmp_path, train=[7, 12, 9, 15, 8], test=[3, 6, 4, 5, 2])
    old_train, old_test, old_mean, old_std = old_load_imagefolder(tmp_path, 16)
    full = load_dataset("imagefolder", path=str(tmp_path), image_size=16)
    assert torch.equal(full.train.images, old_train.images) and torch.equal(full.test.images, old_test.images)
    assert (full.mean, full.std) == (old_mean, old_std)  # every bit
    built: list[int] = []
    monkeypatch.setattr(sources, "ImageSet", lambda images, labels: built.append(len(labels)) or ImageSet(images,
                                                                                                          labels))
    for train_pc, test_pc, seed in ((2, None, 0), (None, 1, 3), (3, 2, 7), (100, 100, 1)):
        built.clear()
        sub = load_dataset("imagefolder", path=str(tmp_path), image_size=16, train_per_class=train_pc,
                           test_per_class=test_pc, subset_seed=seed)
        for got, old, per_class, s in ((sub.train, old_train, train_pc, seed), (sub.test, old_test, test_pc, seed + 1)):
            want = old if per_class is None else old_per_class_subset(old, 5, per_class, s)
            assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)
        # only the kept images were ever put in an ImageSet: the decoded ones (whose fingerprint the cache entry
        # records) and the entry's, mapped
        assert built == [len(sub.train), len(sub.test)] * 2
        assert (sub.mean, sub.std) == (old_mean, old_std)  # of every training image, as before
        assert sub.conversions == full.conversions and sub.conversions["train"]["grayscale_to_rgb"] == 13


def test_imagefolder_holds_the_kept_images_only(tmp_path, monkeypatch):
    """The old loader held a list of every decoded image, stacked it and copied it to NCHW (2.8x the split,
    and all of it before per_class_subset); now one array of the kept images is filled in place."""
    monkeypatch.setattr(sources, "STATS_BLOCK_BYTES", 64 << 10)
    write_rgb_folder(tmp_path, classes=4, train=30, test=2, size=96)
    full_bytes = 4 * 32 * 96 * 96 * 3  # 3.5 MB of images (numpy allocations are traced, PIL's own are not)
    load_dataset("imagefolder", path=str(tmp_path), train_per_class=1)  # imports, caches
    for per_class, limit in ((1, full_bytes / 4), (None, 1.5 * full_bytes)):
        tracemalloc.start()
        try:
            data = load_dataset("imagefolder", path=str(tmp_path), train_per_class=per_class, test_per_class=per_class)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert len(data.train) == (4 if per_class else 120)
        assert peak < limit, (per_class, peak, full_bytes)  # before: 10 MB with train_per_class=1


def test_decoding_threads_keep_the_order_and_name_the_first_bad_file(tmp_path, monkeypatch):
    write_mixed_folder(tmp_path, train=[9, 11, 10], test=[4, 3, 5])
    loaded = {}
    for workers in (1, 4):
        monkeypatch.setattr(sources, "DECODE_WORKERS", workers)
        data = load_dataset("imagefolder", path=str(tmp_path), image_size=14, decode_cache=False)  # both decode
        loaded[workers] = (data.fingerprint, data.mean, data.std, data.conversions)
    assert loaded[1] == loaded[4]
    (tmp_path / "train" / "k1" / "001.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "train" / "k2" / "000.png").write_bytes(b"\x89PNG not really")
    filters = list(warnings.filters)
    with pytest.raises(DataError, match=r"cannot read image .*k1.001\.png .*replace or delete the file"):
        load_dataset("imagefolder", path=str(tmp_path), image_size=14)
    assert warnings.filters == filters  # the DecompressionBombWarning filter went with the error


# ------------------------------------------------------------------------------------------------
# item: channel_stats in bounded memory, every bit as before


@pytest.mark.parametrize("shape", [(5000, 3, 6, 5), (300, 3, 24, 24), (9, 3, 150, 149), (4200, 1, 8, 8),
                                   (4100, 2, 3, 3), (1, 3, 5, 5)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_channel_stats_keeps_every_bit(shape, dtype, monkeypatch):
    """mean/std go into teachers' records (DataBundle.matches compares them exactly) and into cache keys."""
    gen = torch.Generator().manual_seed(sum(shape))
    images = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    if dtype == torch.float32:
        images = images.float().div(255).add_(torch.rand(shape, generator=gen).mul_(1e-3)).clamp_(0, 1)
    want = old_channel_stats(images)
    assert sources.channel_stats(images) == want
    # by blocks of a few images: the same bits for images of several channels (torch summed a single channel in
    # an order that depended on the number of threads; such sets keep their old bits only while a group fits)
    monkeypatch.setattr(sources, "STATS_BLOCK_BYTES", 3 * images[0].numel() * 8 + 1)
    if shape[1] > 1:
        assert sources.channel_stats(images) == want
    # images that come one at a time (the imagefolder loader) give what channel_stats of them all gives
    sums = sources.ChannelSums(tuple(shape[1:]), dtype, len(images))
    for image in images:
        sums.add(image[None].numpy())
    assert sums.mean_std() == sources.channel_stats(images)


def test_channel_stats_converts_a_bounded_block_at_a_time(monkeypatch):
    """It converted 4096 images at a time to float64 (4.9 GB of 224 px images, and as much again for x * x)."""
    monkeypatch.setattr(sources, "STATS_BLOCK_BYTES", 200_000)
    images = torch.randint(0, 256, (500, 3, 32, 32), dtype=torch.uint8)  # 12 MB as float64
    with TensorsMade() as made:
        stats = sources.channel_stats(images)
    assert stats == old_channel_stats(images)
    assert max(size for dtype, size in made.made if dtype == torch.float64) <= 200_000


def test_one_channel_stats_do_not_depend_on_the_number_of_threads(monkeypatch):
    monkeypatch.setattr(sources, "STATS_BLOCK_BYTES", 1)  # one image at a time
    images = torch.randint(0, 256, (3, 1, 220, 230), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    threads = torch.get_num_threads()
    try:
        got = []
        for n in (1, 4):
            torch.set_num_threads(n)
            got.append(sources.channel_stats(images))
    finally:
        torch.set_num_threads(threads)
    assert got[0] == got[1]


# ------------------------------------------------------------------------------------------------
# item: the fingerprint hashes the tensors' memory, not copies of it


class RecordingSha256:
    """hashlib.sha256 that keeps what it is given."""

    given: list = []

    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def update(self, data) -> None:
        self.given.append(data)
        self.h.update(data)

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def test_fingerprint_hashes_the_images_without_copying_them(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 16, 16), generator=gen, dtype=torch.uint8)
    channels_last = torch.randint(0, 256, (40, 16, 16, 3), generator=gen, dtype=torch.uint8).permute(0, 3, 1, 2)
    labels = torch.arange(40) % 4
    for train in (images, channels_last):
        data = DataBundle("x", ImageSet(train, labels), ImageSet(images[:8], labels[:8]), list("abcd"),
                          (0.5,) * 3, (0.25,) * 3)
        assert data.fingerprint == old_fingerprint(data)
        record = RecordingSha256.given = []
        monkeypatch.setattr(base, "HASH_BLOCK_BYTES", 4000)
        monkeypatch.setattr(base, "hashlib", SimpleNamespace(sha256=RecordingSha256))
        assert data._hash_data() == old_fingerprint(data)
        monkeypatch.undo()
        assert all(len(d) < 100 for d in record if isinstance(d, bytes))  # no bytes copy of the pixels
        hashed = [d for d in record if isinstance(d, np.ndarray) and d.dtype == np.uint8]  # byte views of any dtype
        of_labels = [a for a in hashed if np.shares_memory(a, labels.numpy())]
        assert sum(a.nbytes for a in of_labels) == labels.nbytes + labels[:8].nbytes
        arrays = [a for a in hashed if not any(a is b for b in of_labels)]
        assert sum(a.nbytes for a in arrays) == train.numel() + images[:8].numel()
        if train.is_contiguous():  # views of the tensors' own memory
            assert all(np.shares_memory(a, train.numpy()) or np.shares_memory(a, images.numpy()) for a in arrays)
        else:  # copied a block (at most 4000 bytes) at a time
            assert max(a.nbytes for a in arrays) <= 4000


# ------------------------------------------------------------------------------------------------
# item: per-class indices in one pass


@pytest.mark.parametrize("n, num_classes", [(0, 3), (1, 4), (50, 3), (1000, 10), (5000, 97)])
def test_class_indices_equal_the_per_class_scans(n, num_classes):
    gen = torch.Generator().manual_seed(n)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    labels[labels == 1] = 0  # a class with no images
    got = class_indices(labels, num_classes)
    assert len(got) == num_classes
    for c in range(num_classes):
        assert torch.equal(got[c], old_indices_of(labels, c))
    part = ImageSet(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), labels)
    assert all(torch.equal(a, b) for a, b in zip(part.class_indices(num_classes), got))
    for ipc, seed in ((1, 0), (3, 5), (10**6, 2)):
        assert torch.equal(stratified_indices(labels, num_classes, ipc, seed),
                           old_stratified_indices(labels, num_classes, ipc, seed))
        new, old = per_class_subset(part, num_classes, ipc, seed), old_per_class_subset(part, num_classes, ipc, seed)
        assert torch.equal(new.labels, old.labels) and torch.equal(new.images, old.images)


def test_stratified_indices_read_the_labels_a_few_times_not_once_per_class():
    """A scan of every label per class: 5 s for ImageNet's 1.28 M labels and 1000 classes, per evaluation seed."""
    labels = torch.randint(0, 200, (20_000,), generator=torch.Generator().manual_seed(0))
    with TensorsMade() as ops:
        stratified_indices(labels, 200, 2, 0)
    assert sum(n >= len(labels) for n in ops.inputs) <= 5
