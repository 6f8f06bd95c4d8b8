"""freezetune: fine-tune pretrained PyTorch models by freezing what should stay and training what should move.

The public API works in any training loop (plain PyTorch, Lightning, a notebook) without freezetune's trainer:

>>> import torch, torchvision, freezetune as ft
>>> model = ft.replace_head(torchvision.models.resnet18(), 10)
>>> ft.freeze(model, "backbone")
>>> optimizer = torch.optim.AdamW(ft.param_groups(model, 1e-3))
"""

from freezetune.bn_policy import hold_bn_statistics
from freezetune.errors import FreezetuneError
from freezetune.freeze import count_parameters, freeze, freeze_to, summary, unfreeze
from freezetune.heads import head_name, replace_head
from freezetune.loss import balanced_class_weights
from freezetune.param_groups import param_groups
from freezetune.stages import Stage, stages
from freezetune.unfreezing import Unfreezer

__version__ = "0.1.0"

_LAZY = {
    "cache_features": "freezetune.cache",
    "store_loader": "freezetune.cache",
    "TrainConfig": "freezetune.config",
    "create_model": "freezetune.models",
    "eval_transform": "freezetune.data.transforms",
    "RunResult": "freezetune.progress",
    "use_fast_depthwise": "freezetune.depthwise",
    "train": "freezetune.trainer",
    **dict.fromkeys(
        ("evaluate_checkpoint", "evaluate_model", "load_model", "write_evaluation"),
        "freezetune.inference",
    ),
    **dict.fromkeys(("predict_files", "predict_texts"), "freezetune.predict"),
}


def __getattr__(name: str):
    # The feature cache, inference and the trainer pull in the data pipeline (torchvision): import them when first
    # used, not with the package.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'freezetune' has no attribute {name!r}")


__all__ = [
    "FreezetuneError",
    "RunResult",
    "Stage",
    "TrainConfig",
    "Unfreezer",
    "__version__",
    "balanced_class_weights",
    "cache_features",
    "count_parameters",
    "create_model",
    "eval_transform",
    "evaluate_checkpoint",
    "evaluate_model",
    "freeze",
    "freeze_to",
    "head_name",
    "hold_bn_statistics",
    "load_model",
    "param_groups",
    "predict_files",
    "predict_texts",
    "replace_head",
    "stages",
    "store_loader",
    "summary",
    "train",
    "unfreeze",
    "use_fast_depthwise",
    "write_evaluation",
]
