"""FYI flip plug-in (``flip_plugin: true``), one helper shared by the synthesis methods that take it.

Son, Oh, Baek & Ham, "FYI: Flip Your Images for Dataset Distillation", ECCV 2024
(arXiv 2407.08113; code: github.com/cvlab-yonsei/FYI). Observation ("bilateral equivalence"): an object
part seen on one side of a real image appears on the other side of another real image, so a matching
objective that randomly flips the synthetic images pushes every synthetic image to carry the
discriminative parts on *both* halves -- nearly mirror-symmetric images that waste half their pixels.
FYI's fix is to distil with the synthetic set augmented by its horizontal flips,
``A_c = S_c U Flip(S_c)``: each image and its mirror image are matched *jointly* against the real data
(whose distribution is flip-invariant), so one image may hold a part on the left while its mirror
covers the right. FYI therefore assumes classes whose mirror images are still of the class (the paper
evaluates CIFAR, Tiny ImageNet and ImageNet); on digits (``mnist``) a mirrored image is another symbol, and
every method logs a warning once (:func:`warn_digit_mirrors`).

Which methods take it: the recover methods (``sre2l``, ``cda``, ``gvbsm``, ``edc``, ``dwa``, ``cvdd``),
distribution matching (``dm``, ``datadam``), gradient matching (``dc``, ``dsa``) and trajectory
matching (``mtt``, ``tesla``, ``ftd``, ``datm``, ``shq``). Any other method (the selection methods
``random``, ``full``, ``rded``) refuses ``flip_plugin`` naming those that take it
(:data:`ddkit.methods.base.PLUGIN_OPTIONS`).

ddkit's implementation: :func:`with_mirror` returns ``cat([x, flip(x)])``, :func:`flip_pair` that with
duplicated labels.

- The recover loop matches that doubled batch (statistics, cross-entropy and the other terms) and
  turns the per-image random flip of its augmentation off, since the explicit mirror replaces it: a
  random flip drawn per image would flip one copy of a pair and not the other, re-symmetrising the
  pair.
- ``dm`` and ``datadam`` (:func:`ddkit.methods.matching.fit_per_class`) embed each class's doubled
  synthetic batch, as the authors' DM: the synthetic mean embedding (and DataDAM's attention maps)
  cover the images and their mirrors. DSA stays as it is: in its siamese mode the flip is one draw
  for the whole batch, which swaps the two halves and keeps every pair mirrored.
- ``dc`` and ``dsa`` (:func:`ddkit.methods.gradient_matching.fit_gradient_matching`) take each class's
  synthetic gradient on its doubled batch (DSA's siamese flip kept, as above) and, as the authors'
  DC/DSA, train the inner-loop network on doubled batches of the synthetic set.
- The trajectory methods (:func:`ddkit.methods.trajectory.trajectory_gradients`) unroll the student
  on each minibatch followed by its mirror images (labels, learned logits too, repeated), so its
  steps train on ``S U Flip(S)`` with every pair in the same step.
- Where an augmentation draws per image (DSA in DC/DSA's inner loop and in the trajectory methods'
  unroll), an image's draw is reused for its mirror (:func:`pair_params`), so a drawn flip swaps the
  pair, for the reason above; the batches and draws are those of the same run without the plug-in.

How the authors' code (``DC_DSA_DM/``, ``MTT/``) differs: they apply FYI to DC, DSA, DM and MTT (and,
in the paper, IDC and FTD), not to statistics-matching methods. Their DC/DSA/DM concatenate each
class's synthetic batch with its mirror (``BatchAug``) and keep DSA's flip: in DSA's siamese mode it
is decided once per batch, so it swaps the two copies of every pair rather than re-symmetrising them;
their MTT halves ``batch_syn`` (by default to half the set) and doubles each of the student's
minibatches (ddkit keeps ``batch_syn``, so a step holds twice its images). Where they augment per
image after the doubling (DC/DSA's inner loop, MTT's unroll), each copy gets its own draw, a flip
included; ddkit shares one per pair. Their DSA (``DiffAugment``) draws the random flip on every
call, besides the one operation it draws from the others; ddkit's DSA draws the flip as one of its
operations. An earlier version of their MTT code also evaluated each set with flipped-batch
training (``FlipBatchBT``: every student batch concatenated with its mirror); ddkit's evaluation has
no such mode (a student trains on the set as stored, with its protocol's augmentation).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ddkit.data.augment import warn_digits_once

log = logging.getLogger(__name__)


def warn_digit_mirrors(cfg: Any, dataset: str, options_key: str) -> None:
    """Log a warning, once per process for each dataset and ``options_key``, when ``cfg.flip_plugin`` is on and
    ``dataset`` is a digit dataset (:data:`~ddkit.data.augment.DIGIT_DATASETS`): FYI matches every synthetic
    image with its mirror image, which assumes flip-invariant classes, and a mirrored digit is another symbol.
    Every method that takes ``flip_plugin`` calls it; nothing is changed."""
    if getattr(cfg, "flip_plugin", False):
        warn_digits_once(log, "flip_plugin (FYI) matches every synthetic image of dataset %r, a digit dataset, "
                         "together with its mirror image, but FYI assumes flip-invariant classes (a mirrored digit is "
                         "another symbol); set %s.flip_plugin: false to turn it off", dataset, options_key)


def with_mirror(x: torch.Tensor) -> torch.Tensor:
    """``cat([x, x flipped left-right])``: FYI's ``S U Flip(S)`` of a batch; differentiable in ``x``."""
    return torch.cat([x, torch.flip(x, dims=(-1,))])


def flip_pair(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(with_mirror(x), cat([labels, labels]))``: the doubled batch with its labels (indices or logits)."""
    return with_mirror(x), torch.cat([labels, labels])


def pair_params(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-image augmentation parameters drawn for a batch, repeated for its mirror copies
    (``with_mirror``'s second half): each image and its mirror share one draw, so a flip swaps them."""
    return {k: torch.cat([v, v]) for k, v in params.items()}
