"""The stages of a Hugging Face model, read from its structure rather than from attribute names: an input stage,
then a stage per repeated block of its base model (``encoder.layer.N``, GPT-2's ``h.N``, PVT's parallel block lists);
what a task class adds around its base model is head. ``stages.py`` asks these rules first for a transformers model.
"""

from __future__ import annotations

from torch import nn

from freezetune.heads import has_params, hf_base_prefix, is_norm

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
