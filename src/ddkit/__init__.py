"""ddkit: dataset distillation toolkit — distil, relabel and fairly evaluate tiny datasets."""

import os as _os

__version__ = "0.1.0"

# cuBLAS reads this at its first call; deterministic CUDA runs need it (see ddkit.determinism)
_os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def load(path, normalize: bool = False):
    """Load a distilled-set artifact directory as a ``torch.utils.data.Dataset`` (``normalize``:
    items normalised with the dataset's mean and std instead of pixels in [0, 1])."""
    from ddkit.distilled import DistilledSet

    return DistilledSet.load(path, normalize=normalize)


__all__ = ["__version__", "load"]
