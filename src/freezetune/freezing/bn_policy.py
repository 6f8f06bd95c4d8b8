"""BatchNorm in the frozen parts: the policy ``freeze`` gives each layer, kept on the layer itself, and the hook that
keeps a layer in eval mode through ``model.train()``.

- ``"frozen"``: affine parameters and running statistics frozen; the layer stays in eval mode even after
  ``model.train()`` (a forward pre-hook puts it back), so a training pass leaves its statistics bit-identical, and
  a reset of its statistics (SWA's ``update_bn``) keeps them.
- ``"affine"``: weight/bias stay trainable, statistics update in train mode (fastai/Lightning ``train_bn=True``).
- ``"train"``: weight/bias frozen, statistics update in train mode (what plain ``requires_grad=False`` does).
- ``"affine-only"``: weight/bias trainable, statistics frozen as under ``"frozen"`` (eval mode kept): the scale and
  shift adapt to the new data while the pretrained statistics stay, whatever the batch size.

``hold_bn_statistics`` holds the statistics of the parts that train too (lp-ft's fine-tune).
"""

from __future__ import annotations

from typing import Tuple  # noqa: UP035 - TorchScript reads the hook's annotation

import torch
from torch import nn

from freezetune.config.options import BN_AFFINE_POLICIES, BN_DEFAULT, BN_EVAL_POLICIES, BN_POLICIES, check_choice
from freezetune.errors import SpecError
from freezetune.model.stages import Stage
from freezetune.model.tree import unwrap

# The policy freezetune keeps on a BatchNorm module it froze: a plain attribute, so it survives deepcopy/pickling.
# The eval-keeping hook is found again by the name of its function rather than through a stored handle, because a
# deep-copied handle would still point at the original module's hook table.
_POLICY_ATTR = "_freezetune_bn"
_HOLD_ATTR = "_freezetune_hold_bn_stats"  # on the model: hold_bn_statistics was asked, unfreeze keeps it
_OPEN_ATTR = "_freezetune_bn_open"  # on a frozen-policy BatchNorm: its parameters unfreeze named alone ("*.bias")
# The norms whose layers may keep running statistics, traced as leaves (they read self.training at run time)
STAT_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def keeps_stats(module: nn.Module) -> bool:
    """Whether ``module`` is a norm the BatchNorm policies apply to: a BatchNorm or an InstanceNorm that keeps running
    statistics (``track_running_stats``, a BatchNorm's default), which it updates in train mode and uses in eval. One
    without them computes the same in both modes: it is frozen as any other layer is.

    >>> keeps_stats(nn.InstanceNorm2d(4, track_running_stats=True)), keeps_stats(nn.InstanceNorm2d(4, affine=True))
    (True, False)
    """
    return isinstance(module, STAT_NORMS) and module.track_running_stats


def set_frozen(model: nn.Module, params: dict[int, nn.Parameter], bn: str) -> None:
    """``freeze``'s BatchNorm part: the layers whose parameters ``params`` holds (keyed by identity) take policy
    ``bn``; a parameter of a frozen layer named again closes (``freeze(m, "*.bias")``)."""
    _open_bn_params(model, params, opening=False)
    for module in _bn_modules_within(model, params):
        setattr(module, _POLICY_ATTR, bn)
    _apply_bn_policies(model)


def set_released(model: nn.Module, params: dict[int, nn.Parameter], bn: str | None) -> None:
    """``unfreeze``'s BatchNorm part: the layers whose parameters ``params`` holds become ordinary layers again; a
    parameter named alone of a layer that stays frozen trains; ``bn`` (not None) is the new policy of every layer
    still frozen; the statistics ``hold_bn_statistics`` holds stay held in the layers released."""
    for module in _bn_modules_within(model, params):
        _release(module)
        module.train(model.training)
    _open_bn_params(model, params, opening=True)
    for module in model.modules():
        if bn is not None and getattr(module, _POLICY_ATTR, None) is not None:
            setattr(module, _POLICY_ATTR, bn)
    _apply_bn_policies(model)
    if getattr(model, _HOLD_ATTR, False):  # the released layers train, their statistics held as the others'
        hold_bn_statistics(model)


def policy_of(module: nn.Module) -> str | None:
    """The BatchNorm policy ``freeze`` gave ``module`` (None: it is not a frozen BatchNorm layer)."""
    return getattr(module, _POLICY_ATTR, None)


def policies(model: nn.Module) -> set[str]:
    """The BatchNorm policies the frozen layers of ``model`` have (empty when none is frozen).

    >>> import torchvision
    >>> from freezetune.freezing.freeze import freeze
    >>> m = torchvision.models.resnet18(); freeze(m, "backbone", bn="affine"); policies(m)
    {'affine'}
    """
    return {p for p in map(policy_of, unwrap(model).modules()) if p is not None}


def check_bn_policy(bn: str) -> None:
    """Raise ``SpecError`` naming the policies unless ``bn`` is one of them."""
    check_choice("BatchNorm policy", bn, BN_POLICIES, SpecError)


def _bn_modules_within(model: nn.Module, params: dict[int, nn.Parameter]) -> list[nn.Module]:
    """BatchNorm layers whose parameters all lie in ``params`` (a non-affine one: those of the layer before it in its
    parent, the layer it normalises; with none before it, its parent's, or, in the model itself, those of the layer
    after it, which reads what it normalises: an audio model's input BatchNorm over mel bins, first in the model,
    kept moving its statistics under freeze("all"))."""
    out = []
    for name, module in model.named_modules():
        if not keeps_stats(module):
            continue
        own = list(module.parameters())
        if not own:  # its parent's alone was wrong where the parent holds trainable layers too (a whole Sequential
            # backbone: the layer's statistics moved in a frozen stage); the model's hold the head's, which trains
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            own = _feeding(parent, module) or (list(parent.parameters()) if parent is not model else [])
            own = own or _feeding(parent, module, after=True)
        if own and all(id(p) in params for p in own):
            out.append(module)
    return out


def _feeding(parent: nn.Module, module: nn.Module, *, after: bool = False) -> list[nn.Parameter]:
    """The parameters of the last layer with any registered before ``module``, a child of ``parent`` (``after``: of
    the first layer with parameters of its own registered after it, the one that reads its output)."""
    children = list(parent.children())
    at = next(i for i, child in enumerate(children) if child is module)
    for child in children[at + 1 :] if after else reversed(children[:at]):
        if after:
            child = next((m for m in child.modules() if list(m.parameters(recurse=False))), child)
        if own := list(child.parameters()):
            return own
    return []


def _open_bn_params(model: nn.Module, params: dict[int, nn.Parameter], *, opening: bool) -> None:
    """Record on each BatchNorm layer with a policy which of its parameters ``unfreeze`` named alone (``"*.bias"``:
    BitFit by hand), or, ``freeze`` naming them again, forget them. They train while the layer keeps its policy (its
    statistics stay frozen); the policy had set them back to frozen, without a word."""
    for module in model.modules():
        if getattr(module, _POLICY_ATTR, None) is None or not keeps_stats(module):
            continue
        named = {name for name, p in module.named_parameters(recurse=False) if id(p) in params}
        kept = set(getattr(module, _OPEN_ATTR, ()))
        setattr(module, _OPEN_ATTR, kept | named if opening else kept - named)


def _apply_bn_policies(model: nn.Module) -> None:
    for module in model.modules():
        policy = getattr(module, _POLICY_ATTR, None)
        if policy is None or not keeps_stats(module):
            continue
        opened = getattr(module, _OPEN_ATTR, ())
        for name, p in module.named_parameters(recurse=False):
            p.requires_grad_(policy in BN_AFFINE_POLICIES or name in opened)
        if policy in BN_EVAL_POLICIES:
            _hold(module)
        elif _has_eval_hook(module):
            _remove_eval_hook(module)
            module.train(model.training)


def hold_bn_statistics(model: nn.Module) -> None:
    """Run the BatchNorm layers of the parts that train in eval, as a frozen part's: their statistics stay as they
    are (their scale and shift still train). lp-ft's fine-tune: its probe fitted the head on features normalised by
    the pretrained statistics, and batch statistics in training moved them under it (Fashion-MNIST, 100 images a
    class, 64 px: 72.9 / 75.9 % test accuracy, 82.2 / 81.9 % held; ``benchmarks/README.md``). It holds for the
    model's life: the layers a later ``unfreeze`` (an ``Unfreezer``) releases are held too.

    >>> import torch, torchvision
    >>> m = torchvision.models.resnet18(); hold_bn_statistics(m); _ = m.train()
    >>> _ = m(torch.zeros(2, 3, 32, 32)); m.bn1.training, m.bn1.weight.requires_grad
    (False, True)
    """
    model = unwrap(model)
    setattr(model, _HOLD_ATTR, True)
    for module in model.modules():
        if keeps_stats(module) and policy_of(module) is None:
            _hold(module)


def _release(module: nn.Module) -> None:
    """Make a BatchNorm layer an ordinary one again: no policy, no hook, trainable, following model.train()."""
    _remove_eval_hook(module)
    setattr(module, _POLICY_ATTR, None)
    setattr(module, _OPEN_ATTR, set())
    for p in module.parameters(recurse=False):
        p.requires_grad_(True)


def _keep_eval(module: nn.Module, args: Tuple[torch.Tensor]) -> None:  # noqa: UP006 - typing.Tuple: TorchScript's
    # model.train() flips every submodule back to training mode; a frozen BN must keep using (and never update)
    # its running statistics, so it is put back into eval mode right before each forward. torch.jit.script compiles
    # the hook with the model, and cannot compile eval(): a scripted model is scripted for inference, in eval mode.
    if not torch.jit.is_scripting():
        _back_to_eval(module)


def _back_to_eval(module: nn.Module) -> None:
    if module.training:
        module.eval()


def _is_eval_hook(hook: object) -> bool:
    # by name, not identity: a reloaded module (a notebook's %autoreload) has a new _keep_eval, and the hooks put on
    # before it were no longer found, so unfreeze left those layers in eval with frozen statistics
    return getattr(hook, "__module__", None) == __name__ and getattr(hook, "__qualname__", None) == "_keep_eval"


def _has_eval_hook(module: nn.Module) -> bool:
    return any(_is_eval_hook(h) for h in module._forward_pre_hooks.values())


def holds_stats(module: nn.Module) -> bool:
    """Whether ``module`` keeps its running statistics as they are (a frozen policy's layer, or one
    ``hold_bn_statistics`` holds): it runs in eval whatever ``model.train()`` set, from its next Python forward on (a
    CUDA graph's replay runs no hook, and leaves ``.training`` as ``model.train()`` set it)."""
    return _has_eval_hook(module)


def _hold(module: nn.Module) -> None:
    """Keep a BatchNorm layer's statistics as they are: in eval mode through ``model.train()`` (the hook), and through
    a reset. ``torch.optim.swa_utils.update_bn`` (and Lightning's weight averaging) reset every BatchNorm's statistics
    and recompute them in train mode: the hook kept a frozen layer in eval, so its pretrained statistics became
    mean 0, variance 1. Its ``reset_running_stats`` keeps them instead (``reset_parameters`` still resets its affine
    weights); the layer's own comes back when it is released."""
    if not _has_eval_hook(module):
        module.register_forward_pre_hook(_keep_eval)
    module.reset_running_stats = _statistics_held
    module.eval()


def _statistics_held() -> None:
    """A held BatchNorm layer's ``reset_running_stats``: its statistics stay (a module-level function: the layer
    pickles and deep-copies with it)."""


def _remove_eval_hook(module: nn.Module) -> None:
    for key in [k for k, h in module._forward_pre_hooks.items() if _is_eval_hook(h)]:
        del module._forward_pre_hooks[key]
    if getattr(module.__dict__.get("reset_running_stats"), "__name__", None) == _statistics_held.__name__:  # by name,
        del module.reset_running_stats  # as the hook is found: a reloaded module (%autoreload) has a new function


def idle_bn_policy(model: nn.Module, bn: str) -> str | None:
    """A note when a ``bn`` policy other than the default changes nothing: the model has no BatchNorm layers (a ViT's
    LayerNorms, a ConvNeXt's), or none is frozen whole (``freeze none``, ``bitfit``: they all train). Nothing said so.

    >>> import torchvision
    >>> idle_bn_policy(torchvision.models.vit_b_16(), "affine")[:47]
    'note: --bn affine changes nothing: the model ha'
    >>> idle_bn_policy(torchvision.models.resnet18(), "train")[:60]
    'note: --bn train changes nothing: no BatchNorm layer is froz'
    """
    norms = [m for m in unwrap(model).modules() if keeps_stats(m)]
    if bn == BN_DEFAULT or any(policy_of(m) is not None for m in norms):
        return None
    if norms:
        return (f"note: --bn {bn} changes nothing: no BatchNorm layer is frozen in this run (every one trains with "
                "its stage)")  # fmt: skip
    return (
        f"note: --bn {bn} changes nothing: the model has no BatchNorm layers (its other norms freeze and train "
        "with their stage)"
    )


def bn_mode(stage: Stage, model: nn.Module) -> str:
    """The BatchNorm mode of a stage: its frozen policy (with what an unfreeze opened of it: ``"frozen, bias trains"``),
    ``"trainable"``, ``"mixed"`` or ``"-"`` (no BatchNorm)."""
    modes = set()
    for name in stage.modules:
        for module in model.get_submodule(name).modules():
            if keeps_stats(module):
                trains = "trainable, eval stats" if _has_eval_hook(module) else "trainable"  # (hold_bn_statistics)
                policy, opened = policy_of(module), sorted(getattr(module, _OPEN_ATTR, ()))
                # "frozen" alone would hide the biases an unfreeze("*.bias") opened on it
                modes.add(f"{policy}, {'+'.join(opened)} trains" if policy and opened else policy or trains)
    if not modes:
        return "-"
    return modes.pop() if len(modes) == 1 else "mixed"
