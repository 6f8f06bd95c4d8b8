"""What a model is made of, read the same way by every module: the model under its wrappers (DDP, DataParallel,
``torch.compile``), which library built it, which layers are norms or hold parameters, and qualified names."""

from __future__ import annotations

from torch import nn

from freezetune.errors import SpecError, choices


def unwrap(model: nn.Module) -> nn.Module:
    """The model under its wrappers: DistributedDataParallel and DataParallel (``.module``), ``torch.compile``
    (``._orig_mod``). Stages, freezing and groups act on the model itself: a wrapper is one child to them, so
    ``freeze(ddp_model, -2)`` froze nothing and stage names read ``module.fc``."""
    return wrapping(model)[-1]


def wrapping(model: nn.Module) -> list[nn.Module]:
    """``model`` and the modules its wrappers hold, outermost first: ``[ddp, compiled, model]``.

    Raises:
        SpecError: ``model`` is not a module (a model's name, its ``state_dict()``): every function that reads a
            model's stages comes here first, and an ``AttributeError`` from deep inside would not say so.
    """
    if not isinstance(model, nn.Module):
        shown = repr(model) if isinstance(model, str) else type(model).__name__
        raise SpecError(f"expected a model (a torch.nn.Module), got {shown}: build it first, e.g. "
                        f"freezetune.create_model('timm:NAME') or torchvision.models.NAME(weights=...)")  # fmt: skip
    chain = [model]
    while True:
        inner = getattr(chain[-1], "_orig_mod", None)
        if inner is None and isinstance(chain[-1], (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = chain[-1].module
        if not isinstance(inner, nn.Module):
            return chain
        chain.append(inner)


def is_timm(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


def is_library_model(model: nn.Module) -> bool:
    """A model class of timm, torchvision or transformers, whose pretrained checkpoints hold every layer but the
    classifier; a user's own model (a backbone and a head of their making) is not one."""
    return type(model).__module__.split(".")[0] in ("timm", "torchvision", "transformers")


def has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer, by its class: BatchNorm2d, LayerNorm, GroupNorm, RMSNorm, T5LayerNorm, LayerNorm2d, ..."""
    return "norm" in type(module).__name__.lower()


def under(name: str, prefix: str) -> bool:
    """Whether qualified name ``name`` is ``prefix`` or inside it."""
    return name == prefix or name.startswith(prefix + ".")


def check_materialized(model: nn.Module) -> None:
    """A lazy layer's parameter has no size until the first forward pass: counting it raised torch's own error.

    Raises:
        SpecError: naming the lazy layers' parameters.
    """
    lazy = [name for name, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise SpecError(f"{len(lazy)} parameter(s) of lazy layers have no size yet ({choices(lazy, limit=3)}): run "
                        "one forward pass through the model first")  # fmt: skip
