"""Datasets: registry, in-memory containers, sources and augmentation."""

from ddkit.data import sources as _sources  # noqa: F401  (registers the dataset sources)
from ddkit.data.base import (
    DATASETS,
    DataBundle,
    DatasetConfig,
    ImageSet,
    load_dataset,
    make_synthetic,
)

__all__ = ["DATASETS", "DataBundle", "DatasetConfig", "ImageSet", "load_dataset", "make_synthetic"]
