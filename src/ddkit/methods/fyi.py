"""FYI flip plug-in, shared by every synthesis method (``flip_plugin: true``).

Son, Oh, Baek & Ham, "FYI: Flip Your Images for Dataset Distillation", ECCV 2024
(arXiv 2407.08113). Observation ("bilateral equivalence"): an object part seen on one side of a
real image appears on the other side of another real image, so a matching objective that
randomly flips the synthetic images pushes every synthetic image to carry the discriminative
parts on *both* halves -- nearly mirror-symmetric images that waste half their pixels. FYI's fix
is to distil with the synthetic set augmented by its horizontal flips, ``A_c = S_c U Flip(S_c)``:
each image and its mirror image are matched *jointly* against the real data (whose distribution
is flip-invariant), so one image may hold a part on the left while its mirror covers the right.

ddkit's implementation: :func:`flip_pair` returns ``cat([x, flip(x)])`` with duplicated labels;
the recover loop matches that doubled batch (statistics, cross-entropy and the other terms) and
turns the random flip of its augmentation off, since the explicit mirror replaces it (a random
flip on both copies would re-symmetrise the pair). Our reading: this follows the paper's
description; the authors' code was not available offline to check details such as how the
flipped copies enter each base method's loss.
"""

from __future__ import annotations

import torch


def flip_pair(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cat([x, x flipped left-right]), cat([labels, labels]))``; differentiable in ``x``."""
    return torch.cat([x, torch.flip(x, dims=(-1,))]), torch.cat([labels, labels])
