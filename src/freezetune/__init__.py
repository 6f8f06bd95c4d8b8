"""freezetune: fine-tune pretrained PyTorch models by freezing what should stay and training what should move.

The public API works in any training loop (plain PyTorch, Lightning, a notebook) without freezetune's trainer:

>>> import torch, torchvision, freezetune as ft
>>> model = ft.replace_head(torchvision.models.resnet18(), 10)
>>> ft.freeze(model, "backbone")
>>> optimizer = torch.optim.AdamW(ft.param_groups(model, 1e-3))
"""

from freezetune.errors import FreezetuneError
from freezetune.freeze import count_parameters, freeze, freeze_to, summary, unfreeze
from freezetune.param_groups import param_groups
from freezetune.stages import Stage, head_name, replace_head, stages
from freezetune.unfreezing import Unfreezer

__version__ = "0.1.0"

_LAZY = {"cache_features": "freezetune.cache", "store_loader": "freezetune.cache"}


def __getattr__(name: str):
    # The feature cache pulls in the data pipeline (torchvision): import it when first used, not with the package.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'freezetune' has no attribute {name!r}")


__all__ = [
    "FreezetuneError",
    "Stage",
    "Unfreezer",
    "__version__",
    "cache_features",
    "count_parameters",
    "freeze",
    "freeze_to",
    "head_name",
    "param_groups",
    "replace_head",
    "stages",
    "store_loader",
    "summary",
    "unfreeze",
]
