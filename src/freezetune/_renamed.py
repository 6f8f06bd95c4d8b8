"""The module paths of freezetune 0.1's flat layout, kept importable after the package was split into subpackages.

A model saved whole (``torch.save(model)``) names what freezetune put on it by module path: the hook that keeps a
frozen BatchNorm in eval mode (``freezetune.bn_policy._keep_eval``, earlier ``freezetune.freeze._keep_eval``), the
fast depthwise convolution (``freezetune.depthwise.FastDepthwiseConv2d``), a sentence-transformers pooling
(``freezetune.text_pooling``). Without these paths such a file no longer loads; code that imported a module by its old
path keeps working too, with a ``DeprecationWarning`` that names the new one. Five old modules share their name
with a subpackage now (``auto``, ``recipes``, ``config``, ``cli``, ``inference``): that path imports the subpackage,
which hands on the names the old module held (``from freezetune.config import TrainConfig``; ``forwarded``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

# old module -> its path under freezetune now (docs/layout.md lists what each one owns)
MOVED = {
    **{m: f"model.{m}" for m in ("hf_bundle", "download", "weights", "preprocess", "stages", "stages_hf")},
    **{m: f"model.{m}" for m in ("stages_timm", "heads", "text_pooling", "describe")},
    "models": "model.create",
    "models_hf": "model.hf",
    "module_tree": "model.tree",
    **{m: f"freezing.{m}" for m in ("freeze", "bn_policy", "unfreezing")},
    "frozen_dropout": "freezing.dropout",
    "unfreeze_schedule": "freezing.schedule",
    **{m: f"training.{m}" for m in ("trainer", "step", "graph_step", "loss", "param_groups", "optim", "epoch_log")},
    **{m: f"training.{m}" for m in ("progress", "rng", "metrics", "bn_refresh")},
    "evaluate": "training.eval_loop",
    **{m: f"device.{m}" for m in ("precision", "hardware", "depthwise", "bn_fold", "memory", "distributed", "monitor")},
    **{f"run_{m}": f"run.{m}" for m in ("setup", "notes", "records", "traces", "log", "lock")},
    **{m: f"run.{m}" for m in ("interrupt", "reporting", "checkpoint", "checkpoint_writer")},
    "runtime": "run.directory",
    **{f"auto_{m}": f"auto.{m}" for m in ("budget", "plan", "resume", "rule", "trials")},
    "recipe_request": "recipes.request",
    **{m: f"recipes.{m}" for m in ("sweep", "sweep_config", "sweep_report")},
    **{f"config_{m}": f"config.{m}" for m in ("check", "file", "values")},
    "options": "config.options",
    **{f"cli_{m}": f"cli.{m}" for m in ("args", "exit", "parser")},
    "flag_help": "cli.flag_help",
    **{m: f"inference.{m}" for m in ("predict", "export")},
}


# the old module of a subpackage's name -> where its names are now
SAME_NAMED = {"auto": "auto.recipe", "recipes": "recipes.named", "config": "config.train_config", "cli": "cli.main",
              "inference": "inference.evaluation"}  # fmt: skip


def moved_module(old: str, *, stacklevel: int = 3) -> types.ModuleType:
    """The module now at the new path of ``old``, with the warning that names it at the importing line: ``from
    freezetune import run_setup``, the flat layout's form (through ``freezetune.__getattr__``), or
    ``import freezetune.run_setup`` (through ``_OldPaths``)."""
    new = f"freezetune.{MOVED[old]}"
    warnings.warn(f"freezetune.{old} is now {new}", DeprecationWarning, stacklevel=stacklevel)
    return importlib.import_module(new)


def forwarded(package: str, name: str):
    """A name the old module of a subpackage's name held (``freezetune.config.TrainConfig``), from its new module;
    anything else, a submodule not imported yet included, is left to the import system (AttributeError)."""
    module = importlib.import_module(f"freezetune.{SAME_NAMED[package.rpartition('.')[2]]}")
    value = getattr(module, name, None) if not name.startswith("__") else None
    if value is None or isinstance(value, types.ModuleType):
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    warnings.warn(f"{package}.{name} is now {module.__name__}.{name}", DeprecationWarning, stacklevel=3)
    return value


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``freezetune.<old>`` as the module now at ``freezetune.<new>``: the same module object, not a copy, so a
    patch or a class check made through either path holds for both."""

    def find_spec(self, fullname: str, path=None, target=None):
        package, _, old = fullname.partition(".")
        if package != "freezetune" or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = moved_module(spec.name.partition(".")[2], stacklevel=3)
        spec.loader_state = module.__spec__  # the import machinery sets the old path's spec on it: put back its own
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = module.__spec__.loader_state


def install() -> None:
    """Puts the old paths last on ``sys.meta_path``: every module that exists is found first, as it was."""
    if not any(isinstance(finder, _OldPaths) for finder in sys.meta_path):
        sys.meta_path.append(_OldPaths())
