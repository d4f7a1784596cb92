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

from ddkit.data import base
from ddkit.data.base import DataBundle, ImageSet, class_indices, per_class_subset
from ddkit.methods.random import stratified_indices

# ------------------------------------------------------------------------------------------------
# the code replaced, as it was


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
