"""Freezing and the BatchNorm policy of frozen parts.

A spec names what to (un)freeze: ``"backbone"`` (all but the head), ``"all"``, ``"none"``, ``"bitfit"`` (the
backbone but its biases and normalisation parameters), an int ``n`` (the first
``n`` stages, negative as in slicing), a stage name, a glob over qualified module/parameter names, or a list of
these. BatchNorm layers inside a frozen part follow one of four policies:

- ``"frozen"``: affine parameters and running statistics frozen; the layer stays in eval mode even after
  ``model.train()`` (a forward pre-hook puts it back), so a training pass leaves its statistics bit-identical.
- ``"affine"``: weight/bias stay trainable, statistics update in train mode (fastai/Lightning ``train_bn=True``).
- ``"train"``: weight/bias frozen, statistics update in train mode (what plain ``requires_grad=False`` does).
- ``"affine-only"``: weight/bias trainable, statistics frozen as under ``"frozen"`` (eval mode kept): the scale and
  shift adapt to the new data while the pretrained statistics stay, whatever the batch size.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Sequence
from typing import Tuple  # noqa: UP035 - TorchScript reads the hook's annotation

import torch
from torch import nn

from freezetune.errors import SpecError, choices
from freezetune.heads import unwrap
from freezetune.options import (
    BN_AFFINE_POLICIES,
    BN_DEFAULT,
    BN_EVAL_POLICIES,
    BN_POLICIES,
    FREEZE_DEFAULT,
    FREEZE_KEYWORDS,
    check_choice,
)
from freezetune.stages import Stage, stages

Spec = str | int | Sequence[str | int]

# The policy freezetune keeps on a BatchNorm module it froze: a plain attribute, so it survives deepcopy/pickling.
# The eval-keeping hook is found again by identity of its function rather than through a stored handle, because a
# deep-copied handle would still point at the original module's hook table.
_POLICY_ATTR = "_freezetune_bn"
_HOLD_ATTR = "_freezetune_hold_bn_stats"  # on the model: hold_bn_statistics was asked, unfreeze keeps it
_OPEN_ATTR = "_freezetune_bn_open"  # on a frozen-policy BatchNorm: its parameters unfreeze named alone ("*.bias")


def freeze(model: nn.Module, spec: Spec = FREEZE_DEFAULT, *, bn: str = BN_DEFAULT) -> None:
    """Freeze the parameters ``spec`` names; BatchNorm layers inside follow the ``bn`` policy.

    Args:
        model: any ``nn.Module`` (under DDP, ``DataParallel`` or ``torch.compile``: the model inside); its stages are
            ``stages(model)``, head last.
        spec: ``"backbone"`` (every stage but the head), ``"all"``, ``"none"``, ``"bitfit"`` (all but biases, norms
            and the head), an int ``n`` (the first ``n`` stages; negative: all but the last ``-n``), a stage name, a
            glob of parameter or stage names (``"layer[1-3]*"``), or a list of these.
        bn: the BatchNorm layers in the frozen part: ``"frozen"`` (statistics and affine frozen, run in eval even
            after ``model.train()``), ``"affine"`` (affine trains, statistics update), ``"train"`` (statistics
            update only) or ``"affine-only"`` (affine trains, statistics frozen in eval). The policy lives on the
            layers: convert to ``SyncBatchNorm`` before freezing, as the conversion builds new layers without it.

    Raises:
        SpecError: an unknown stage name, a glob that matches nothing, an int beyond the stage count, an unknown
            ``bn``; the message lists the valid choices.

    >>> import torchvision
    >>> m = torchvision.models.resnet18()
    >>> freeze(m, "backbone")
    >>> count_parameters(m)
    (513000, 11689512)
    """
    check_bn_policy(bn)
    model = unwrap(model)
    st = stages(model)
    params = _resolve(model, st, spec)
    for p in params.values():
        p.requires_grad_(False)
    _open_bn_params(model, params, opening=False)
    for bn_module in _bn_modules_within(model, params):
        setattr(bn_module, _POLICY_ATTR, bn)
    _apply_bn_policies(model)


def unfreeze(model: nn.Module, spec: Spec = "all", *, bn: str | None = None) -> None:
    """Make the parameters ``spec`` names trainable; their BatchNorm layers become ordinary layers again.

    The BatchNorm layers of the parts that stay frozen keep their policy, unless ``bn`` names one for all of them; a
    parameter of one named alone (``"*.bias"``) trains, its layer's statistics frozen as the policy says.
    An int ``n`` names the first ``n`` stages, as in ``freeze``: ``unfreeze(m, -2)`` opens all stages but the last two
    (``freeze_to(m, -2)`` is "train the last two").

    >>> import torchvision
    >>> m = torchvision.models.resnet18()
    >>> freeze(m, "all"); unfreeze(m, "layer4")
    >>> [s.name for s in stages(m) if s.num_trainable]
    ['layer4']
    """
    if bn is not None:
        check_bn_policy(bn)
    warn_negative_unfreeze(spec)
    model = unwrap(model)
    st = stages(model)
    params = _resolve(model, st, spec)
    for p in params.values():
        p.requires_grad_(True)
    for bn_module in _bn_modules_within(model, params):
        _release(bn_module)
        bn_module.train(model.training)
    _open_bn_params(model, params, opening=True)
    for module in model.modules():
        if bn is not None and getattr(module, _POLICY_ATTR, None) is not None:
            setattr(module, _POLICY_ATTR, bn)
    _apply_bn_policies(model)
    if getattr(model, _HOLD_ATTR, False):  # the released layers train, their statistics held as the others'
        hold_bn_statistics(model)


def warn_negative_unfreeze(spec: Spec) -> None:
    """Warn that a negative int opens every stage but the last ``-n``: fastai's ``freeze_to(-2)`` habit reads it as
    "the last two", and the head then stayed frozen between trained stages."""
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    for n in (s for s in specs if isinstance(s, int) and not isinstance(s, bool) and s < 0):
        warnings.warn(f"unfreezing {n} opens every stage but the last {-n} (as freeze({n}) freezes them); to train the "
                      f"last {-n}, unfreeze their names or use freeze_to(model, {n})", stacklevel=3)  # fmt: skip


def freeze_to(model: nn.Module, n: int, *, bn: str = BN_DEFAULT) -> None:
    """Freeze ``stages[:n]`` and make ``stages[n:]`` trainable (``n`` may be negative, as in slicing).

    Args:
        model: as in ``freeze``.
        n: the stages to freeze, from the input: ``-2`` trains the last two (the head and the stage before it).
        bn: the BatchNorm policy of the frozen part, as in ``freeze``.

    Raises:
        SpecError: ``n`` is not an int, or beyond the model's stage count (which the message names).

    >>> import torchvision
    >>> m = torchvision.models.resnet18()
    >>> freeze_to(m, -2)
    >>> [s.name for s in stages(m) if s.num_trainable]
    ['layer4', 'fc']
    """
    if not isinstance(n, int) or isinstance(n, bool):
        raise SpecError(f"freeze_to takes an int number of stages, got {n!r}")
    st = stages(model)
    _check_count(n, st)
    names = [s.name for s in st]
    frozen, trainable = names[:n], names[n:]
    if trainable:
        unfreeze(model, trainable, bn=bn)
    if frozen:
        freeze(model, frozen, bn=bn)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; shared parameters count once.

    >>> count_parameters(nn.Linear(3, 2))
    (8, 8)
    """
    params = list(unwrap(model).parameters())  # de-duplicated by identity; a model's name is refused by unwrap
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def bn_mode(stage: Stage, model: nn.Module) -> str:
    """The BatchNorm mode of a stage: its frozen policy (with what an unfreeze opened of it: ``"frozen, bias trains"``),
    ``"trainable"``, ``"mixed"`` or ``"-"`` (no BatchNorm)."""
    modes = set()
    for name in stage.modules:
        for module in model.get_submodule(name).modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                trains = "trainable, eval stats" if _has_eval_hook(module) else "trainable"  # (hold_bn_statistics)
                policy, opened = policy_of(module), sorted(getattr(module, _OPEN_ATTR, ()))
                # "frozen" alone would hide the biases an unfreeze("*.bias") opened on it
                modes.add(f"{policy}, {'+'.join(opened)} trains" if policy and opened else policy or trains)
    if not modes:
        return "-"
    return modes.pop() if len(modes) == 1 else "mixed"


def summary(model: nn.Module) -> str:
    """A table with one row per stage: name, parameters, trainable parameters, BatchNorm mode.

    >>> print(summary(nn.Sequential(nn.Linear(3, 2))).splitlines()[0].split())
    ['stage', 'params', 'trainable', 'bn']
    """
    model = unwrap(model)
    st = stages(model)
    width = max([len(s.name) for s in st] + [5])
    lines = [f"{'stage':<{width}}  {'params':>12}  {'trainable':>12}  bn"]
    for s in st:
        lines.append(f"{s.name:<{width}}  {s.num_params:>12,}  {s.num_trainable:>12,}  {bn_mode(s, model)}")
    trainable, total = count_parameters(model)
    pct = 100.0 * trainable / max(total, 1)
    lines.append(f"{'total':<{width}}  {total:>12,}  {trainable:>12,}  ({pct:.1f}% trainable)")
    return "\n".join(lines)


# --- spec resolution ----------------------------------------------------------------------------------------


def resolve_stages(model: nn.Module, spec: Spec) -> list[Stage]:
    """The stages that ``spec`` touches, in model order (a glob touching part of a stage includes that stage)."""
    model = unwrap(model)
    st = stages(model)
    ids = {id(p) for p in _resolve(model, st, spec).values()}
    return [s for s in st if any(id(p) in ids for p in s.params)]


def _resolve(model: nn.Module, st: list[Stage], spec: Spec) -> dict[int, nn.Parameter]:
    """Map a spec to the parameters it names, keyed by identity."""
    if isinstance(spec, (list, tuple)):
        out: dict[int, nn.Parameter] = {}
        for item in spec:
            out.update(_resolve(model, st, item))
        return out
    if isinstance(spec, int) and not isinstance(spec, bool):
        _check_count(spec, st)
        return _params_of(st[:spec])
    if not isinstance(spec, str):
        raise SpecError(f"a freeze spec is a str, an int or a list of them, got {type(spec).__name__}")
    return _resolve_name(model, st, spec)


def _resolve_name(model: nn.Module, st: list[Stage], spec: str) -> dict[int, nn.Parameter]:
    if spec == "backbone":
        return _params_of(st[:-1])
    if spec == "all":
        return _params_of(st)
    if spec == "none":
        return {}
    if spec == "bitfit":
        return _bitfit_frozen(model, st)
    if spec == "auto":
        raise SpecError("freeze 'auto' is a recipe, decided by measurement: run it through freezetune.train(cfg) "
                        "or the CLI, or give a freeze spec")  # fmt: skip
    by_name = {s.name: s for s in st}
    if spec in by_name:
        return _params_of([by_name[spec]])
    matched = [s for s in st if fnmatch.fnmatchcase(s.name, spec)]
    out = _params_of(matched)
    for mod_name, module in model.named_modules():
        if mod_name and fnmatch.fnmatchcase(mod_name, spec):
            out.update({id(p): p for p in module.parameters()})
    for p_name, p in model.named_parameters():
        if fnmatch.fnmatchcase(p_name, spec):
            out[id(p)] = p
    if not out:
        raise SpecError(
            f"{spec!r} matches no stage, module or parameter; stages are: {choices(s.name for s in st)} "
            f"(or {choices(FREEZE_KEYWORDS)}, an int, or a glob such as 'layer[1-3]*')"
        )
    return out


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _bitfit_frozen(model: nn.Module, st: list[Stage]) -> dict[int, nn.Parameter]:
    """BitFit (Ben Zaken et al. 2022): every backbone weight but biases and normalisation parameters is frozen.

    The norms' parameters keep training, so their BatchNorm layers are not frozen either (as with ``bn="affine"``).
    """
    keep = {id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)}
    keep |= {id(p) for name, p in model.named_parameters() if name.endswith("bias")}
    return {i: p for i, p in _params_of(st[:-1]).items() if i not in keep}


def _check_count(n: int, st: list[Stage]) -> None:
    """An int spec ``n`` names ``stages[:n]``: past the stage count it would silently mean "all" or "none"."""
    if not -len(st) <= n <= len(st):
        names = choices(s.name for s in st)
        raise SpecError(f"stage count {n} is out of range: the model has {len(st)} stages ({names}); an int n names "
                        f"the first n stages and -n all but the last n, from {-len(st)} to {len(st)}")  # fmt: skip


def _params_of(selected: list[Stage]) -> dict[int, nn.Parameter]:
    return {id(p): p for s in selected for p in s.params}


# --- BatchNorm policy ---------------------------------------------------------------------------------------


def policy_of(module: nn.Module) -> str | None:
    """The BatchNorm policy ``freeze`` gave ``module`` (None: it is not a frozen BatchNorm layer)."""
    return getattr(module, _POLICY_ATTR, None)


def policies(model: nn.Module) -> set[str]:
    """The BatchNorm policies the frozen layers of ``model`` have (empty when none is frozen).

    >>> import torchvision
    >>> m = torchvision.models.resnet18(); freeze(m, "backbone", bn="affine"); policies(m)
    {'affine'}
    """
    return {p for p in map(policy_of, unwrap(model).modules()) if p is not None}


def check_bn_policy(bn: str) -> None:
    """Raise ``SpecError`` naming the policies unless ``bn`` is one of them."""
    check_choice("BatchNorm policy", bn, BN_POLICIES, SpecError)


def _bn_modules_within(model: nn.Module, params: dict[int, nn.Parameter]) -> list[nn.Module]:
    """BatchNorm layers whose parameters all lie in ``params`` (non-affine ones: whose parent's do)."""
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        own = list(module.parameters())
        if not own:
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            own = list(parent.parameters())
        if own and all(id(p) in params for p in own):
            out.append(module)
    return out


def _open_bn_params(model: nn.Module, params: dict[int, nn.Parameter], *, opening: bool) -> None:
    """Record on each BatchNorm layer with a policy which of its parameters ``unfreeze`` named alone (``"*.bias"``:
    BitFit by hand), or, ``freeze`` naming them again, forget them. They train while the layer keeps its policy (its
    statistics stay frozen); the policy had set them back to frozen, without a word."""
    for module in model.modules():
        if getattr(module, _POLICY_ATTR, None) is None or not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        named = {name for name, p in module.named_parameters(recurse=False) if id(p) in params}
        kept = set(getattr(module, _OPEN_ATTR, ()))
        setattr(module, _OPEN_ATTR, kept | named if opening else kept - named)


def _apply_bn_policies(model: nn.Module) -> None:
    for module in model.modules():
        policy = getattr(module, _POLICY_ATTR, None)
        if policy is None or not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        opened = getattr(module, _OPEN_ATTR, ())
        for name, p in module.named_parameters(recurse=False):
            p.requires_grad_(policy in BN_AFFINE_POLICIES or name in opened)
        if policy in BN_EVAL_POLICIES:
            if not _has_eval_hook(module):
                module.register_forward_pre_hook(_keep_eval)
            module.eval()
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
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and policy_of(module) is None:
            if not _has_eval_hook(module):
                module.register_forward_pre_hook(_keep_eval)
            module.eval()


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


def _remove_eval_hook(module: nn.Module) -> None:
    for key in [k for k, h in module._forward_pre_hooks.items() if _is_eval_hook(h)]:
        del module._forward_pre_hooks[key]


def idle_bn_policy(model: nn.Module, bn: str) -> str | None:
    """A note when a ``bn`` policy other than the default changes nothing: the model has no BatchNorm layers (a ViT's
    LayerNorms, a ConvNeXt's), or none is frozen whole (``freeze none``, ``bitfit``: they all train). Nothing said so.

    >>> import torchvision
    >>> idle_bn_policy(torchvision.models.vit_b_16(), "affine")[:47]
    'note: --bn affine changes nothing: the model ha'
    >>> idle_bn_policy(torchvision.models.resnet18(), "train")[:60]
    'note: --bn train changes nothing: no BatchNorm layer is froz'
    """
    norms = [m for m in unwrap(model).modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bn == BN_DEFAULT or any(policy_of(m) is not None for m in norms):
        return None
    if norms:
        return (f"note: --bn {bn} changes nothing: no BatchNorm layer is frozen in this run (every one trains with "
                "its stage)")  # fmt: skip
    return (
        f"note: --bn {bn} changes nothing: the model has no BatchNorm layers (its other norms freeze and train "
        "with their stage)"
    )
