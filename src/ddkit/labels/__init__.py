"""Labels for distilled sets beyond hard labels.

- :mod:`ddkit.labels.fkd`: FKD-style per-epoch soft labels (the "relabel" stage): for every epoch
  and image, the augmentation parameters of a view and the teacher's logits on it, replayed at
  training time independently of batch size and order.
"""

from ddkit.labels.fkd import RelabelSpec, Replay, SoftLabelStore, relabel, render, train_with_store

__all__ = ["RelabelSpec", "Replay", "SoftLabelStore", "relabel", "render", "train_with_store"]
