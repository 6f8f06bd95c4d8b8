"""A model's classifier head: find it, tell it from the pretrained layers around it, and replace it.

The head is what ``replace_head`` makes new: the layer that outputs class scores, plus the other outputs of the same
classes (GoogLeNet's and Inception's auxiliary classifiers, a distilled model's second head), plus, for a Hugging
Face task model, what the task class adds around its base model (which a base checkpoint does not hold). Pretrained
layers in front of it inside the same container (VGG's two 4096-wide layers, MobileNetV3's ``conv_head``) are not
head: ``stages`` gives them a stage of their own.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable

from torch import nn

from freezetune.errors import SpecError
from freezetune.model.tree import has_params, is_library_model, is_norm, is_timm, under, unwrap

HEAD_ATTRS = ("fc", "classifier", "head", "heads")  # where torchvision and plain models keep their classifier


def head_name(model: nn.Module) -> str:
    """Qualified name of the classifier layer (the ``nn.Linear`` that outputs class scores; SqueezeNet's is a 1x1
    ``nn.Conv2d``).

    Raises:
        SpecError: the model has no classifier: a timm model created with ``num_classes=0`` (``replace_head`` gives
            it one), a Hugging Face base model from ``AutoModel``, or a model without an ``nn.Linear``.

    >>> import torchvision
    >>> head_name(torchvision.models.resnet18())
    'fc'
    """
    model = unwrap(model)
    found = _timm_head_name(model)
    if found:
        return found
    if is_hf_base_model(model):  # its last Linear is a pretrained pooler, not a classifier
        raise SpecError(
            f"{type(model).__name__} is a Hugging Face base model with no classifier head; load the checkpoint with "
            "AutoModelForSequenceClassification or AutoModelForImageClassification (as create_model('hf:...') does), "
            "which adds one"
        )
    heads = {a: m for a in HEAD_ATTRS if isinstance(m := getattr(model, a, None), nn.Module)}
    for attr, module in heads.items():  # a head taken off (torchvision's heads = Identity): the last Linear is a body
        # layer; unless another of the names holds the classifier (HGNetV2's fc, beside a 'classifier' of pooling)
        if not has_params(module) and not any(has_params(m) for m in heads.values()):
            raise SpecError(f"{type(model).__name__} has no classifier head (its {attr} is {type(module).__name__}); "
                            "build it with its classifier, which replace_head then replaces")  # fmt: skip
    base = hf_base_prefix(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _in_aux(n)]
    if base:
        linears = [n for n in linears if not under(n, base)]
        # a distilled model's two heads (DeiT's cls_classifier and distillation_classifier): the class token's is
        # the classifier its stage is named after, as timm names that stage "head"
        linears = [n for n in linears if "distil" not in n.lower()] or linears
    else:  # the classifier a model names (a head registered before its backbone, a user's own model) comes first
        named = [c for c, m in model.named_children() if c in HEAD_ATTRS and has_params(m)]
        in_named = [n for n in linears if named and under(n, named[-1])]
        linears = in_named or linears
    if linears:
        return linears[-1]
    conv = _conv_classifier(model)
    if conv:
        return conv
    raise SpecError(f"cannot find a classifier head in {type(model).__name__}: it has no nn.Linear layer (nor a 1x1 "
                    "nn.Conv2d in a 'classifier')")  # fmt: skip


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the classifier, and the other outputs of the same classes (auxiliary and distillation heads), with
    new, trainable layers for ``num_classes`` classes; returns ``model``.

    >>> import torchvision
    >>> replace_head(torchvision.models.resnet18(), 10).fc.out_features
    10
    """
    # NumPy's ints too: replace_head(model, labels.max() + 1)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise SpecError(f"num_classes must be an int >= 1, got {num_classes!r}")
    num_classes = int(num_classes)
    wrapper, model = model, unwrap(model)
    if is_timm(model) and hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)  # timm knows its own pooling/head layout (both heads of a distilled one)
        return wrapper
    name = head_name(model)
    for target in (name, *sibling_heads(model, name)):
        _replace(model, target, num_classes)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_labels"):
        config.num_labels = num_classes  # keep HF config in sync so save/load round-trips
        # a new head, with no task of its own: HF's loss goes by the labels it is given (class ids: cross-entropy),
        # where a checkpoint's multi-label or regression problem_type had class ids fail in its BCE or MSE
        config.problem_type = None
    for attr in ("num_classes", "num_labels"):  # HF forward() reads self.num_labels to shape its loss
        if isinstance(getattr(model, attr, None), int):
            setattr(model, attr, num_classes)
    if hf_base_prefix(model):
        _train_hf_head(model)
    return wrapper  # as given: a compiled model runs the new head


def _train_hf_head(model: nn.Module) -> None:
    """A Hugging Face task model's head stage is all it adds to the base model (RoBERTa's ``classifier.dense`` before
    its ``out_proj``, DistilBERT's ``pre_classifier``); ``replace_head`` makes only the last layer anew. Frozen before
    the call, the others stayed frozen, so the new classifier trained on a layer a base checkpoint leaves random:
    the whole head stage trains, whichever came first, ``freeze`` or ``replace_head``."""
    if all(p.requires_grad for p in model.parameters()):  # nothing frozen (a run replaces the head first): no stages
        return
    from freezetune.model.stages import stages  # stages reads the heads this module finds

    for p in stages(model)[-1].params:
        p.requires_grad_(True)


def sibling_heads(model: nn.Module, head: str) -> list[str]:
    """The other layers that output the head's classes: auxiliary classifiers (GoogLeNet's ``aux1.fc2``, Inception's
    ``AuxLogits.fc``) and, in a Hugging Face task model, the other classifiers it adds (DeiT's distillation head)."""
    classes = _out_features(model.get_submodule(head))
    base = hf_base_prefix(model)
    out = []
    for name, module in model.named_modules():
        if name == head or not isinstance(module, nn.Linear) or module.out_features != classes:
            continue
        if _in_aux(name) or (base and not under(name, base)):
            out.append(name)
    return out


def aux_modules(model: nn.Module) -> list[str]:
    """Top-level auxiliary classifiers (``aux1``, ``AuxLogits``): side branches that only an auxiliary loss trains,
    so no stage of their own (their classifiers are head, see ``sibling_heads``)."""
    return [n for n, m in model.named_children() if _in_aux(n) and has_params(m)]


def drop_aux_classifiers(model: nn.Module) -> list[str]:
    """Remove GoogLeNet's and Inception v3's auxiliary classifiers (``aux1``/``aux2``, ``AuxLogits``), as
    torchvision's builder removes them from a pretrained GoogLeNet (``aux_logits=False``) and timm builds its Inception v3: they
    run in training only, beside the model's output, and freezetune's training reads that output alone. Kept, they
    were counted as trainable, cost a forward pass a step and never changed; and the feature cache stopped short of
    them. Returns the names removed ([] for a model without them: VOLO's ``aux_head`` feeds its output, and stays).

    >>> import torchvision
    >>> model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    >>> drop_aux_classifiers(model), model.aux1, model.aux_logits
    (['aux1', 'aux2'], None, False)
    """
    if getattr(model, "aux_logits", None) is not True:
        return []
    names = aux_modules(model)
    model.aux_logits = False
    for name in names:
        setattr(model, name, None)  # (their forward skips a None branch)
    return names


def dropped_aux_keys(model: nn.Module, state_dict: Iterable[str]) -> set[str]:
    """The keys of ``state_dict`` under an auxiliary classifier ``drop_aux_classifiers`` removed from ``model``: a
    weights file, or a checkpoint an earlier freezetune trained with them, holds them, and nothing reads them here."""
    return {
        k for k in state_dict if _in_aux(k) and hasattr(model, top := k.split(".")[0]) and getattr(model, top) is None
    }


def holds_aux(state_dict: Iterable[str]) -> bool:
    """Whether a state dict holds the weights of auxiliary classifiers (a GoogLeNet an earlier freezetune trained
    with them: its run resumes with them, ``create_model(keep_aux=True)``)."""
    return any(_in_aux(k) for k in state_dict)


def head_container(model: nn.Module, head: str) -> str:
    """The module that holds the classifier (``classifier`` around ``classifier.6``, timm's ``head`` around
    ``head.fc``); for a Hugging Face task model, the top-level child the classifier is."""
    if hf_base_prefix(model):
        return head.split(".")[0]
    top = head.split(".")[0]
    if top != head and not is_library_model(model) and _head_like(model.get_submodule(top)):
        return top  # a user's own head under a name of their own: proj = Sequential(Linear, ReLU, Linear)
    found, parent = head, head.rpartition(".")[0]
    while parent:  # the outermost head-like ancestor: timm's ``head`` around ``head.classifier.4``
        leaf = parent.rpartition(".")[2]
        if leaf in HEAD_ATTRS or leaf.endswith("head"):
            found = parent
        parent = parent.rpartition(".")[0]
    return found


def sequential_head(model: nn.Module, head: str) -> list[str]:
    """The top-level layers of a user's own ``nn.Sequential`` model that make its head with ``head``, its last
    ``nn.Linear``: the run of head-like layers before it, from its first Linear (``Sequential(backbone, Linear, ReLU,
    Linear)``: both linear layers; as an attribute, ``mlp = Sequential(Linear, ReLU, Linear)``, they were, but as the
    model's own children the hidden one stayed frozen at its random init). Just ``[head]`` for a head of one Linear,
    when the run would be every layer with parameters (an MLP alone), or when the model is not such a ``Sequential``.

    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 8), nn.ReLU(),
    ...                       nn.Linear(8, 2))
    >>> sequential_head(model, "5"), sequential_head(model[:4], "3")
    (['3', '4', '5'], ['3'])
    """
    if type(model) is not nn.Sequential or "." in head:
        return [head]
    children = list(model.named_children())
    names = [n for n, _ in children]
    run = [head]
    for name, module in reversed(children[: names.index(head)]):
        if not _head_layer(module):
            break
        run.insert(0, name)
    # from its first Linear: a norm before it is the backbone's (conv, BatchNorm2d, ReLU, Flatten, Linear), and one
    # Linear is a head of one layer
    linears = [i for i, n in enumerate(run) if isinstance(model.get_submodule(n), nn.Linear)]
    run = run[linears[0] :]
    kept = [m for n, m in children if n not in run and has_params(m)]
    return run if kept and len(linears) > 1 else [head]


def _head_like(module: nn.Module) -> bool:
    """A ``Sequential`` of what a classifier head is built from: linear layers, activations, dropout, norms."""
    return isinstance(module, nn.Sequential) and all(_head_layer(m) for m in module.children())


def _head_layer(module: nn.Module) -> bool:
    """One layer of what a classifier head is built from (``_head_like``)."""
    plain = (nn.Linear, nn.Dropout, nn.Identity, nn.Flatten)
    return isinstance(module, plain) or is_norm(module) or type(module).__module__ == "torch.nn.modules.activation"


def hf_base_prefix(model: nn.Module) -> str | None:
    """The attribute of a Hugging Face task model that holds its pretrained base model (``bert``, ``vit``)."""
    prefix = getattr(model, "base_model_prefix", None)
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return prefix
    if not type(model).__module__.startswith("transformers."):
        return None
    # CLIP- and SigLIP-style classifiers name a prefix ("clip") they do not have: their one tower is the base
    towers = [n for n, m in model.named_children() if n.endswith("_model") and has_params(m)]
    return towers[0] if len(towers) == 1 else None


def is_hf_base_model(model: nn.Module) -> bool:
    """A bare transformers base model, as ``AutoModel`` builds (``BertModel``): it outputs hidden states."""
    if not type(model).__module__.startswith("transformers."):
        return False
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    # Task classes such as CLIPForImageClassification also have base_model == self, so ask AutoModel's own list.
    bases = {n for v in MODEL_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    return type(model).__name__ in bases


# --- helpers ------------------------------------------------------------------------------------------------


def _timm_head_name(model: nn.Module) -> str | None:
    """The classifier a timm model names through ``get_classifier()``; None for other models."""
    if not (callable(getattr(model, "get_classifier", None)) and is_timm(model)):
        return None
    found = _timm_classifiers(model)
    classifier = found[0] if found else None  # a distilled model's (head, head_dist): the first is primary
    if isinstance(classifier, nn.Module) and not has_params(classifier):
        raise SpecError(
            f"{type(model).__name__} has no classifier head (a timm model created with num_classes=0 has "
            f"{type(classifier).__name__} there); add one with freezetune.replace_head(model, num_classes) (freezetune "
            "inspect: --num-classes N)"
        )
    return _name_of(model, classifier) if isinstance(classifier, nn.Module) else None


def timm_heads(model: nn.Module) -> list[str]:
    """What timm's ``reset_classifier`` makes new: every classifier ``get_classifier()`` names (two for a distilled
    model), with the norm it is paired with (EfficientViT-MSRA's ``BNLinear``), and the other layers of its classes
    (VOLO's ``aux_head``, Inception's ``AuxLogits.fc``)."""
    found = _timm_classifiers(model)
    names = [_with_its_norm(model, n) for n in (_name_of(model, c) for c in found if isinstance(c, nn.Module)) if n]
    classes = getattr(model, "num_classes", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == classes and _in_aux(name):
            if not any(under(name, n) for n in names):
                names.append(name)
    return names


def _timm_classifiers(model: nn.Module) -> list:
    """What a timm model's ``get_classifier()`` returns, as a list (a distilled model returns two)."""
    classifier = model.get_classifier()
    return list(classifier) if isinstance(classifier, (tuple, list)) else [classifier]


def _with_its_norm(model: nn.Module, name: str) -> str:
    """A classifier's parent when that is a norm-and-linear unit (EfficientViT-MSRA's ``BNLinear``, SHViT's
    ``BN_Linear``: built and renewed together); a head ``Sequential`` that keeps its norm (MetaFormer's) is not one."""
    parent = name.rpartition(".")[0]
    if not parent or "linear" not in type(model.get_submodule(parent)).__name__.lower():
        return name
    layers = [m for m in model.get_submodule(parent).children() if has_params(m)]
    return parent if len(layers) == 2 and sum(map(is_norm, layers)) == 1 else name


def _conv_classifier(model: nn.Module) -> str | None:
    """SqueezeNet's head: a 1x1 convolution to the classes inside ``classifier``."""
    container = getattr(model, "classifier", None)
    if not isinstance(container, nn.Module):
        return None
    convs = [n for n, m in container.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    return f"classifier.{convs[-1]}" if convs and convs[-1] else None


def _replace(model: nn.Module, name: str, num_classes: int) -> None:
    old = model.get_submodule(name)
    if isinstance(old, nn.Conv2d):
        new: nn.Module = nn.Conv2d(old.in_channels, num_classes, 1, bias=old.bias is not None)
    else:
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _out_features(module: nn.Module) -> int | None:
    return module.out_features if isinstance(module, nn.Linear) else getattr(module, "out_channels", None)


def _in_aux(name: str) -> bool:
    """Under an auxiliary classifier: GoogLeNet's ``aux1``, Inception's ``AuxLogits``, VOLO's ``aux_head``."""
    return name.split(".")[0].lower().startswith("aux")


def _name_of(model: nn.Module, target: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if module is target and name:
            return name
    return None
