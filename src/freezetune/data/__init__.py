"""Data: datasets (``datasets.py``: IDX, image folders, CSV), loaders (``loaders.py``: the run's loader factory),
transforms (CPU, per sample) and device pipelines (``gpu.py``, ``augment.py``: batched on the training device).
"""

from freezetune.config.options import AUG_PRESETS
from freezetune.data.datasets import DataBundle, build_datasets, build_eval_dataset
from freezetune.data.folder import FileImageDataset, list_images, load_image
from freezetune.data.idx import InMemoryImageDataset
from freezetune.data.loaders import Loaders, build_loader, default_workers
from freezetune.data.text import noun
from freezetune.data.transforms import eval_transform, train_transform
from freezetune.data.workers import usable_cpus

__all__ = [
    "AUG_PRESETS",
    "DataBundle",
    "FileImageDataset",
    "InMemoryImageDataset",
    "Loaders",
    "build_datasets",
    "build_eval_dataset",
    "build_loader",
    "default_workers",
    "eval_transform",
    "list_images",
    "load_image",
    "noun",
    "train_transform",
    "usable_cpus",
]
