"""Real data at scale: what loading holds, copies and scans, and that the results keep their bits.

Each test compares with the code it replaced (copied here as ``old_*``) and asserts on what is held or
passed around (allocations, hashed buffers, tensor ops), never on time.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ddkit.data.base import ImageSet, class_indices, per_class_subset
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
