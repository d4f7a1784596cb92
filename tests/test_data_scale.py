"""Real data at scale: what loading holds, copies and scans, and that the results keep their bits.

Each test compares with the code it replaced (copied here as ``old_*``) and asserts on what is held or
passed around (allocations, hashed buffers, tensor ops), never on time.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ddkit.data import base, sources
from ddkit.data.base import DataBundle, ImageSet, class_indices, per_class_subset
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
        assert base.DataBundle.fingerprint.func(data) == old_fingerprint(data)
        monkeypatch.undo()
        assert all(len(d) < 100 for d in record if isinstance(d, bytes))  # no bytes copy of the pixels
        arrays = [d for d in record if isinstance(d, np.ndarray) and d.dtype == np.uint8]
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
