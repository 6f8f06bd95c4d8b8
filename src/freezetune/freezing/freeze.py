"""Freezing: which parameters train, named by a spec.

A spec names what to (un)freeze: ``"backbone"`` (all but the head), ``"all"``, ``"none"``, ``"bitfit"`` (the
backbone but its biases and normalisation parameters), an int ``n`` (the first ``n`` stages, negative as in
slicing), a stage name, a glob over qualified module/parameter names, or a list of these. BatchNorm layers inside a
frozen part follow one of four policies (``bn_policy``): ``"frozen"`` (the default: statistics and affine frozen,
eval mode kept through ``model.train()``), ``"affine"``, ``"train"`` and ``"affine-only"``; dropout and drop path
layers in the frozen stages, one of two (``freezetune.freezing.dropout``).
"""

from __future__ import annotations

import fnmatch
import numbers
import warnings
from collections.abc import Sequence

from torch import nn

from freezetune.config.options import BN_DEFAULT, FREEZE_DEFAULT, FREEZE_KEYWORDS
from freezetune.errors import SpecError, choices
from freezetune.freezing.bn_policy import (
    _keep_eval,  # noqa: F401 - a model pickled whole by an earlier freezetune names it here
    bn_mode,
    check_bn_policy,
    set_frozen,
    set_released,
)
from freezetune.freezing.dropout import apply_dropout_policy, check_dropout_policy
from freezetune.model.stages import Stage, stages
from freezetune.model.tree import check_materialized, is_norm, unwrap

Spec = str | int | Sequence[str | int]


def freeze(model: nn.Module, spec: Spec = FREEZE_DEFAULT, *, bn: str = BN_DEFAULT, dropout: str | None = None) -> None:
    """Freeze the parameters ``spec`` names; BatchNorm layers inside follow the ``bn`` policy, dropout layers before
    the first stage that trains the ``dropout`` policy.

    It adds to what is frozen: what an earlier call froze stays frozen (``"none"`` changes nothing, and ``"bitfit"``
    after ``"backbone"`` trains no bias it froze; ``unfreeze(model)`` first starts from a trainable model, which
    ``freeze_to`` does itself).

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
        dropout: the dropout, drop path and stochastic depth layers of the stages before the first that trains:
            ``"keep"`` (they draw in training, as built) or ``"off"`` (run as at inference even after
            ``model.train()``: the prefix is then deterministic, so the feature cache holds it; see
            ``freezetune.freezing.dropout``). None: the policy an earlier call gave, else ``"keep"``. An ``unfreeze``
            keeps the policy; the stages it opens draw again.

    Raises:
        SpecError: an unknown stage name, a glob that matches nothing, an int beyond the stage count, an unknown
            ``bn`` or ``dropout``; the message lists the valid choices.

    >>> import torchvision
    >>> m = torchvision.models.resnet18()
    >>> freeze(m, "backbone")
    >>> count_parameters(m)
    (513000, 11689512)
    """
    check_bn_policy(bn)
    check_dropout_policy(dropout)
    model = unwrap(model)
    st = stages(model)
    params = _resolve(model, st, spec)
    _say_earlier_freezes_stay(model, spec, params)
    for p in params.values():
        p.requires_grad_(False)
    set_frozen(model, params, bn)
    apply_dropout_policy(model, st, dropout)


def _say_earlier_freezes_stay(model: nn.Module, spec: Spec, params: dict) -> None:
    """Warn when a spec that reads as the model's whole state (``"none"``, ``"bitfit"``) leaves parameters an earlier
    call froze frozen: ``freeze(m, "bitfit")`` after ``"backbone"`` trained the head alone, in silence."""
    if not (isinstance(spec, str) and spec in ("none", "bitfit")):
        return
    kept = sum(p.numel() for p in model.parameters() if not p.requires_grad and id(p) not in params)
    if kept:
        warnings.warn(f"freeze {spec!r} adds to what is frozen: {kept:,} parameters frozen earlier stay frozen; "
                      "call unfreeze(model) first to start from a trainable model", stacklevel=3)  # fmt: skip


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
    set_released(model, params, bn)
    apply_dropout_policy(model, st)


def spec_items(spec: Spec) -> list[str | int]:
    """The items of ``spec``, one item or a list of them.

    >>> spec_items("layer4"), spec_items(["stem", 2])
    (['layer4'], ['stem', 2])
    """
    return list(spec) if isinstance(spec, (list, tuple)) else [spec]


def is_count(item: object) -> bool:
    """Whether a spec item is an int (NumPy's too), a number of stages (``True`` is not one)."""
    return isinstance(item, numbers.Integral) and not isinstance(item, bool)


def warn_negative_unfreeze(spec: Spec) -> None:
    """Warn that a negative int opens every stage but the last ``-n``: fastai's ``freeze_to(-2)`` habit reads it as
    "the last two", and the head then stayed frozen between trained stages."""
    for n in (s for s in spec_items(spec) if is_count(s) and s < 0):
        warnings.warn(f"unfreezing {n} opens every stage but the last {-n} (as freeze({n}) freezes them); to train the "
                      f"last {-n}, unfreeze their names or use freeze_to(model, {n})", stacklevel=3)  # fmt: skip


def freeze_to(model: nn.Module, n: int, *, bn: str = BN_DEFAULT, dropout: str | None = None) -> None:
    """Freeze ``stages[:n]`` and make ``stages[n:]`` trainable (``n`` may be negative, as in slicing).

    Args:
        model: as in ``freeze``.
        n: the stages to freeze, from the input: ``-2`` trains the last two (the head and the stage before it).
        bn: the BatchNorm policy of the frozen part, as in ``freeze``.
        dropout: the dropout policy of the frozen stages, as in ``freeze`` (None: the one given before, else keep).

    Raises:
        SpecError: ``n`` is not an int, or beyond the model's stage count (which the message names).

    >>> import torchvision
    >>> m = torchvision.models.resnet18()
    >>> freeze_to(m, -2)
    >>> [s.name for s in stages(m) if s.num_trainable]
    ['layer4', 'fc']
    """
    if not is_count(n):
        raise SpecError(f"freeze_to takes an int number of stages, got {n!r}")
    check_dropout_policy(dropout)
    n, st = int(n), stages(model)
    _check_count(n, st)
    names = [s.name for s in st]
    frozen, trainable = names[:n], names[n:]
    if trainable:
        unfreeze(model, trainable, bn=bn)
    if frozen:
        freeze(model, frozen, bn=bn, dropout=dropout)
    else:
        apply_dropout_policy(unwrap(model), st, dropout)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; shared parameters count once.

    >>> count_parameters(nn.Linear(3, 2))
    (8, 8)
    """
    model = unwrap(model)  # a model's name is refused by unwrap
    check_materialized(model)
    params = list(model.parameters())  # de-duplicated by identity
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def summary(model: nn.Module) -> str:
    """A table with one row per stage: name, parameters, trainable parameters, BatchNorm mode.

    >>> print(summary(nn.Sequential(nn.Linear(3, 2))).splitlines()[0].split())
    ['stage', 'params', 'trainable', 'bn']
    """
    model = unwrap(model)
    trainable, total = count_parameters(model)  # first: it names lazy layers, whose stages' sizes cannot be counted
    st = stages(model)
    width = max([len(s.name) for s in st] + [5])
    lines = [f"{'stage':<{width}}  {'params':>12}  {'trainable':>12}  bn"]
    for s in st:
        lines.append(f"{s.name:<{width}}  {s.num_params:>12,}  {s.num_trainable:>12,}  {bn_mode(s, model)}")
    share = _trainable_share(trainable, total)
    lines.append(f"{'total':<{width}}  {total:>12,}  {trainable:>12,}  ({share} trainable)")
    return "\n".join(lines)


def _trainable_share(trainable: int, total: int) -> str:
    """``trainable`` of ``total`` as a percentage that reads 0 % or 100 % only when it is: a linear probe of ResNet-18
    trains 0.014 %, which one decimal showed as "0.0%".

    >>> [_trainable_share(n, total) for n, total in ((1_539, 11_178_051), (0, 10), (5, 10), (9_999, 10_000))]
    ['0.014%', '0.0%', '50.0%', '99.99%']
    """
    pct = 100.0 * trainable / max(total, 1)
    digits = 1
    while 0 < trainable < total and round(pct, digits) in (0.0, 100.0) and digits < 12:
        digits += 1
    return f"{pct:.{digits + 1 if digits > 1 and pct < 50 else digits}f}%"  # a small share: two significant digits


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
    if is_count(spec):
        n = int(spec)  # a NumPy int as a plain one
        _check_count(n, st)
        return _params_of(st[:n])
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
            f"{spec!r} matches no stage, module or parameter{_full_name_hint(model, spec)}; stages are: "
            f"{choices(s.name for s in st)} (or {choices(FREEZE_KEYWORDS)}, an int, or a glob such as 'layer[1-3]*')"
        )
    return out


def _full_name_hint(model: nn.Module, spec: str) -> str:
    """A glob that matches once the module names above it are put in front: a stage is named short ('h.0', a
    GPT-2's block), a module glob matches the full name ('transformer.h.*.attn')."""
    # modules with parameters only: a sentence model's pooler is a parameterless TokenPooler, and "did you mean
    # 'bert.pooler'?" named a module that was refused in turn as matching no stage
    names = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters())]
    for prefix in dict.fromkeys(n.rpartition(".")[0] for n in names if "." in n):
        full = f"{prefix}.{spec}"
        if any(fnmatch.fnmatchcase(n, full) for n in names):
            return f" (module names are full: did you mean {full!r}?)"
    return ""


def _bitfit_frozen(model: nn.Module, st: list[Stage]) -> dict[int, nn.Parameter]:
    """BitFit (Ben Zaken et al. 2022): every backbone weight but biases and normalisation parameters is frozen.

    The norms' parameters keep training, so their BatchNorm layers are not frozen either (as with ``bn="affine"``).
    """
    # a norm by its class name, as everywhere (model.tree.is_norm): RMSNorm and Hugging Face's *RMSNorm were
    # frozen as weights, and a Llama classifier, which has no biases, trained its head alone
    keep = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)}
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
