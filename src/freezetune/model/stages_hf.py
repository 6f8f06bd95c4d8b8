"""The stages of a Hugging Face model, read from its structure rather than from attribute names: an input stage,
then a stage per repeated block of its base model (``encoder.layer.N``, GPT-2's ``h.N``, PVT's parallel block lists);
what a task class adds around its base model is head. ``model/stages.py`` asks these rules first for a transformers
model.
"""

from __future__ import annotations

import torch
from torch import nn

from freezetune.model.heads import hf_base_prefix
from freezetune.model.tree import has_params, is_norm

Decl = list[tuple[str, list[str]]]  # (stage name, the module or parameter name prefixes it holds), input to output


def hf_decl(model: nn.Module, head: str) -> Decl | None:
    base = hf_base_prefix(model)
    if not base:
        return None
    decl = hf_body(model.get_submodule(base), base)
    # What the task class adds around its base model (DistilBERT's pre_classifier, DeBERTa's pooler, XLNet's
    # sequence_summary) is not in a base checkpoint: it starts random and trains with the classifier. A pooler
    # inside the base model (BERT's) is pretrained and stays a backbone stage.
    added = [n for n, _ in model.named_children() if n != base] + [n for n, _ in model.named_parameters(recurse=False)]
    return [*decl, (head, added)]


def hf_body(base_model: nn.Module, base: str) -> Decl:
    """The stages of a Hugging Face base model, at ``base`` in the model: an input stage, then a stage per block."""
    children = [(c, m) for c, m in base_model.named_children() if has_params(m)]
    decl: Decl = []
    lead: list[str] = []  # the children in front of the first blocks: one input stage (GPT-2's wte and wpe)
    for child, module in children:
        child_decl = _hf_child_decl(base, child, module, first=not decl and not lead)
        if not decl and len(child_decl) == 1:
            lead.append(child)
            continue
        if lead and not decl:
            decl.append((lead[0], [f"{base}.{c}" for c in lead]))
        decl += child_decl
    if not decl:  # no blocks anywhere: a stage per child
        decl = [(c, [f"{base}.{c}"]) for c in lead]
    return decl


def _hf_child_decl(base: str, child: str, module: nn.Module, *, first: bool) -> Decl:
    """Stages of one child of a Hugging Face base model: one per repeated block, found as structure rather than by
    attribute name: the child itself when it is an ``nn.ModuleList`` (ViT's ``layers``, GPT-2's ``h``), else its
    ``nn.ModuleList`` (BERT's ``encoder.layer``, ConvNeXt's ``encoder.stages``), or its parallel lists of one length
    (PVT's ``patch_embeddings``/``block``/``layer_norm``: stage i holds item i of each); a child with none, or with
    lists of different lengths, is one stage. The child's layers after its blocks (a final norm) form one more stage;
    those in front of them (OPT's embeddings, BART's decoder positions) open the child's first block, or, in the
    base model's ``first`` child, form an input stage of their own."""
    if isinstance(module, nn.ModuleList):
        return [(f"{child}.{i}", [f"{base}.{child}.{i}"]) for i in range(len(module))]
    names = [n for n, m in module.named_children() if has_params(m)]
    lists = [n for n in names if isinstance(module.get_submodule(n), nn.ModuleList)]
    if not lists or len({len(module.get_submodule(n)) for n in lists}) != 1:
        return [(child, [f"{base}.{child}"])]
    main = max(lists, key=lambda n: sum(p.numel() for p in module.get_submodule(n).parameters()))
    decl: Decl = [(f"{child}.{main}.{i}", [f"{base}.{child}.{n}.{i}" for n in lists])
                   for i in range(len(module.get_submodule(main)))]  # fmt: skip
    at = names.index(lists[0])
    pre = [n for n in names[:at] if n not in lists]
    post = [n for n in names[at:] if n not in lists]
    # a norm registered in front of the blocks is their final one (OPT's final_layer_norm): it goes after them
    norms = [n for n in pre if is_norm(module.get_submodule(n))]
    pre, post = [n for n in pre if n not in norms], [*norms, *post]
    inputs = _block_inputs(module, post)  # registered after the blocks, run before them (or by each of them)
    pre, post = [*pre, *inputs], [n for n in post if n not in inputs]
    if pre and first:
        decl.insert(0, (f"{child}.{pre[0]}", [f"{base}.{child}.{n}" for n in pre]))
    elif pre:
        decl[0] = (decl[0][0], [*decl[0][1], *(f"{base}.{child}.{n}" for n in pre)])
    # named after what it holds: a stage called "encoder" with only the encoder's final norm in it would take
    # freeze("encoder") from the module glob that means the whole encoder
    return [*decl, (f"{child}.{post[0]}" if post else child, [f"{base}.{child}.{n}" for n in post])]


def _block_inputs(module: nn.Module, post: list[str]) -> list[str]:
    """Of the layers registered after a child's blocks, those that feed them rather than follow them: a position
    table every block reads (DeBERTa's ``rel_embeddings`` and the norm after it, MPNet's ``relative_attention_bias``)
    and a norm of the embeddings (BART's ``layernorm_embedding``). As a stage after the blocks, "the last two
    stages" trained the table and the head, and no block."""
    inputs: list[str] = []
    for i, name in enumerate(post):
        layer = module.get_submodule(name)
        table = any(isinstance(m, nn.Embedding) for m in layer.modules())
        if table or (is_norm(layer) and ("embed" in name.lower() or (i and inputs and inputs[-1] == post[i - 1]))):
            inputs.append(name)
    return inputs


def hf_norms_in_front(model: nn.Module, params: list[str]) -> list[str]:
    """The norms of a Hugging Face task model's additions that come before any other layer of their module (LeViT's
    ``classifier.batch_norm``, then its linear): pretrained, with the backbone. A norm after one (ModernBERT's
    ``head.norm``, on ``head.dense``'s output) normalises what trains, and trains with it: frozen, it sat between a
    trained layer and the classifier at its initial scale, out of the stages' order."""
    layered, norms = set(), []  # the additions (top-level modules) a layer other than a norm was seen in
    for name in params:  # in registration order, which is the order these small modules run in
        top = name.split(".", 1)[0]
        if not is_norm(model.get_submodule(name.rpartition(".")[0])):
            layered.add(top)
        elif top not in layered:
            norms.append(name)
    return norms


# by architecture and config: the answer does not depend on the weights, and the auto recipe's trials, a sweep's
# recipes and a checkpoint's loading each build the same model again
_UNUSED: dict[tuple[str, str, tuple[str, ...]], frozenset[str]] = {}


def hf_unused_params(model: nn.Module, names: list[str]) -> frozenset[str]:
    """Those of the parameters ``names`` of a Hugging Face classifier that its logits do not depend on, measured by
    one backward pass of a dummy input to them alone: a pretrained layer the task model runs without using its
    output (SigLIP's attention-pooling head beside the token average it classifies, ESM's contact head, BigBird's
    pooler). Empty when no dummy input can be made (an input other than token ids or an image) or the pass fails.
    Remembered by architecture and config; nothing is run for no names. The model is left as it was: modes,
    ``requires_grad`` flags, gradients and BatchNorm statistics (the pass runs in eval mode, with gradients on
    whatever the caller's mode).
    """
    if not names:
        return frozenset()
    try:
        key = (type(model).__qualname__, model.config.to_json_string(), tuple(names))
    except Exception:  # a config that does not serialise: measured every time
        key = None
    if key in _UNUSED:
        return _UNUSED[key]
    try:
        unused = _no_gradient(model, names)
    except Exception:  # a model the dummy input does not fit: the structure alone decides
        unused = frozenset()
    if key is not None:
        _UNUSED[key] = unused
    return unused


def _no_gradient(model: nn.Module, names: list[str]) -> frozenset[str]:
    everything = dict(model.named_parameters())
    params = [everything[n] for n in names]
    inputs = _dummy_input(model, params[0])
    if inputs is None:
        return frozenset()
    # a caller's no_grad or inference_mode (a notebook's summary) would make every candidate look unused
    with torch.inference_mode(False), torch.enable_grad():
        return _measured(model, names, everything, params, inputs)


def _measured(model: nn.Module, names: list[str], everything: dict[str, nn.Parameter], params: list[nn.Parameter],
              inputs: dict) -> frozenset[str]:  # fmt: skip
    flags = {n: p.requires_grad for n, p in everything.items()}
    modes = {m: m.training for m in model.modules()}
    try:
        for p in everything.values():  # only the measured ones: the pass keeps no graph of the rest
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        output = model.eval()(**inputs)
        logits = output.logits if hasattr(output, "logits") else output
        if not logits.requires_grad:  # none of them reaches the logits
            return frozenset(names)
        grads = torch.autograd.grad(logits.float().sum(), params, allow_unused=True)
    finally:
        for n, p in everything.items():
            p.requires_grad_(flags[n])
        for m, training in modes.items():
            m.training = training
    return frozenset(n for n, g in zip(names, grads, strict=True) if g is None)


def _dummy_input(model: nn.Module, param: nn.Parameter) -> dict | None:
    """Token ids (none of them the padding id, which some models warn about without a mask) or a small image batch,
    as the model's main input, on its device; None for other inputs."""
    if param.is_meta:
        return None
    config, kind = model.config, getattr(model, "main_input_name", None)
    if kind == "input_ids":
        ids = [i for i in range(4, 12) if i != getattr(config, "pad_token_id", None)][:5]
        return {"input_ids": torch.tensor([ids], device=param.device)}
    if kind != "pixel_values":
        return None
    config = getattr(config, "vision_config", None) or config
    size = getattr(config, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else (size["height"], size["width"]) \
        if isinstance(size, dict) else tuple(size)  # fmt: skip
    dtype = param.dtype if param.is_floating_point() else torch.float32
    return {"pixel_values": torch.zeros(1, getattr(config, "num_channels", 3), height, width, dtype=dtype,
                                        device=param.device)}  # fmt: skip
