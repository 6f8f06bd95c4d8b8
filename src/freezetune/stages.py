"""Model structure: split a model into ordered stages (input -> output, head last) and find its classifier.

Every model family *declares* its stages as ``(name, prefixes)`` pairs, where a prefix is a qualified module or
parameter name; one generic assigner then gives each parameter to the stage with the longest matching prefix.
Parameters no declaration covers join the stage of the parameter registered just before them, so none is lost
or counted twice.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from freezetune.errors import SpecError

# A declared stage: its name and the qualified module/parameter names that belong to it.
_Decl = list[tuple[str, list[str]]]


@dataclass(frozen=True, eq=False)
class Stage:
    """One stage of a model: a name, the modules wholly inside it, and its parameters.

    >>> from torch import nn
    >>> [s.name for s in stages(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))]
    ['0', '2']
    """

    name: str
    modules: tuple[str, ...]
    param_names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params if p.requires_grad)

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(self.params)


def stages(model: nn.Module) -> list[Stage]:
    """Ordered stages of ``model``, input to output; the last stage is the classifier head.

    Recognises torchvision ResNet, ``features``/``classifier`` models (EfficientNet, MobileNet, ConvNeXt, VGG, ...),
    torchvision ViT, timm models (through their own ``group_matcher``), Hugging Face classifiers (one stage per
    repeated block), and falls back to the model's top-level children with the last ``nn.Linear`` as head.

    >>> import torchvision
    >>> [s.name for s in stages(torchvision.models.resnet18())]
    ['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'fc']
    """
    head = _head_container(model, head_name(model))
    decl = _declare(model, head)
    if not decl or decl[-1][0] != head:  # a family rule may declare the head itself, with extra members
        decl.append((head, [head]))
    return _assign(model, decl)


def head_name(model: nn.Module) -> str:
    """Qualified name of the classifier layer (the ``nn.Linear`` that outputs class scores).

    Raises:
        SpecError: the model has no classifier: a timm model created with ``num_classes=0`` (``replace_head`` gives
            it one), a Hugging Face base model from ``AutoModel``, or a model without an ``nn.Linear``.

    >>> import torchvision
    >>> head_name(torchvision.models.resnet18())
    'fc'
    """
    found = _timm_head_name(model)
    if found:
        return found
    if _is_hf_base_model(model):  # its last Linear is a pretrained pooler, not a classifier
        raise SpecError(
            f"{type(model).__name__} is a Hugging Face base model with no classifier head; load the checkpoint with "
            "AutoModelForSequenceClassification or AutoModelForImageClassification (as create_model('hf:...') does), "
            "which adds one"
        )
    for attr in _HEAD_ATTRS:  # a head taken off (torchvision's heads = Identity): the last Linear is a body layer
        module = getattr(model, attr, None)
        if isinstance(module, nn.Module) and not any(True for _ in module.parameters()):
            raise SpecError(f"{type(model).__name__} has no classifier head (its {attr} is {type(module).__name__}); "
                            "build it with its classifier, which replace_head then replaces")  # fmt: skip
    base = _hf_base_prefix(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if base:
        linears = [n for n in linears if not _under(n, base)]
    if not linears:
        raise SpecError(f"cannot find a classifier head in {type(model).__name__}: it has no nn.Linear layer")
    return linears[-1]


_HEAD_ATTRS = ("fc", "classifier", "head", "heads")  # where torchvision and plain models keep their classifier


def _timm_head_name(model: nn.Module) -> str | None:
    """The classifier a timm model names through ``get_classifier()``; None for other models."""
    get_classifier = getattr(model, "get_classifier", None)
    if not (callable(get_classifier) and _is_timm(model)):
        return None
    classifier = get_classifier()
    if isinstance(classifier, (tuple, list)):  # distilled models return (head, head_dist): the first is primary
        classifier = classifier[0] if classifier else None
    if isinstance(classifier, nn.Module) and not any(True for _ in classifier.parameters()):
        raise SpecError(
            f"{type(model).__name__} has no classifier head (a timm model created with num_classes=0 has "
            f"{type(classifier).__name__} there); add one with freezetune.replace_head(model, num_classes)"
        )
    return _name_of(model, classifier) if isinstance(classifier, nn.Module) else None


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the classifier with a new, trainable layer for ``num_classes`` classes; returns ``model``.

    >>> import torchvision
    >>> replace_head(torchvision.models.resnet18(), 10).fc.out_features
    10
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise SpecError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if _is_timm(model) and hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)  # timm knows its own pooling/head layout
        return model
    name = head_name(model)
    old = model.get_submodule(name)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_labels"):
        config.num_labels = num_classes  # keep HF config in sync so save/load round-trips
    for attr in ("num_classes", "num_labels"):  # HF forward() reads self.num_labels to shape its loss
        if isinstance(getattr(model, attr, None), int):
            setattr(model, attr, num_classes)
    return model


# --- family declarations ------------------------------------------------------------------------------------


def _declare(model: nn.Module, head: str) -> _Decl:
    for rule in (_timm_decl, _resnet_decl, _vit_decl, _features_decl, _hf_decl):
        decl = rule(model, head)
        if decl:
            return decl
    return _generic_decl(model, head)


def _resnet_decl(model: nn.Module, head: str) -> _Decl | None:
    names = [n for n, _ in model.named_children()]
    if not {"conv1", "bn1", "layer1", "layer4"} <= set(names):
        return None
    layers = sorted((n for n in names if re.fullmatch(r"layer\d+", n)), key=lambda n: int(n[5:]))
    return [("stem", ["conv1", "bn1"])] + [(n, [n]) for n in layers]


def _features_decl(model: nn.Module, head: str) -> _Decl | None:
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential) or not hasattr(model, "classifier"):
        return None
    return [(f"features.{n}", [f"features.{n}"]) for n, _ in features.named_children()]


def _vit_decl(model: nn.Module, head: str) -> _Decl | None:
    if not (hasattr(model, "conv_proj") and hasattr(model, "class_token") and hasattr(model, "encoder")):
        return None
    layers = [n for n, _ in model.encoder.layers.named_children()]
    decl: _Decl = [("stem", ["conv_proj", "class_token", "encoder.pos_embedding"])]
    decl += [(n, [f"encoder.layers.{n}"]) for n in layers]
    return decl + [("norm", ["encoder.ln"])]


def _timm_decl(model: nn.Module, head: str) -> _Decl | None:
    matcher_fn = getattr(model, "group_matcher", None)
    if not (_is_timm(model) and callable(matcher_fn)):
        return None
    from timm.models import group_parameters

    matcher = matcher_fn(coarse=True)
    matched = _timm_matched(model, matcher)
    regexes = _matcher_regexes(matcher)
    decl: _Decl = []
    for names in group_parameters(model, matcher).values():
        members = [n for n in names if n in matched and not _under(n, head)]
        if members:
            decl.append((_timm_stage_name(len(decl), members, matcher, regexes), members))
    # timm leaves the classifier and its neck (pre-logits norm, a distillation head) unmatched, after every group:
    # those trailing parameters are the head. Unmatched ones in between join their predecessor's stage in _assign.
    names = [n for n, _ in model.named_parameters()]
    last = max((i for i, n in enumerate(names) if n in matched and not _under(n, head)), default=-1)
    trailing = [n for n in names[last + 1 :] if n not in matched and not _under(n, head)]
    return _dedupe_names(decl) + [(head, [head, *trailing])]


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


def _hf_decl(model: nn.Module, head: str) -> _Decl | None:
    base = _hf_base_prefix(model)
    if not base:
        return None
    base_model = model.get_submodule(base)
    children = [(c, m) for c, m in base_model.named_children() if any(True for _ in m.parameters())]
    decl: _Decl = []
    lead: list[str] = []  # the children in front of the first blocks: one input stage (GPT-2's wte and wpe)
    for child, module in children:
        child_decl = _hf_child_decl(base, child, module)
        if not decl and len(child_decl) == 1:
            lead.append(child)
            continue
        if lead and not decl:
            decl.append((lead[0], [f"{base}.{c}" for c in lead]))
        decl += child_decl
    if not decl:  # no blocks anywhere: a stage per child
        decl = [(c, [f"{base}.{c}"]) for c in lead]
    # What the task class adds around its base model (DistilBERT's pre_classifier, DeBERTa's pooler, XLNet's
    # sequence_summary) is not in a base checkpoint: it starts random and trains with the classifier. A pooler
    # inside the base model (BERT's) is pretrained and stays a backbone stage.
    added = [n for n, _ in model.named_children() if n != base] + [n for n, _ in model.named_parameters(recurse=False)]
    return [*decl, (head, added)]


def _hf_child_decl(base: str, child: str, module: nn.Module) -> _Decl:
    """Stages of one child of a Hugging Face base model: one per repeated block, found as structure rather than by
    attribute name: the child itself when it is an ``nn.ModuleList`` (ViT's ``layers``, GPT-2's ``h``), else its only
    ``nn.ModuleList`` (BERT's ``encoder.layer``, ConvNeXt's ``encoder.stages``); a child with none, or several (which
    would be ambiguous), is one stage. The child's layers after its blocks (a final norm) form one more stage."""
    if isinstance(module, nn.ModuleList):
        blocks, path, names = module, child, []
    else:
        names = [n for n, _ in module.named_children()]
        lists = [n for n, m in module.named_children() if isinstance(m, nn.ModuleList)]
        if len(lists) != 1:
            return [(child, [f"{base}.{child}"])]
        blocks, path = module.get_submodule(lists[0]), f"{child}.{lists[0]}"
        names = names[names.index(lists[0]) + 1 :]
    # Layers in front of the blocks (ALBERT's input projection) are left undeclared: _assign puts them with the
    # stage before (the embeddings), so stages stay in input -> output order.
    decl: _Decl = [(f"{path}.{i}", [f"{base}.{path}.{i}"]) for i in range(len(blocks))]
    return [*decl, (child, [f"{base}.{child}.{n}" for n in names])]


def _generic_decl(model: nn.Module, head: str) -> _Decl:
    return [(n, [n]) for n, m in model.named_children() if any(True for _ in m.parameters())]


# --- helpers ------------------------------------------------------------------------------------------------


def _assign(model: nn.Module, decl: _Decl) -> list[Stage]:
    """Give every parameter to the declared stage with the longest prefix; unmatched ones join their predecessor."""
    owner: dict[str, int] = {}
    for i, (_, prefixes) in enumerate(decl):
        for p in prefixes:
            owner[p] = i  # later declarations win for the same prefix (the head is declared last)
    members: list[list[tuple[str, nn.Parameter]]] = [[] for _ in decl]
    pending: list[tuple[str, nn.Parameter]] = []  # unmatched before any matched parameter: join the first stage
    last = None
    for name, param in model.named_parameters():  # shared parameters come once, under their first name
        idx = _longest_prefix_owner(name, owner)
        idx = last if idx is None else idx
        if idx is None:
            pending.append((name, param))
            continue
        members[idx].append((name, param))
        last = idx
    if pending:
        first = next((i for i, m in enumerate(members) if m), len(decl) - 1)
        members[first][:0] = pending
    all_names = {n for n, _ in model.named_parameters()}
    out = []
    for (name, _), mem in zip(decl, members, strict=True):
        if mem:
            names = tuple(n for n, _ in mem)
            out.append(Stage(name, _cover(model, set(names), all_names), names, tuple(p for _, p in mem)))
    return out


def _longest_prefix_owner(name: str, owner: dict[str, int]) -> int | None:
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        idx = owner.get(".".join(parts[:k]))
        if idx is not None:
            return idx
    return None


def _cover(model: nn.Module, names: set[str], all_names: set[str]) -> tuple[str, ...]:
    """The largest modules all of whose parameters are in ``names`` (parameter-less modules are left out)."""
    covered: list[str] = []
    for mod_name, module in model.named_modules():
        if not mod_name or any(_under(mod_name, c) for c in covered):
            continue
        own = [f"{mod_name}.{n}" for n, _ in module.named_parameters()]
        if own and all(n in names for n in own) and all(n in all_names for n in own):
            covered.append(mod_name)
    return tuple(covered)


def _head_container(model: nn.Module, head: str) -> str:
    """The module that holds the classifier and its private layers (e.g. ``classifier`` around ``classifier.1``)."""
    base = _hf_base_prefix(model)
    if base:
        top = head.split(".")[0]
        return top
    found, parent = head, head.rpartition(".")[0]
    while parent:  # the outermost head-like ancestor: timm's ``head`` around ``head.classifier.4``
        leaf = parent.rpartition(".")[2]
        if leaf in {"classifier", "head", "heads", "fc"} or leaf.endswith("head"):
            found = parent
        parent = parent.rpartition(".")[0]
    return found


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


def _timm_stage_name(i: int, members: list[str], matcher: dict, regexes: list[str]) -> str:
    stem = matcher.get("stem") if isinstance(matcher, dict) else None
    if i == 0 and isinstance(stem, str) and re.match(stem, members[0]):
        return "stem"
    for r in regexes:
        m = re.match(r, members[0])
        if m and m.groups():
            return m.group(0).lstrip("^")
    return members[0].split(".")[0]


def _dedupe_names(decl: _Decl) -> _Decl:
    seen: dict[str, int] = {}
    out = []
    for name, prefixes in decl:
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}_{seen[name]}", prefixes))
    return out


def _hf_base_prefix(model: nn.Module) -> str | None:
    """The attribute of a Hugging Face task model that holds its pretrained base model (``bert``, ``vit``)."""
    prefix = getattr(model, "base_model_prefix", None)
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return prefix
    if not type(model).__module__.startswith("transformers."):
        return None
    # CLIP- and SigLIP-style classifiers name a prefix ("clip") they do not have: their one tower is the base
    towers = [n for n, m in model.named_children() if n.endswith("_model") and any(True for _ in m.parameters())]
    return towers[0] if len(towers) == 1 else None


def _is_hf_base_model(model: nn.Module) -> bool:
    """A bare transformers base model, as ``AutoModel`` builds (``BertModel``): it outputs hidden states."""
    if not type(model).__module__.startswith("transformers."):
        return False
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    # Task classes such as CLIPForImageClassification also have base_model == self, so ask AutoModel's own list.
    bases = {n for v in MODEL_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    return type(model).__name__ in bases


def _is_timm(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


def _name_of(model: nn.Module, target: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if module is target and name:
            return name
    return None


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")
