"""Dropout in the frozen stages: what draws random numbers in training (dropout, drop path, stochastic depth) and,
in the stages before the first that trains, whether it still draws.

- ``"keep"`` (the default): they draw in training as the model was built.
- ``"off"``: those layers run as at inference, whatever ``model.train()`` set (a forward pre-hook puts them back in
  eval, as a frozen BatchNorm's), as Keras's transfer-learning guide runs a frozen base (``training=False``). The
  frozen prefix is then deterministic, so the feature cache holds all of it: torchvision's EfficientNet, ConvNeXt,
  Swin and MaxViT ship with stochastic depth on, and the cache cuts at their first frozen block that draws.

Why keep is the default, measured (``benchmarks/frozen_dropout.py``: the default command on EfficientNet-Lite0 built
with drop path 0.2, 64 px, 3 epochs, 3 seeds): off scored the same on Fashion-MNIST at 100 a class (84.72 against
84.75 %), 0.65 points less on scikit-learn's digits at 50 a class (96.20 against 96.85 %, every seed lower): the masks
of frozen layers teach them nothing, but on a small set they shake the features the trainable part reads, a useful
noise. Off is a speed lever where the frozen part is a large share of the model's compute.

The layers of the stages that train draw as built either way (a head's dropout regularises the head). The frozen
layer a held dropout sits in is held too: an attention layer hands its dropout's rate to a fused kernel (timm's, Hugging
Face's SDPA attention) by its own mode. A dropout the model's own forward calls as a function (timm's head dropout)
draws as built.
"""

from __future__ import annotations

from typing import Tuple  # noqa: UP035 - TorchScript reads the hook's annotation

import torch
from torch import nn

from freezetune.config.options import DROPOUT_DEFAULT, DROPOUT_POLICIES, check_choice
from freezetune.errors import SpecError
from freezetune.freezing.bn_policy import policy_of
from freezetune.model.stages import Stage

# What draws random numbers in training, by its class's name: torch's dropout, timm's DropPath and DropBlock,
# torchvision's StochasticDepth (EfficientNet, ConvNeXt, Swin), Hugging Face's <Model>DropPath, torch's
# MultiheadAttention (its attention dropout, a float: torchvision's ViT)
RANDOM_KINDS = ("Dropout", "DropPath", "DropBlock", "StochasticDepth", "MultiheadAttention")
_KIND_WORDS = {"StochasticDepth": "stochastic depth", "DropPath": "drop path", "DropBlock": "drop block",
               "MultiheadAttention": "attention"}  # fmt: skip
_POLICY_ATTR = "_freezetune_dropout"  # on the model: the policy the last freeze gave, which unfreeze keeps


def random_kind(m: nn.Module) -> bool:
    """Whether ``m`` is a layer that draws random numbers in training, by its class's name (whatever its rate)."""
    return any(kind in type(m).__name__ for kind in RANDOM_KINDS)


def draws(m: nn.Module) -> bool:
    """Whether ``m`` is a random kind at a probability above 0 (one that names none counts as random)."""
    if not random_kind(m):
        return False
    rates = [getattr(m, a) for a in ("p", "drop_prob", "dropout") if isinstance(getattr(m, a, None), (int, float))]
    return bool(rates[0]) if rates else True


def is_stochastic(m: nn.Module) -> bool:
    """Whether ``m`` draws random numbers in a training forward: it ``draws`` and is not held as at inference.

    >>> m = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.2), nn.Linear(2, 2))
    >>> is_stochastic(m[1]), is_stochastic(nn.Dropout(0.0))
    (True, False)
    """
    return draws(m) and not held(m)


def check_dropout_policy(policy: str | None) -> None:
    """Raise ``SpecError`` naming the policies unless ``policy`` is one of them (or None: the model's own)."""
    if policy is not None:
        check_choice("dropout policy", policy, DROPOUT_POLICIES, SpecError)


def apply_dropout_policy(model: nn.Module, st: list[Stage], policy: str | None = None) -> None:
    """Hold the random layers of ``model`` before its first stage that trains (of ``st``: ``prefix_random_layers``)
    as at inference (``policy`` ``"off"``), with the frozen layer each sits in (an attention layer passes its dropout's
    rate to a fused kernel by its own mode); release the others. ``policy`` None: the one the model was last given,
    else the default. ``freeze`` and ``unfreeze`` call it, so an unfreeze releases the stages it opens."""
    if policy is not None:
        setattr(model, _POLICY_ATTR, policy)
    hold = {}
    if getattr(model, _POLICY_ATTR, DROPOUT_DEFAULT) == "off":
        for name, layer in prefix_random_layers(model, st):
            hold[id(layer)] = layer
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            if parent is not model and not any(p.requires_grad for p in parent.parameters()):
                hold[id(parent)] = parent
    for module in model.modules():
        if id(module) in hold:
            _hold(module)
        elif held(module):
            _release(module)
            module.training = model.training


def prefix_random_layers(model: nn.Module, st: list[Stage]) -> list[tuple[str, nn.Module]]:
    """The random layers (``random_kind``, whatever their rate) of the stages of ``st`` before the first that trains.
    The BatchNorm parameters a frozen stage's policy trains (``bn="affine"``) do not make it a stage that trains. One of
    no stage (a ViT's dropout after its patch embedding) is left as built: where it runs, before a frozen stage or
    after the last one, is not told by where it is registered (pytorch/examples' MNIST net registers both its
    dropouts before its linear layers).

    >>> m = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Dropout(0.2), nn.Linear(2, 2)), nn.Linear(2, 2))
    >>> from freezetune.freezing.freeze import freeze_to
    >>> from freezetune.model.stages import stages
    >>> freeze_to(m, 2); [name for name, _ in prefix_random_layers(m, stages(m))]
    ['1.0']
    """
    first = _first_training(model, st)
    return [(name, m) for s in st[:first] for top in s.modules
            for name, m in model.get_submodule(top).named_modules(prefix=top) if random_kind(m)]  # fmt: skip


def _first_training(model: nn.Module, st: list[Stage]) -> int:
    """The index in ``st`` of the first stage with a trainable parameter other than a frozen BatchNorm's."""
    released = {id(p) for m in model.modules() if policy_of(m) is not None for p in m.parameters(recurse=False)}
    return next((i for i, s in enumerate(st) if any(p.requires_grad and id(p) not in released for p in s.params)),
                len(st))  # fmt: skip


def apply_holds(model: nn.Module) -> None:
    """Put the held layers in eval now, as their hooks do at their next forward: ``torch.fx`` traces a layer's
    ``forward`` without its hooks, and a held attention layer's mode decides its fused kernel's dropout."""
    for module in model.modules():
        if held(module):
            module.training = False


def held_layers(model: nn.Module) -> list[str]:
    """The names of the layers that would draw in training and run as at inference instead (frozen, policy off).

    >>> import torchvision
    >>> from freezetune.freezing.freeze import freeze
    >>> m = torchvision.models.efficientnet_b0(); freeze(m, "backbone", dropout="off"); len(held_layers(m))
    15
    """
    return [name for name, m in model.named_modules() if draws(m) and held(m)]


def dropout_note(model: nn.Module) -> str | None:
    """The run's line on the random layers of its frozen stages that run as at inference (policy off); None where
    none does (under keep, the feature cache's line says where the layers that draw moved its cut).

    >>> import torchvision
    >>> from freezetune.freezing.freeze import freeze
    >>> m = torchvision.models.efficientnet_b0(); freeze(m, "backbone", dropout="off"); dropout_note(m)[:61]
    'frozen stages: 15 stochastic depth layers run as at inference'
    """
    layers = [m for m in model.modules() if draws(m) and held(m)]
    if not layers:
        if getattr(model, _POLICY_ATTR, DROPOUT_DEFAULT) == "off" and any(draws(m) for m in model.modules()):
            return ("note: --frozen-dropout off changes nothing: no layer that draws lies before the first stage that "
                    "trains (bitfit and an opened '*.bias' train every stage)")  # fmt: skip
        return None
    kinds = sorted({_KIND_WORDS.get(type(m).__name__, "dropout") for m in layers})
    what = f"{len(layers)} {' and '.join(kinds)} layer{'s' if len(layers) > 1 else ''}"
    return f"frozen stages: {what} run as at inference (--frozen-dropout off; keep draws them in training, as built)"


def held(module: nn.Module) -> bool:
    """Whether ``module`` runs as at inference whatever ``model.train()`` set (from its next Python forward on)."""
    return any(_is_hold_hook(h) for h in module._forward_pre_hooks.values())


def _keep_inference(module: nn.Module, args: Tuple[torch.Tensor]) -> None:  # noqa: UP006 - typing.Tuple: TorchScript's
    # model.train() flips every submodule back to training mode: a frozen stage's dropout is put back into eval right
    # before each forward, itself alone (the layer a dropout sits in holds BatchNorm layers whose policy decides their
    # own mode); a scripted model is scripted for inference, in eval mode
    if not torch.jit.is_scripting():
        if module.training:
            module.training = False


def _is_hold_hook(hook: object) -> bool:
    # by name, not identity, as bn_policy's hook: a reloaded module (a notebook's %autoreload) has a new function
    return getattr(hook, "__module__", None) == __name__ and getattr(hook, "__qualname__", None) == "_keep_inference"


def _hold(module: nn.Module) -> None:
    if not held(module):
        module.register_forward_pre_hook(_keep_inference)
    module.training = False


def _release(module: nn.Module) -> None:
    for key in [k for k, h in module._forward_pre_hooks.items() if _is_hold_hook(h)]:
        del module._forward_pre_hooks[key]
