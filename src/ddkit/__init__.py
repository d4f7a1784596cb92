"""ddkit: dataset distillation toolkit — distil, relabel and fairly evaluate tiny datasets."""

__version__ = "0.1.0"


def load(path):
    """Load a distilled-set artifact directory as a ``torch.utils.data.Dataset``."""
    from ddkit.distilled import DistilledSet

    return DistilledSet.load(path)


__all__ = ["__version__", "load"]
