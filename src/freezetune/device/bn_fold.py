"""An evaluation copy of a model whose BatchNorm layers are folded into the convolutions that feed them.

In eval mode a BatchNorm is a fixed affine map per channel; after a convolution whose output nothing else reads, the
convolution's weights and bias can absorb it, and a pass over every activation map is saved. On a CPU that made
EfficientNet-Lite0's evaluation forward about 1.2x as fast (``benchmarks/bn_fold.py``), so the final test, each
epoch's validation and ``freezetune eval`` run on such a copy there; the trained model is never changed.

Which pairs fold is read from the model's ``torch.fx`` graph, not from the order of its modules: a convolution whose
output is also read elsewhere (a residual branch), a convolution that changes its weights in its forward (weight
standardisation, or a hook such as ``weight_norm``'s), or a norm without running statistics, stays as it is. A model
that does not trace, or cannot be copied, folds nothing.
"""

from __future__ import annotations

import collections
import copy
import weakref

import torch
from torch import nn

from freezetune.device.depthwise import FastDepthwiseConv2d
from freezetune.model.tree import wrapping

# convolutions whose forward is F.conv2d on their weight and bias (padding, if any, applied to the input)
_CONVS: tuple[type, ...] = (nn.Conv2d, FastDepthwiseConv2d)
_NORMS: tuple[type, ...] = (nn.BatchNorm2d,)
try:
    from timm.layers import BatchNormAct2d, Conv2dSame

    _CONVS += (Conv2dSame,)
    _NORMS += (BatchNormAct2d,)  # its dropout and activation stay, after the folded convolution
except ImportError:  # timm is a dependency; a model of another library folds its plain layers
    pass

# per model: its modules' names and types when traced (a module swapped or inserted since is traced again), and pairs
_PAIRS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, tuple[tuple[str, str], ...]]] = weakref.WeakKeyDictionary()


def foldable(model: nn.Module) -> bool:
    """Whether ``folded`` may trace ``model``: a plain module that holds a BatchNorm (a wrapper, DDP's or
    torch.compile's, runs collective or compiled code when called, which a trace must not start).

    >>> foldable(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))), foldable(nn.Linear(2, 2))
    (True, False)
    """
    if len(wrapping(model)) > 1:
        return False
    return any(type(m) in _NORMS for m in model.modules())


def foldable_pairs(model: nn.Module) -> tuple[tuple[str, str], ...]:
    """``(conv, norm)`` module names where ``norm`` reads only ``conv``'s output, ``conv`` feeds nothing else, and
    each is called once (a module called twice would be changed for its other call too); traced once per model
    structure.

    >>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    >>> foldable_pairs(m)
    (('0', '1'),)
    """
    structure = tuple((name, type(m)) for name, m in model.named_modules())
    if model not in _PAIRS or _PAIRS[model][0] != structure:
        _PAIRS[model] = structure, _find_pairs(model)
    return _PAIRS[model][1]


def _find_pairs(model: nn.Module) -> tuple[tuple[str, str], ...]:
    from freezetune.cache.model_split import _trace, _Untraceable  # the run's own tracer: timm's no-trace leaves

    try:
        graph = _trace(model, training=False)
    except _Untraceable:  # the model is evaluated as it is
        return ()
    modules = dict(model.named_modules())
    calls = collections.Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        norm = modules.get(node.target) if node.op == "call_module" else None
        if type(norm) not in _NORMS or norm.running_mean is None or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        conv = modules.get(source.target) if isinstance(source, torch.fx.Node) and source.op == "call_module" else None
        if type(conv) in _CONVS and len(source.users) == 1 and calls[source.target] == calls[node.target] == 1 \
                and conv.out_channels == norm.num_features and not _hooked(conv):  # fmt: skip
            pairs.append((source.target, node.target))
    return tuple(pairs)


def _hooked(conv: nn.Module) -> bool:
    """Whether hooks run around ``conv``'s forward: ``weight_norm`` and ``spectral_norm`` recompute its weight in a
    pre-hook, which would overwrite the folded one."""
    return bool(conv._forward_pre_hooks or conv._forward_hooks)


def folded(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with its ``foldable_pairs`` folded, or ``model`` itself when none fold.

    >>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    >>> x = torch.randn(2, 3, 8, 8)
    >>> f = folded(m)
    >>> type(f[1]).__name__, torch.allclose(f(x), m(x), atol=1e-5)
    ('Identity', True)
    """
    pairs = foldable_pairs(model)
    if not pairs:
        return model
    try:
        copied = copy.deepcopy(model).eval()
    except Exception:  # an attribute that cannot be copied (a lock, a handle): a fold may never fail an evaluation
        return model
    with torch.no_grad():
        for conv_name, norm_name in pairs:
            conv, norm = copied.get_submodule(conv_name), copied.get_submodule(norm_name)
            _fold(conv, norm)
            parent, _, leaf = norm_name.rpartition(".")
            after = nn.Sequential(norm.drop, norm.act) if hasattr(norm, "act") else nn.Identity()
            setattr(copied.get_submodule(parent) if parent else copied, leaf, after)
    return copied


def _fold(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    """``norm(conv(x))`` in eval mode as one convolution: each output channel scaled, then shifted."""
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    conv.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)
