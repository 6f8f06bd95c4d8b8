"""Model structure: split a model into ordered stages (input -> output, head last) and find its classifier.

Every model family *declares* its stages as ``(name, prefixes)`` pairs, where a prefix is a qualified module or
parameter name; one generic assigner then gives each parameter to the stage with the longest matching prefix.
Parameters no declaration covers join the stage of the parameter listed just before them in ``named_parameters``
(a model's own parameters, outside any layer, are listed first: they join the first stage), so none is lost or
counted twice. A parameter shared by two layers belongs to the stage of the first, except one the head shares (a
head tied to an embedding): the head keeps it.
"""

from __future__ import annotations

import dataclasses
import re
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from freezetune.model.heads import (
    aux_modules,
    head_container,
    head_name,
    hf_base_prefix,
    is_hf_base_model,
    replace_head,
    sequential_head,
    sibling_heads,
    timm_heads,
)
from freezetune.model.stages_hf import Decl as _Decl
from freezetune.model.stages_hf import hf_body, hf_decl, hf_norms_in_front, hf_unused_params
from freezetune.model.stages_timm import timm_decl
from freezetune.model.tree import (
    check_materialized,
    has_params,
    is_library_model,
    is_norm,
    is_timm,
    under,
    unwrap,
)

__all__ = ["Stage", "head_name", "replace_head", "stages"]  # head_name and replace_head live in freezetune.model.heads

# A declared stage: its name and the qualified module/parameter names that belong to it.


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
    params: tuple[nn.Parameter, ...] = field(repr=False)  # a notebook shows a stage, not every weight in it

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

    Worked out again only when the model's modules or parameters changed (a new head, a layer swapped): a run's
    set-up asked 9 times, 7 ms each for EfficientNet-Lite0.

    >>> import torchvision
    >>> [s.name for s in stages(torchvision.models.resnet18())]
    ['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'fc']
    """
    model = unwrap(model)
    known, now = _KNOWN.get(model), _structure(model)
    if known is None or known[0] != now:
        _KNOWN[model] = known = (now, _worked_out(model))
    return list(known[1])  # a caller's changes to the list stay its own


# each model's stages and the structure they were worked out for (a model no longer used drops its entry; the
# parameters an entry holds cannot be freed, so a new one never takes an old one's id)
_KNOWN: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, list[Stage]]] = weakref.WeakKeyDictionary()


def _structure(model: nn.Module) -> tuple:
    """What the stages follow: the parameters (by name and identity) and the modules (by name and type)."""
    return tuple((n, id(p)) for n, p in model.named_parameters()), tuple((n, type(m)) for n, m in model.named_modules())


def _worked_out(model: nn.Module) -> list[Stage]:
    layer = head_name(model)
    head = head_container(model, layer)
    decl = _declare(model, head)
    if len(run := sequential_head(model, head)) > 1:  # a Sequential model's head of several layers: one stage
        taken = {n for n, _ in model.named_modules()}
        decl = [(n, prefixes) for n, prefixes in decl if not set(prefixes) <= set(run)]
        decl.append((head := "head" if "head" not in taken else head, run))
    if not decl or decl[-1][0] != head:  # a family rule may declare the head itself, with extra members
        decl.append((head, [head]))
    found = _merge_norms(model, _named_neck(model, _assign(model, _head_apart(model, decl, layer))))
    if hf_base_prefix(model):  # a pretrained layer whose output the classifier never reads is no depth either
        pooling = [n for s in found[1:-1] if _POOLING.search(s.name) for n in s.param_names]
        unused = hf_unused_params(model, pooling)
        found = _merge_into_previous(found, lambda stage: bool(stage.param_names) and set(stage.param_names) <= unused)
    return found


# the stages after the blocks that a task class may bypass: a pooler, a pooling head, a contact head. Only these are
# measured: the pass of a dummy image through an HF EfficientNet-B7 took 4 s, for a top_conv that is always used
_POOLING = re.compile(r"(^|\.|_)(pooler|head)$")


_NECK = "\0neck"  # the placeholder name of the pretrained layers beside the head, named after them once assigned


def _head_apart(model: nn.Module, decl: _Decl, layer: str) -> _Decl:
    """The last declaration is the head's container. Only what ``replace_head`` makes new is the head stage: the
    classifier and the other outputs of its classes (auxiliary and distillation classifiers). Pretrained layers the
    container also holds (VGG's 4096-wide layers, MobileNetV3's ``conv_head``, ConvNeXt's head norm) become a stage
    before it, so a linear probe or ``freeze("backbone")`` trains what is new and nothing pretrained. A Hugging Face
    task model's additions are new (a base checkpoint holds none of them), but for their norms, which
    ``replace_head`` keeps and a classification checkpoint holds (LeViT's ``classifier.batch_norm``). So is all of
    the head container of a user's own model (a backbone and ``head = Sequential(Linear, ReLU, Linear)``): no
    checkpoint of a library made it, and a hidden layer they just built must not stay frozen at its random init."""
    name, members = decl[-1]
    aux = aux_modules(model)  # GoogLeNet's aux1/aux2: their classifiers are head, the rest joins the last stage
    body = [(n, kept) for n, prefixes in decl[:-1] if (kept := [p for p in prefixes if not _under_any(p, aux)])]
    if aux and body:
        body[-1] = (body[-1][0], [*body[-1][1], *aux])
    params = [n for n, _ in model.named_parameters() if _under_any(n, members)]
    if hf_base_prefix(model):
        neck = hf_norms_in_front(model, params)
        layers = [n for n in params if n not in neck]
    elif not is_library_model(model):  # a user's own head (Linear, ReLU, Dropout, Linear) is new, all of it
        neck, layers = [], members
    elif not is_timm(model) and not _library_head(model, name):  # a user's MLP in ResNet's fc: all of it new
        neck, layers = [], [*members, *sibling_heads(model, layer)]
    else:
        layers = timm_heads(model) if is_timm(model) else [layer, *sibling_heads(model, layer)]
        neck = [n for n in params if not _under_any(n, layers)]
    # the head stage keeps its container's name only when it is all of it: a stage "classifier" holding classifier.6
    # alone would take freeze("classifier") from the module glob that means all of VGG's classifier
    return [*body, (_NECK, neck), (name if not neck else layer, layers)]


# torchvision's head containers that hold pretrained layers beside the classifier, by model class: their children's
# types as the library builds them. Any other container in a torchvision model is the user's, new all of it: a
# Sequential(Linear, ReLU, Dropout, Linear) put in ResNet's fc or EfficientNet's classifier has a hidden layer at
# its random init, which as "pretrained" stayed frozen under freeze("backbone"). A user's container of exactly these
# types is taken for the library's.
_TORCHVISION_HEADS = {
    "VGG": ("Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"),
    "AlexNet": ("Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear"),
    "MobileNetV3": ("Linear", "Hardswish", "Dropout", "Linear"),
    "ConvNeXt": ("LayerNorm2d", "Flatten", "Linear"),
    "MaxVit": ("AdaptiveAvgPool2d", "Flatten", "LayerNorm", "Linear", "Tanh", "Linear"),
    "VisionTransformer": ("Linear", "Tanh", "Linear"),  # with a representation layer (pre_logits)
}


def _library_head(model: nn.Module, container: str) -> bool:
    """Whether a library model's head container at ``container`` may hold pretrained layers beside its classifier:
    a torchvision one as the library builds it (``_TORCHVISION_HEADS``); any other library's, as before."""
    if type(model).__module__.split(".")[0] != "torchvision":
        return True
    built = _TORCHVISION_HEADS.get(type(model).__name__)
    kids = tuple(type(m).__name__ for m in model.get_submodule(container).children())
    return built is not None and kids == built


def _under_any(name: str, prefixes: list[str]) -> bool:
    return any(under(name, p) for p in prefixes)


def _named_neck(model: nn.Module, found: list[Stage]) -> list[Stage]:
    """The pretrained layers beside the head, named for the one module they are, else "neck"."""
    taken = {s.name for s in found} | {n for n, _ in model.named_modules()}
    neck = "neck" if "neck" not in taken else "head_neck"
    return [dataclasses.replace(s, name=s.modules[0] if len(s.modules) == 1 else neck) if s.name == _NECK else s
            for s in found]  # fmt: skip


def _merge_norms(model: nn.Module, found: list[Stage]) -> list[Stage]:
    """A stage of normalisation layers alone (a ViT's final norm, GPT-2's ``ln_f``, VGG-BN's BatchNorms) joins the
    stage before it, as timm's own grouping does: it is no depth of its own to freeze or unfreeze."""
    return _merge_into_previous(found, lambda stage: all(_is_norm(model, n) for n in stage.param_names))


def _merge_into_previous(found: list[Stage], merge: Callable[[Stage], bool]) -> list[Stage]:
    """Each stage but the first and the head that ``merge`` picks, joined to the stage before it."""
    out: list[Stage] = []
    for i, stage in enumerate(found):
        if out and i < len(found) - 1 and merge(stage):
            prev = out.pop()
            stage = Stage(prev.name, prev.modules + stage.modules, prev.param_names + stage.param_names,
                          prev.params + stage.params)  # fmt: skip
        out.append(stage)
    return out


def _is_norm(model: nn.Module, param: str) -> bool:
    """Whether parameter ``param`` belongs to a normalisation layer."""
    owner = param.rpartition(".")[0]
    return bool(owner) and is_norm(model.get_submodule(owner))


# --- family declarations ------------------------------------------------------------------------------------


def _declare(model: nn.Module, head: str) -> _Decl:
    for rule in (*_FAMILY_RULES, hf_decl):
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
    """A stage per layer of ``features``; a layer of its own between it and the head (a user's ``neck``) is a stage
    too: left undeclared, it joined the last layer of ``features``, a BatchNorm, which then split from its conv."""
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential) or not hasattr(model, "classifier"):
        return None
    decl: _Decl = []
    for name, child in model.named_children():
        if name == "features":
            decl += [(f"features.{n}", [f"features.{n}"]) for n, _ in features.named_children()]
        elif name not in (head, "classifier") and has_params(child):  # the head's stage is made after
            decl.append((name, [name]))
    return decl


def _vit_decl(model: nn.Module, head: str) -> _Decl | None:
    if not (hasattr(model, "conv_proj") and hasattr(model, "class_token") and hasattr(model, "encoder")):
        return None
    layers = [n for n, _ in model.encoder.layers.named_children()]
    decl: _Decl = [("stem", ["conv_proj", "class_token", "encoder.pos_embedding"])]
    decl += [(n, [f"encoder.layers.{n}"]) for n in layers]
    return decl + [("norm", ["encoder.ln"])]


def _generic_decl(model: nn.Module, head: str) -> _Decl:
    """A stage per top-level child; the largest, when it is a ``Sequential``/``ModuleList`` of several blocks
    (torchvision Swin's ``features``, RegNet's ``trunk_output``, MaxViT's ``blocks``, timm MetaFormers' ``stages``),
    a stage per block: as one stage, freezing by depth would be all or nothing."""
    classifies = is_timm(model) and hasattr(model, "get_classifier")  # a features_only model has no head
    heads = {n.split(".")[0] for n in (timm_heads(model) if classifies else [])} | {head}  # PiT's head_dist too
    children = [(n, m) for n, m in model.named_children() if has_params(m) and n not in heads]
    if not children:
        return []
    check_materialized(model)  # the trunk is the child of most parameters: a lazy layer's have no size yet
    trunk = max(children, key=lambda c: sum(p.numel() for p in c[1].parameters()))[1]
    # split only when the children alone give fewer than 3 stages (norms not counted): a model whose children are
    # its stages (stem, block1, ...) keeps them
    few = sum(not is_norm(m) for _, m in children) < 3
    decl: _Decl = []
    for name, module in children:
        body = _library_bodies(module, name) if not is_library_model(model) else None  # a user's own model
        blocks = _blocks(name, module) if few and module is trunk else None
        if body:
            decl += body
        elif blocks:
            decl += [(b, [b]) for b in blocks]
        else:
            decl.append((name, [name]))
    return decl


def _blocks(name: str, module: nn.Module) -> list[str] | None:
    """The blocks of a trunk, by name: the children of a ``Sequential``/``ModuleList`` of several, found through
    wrappers whose one child with parameters is the list (HGNetV2's ``encoder.stages``: as the one stage
    ``encoder``, the auto recipe's only candidate trained all four); None when there is no such list."""
    while True:
        kids = [(c, m) for c, m in module.named_children() if has_params(m)]
        if isinstance(module, (nn.Sequential, nn.ModuleList)) and len(kids) > 1:
            return [f"{name}.{c}" for c, _ in kids]
        if len(kids) != 1:
            return None
        name, module = f"{name}.{kids[0][0]}", kids[0][1]


# the rules of the model families declared by structure, in the order they are asked (_declare adds Hugging Face's)
_FAMILY_RULES = (timm_decl, _resnet_decl, _vit_decl, _features_decl)


def _library_body(module: nn.Module, name: str) -> _Decl | None:
    """The stages of a library model a user's own model holds as its backbone (a timm model made with
    ``num_classes=0``, a Hugging Face ``AutoModel``, a torchvision model with its ``fc`` taken off) at ``name``:
    its own declaration, its head (if any) joined to its last stage. As one stage it made "the last 3 stages" all or
    nothing. None for any other module, and for a library's building block (a timm ``Mlp``), which no family rule
    declares. A feature extractor (timm's ``features_only`` models, torchvision's ``create_feature_extractor``, an
    ``fx.GraphModule``) is a backbone whatever its class: no family rule but ResNet's knows its flattened layers
    (``stages_0``, EfficientNet's ``blocks`` without a head), so a stage per child, as ``_generic_decl`` finds them."""
    extractor = hasattr(module, "feature_info") or isinstance(module, torch.fx.GraphModule)
    if not (is_library_model(module) or extractor):
        return None
    if is_hf_base_model(module):
        return [(f"{name}.{n}", prefixes) for n, prefixes in hf_body(module, name)]
    for rule in (*_FAMILY_RULES, _generic_decl) if extractor else _FAMILY_RULES:
        decl = [(n, p) for n, p in (rule(module, _NO_HEAD) or []) if n != _NO_HEAD]  # its head joins a neighbour
        if len(decl) >= 2:
            return [(f"{name}.{n}", [f"{name}.{p}" for p in prefixes]) for n, prefixes in decl]
    return None


def _library_bodies(module: nn.Module, name: str) -> _Decl | None:
    """``_library_body`` of ``module``, or of each library model in a list or dict of them (a model per input). A
    library's own dict is one model (timm's ``features_only`` backbone, a ``FeatureListNet``, is a ``ModuleDict`` of
    its layers): its declaration comes first."""
    own = _library_body(module, name) if type(module) not in (nn.ModuleList, nn.ModuleDict) else None
    if own:
        return own
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        bodies = [_library_body(m, f"{name}.{c}") for c, m in module.named_children()]
        return [d for body in bodies for d in body] if bodies and all(bodies) else None
    return _library_body(module, name)


_NO_HEAD = "\0no-head"  # no parameter is under it: a library model declared as a body only


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
    _claim_tied_head(model, owner, members, all_names)
    # each module's parameters, listed once for every stage's cover: per stage, they took 0.15 s on EfficientNet-B0
    owns = [(m, [f"{m}.{n}" for n, _ in module.named_parameters()]) for m, module in model.named_modules() if m]
    out = []
    for (name, _), mem in zip(decl, members, strict=True):
        if mem:
            names = tuple(n for n, _ in mem)
            out.append(Stage(name, _cover(owns, set(names), all_names), names, tuple(p for _, p in mem)))
    return out


def _claim_tied_head(model: nn.Module, owner: dict[str, int], members: list[list[tuple[str, nn.Parameter]]],
                     listed: set[str]) -> None:  # fmt: skip
    """A head whose weight is tied to an earlier layer's (an embedding's) keeps it in the head stage, the last of
    ``members``: a shared parameter is listed once, under its first name (``listed``: those names), and the head had
    none, so "backbone" trained the layer before it and froze the head. Only the other names are looked up."""
    head = len(members) - 1
    tied = {id(p) for name, p in model.named_parameters(remove_duplicate=False)
            if name not in listed and _longest_prefix_owner(name, owner) == head}  # fmt: skip
    for i, mem in enumerate(members[:head]):
        members[head] += [(n, p) for n, p in mem if id(p) in tied]
        members[i] = [(n, p) for n, p in mem if id(p) not in tied]


def _longest_prefix_owner(name: str, owner: dict[str, int]) -> int | None:
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        idx = owner.get(".".join(parts[:k]))
        if idx is not None:
            return idx
    return None


def _cover(owns: list[tuple[str, list[str]]], names: set[str], all_names: set[str]) -> tuple[str, ...]:
    """The largest modules all of whose parameters are in ``names`` (parameter-less modules are left out), of
    ``owns``: each module's name and its parameters' full names, in ``named_modules`` order."""
    covered: list[str] = []
    for mod_name, own in owns:
        if any(under(mod_name, c) for c in covered):
            continue
        if own and all(n in names for n in own) and all(n in all_names for n in own):
            covered.append(mod_name)
    return tuple(covered)
