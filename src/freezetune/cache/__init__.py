"""Frozen-prefix feature cache: run the frozen, deterministic part of a model once per input and train the rest.

``model_split.py`` cuts a model into the frozen prefix and the trainable rest (``torch.fx``); ``store.py`` builds and
batches the stored features (``cache_features`` and ``store_loader`` for your own loop), which ``placement.py`` puts
on the device, in RAM or in a mapped file; ``path.py`` is the trainer's
``FeaturePath``, which decides per trainable set whether a step reads images or features.
"""

from freezetune.cache.path import FeaturePath
from freezetune.cache.store import CacheInfo, FeatureStore, StoreLoader, build_store, cache_features, store_loader

__all__ = ["CacheInfo", "FeaturePath", "FeatureStore", "StoreLoader", "build_store", "cache_features", "store_loader"]
