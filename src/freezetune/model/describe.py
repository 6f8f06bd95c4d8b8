"""What a model looks like to freezetune before a run: its stages as a spec freezes them, and the training memory."""

from __future__ import annotations

from freezetune.config.options import BATCH_AUTO, FREEZE_DEFAULT, RANDOM_WEIGHTS, batch_size_problem, check
from freezetune.config.train_config import TrainConfig


def describe_model(
    name: str,
    *,
    weights: str | None = RANDOM_WEIGHTS[0],
    freeze: str | int | list = FREEZE_DEFAULT,
    bn: str = TrainConfig.bn,
    img_size: int | None = None,
    batch_size: int | str = TrainConfig.batch_size,
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
        batch_size: batch size of the memory estimate, or ``"auto"``: the one ``train --batch-size auto`` picks on
            this machine's default device (measured on CUDA; elsewhere the default), shown with the reason.
        num_classes: replace the head with one of this many classes.
        amp: precision of the memory estimate's step, as ``train --amp`` takes it (``auto``: what a run on this
            machine's default device uses).

    >>> print(describe_model("timm:test_efficientnet", img_size=32))  # doctest: +SKIP
    timm:test_efficientnet  head: classifier  freeze: backbone  bn: frozen
    ...
    """
    from freezetune.config.train_config import parse_freeze_spec
    from freezetune.device.precision import resolve_device, resolve_precision
    from freezetune.freezing.freeze import freeze as freeze_model
    from freezetune.freezing.freeze import summary
    from freezetune.model.create import create_model
    from freezetune.model.heads import head_name, replace_head

    check(batch_size_problem(batch_size))  # bad values fail before the model is built
    precision = resolve_precision(resolve_device("auto"), amp)
    model, pre = create_model(name, weights, img_size=img_size)
    if num_classes is not None:  # 0 is a mistake to name, not "keep the head"
        replace_head(model, num_classes)
    shown, averaged = freeze, False
    if freeze == "auto":  # measured when a run starts: what its default candidate trains
        from freezetune.auto.recipe import run_average
        from freezetune.auto.rule import default_freeze

        freeze, ks = default_freeze(name, img_size)
        shown = (f"auto (measured when train runs; its default candidate, the last {-freeze - 1} stages: {freeze}; "
                 f"the trials may choose the last {', '.join(map(str, ks))})")  # fmt: skip
        averaged = run_average(None, text=pre is None) > 0  # its run averages its weights (an image model's)
    freeze_model(model, parse_freeze_spec(freeze), bn=bn)
    lines = [f"{name}  head: {head_name(model)}  freeze: {shown}  bn: {bn}", summary(model)]
    if batch_size == BATCH_AUTO:
        batch_size, why = _auto_batch_size(model, pre, precision, averaged)
        lines.append(f"--batch-size auto -> {batch_size}: {why}")
    return "\n".join([*lines, *_input_and_memory(name, model, pre, batch_size, precision.amp_dtype, averaged)])


# inspect has no training set to cap the measured size at; a larger batch rarely helps a fine-tune
_AUTO_CAP = 1024


def _auto_batch_size(model, pre, precision, averaged: bool) -> tuple[int, str]:
    """What ``train --batch-size auto`` would pick for this model and freeze on the default device: as a run measures
    it (the frozen part keeps no activations for backward), capped at ``_AUTO_CAP`` rather than the training set."""
    from freezetune.device.memory import auto_batch_size

    device = precision.device
    try:
        return auto_batch_size(model.to(device), pre.input_size if pre is not None else None, device=device,
                               cap=_AUTO_CAP, default=TrainConfig.batch_size, autocast=precision.autocast,
                               averaged=averaged)  # fmt: skip
    finally:
        model.to("cpu")  # the estimate below measures a CPU copy


def _input_and_memory(name: str, model, pre, batch_size: int, dtype, averaged: bool = False) -> list[str]:
    """The input line and the memory estimate: on images of the model's size, or on texts at its tokenizer's cut
    (``averaged``: the run keeps a weight average, as ``estimate_memory`` counts it)."""
    from freezetune.data.text import text_preprocess
    from freezetune.device.memory import estimate_memory, format_memory
    from freezetune.model.text_pooling import POOLED, pooling_of

    if pre is not None:
        mean, std = tuple(round(m, 3) for m in pre.mean), tuple(round(s, 3) for s in pre.std)
        estimate = estimate_memory(model, pre.input_size, batch_size, amp_dtype=dtype, averaged=averaged)
        order = ", channels reversed to BGR" if pre.channel_order == "BGR" else ""
        memory = format_memory(estimate, batch_size, dtype, averaged=averaged)
        return [f"input: {pre.input_size}px mean {mean} std {std}{order}", memory]
    tokens = text_preprocess(name).max_length  # a Hugging Face text model: its tokenizer, as a run builds it
    estimate = estimate_memory(model, None, batch_size, amp_dtype=dtype, tokens=tokens)
    pooled = pooling_of(model)  # a sentence-transformers model's own, in place of the pooler
    pooled = f", each pooled as its sentence-transformers config says: {POOLED[pooled]}" if pooled else ""
    return [f"input: texts, tokenized and cut at {tokens} tokens{pooled}", format_memory(estimate, batch_size, dtype,
                                                                                   tokens=tokens)]  # fmt: skip
