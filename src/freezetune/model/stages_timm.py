"""timm models' stages, read from their own ``group_matcher`` (coarse groups: stem, stages or blocks), for
``stages.stages``: named after the matcher's regexes or the largest module a group holds, made unique, with the
classifier and the neck timm leaves unmatched after every group as the head."""

from __future__ import annotations

import os
import re

from torch import nn

from freezetune.model.stages_hf import Decl as _Decl
from freezetune.model.tree import is_timm, under


def timm_decl(model: nn.Module, head: str) -> _Decl | None:
    matcher_fn = getattr(model, "group_matcher", None)
    if not (is_timm(model) and callable(matcher_fn)):
        return None
    from timm.models import group_parameters

    try:
        matcher = matcher_fn(coarse=True)
        groups = group_parameters(model, matcher)
    except (AssertionError, NotImplementedError, TypeError):  # "coarse grouping is not implemented for RDNet"
        return None  # the generic rule then
    matched = _timm_matched(model, matcher)
    regexes = _matcher_regexes(matcher)
    modules = {n for n, _ in model.named_modules()}
    decl: _Decl = []
    for names in groups.values():
        members = [n for n in names if n in matched and not under(n, head)]
        if members:
            decl.append((_timm_stage_name(model, len(decl), members, matcher, regexes, modules), members))
    # timm leaves the classifier and its neck (pre-logits norm, a distillation head) unmatched, after every group:
    # those trailing parameters are the head. Unmatched ones in between join their predecessor's stage in _assign.
    names = [n for n, _ in model.named_parameters()]
    last = max((i for i, n in enumerate(names) if n in matched and not under(n, head)), default=-1)
    trailing = [n for n in names[last + 1 :] if n not in matched and not under(n, head)]
    return _dedupe_names(decl, modules) + [(head, [head, *trailing])]


def _timm_matched(model: nn.Module, matcher: dict | object) -> set[str]:
    """Parameter names that timm's group matcher places in a group (dict of regexes, or a callable giving ordinals)."""
    out = set()
    for name, _ in model.named_parameters():
        if isinstance(matcher, dict):
            hit = any(re.match(r, name) for r in _matcher_regexes(matcher))
        else:
            ordinal = matcher(name)
            first = ordinal[0] if isinstance(ordinal, (tuple, list)) else ordinal
            hit = first is not None and first != float("inf")  # timm's marker for "no group"
        if hit:
            out.add(name)
    return out


def _matcher_regexes(matcher: dict | object) -> list[str]:
    if not isinstance(matcher, dict):
        return []  # a callable matcher: stages are named after their first module
    out = []
    for value in matcher.values():
        if value is None:
            continue
        if isinstance(value, str):
            out.append(value)
        else:
            out += [v[0] for v in value]
    return out


def _timm_stage_name(model: nn.Module, i: int, members: list[str], matcher: dict, regexes: list[str],
                     modules: set[str]) -> str:  # fmt: skip
    stem = matcher.get("stem") if isinstance(matcher, dict) else None
    if i == 0 and isinstance(stem, str) and re.match(stem, members[0]):
        return "stem"
    for r in regexes:
        m = re.match(r, members[0])
        if m and m.groups():
            return m.group(0).lstrip("^")
    # a group the matcher names without numbering it (CoaT's stem2, its second stage's embeddings): by that name
    unnumbered = matcher.items() if isinstance(matcher, dict) else ()
    named = [k for k, v in unnumbered if isinstance(v, str) and re.compile(v).groups == 0 and re.match(v, members[0])]
    if len(named) == 1 and named[0] not in modules:
        return named[0]
    # the largest module holding its parameters and no others ("repeat.0" for a callable matcher's group of one block,
    # not "repeat": that names them all), else its first block's ("blocks.22" for CaiT's blocks.22 + blocks_token_only.0)
    common = os.path.commonprefix([n.split(".")[:-1] for n in members]) or members[0].split(".")[:-1][:2]
    if not common:  # the first group's model-level parameters (CaiT's cls_token) before its patch embedding: a stem
        return "stem" if i == 0 else members[0]
    group = set(members)
    while len(common) > 1 and all(f"{'.'.join(common[:-1])}.{n}" in group
                                  for n, _ in model.get_submodule(".".join(common[:-1])).named_parameters()):  # fmt: skip
        common = common[:-1]
    return ".".join(common)


def _dedupe_names(decl: _Decl, modules: set[str]) -> _Decl:
    """Unique stage names: a repeated one gets ``_2``, ``_3``..., skipping any that names a module (Inception-ResNet's
    second ``repeat`` group is not its ``repeat_2`` module)."""
    seen: set[str] = set()
    out = []
    for name, prefixes in decl:
        new, k = name, 1
        while new in seen:
            k += 1
            new = f"{name}_{k}"
            if new in modules:
                new = name  # taken by a module: try the next number
        seen.add(new)
        out.append((new, prefixes))
    return out
