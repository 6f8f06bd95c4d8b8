"""What a model looks like to freezetune before a run: its stages as a spec freezes them, and the training memory."""

from __future__ import annotations

from freezetune.config import TrainConfig
from freezetune.options import FREEZE_DEFAULT


def describe_model(
    name: str,
    *,
    weights: str | None = "none",
    freeze: str | int | list = FREEZE_DEFAULT,
    bn: str = TrainConfig.bn,
    img_size: int | None = None,
    batch_size: int = TrainConfig.batch_size,
    num_classes: int | None = None,
    amp: str = TrainConfig.amp,
) -> str:
    """Build model ``name``, freeze it by ``freeze`` and describe it: head, stage table, input, memory estimate.

    Args:
        name: ``timm:NAME``, ``torchvision:NAME`` or ``hf:DIR_OR_ID``.
        weights: as ``create_model``; the default random init, as the structure does not depend on the weights.
        freeze: a freeze spec (string forms as on the CLI: ``"-2"``, ``"stem,layer1"``).
        bn: BatchNorm policy of the frozen part.
        img_size: input size (default: the model's own).
        batch_size: batch size of the memory estimate.
        num_classes: replace the head with one of this many classes.
        amp: precision of the memory estimate's step, as ``train --amp`` takes it (``auto``: what a run on this
            machine's default device uses).

    >>> print(describe_model("timm:test_efficientnet", img_size=32))  # doctest: +SKIP
    timm:test_efficientnet  head: classifier  freeze: backbone  bn: frozen
    ...
    """
    from freezetune.config import parse_freeze_spec
    from freezetune.freeze import freeze as freeze_model
    from freezetune.freeze import summary
    from freezetune.memory import estimate_memory, format_memory
    from freezetune.models import create_model, text_preprocess
    from freezetune.precision import resolve_device, resolve_precision
    from freezetune.stages import head_name, replace_head

    dtype = resolve_precision(resolve_device("auto"), amp).amp_dtype  # a bad value fails before the model is built
    model, pre = create_model(name, weights, img_size=img_size)
    if num_classes:
        replace_head(model, num_classes)
    freeze_model(model, parse_freeze_spec(freeze), bn=bn)
    lines = [f"{name}  head: {head_name(model)}  freeze: {freeze}  bn: {bn}", summary(model)]
    if pre is not None:
        mean, std = tuple(round(m, 3) for m in pre.mean), tuple(round(s, 3) for s in pre.std)
        lines.append(f"input: {pre.input_size}px mean {mean} std {std}")
        estimate = estimate_memory(model, pre.input_size, batch_size, amp_dtype=dtype)
        lines.append(format_memory(estimate, batch_size, dtype))
    else:  # a Hugging Face text model: the preprocessing is its tokenizer, as a run builds it
        tokens = text_preprocess(name).max_length
        lines.append(f"input: texts, tokenized and cut at {tokens} tokens")
        estimate = estimate_memory(model, None, batch_size, amp_dtype=dtype, tokens=tokens)
        lines.append(format_memory(estimate, batch_size, dtype, tokens=tokens))
    return "\n".join(lines)
