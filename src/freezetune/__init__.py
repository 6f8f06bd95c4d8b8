"""freezetune: fine-tune pretrained PyTorch models by freezing what should stay and training what should move.

The public API works in any training loop (plain PyTorch, Lightning, a notebook) without freezetune's trainer:

>>> import torch, torchvision, freezetune as ft
>>> model = ft.replace_head(torchvision.models.resnet18(), 10)
>>> ft.freeze(model, "backbone")
>>> optimizer = torch.optim.AdamW(ft.param_groups(model, 1e-3))
"""

import sys
import types
from typing import TYPE_CHECKING

from freezetune import _renamed

__version__ = "0.1.0"

# Every name is imported when first used, not with the package: ``import freezetune`` (and so the ``freezetune``
# command, whose entry point imports ``freezetune.cli.main``) does not wait for torch, and a Ctrl-C during torch's
# import reaches the command's own handling instead of a traceback.
_LAZY = {
    "hold_bn_statistics": "freezetune.freezing.bn_policy",
    "FreezetuneError": "freezetune.errors",
    **dict.fromkeys(("count_parameters", "freeze", "freeze_to", "summary", "unfreeze"), "freezetune.freezing.freeze"),
    **dict.fromkeys(("head_name", "replace_head"), "freezetune.model.heads"),
    "balanced_class_weights": "freezetune.training.loss",
    "param_groups": "freezetune.training.param_groups",
    **dict.fromkeys(("Stage", "stages"), "freezetune.model.stages"),
    "Unfreezer": "freezetune.freezing.unfreezing",
    "cache_features": "freezetune.cache",
    "store_loader": "freezetune.cache",
    "TrainConfig": "freezetune.config.train_config",
    "create_model": "freezetune.model.create",
    "eval_transform": "freezetune.data.transforms",
    "RunResult": "freezetune.training.progress",
    "use_fast_depthwise": "freezetune.device.depthwise",
    "train": "freezetune.training.trainer",
    **dict.fromkeys(
        ("evaluate_checkpoint", "evaluate_model", "load_model", "write_evaluation"),
        "freezetune.inference.evaluation",
    ),
    **dict.fromkeys(("predict_files", "predict_texts"), "freezetune.inference.predict"),
}


def __getattr__(name: str):
    import importlib
    import importlib.util

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # the next use is a plain attribute
        return value
    if name in _renamed.MOVED:  # ``from freezetune import run_setup``, as the flat layout had it
        return _renamed.moved_module(name)
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # a submodule, as docs/export.md writes it after a plain ``import freezetune``: freezetune.data.load_image(...)
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'freezetune' has no attribute {name!r}")


class _Package(types.ModuleType):
    """The package keeps its function where an old module path has the same name (``freeze``, ``param_groups``,
    ``stages``: ``_renamed.py``): importing ``freezetune.freeze`` sets the package's attribute to the module, which
    would shadow the lazy function (``ft.freeze(model, ...)``: 'module' object is not callable)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return  # the module stays reachable as sys.modules["freezetune.freeze"] and by ``from ... import``
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
_renamed.install()  # the flat layout's module paths: models saved whole by an earlier freezetune name them


def __dir__() -> list[str]:  # a notebook's tab completion lists the lazy names too
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what type checkers and editors resolve the lazy names to
    from freezetune.cache import cache_features, store_loader
    from freezetune.config.train_config import TrainConfig
    from freezetune.data.transforms import eval_transform
    from freezetune.device.depthwise import use_fast_depthwise
    from freezetune.errors import FreezetuneError
    from freezetune.freezing.bn_policy import hold_bn_statistics
    from freezetune.freezing.freeze import count_parameters, freeze, freeze_to, summary, unfreeze
    from freezetune.freezing.unfreezing import Unfreezer
    from freezetune.inference.evaluation import evaluate_checkpoint, evaluate_model, load_model, write_evaluation
    from freezetune.inference.predict import predict_files, predict_texts
    from freezetune.model.create import create_model
    from freezetune.model.heads import head_name, replace_head
    from freezetune.model.stages import Stage, stages
    from freezetune.training.loss import balanced_class_weights
    from freezetune.training.param_groups import param_groups
    from freezetune.training.progress import RunResult
    from freezetune.training.trainer import train


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
