"""Optimizer parameter groups: one group per stage, trainable parameters only, each parameter exactly once.

The learning rate of a stage follows one rule, shared with progressive unfreezing so a stage unfrozen later gets the
LR it would have had from the start: an explicit ``stage_lrs[name]``, else ``lr / decay**depth`` where the head has
depth 0 and depth counts every stage, frozen or not.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from freezetune.config.options import DECAY_MEANS
from freezetune.errors import SpecError, choices
from freezetune.model.stages import Stage, stages
from freezetune.model.tree import unwrap


class LRRule:
    """The per-stage learning-rate rule: ``stage_lrs`` overrides, else ``lr / decay**depth`` (head depth 0).

    >>> rule = LRRule(["stem", "body", "head"], 1e-3, decay=10)
    >>> rule("body")
    0.0001
    """

    def __init__(
        self,
        stage_names: list[str],
        lr: float,
        *,
        stage_lrs: Mapping[str, float] | str | None = None,
        decay: float | None = None,
    ) -> None:
        stage_lrs = resolve_stage_lrs(checked_lrs(lr, stage_lrs, decay), stage_names)
        self.depth = {name: len(stage_names) - 1 - i for i, name in enumerate(stage_names)}
        self.lr, self.stage_lrs, self.decay = float(lr), dict(stage_lrs or {}), decay

    def __call__(self, stage_name: str) -> float:
        if stage_name in self.stage_lrs:
            return float(self.stage_lrs[stage_name])
        if self.decay:
            return self.lr / self.decay ** self.depth[stage_name]
        return self.lr


def resolve_stage_lrs(stage_lrs: Mapping[str, float], stage_names: list[str]) -> dict[str, float]:
    """Each stage's explicit LR: a stage named outright takes its own, one a glob matches (``"blocks.[4-6]"``,
    ``"layer*"``) the glob's.

    Raises:
        SpecError: a name or glob that matches no stage (the stages are listed), or a stage two globs match and no
            entry names outright.

    >>> resolve_stage_lrs({"blocks.[1-2]": 1e-4, "blocks.2": 2e-4}, ["blocks.0", "blocks.1", "blocks.2", "head"])
    {'blocks.2': 0.0002, 'blocks.1': 0.0001}
    """
    out = {name: float(lr) for name, lr in stage_lrs.items() if name in stage_names}
    matched_by: dict[str, str] = {}
    unknown = []
    for pattern, lr in stage_lrs.items():
        if pattern in stage_names:
            continue
        hits = [name for name in stage_names if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            unknown.append(pattern)
        for name in (n for n in hits if n not in stage_lrs):
            if name in matched_by:
                raise SpecError(f"stage_lrs: stage {name!r} matches both {matched_by[name]!r} and {pattern!r}; name it "
                                "outright to give it its LR")  # fmt: skip
            matched_by[name], out[name] = pattern, float(lr)
    if unknown:
        raise SpecError(f"stage_lrs names unknown stage(s) {choices(unknown)}; stages are: {choices(stage_names)}")
    return out


def param_groups(
    model: nn.Module,
    lr: float,
    *,
    stage_lrs: Mapping[str, float] | str | None = None,
    decay: float | None = None,
    weight_decay: float | None = None,
) -> list[dict]:
    """Optimizer groups for the trainable parameters of ``model``, one per stage (head last).

    Unless ``weight_decay`` is 0, each stage also gets a ``"<stage>/no_decay"`` twin with weight decay 0, holding its
    biases, norm parameters and the model's declared ``no_weight_decay()`` names (position embeddings, class tokens).
    ``weight_decay`` None (the default) leaves the other groups' decay to the optimizer's own setting (AdamW's 0.01,
    or what is passed to it); a number sets it in every group.

    Args:
        model: the model, frozen as wanted first (``freeze``, ``freeze_to``): frozen parameters get no group.
        lr: the head's learning rate, and every stage's unless ``stage_lrs`` or ``decay`` says otherwise.
        stage_lrs: learning rates by stage name or glob of names (``{"layer4": 1e-4}``, ``"layer4=1e-4,layer3=5e-5"``,
            ``"blocks.[4-6]=1e-4"``); a stage named outright takes its own over a glob's.
        decay: each stage not in ``stage_lrs`` trains at ``lr / decay ** depth``, depth 0 for the head.
        weight_decay: see above.

    Raises:
        SpecError: a negative learning rate, ``decay <= 0``, a stage name the model lacks (the stages are listed), or
            no trainable parameter at all.

    >>> import torch, torchvision
    >>> import freezetune as ft
    >>> m = torchvision.models.resnet18()
    >>> ft.freeze_to(m, -3)
    >>> [(g["name"], g["lr"]) for g in ft.param_groups(m, 1e-3, stage_lrs={"layer4": 1e-4, "layer3": 5e-5},
    ...                                                 weight_decay=0)]
    [('layer3', 5e-05), ('layer4', 0.0001), ('fc', 0.001)]
    >>> opt = torch.optim.SGD(ft.param_groups(m, 0.1), lr=0.1, weight_decay=5e-4)
    >>> [(g["name"], g["weight_decay"]) for g in opt.param_groups][-2:]
    [('fc', 0.0005), ('fc/no_decay', 0.0)]
    """
    check_weight_decay(weight_decay)
    model = unwrap(model)
    st = stages(model)
    rule = LRRule([s.name for s in st], lr, stage_lrs=stage_lrs, decay=decay)
    no_decay = no_decay_names(model)
    seen: set[int] = set()
    groups: list[dict] = []
    for stage in st:
        groups += stage_groups(stage, rule(stage.name), weight_decay, no_decay, seen)
    if not groups:
        raise SpecError(
            f"the model has no trainable parameters; unfreeze a stage first (stages are: {choices(s.name for s in st)})"
        )
    return groups


def _finite_non_negative(value: object) -> bool:
    """A real number (not a bool; numpy's too, and a one-element tensor, as torch's optimizers take) in [0, inf):
    what a learning rate and a weight decay must be (NaN is not).

    >>> import numpy as np, torch
    >>> [_finite_non_negative(v) for v in (1e-3, np.float32(1e-3), torch.tensor(1e-3), True, -1.0, float("nan"))]
    [True, True, True, False, False, False]
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, numbers.Real) and bool(0 <= value < math.inf)


def checked_lrs(lr: float | None, stage_lrs: Mapping[str, float] | str | None, decay: float | None, *,
                lr_given: bool = True) -> dict:  # fmt: skip
    """``stage_lrs`` as a dict (the ``--stage-lrs`` string parsed), after checking it, ``lr`` and ``decay``: what the
    LR rule takes, checked where it is given (a Lightning callback's, at its construction, where ``lr`` may be left
    to the optimizer: ``lr_given=False`` with None).

    >>> checked_lrs(1e-3, "layer4=1e-4", 2.0)
    {'layer4': 0.0001}
    """
    if isinstance(stage_lrs, str):  # "layer4=1e-4,layer3=5e-5", as --stage-lrs takes: not its characters
        from freezetune.config.train_config import parse_stage_lrs

        stage_lrs = parse_stage_lrs(stage_lrs)
    given = {**({} if lr is None and not lr_given else {"lr": lr}), **dict(stage_lrs or {})}
    bad = [f"{k}={v!r}" for k, v in given.items() if not _finite_non_negative(v)]
    if bad:  # a negative LR climbs the loss; torch's optimizers refuse it only at their construction
        raise SpecError(f"learning rates must be finite numbers >= 0, got {', '.join(bad)}")
    # nan too, and a bool, as for lr: decay=True ran as 1.0, every stage at lr, nothing decayed
    # below 1 the stem trained fastest: timm's layer_decay 0.75 passed as decay gave it 42x the head's LR
    bad_decay = isinstance(decay, bool) or not (isinstance(decay, numbers.Real) and 1 <= decay < math.inf)
    if decay is not None and bad_decay:
        raise SpecError(f"decay must be >= 1 and finite, got {decay!r}: {DECAY_MEANS}")
    return dict(stage_lrs or {})


def check_weight_decay(weight_decay: float | None) -> None:
    """Refuse a weight decay that is not None (the optimizer's own) or a finite number >= 0: torch's optimizers check
    only their constructor's default, and a negative decay pushes every weight away from zero.

    >>> check_weight_decay(-0.5)
    Traceback (most recent call last):
    freezetune.errors.SpecError: weight_decay must be a finite number >= 0 (or None: the optimizer's own), got -0.5
    """
    if weight_decay is not None and not _finite_non_negative(weight_decay):
        raise SpecError(
            f"weight_decay must be a finite number >= 0 (or None: the optimizer's own), got {weight_decay!r}"
        )


def stage_groups(stage: Stage, lr: float, weight_decay: float | None, no_decay: set[str], seen: set[int]) -> list[dict]:
    """The group(s) of one stage's trainable parameters not in ``seen`` (updated in place); ``weight_decay`` None:
    the optimizer's own, left out of the decaying group."""
    decay_params: list[nn.Parameter] = []
    skip_params: list[nn.Parameter] = []
    for name, p in zip(stage.param_names, stage.params, strict=True):
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # by identity: tied weights go once, equal-valued distinct params are all kept
        if weight_decay != 0 and (p.ndim <= 1 or name in no_decay):
            skip_params.append(p)
        else:
            decay_params.append(p)
    out = []
    if decay_params:
        decays = {} if weight_decay is None else {"weight_decay": weight_decay}
        out.append({"params": decay_params, "name": stage.name, "lr": lr, **decays})
    if skip_params:
        out.append({"params": skip_params, "name": f"{stage.name}{NO_DECAY}", "lr": lr, "weight_decay": 0.0})
    return out


NO_DECAY = "/no_decay"  # the suffix of a stage's twin group holding its biases and norm parameters


def group_stage(group: dict) -> str:
    """The stage an optimizer group of ``param_groups`` belongs to ("" for a group named otherwise, or not at all).

    >>> group_stage({"name": "layer4/no_decay"}), group_stage({"name": "fc"}), group_stage({})
    ('layer4', 'fc', '')
    """
    return str(group.get("name", "")).removesuffix(NO_DECAY)


def is_no_decay(group: dict) -> bool:
    """Whether an optimizer group is a stage's ``/no_decay`` twin."""
    return str(group.get("name", "")).endswith(NO_DECAY)


def stage_lr_text(param_groups: list[dict], names: list[str]) -> str:
    """The LRs of stages ``names`` as the log says them where they open: each stage's own (``stage_lrs``, ``decay``)
    at the schedule's peak, and where the schedule stands now.

    >>> stage_lr_text([{"name": "fc", "lr": 1e-3}, {"name": "layer4", "lr": 7.5e-5, "max_lr": 1e-4}], ["layer4"])
    'lr 1.0e-04 at its peak, 7.5e-05 now'
    >>> stage_lr_text([{"name": "layer4", "lr": 1e-4}, {"name": "layer3/no_decay", "lr": 5e-5}], ["layer4", "layer3"])
    'lr layer4 1.0e-04, layer3 5.0e-05'
    """
    own = {}
    for group in param_groups:  # a stage's /no_decay twin has its LR: the first group of each stage says it
        own.setdefault(group_stage(group), group)
    opened = [own[n] for n in names if n in own]
    if not opened:
        return ""
    peaks = [float(g.get("max_lr", g.get("initial_lr", g["lr"]))) for g in opened]
    said = f"lr {peaks[0]:.1e}" if len(opened) == 1 else "lr " + ", ".join(
        f"{n} {lr:.1e}" for n, lr in zip([n for n in names if n in own], peaks, strict=True))  # fmt: skip
    now = float(opened[0]["lr"])
    if math.isclose(now, peaks[0], rel_tol=1e-9):
        return said
    if len(opened) == 1:
        return f"{said} at its peak, {now:.1e} now"
    return f"{said} at their peaks, {now / peaks[0]:.2g}x now"


# Parameters exempt from weight decay by convention, by their own name, where a model declares none: torchvision's ViT
# class_token and pos_embedding, Swin's relative_position_bias_table, Hugging Face ViT's cls_token and
# position_embeddings (timm's models list theirs in no_weight_decay()). Not 1-D, they decayed toward zero as weights.
# torchvision ConvNeXt's layer_scale is (C, 1, 1) where timm's and the paper's gamma is 1-D, and exempt.
NO_DECAY_PARAMETERS = ("cls_token", "class_token", "dist_token", "mask_token", "pos_embed", "pos_embedding",
                       "position_embeddings", "absolute_pos_embed", "relative_position_bias_table", "bias",
                       "layer_scale")  # fmt: skip

# normalization layers: their scale and shift are exempt whatever their shape (LayerNorm([C, H, W]) holds C x H x W)
_NORMS = tuple(getattr(nn, n) for n in ("LayerNorm", "GroupNorm", "RMSNorm", "LocalResponseNorm") if hasattr(nn, n))
_NORMS += (nn.modules.batchnorm._NormBase,)  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameter names exempt from weight decay besides the 1-D ones: those the model or a library model inside it
    declares (timm's ``no_weight_decay()``), expanded; a normalization layer's; and biases, tokens and position
    embeddings by name (``NO_DECAY_PARAMETERS``).

    >>> import torchvision
    >>> vit = torchvision.models.VisionTransformer(32, 16, 1, 2, 8, 16)  # (its 1-D parameters are exempt anyway)
    >>> sorted(n for n, p in vit.named_parameters() if p.ndim > 1 and n in no_decay_names(vit))
    ['class_token', 'encoder.pos_embedding']
    """
    declared: set[str] = set()  # parameter names, or names of modules all of whose parameters are exempt
    for prefix, module in model.named_modules():  # a timm backbone in the user's own model declares its own
        names = module.no_weight_decay() if callable(getattr(module, "no_weight_decay", None)) else ()
        if isinstance(module, _NORMS):
            names = [*names, *(n for n, _ in module.named_parameters(recurse=False))]
        declared.update(f"{prefix}.{n}" if prefix else n for n in names)
    out = set()
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[-1] in NO_DECAY_PARAMETERS or any(".".join(parts[:k]) in declared for k in range(1, len(parts) + 1)):
            out.add(name)
    return out


def idle_stage_lrs(model: nn.Module, stage_lrs: Mapping[str, float], *, unfreezes: bool,
                   decay: float | None = None) -> str | None:  # fmt: skip
    """A note naming the stages ``stage_lrs`` sets that stay frozen through a run without unfreezing (``unfreezes``
    False): their LR is never used, and a user who set it expects it trains. So is ``decay`` when only the head trains.

    >>> import torchvision
    >>> from freezetune.freezing.freeze import freeze
    >>> m = torchvision.models.resnet18(); freeze(m, "backbone")
    >>> idle_stage_lrs(m, {"layer1": 1e-4}, unfreezes=False)
    "note: stage_lrs sets 'layer1', frozen in this run with nothing to unfreeze it: its LR is not used"
    >>> idle_stage_lrs(m, {}, unfreezes=False, decay=10.0)[:68]
    'note: decay 10.0 sets the LR of the stages below the head, and only '
    """
    if unfreezes:
        return None
    st = stages(model)
    stage_lrs = resolve_stage_lrs(stage_lrs, [s.name for s in st])
    notes = []
    if decay and not any(s.num_trainable for s in st[:-1]):
        notes.append(f"note: decay {decay} sets the LR of the stages below the head, and only the head trains in this "
                     "run with nothing to unfreeze a stage: it is not used")  # fmt: skip
    idle = [s.name for s in st if s.name in stage_lrs and not s.num_trainable]
    if idle:
        it, its = ("it", "its") if len(idle) == 1 else ("them", "their")
        notes.append(f"note: stage_lrs sets {choices(idle)}, frozen in this run with nothing to unfreeze {it}: {its} "
                     "LR is not used")  # fmt: skip
    return "\n".join(notes) or None
