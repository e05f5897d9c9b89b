"""Datasets held in memory as uint8 tensors, and a batched loader that augments on the device."""
from .datasets import DATASETS, DataSpec, Split, download, fingerprint, load_splits
from .loader import BatchLoader

__all__ = ["DATASETS", "DataSpec", "Split", "download", "fingerprint", "load_splits", "BatchLoader"]
