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
from ddkit.data.sources import save_tensors

__all__ = ["DATASETS", "DataBundle", "DatasetConfig", "ImageSet", "load_dataset", "make_synthetic",
           "save_tensors"]
