"""Split a model at the input of its first trainable stage into a frozen prefix and a trainable suffix.

The split is what makes the feature cache possible: a frozen, deterministic prefix computes the same features every
epoch, so they are computed once. Models are traced with ``torch.fx`` (BatchNorm, dropout and timm's untraceable
modules stay leaf calls so they keep reading their ``training`` flag at run time). Where the graph cannot be cut at
one tensor — or the model does not trace — the split falls back to the head alone (timm's ``forward_features`` /
``forward_head``, or the input of the classifier module), and says why.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass

import torch
from torch import fx, nn

from freezetune.config.options import BN_EVAL_POLICIES
from freezetune.device.depthwise import FastDepthwiseConv2d
from freezetune.errors import SpecError, choices
from freezetune.freezing.bn_policy import STAT_NORMS, keeps_stats, policy_of
from freezetune.freezing.dropout import apply_holds, is_stochastic, random_kind
from freezetune.model.heads import aux_modules
from freezetune.model.stages import Stage, stages
from freezetune.model.tree import under

log = logging.getLogger(__name__)


@dataclass
class Split:
    """``suffix(prefix(x)) == model(x)``; ``prefix`` holds only frozen, deterministic computation."""

    prefix: nn.Module
    suffix_train: nn.Module  # traced in train mode (functional dropout etc. as in training)
    suffix_eval: nn.Module
    boundary: str  # name of the first stage the suffix computes (or "head")
    how: str  # "fx" | "timm-head" | "head-hook"

    def refuse_stale_training(self) -> None:
        """What the prefix computes is frozen; an unfreeze of it later (an Unfreezer in a loop of the user's) would
        train nothing: its features were computed once. From now on a training step through ``suffix_train`` says so.
        For ``cache_features``' splits: freezetune's trainer caches again after each unfreeze, and its steps (a
        cached head's are a handful of small kernels) need not walk the prefix's parameters."""
        cached = [(name, p) for name, p in self.prefix.named_parameters() if not p.requires_grad]
        self.suffix_train.register_forward_pre_hook(functools.partial(_refuse_stale, cached, self.boundary))


def _refuse_stale(cached: list[tuple[str, nn.Parameter]], boundary: str, *_) -> None:
    """Refuse a training step of a suffix whose prefix has a parameter that trains now (opened after the split)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return
    opened = [name for name, p in cached if p.requires_grad]
    if opened:
        raise SpecError(f"{len(opened)} parameter(s) of the cached prefix train now (first: {opened[0]}), opened "
                        f"after the features were cached (the cut is at {boundary}): on those features they would "
                        "not train; cache them again after an unfreeze (ft.cache_features, as freezetune's trainer "
                        "does), or train on images")  # fmt: skip


def split_model(model: nn.Module, at: str | None = None) -> tuple[Split | None, str]:
    """Split ``model`` at its first trainable stage; returns ``(split, reason)`` with ``split`` None if impossible.

    ``at`` names an earlier stage to cut at instead: the frozen stages from there on then run in the suffix (forward
    only, no gradient flows into them), and models frozen to different depths share one cache (the auto recipe's
    trials do).

    >>> import torchvision, freezetune as ft
    >>> m = torchvision.models.resnet18(); ft.freeze_to(m, 4)
    >>> split_model(m)[0].boundary
    'layer4'
    """
    st = stages(model)
    moving = _moving_batchnorm(model)
    if moving:
        return None, moving
    first, cuts = _cuts(st)
    if first is None:
        return None, "nothing is trainable"
    if first == 0:
        return None, _trainable_first_stage(model, st[0])
    if at is not None:
        if at not in cuts:
            return None, f"cannot cut at {at!r}: the cut must be a frozen stage's start among {cuts}"
        first = [s.name for s in st].index(at)
    try:
        split = _fx_split(model, st, first, set(st[first].param_names) if at is not None else None)
        if split is not None and split.boundary != st[first].name:  # say where the cache is, and why there
            why = _why_earlier(model, st, split.boundary, first)
            return split, f"cached at the input of {split.boundary} (fx), not of {st[first].name}: {why}"
        if split is not None:
            return split, f"cached at the input of {split.boundary} (fx)"
        why = "no single tensor crosses the stage boundary"
    except _Untraceable as exc:
        why = f"the model does not trace with torch.fx ({type(exc.__cause__).__name__})"
    except Exception as exc:  # splitting a graph that traced: a freezetune bug, but the run can go on
        why = (f"splitting its torch.fx graph failed ({type(exc).__name__}: {exc}; a freezetune bug, please report "
               "it)")  # fmt: skip
    head, problem = _head_split(model)
    if head is None:
        return None, f"{why}, and {problem}"
    return head, f"{why}; caching the head input only"


def _why_earlier(model: nn.Module, st: list[Stage], boundary: str, first: int) -> str:
    """Why a cut lies before stage ``first``, at ``boundary``'s input: a random layer of the frozen stages between, or
    more than one tensor crossing into ``first`` (HRNet's branches: it was blamed on random numbers it has none of)."""
    between = st[[s.name for s in st].index(boundary) : first]
    if aux := [n for n in aux_modules(model) if any(p.requires_grad for p in model.get_submodule(n).parameters())]:
        return (f"the auxiliary classifier(s) {choices(aux)} train and branch off before it (create_model builds "
                f"the model without them), so the frozen layers from {boundary} on run every step")  # fmt: skip
    staged = {id(m) for s in st for top in s.modules for m in model.get_submodule(top).modules()}
    inside = [m for s in between for top in s.modules for m in model.get_submodule(top).modules()]
    if any(is_stochastic(m) for m in inside) or any(is_stochastic(m) and id(m) not in staged for m in model.modules()):
        return ("frozen layers between them draw random numbers in training (dropout, drop path, stochastic depth: "
                "--frozen-dropout off runs them as at inference, and caches them) and run every step")  # fmt: skip
    return (f"more than one tensor (or a random op) crosses into {st[first].name}, so the frozen layers from "
            f"{boundary} on run every step")  # fmt: skip


def check_cut(model: nn.Module, at: str | None) -> None:
    """Raise a ``SpecError`` listing the stages when ``at`` (``cache_at``) names none the cache could cut at.

    A known stage that is not frozen when the cache is built is no mistake (an unfreeze moves the boundary): the
    run then reads images and says why.

    >>> import torchvision
    >>> check_cut(torchvision.models.resnet18(), "layer5")
    Traceback (most recent call last):
    freezetune.errors.SpecError: unknown cache_at stage 'layer5'; the cache can cut at: 'layer1', 'layer2', 'layer3', 'layer4', 'fc'
    """
    names = [s.name for s in stages(model)][1:]  # a cut at the first stage leaves no prefix to cache
    if at is not None and at not in names:
        raise SpecError(f"unknown cache_at stage {at!r}; the cache can cut at: {choices(names)}")


def check_cut_at_start(model: nn.Module, at: str | None) -> None:
    """Raise a ``SpecError`` when ``at`` names a stage past the first one that trains in ``model`` as the run starts
    (its freeze applied): the cut asked for cannot be made, and the run trained on uncached images, exit 0. Later,
    an unfreeze that moves the boundary past it is no mistake (see ``check_cut``)."""
    first, cuts = _cuts(stages(model))
    if at is not None and first and at not in cuts:
        raise SpecError(f"cache_at {at!r} trains from the start of the run: the cache cuts at the input of a stage "
                        f"up to the first that trains: {choices(cuts)}; give one of them, or freeze more")  # fmt: skip


def _cuts(st: list[Stage]) -> tuple[int | None, list[str]]:
    """The index of the first stage that trains (None: none does) and the stages a cache can cut at, from the second
    up to that one: a cut at the first leaves no prefix, past it the prefix would train."""
    first = next((i for i, s in enumerate(st) if any(p.requires_grad for p in s.params)), None)
    return first, [s.name for s in st[1 : (first or 0) + 1]]


def _moving_batchnorm(model: nn.Module) -> str | None:
    """A frozen-part BatchNorm whose statistics move in training makes every earlier cached feature stale."""
    for name, m in model.named_modules():
        policy = policy_of(m)
        if keeps_stats(m) and policy is not None and policy not in BN_EVAL_POLICIES:
            return f"BatchNorm {name} updates its statistics in training (bn policy {policy!r}, not 'frozen')"
    return None


def _trainable_first_stage(model: nn.Module, first: Stage) -> str:
    """Why there is no prefix to cache when the first stage trains: ``bn="affine-only"`` trains the BatchNorm scale
    and shift of every frozen stage, the first one's too."""
    norms = [m for name in first.modules for m in model.get_submodule(name).modules()
             if keeps_stats(m)]  # fmt: skip
    held = {id(p): policy_of(m) for m in norms for p in m.parameters(recurse=False)}
    trainable = [p for p in first.params if p.requires_grad]
    policies = {held.get(id(p)) for p in trainable}
    if trainable and None not in policies:  # every trainable parameter of it a BatchNorm's under a policy
        return (f"the frozen stages' BatchNorm scale and shift train (bn policy {sorted(policies)[0]!r}), the first "
                f"stage's ({first.name}) too: there is no frozen prefix to cache")  # fmt: skip
    return f"the first stage ({first.name}) is trainable: there is no frozen prefix to cache"


# What draws random numbers in training, by its function's name (the layers: freezing.dropout.RANDOM_KINDS; a
# StochasticDepth traced through had its training flag baked into the prefix, and cached features held one random
# depth an image)
_RANDOM_FUNCTIONS = ("dropout", "drop_path", "drop_block", "stochastic_depth")


class _Tracer(fx.Tracer):
    """Keep norm, dropout and timm's no-trace modules as leaves: they read ``self.training`` at run time. So is
    ``FastDepthwiseConv2d``: it picks its backward by the input it gets and whether its weight trains."""

    def __init__(self) -> None:
        leaves: tuple = (*STAT_NORMS, nn.modules.dropout._DropoutNd, FastDepthwiseConv2d)
        autowrap: tuple = ()
        try:
            from timm.layers import DropPath
            from timm.models._features_fx import get_notrace_functions, get_notrace_modules

            leaves += (DropPath, *get_notrace_modules())
            autowrap = tuple(get_notrace_functions())
        except ImportError:
            pass
        super().__init__(autowrap_functions=autowrap)
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        # a random module stays a call that reads its training flag when run (and that the cut sees: _random_call)
        return isinstance(m, self.leaves) or random_kind(m) or super().is_leaf_module(m, qualified_name)


class _Untraceable(Exception):
    """torch.fx could not trace the model (its error is the ``__cause__``): a model's own Python, not a fault."""


def _trace(model: nn.Module, training: bool) -> fx.Graph:
    was = model.training
    model.train(training)
    apply_holds(model)  # a held layer's mode, as its hook sets it when run: fx traces forward() without hooks
    try:
        return _Tracer().trace(model, concrete_args=_defaults(model))
    except Exception as exc:  # any tracing failure: the model is just not fx-traceable
        raise _Untraceable from exc
    finally:
        model.train(was)


def _defaults(model: nn.Module) -> dict[str, object]:
    """The optional inputs of ``model.forward`` after the first, at their defaults, as training calls it: traced as
    inputs, they were values every block reads (timm ViT's ``attn_mask=None``), so that no cut had one tensor
    crossing it."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params if p.kind in kinds and p.default is not inspect.Parameter.empty}


def _fx_split(model: nn.Module, st: list[Stage], first: int, stage_params: set[str] | None = None) -> Split | None:
    """The split at the latest cut before stage ``first`` (of stages ``st``) that the train and eval graphs agree on;
    its ``boundary`` is the stage the first module after the cut belongs to (an earlier one than ``first`` when a
    random op comes before)."""
    traced = {training: _trace(model, training) for training in (True, False)}
    # the earlier limit of the two: a random op whose rate its layer passes by its mode is random in one graph alone
    limit = min(_limit(model, graph, stage_params) for graph in traced.values())
    graphs = {}
    for training, graph in traced.items():
        cut = _find_cut(graph, limit)
        if cut is None:
            return None
        graphs[training] = (graph, *cut)
    g_train, idx_train, live_train = graphs[True]
    if idx_train != graphs[False][1] or _shape(g_train, idx_train) != _shape(graphs[False][0], idx_train):
        return None  # train and eval graphs disagree before the boundary: not a deterministic prefix
    prefix = fx.GraphModule(model, _prefix_graph(g_train, idx_train, live_train))
    suffix_train = fx.GraphModule(model, _suffix_graph(g_train, idx_train, live_train))
    suffix_eval = fx.GraphModule(model, _suffix_graph(*graphs[False]))
    boundary = _stage_after(list(g_train.nodes)[idx_train:], st, aux_modules(model)) or st[first].name
    return Split(prefix, suffix_train, suffix_eval, boundary, "fx")


def _shape(graph: fx.Graph, cut: int) -> list[tuple[str, object]]:
    """What the first ``cut`` nodes of ``graph`` do: a frozen layer's branch on its mode (``if self.training:``) made
    the train graph's cut fall at another node than the eval graph's at the same index."""
    return [(n.op, n.target) for n in list(graph.nodes)[:cut]]


def _stage_after(nodes: list[fx.Node], st: list[Stage], aux: list[str]) -> str | None:
    """The stage of the first module or parameter ``nodes`` use, but for an auxiliary classifier's (``aux``: a side
    branch in the last stage, which the main path reaches only after the stages between)."""
    for node in nodes:
        if node.op not in ("call_module", "get_attr") or any(under(node.target, a) for a in aux):
            continue
        for stage in st:
            if any(node.target == m or node.target.startswith(f"{m}.") for m in (*stage.modules, *stage.param_names)):
                return stage.name
    return None


def _limit(model: nn.Module, graph: fx.Graph, stage_params: set[str] | None = None) -> int:
    """The index of the first trainable or random op (or op of the stage whose parameters are ``stage_params``)."""
    nodes = list(graph.nodes)
    return next((i for i, n in enumerate(nodes) if _uses_trainable(model, n) or _random_call(model, n)
                 or (stage_params and _uses_params(model, n, stage_params))), len(nodes) - 1)  # fmt: skip


def _find_cut(graph: fx.Graph, limit: int) -> tuple[int, fx.Node] | None:
    """The latest node index at or before ``limit`` at which exactly one value crosses over."""
    nodes = list(graph.nodes)
    for cut in range(limit, 1, -1):
        before = set(nodes[:cut])
        crossing = {a for n in nodes[cut:] for a in n.all_input_nodes if a in before and a.op != "get_attr"}
        if len(crossing) == 1:
            live = crossing.pop()
            if live.op != "placeholder":
                return cut, live
            return None
    return None


def _uses_params(model: nn.Module, node: fx.Node, names: set[str]) -> bool:
    if node.op == "call_module":
        return any(f"{node.target}.{n}" in names for n, _ in model.get_submodule(node.target).named_parameters())
    return node.op == "get_attr" and node.target in names


def _uses_trainable(model: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        return any(p.requires_grad for p in model.get_submodule(node.target).parameters())
    if node.op == "get_attr":
        obj = _get_attr(model, node.target)
        return isinstance(obj, torch.Tensor) and obj.requires_grad
    return False


def _random_call(model: nn.Module, node: fx.Node) -> bool:
    """Dropout-like ops must run in the suffix: a cached prefix would freeze one random mask forever."""
    if node.op == "call_module":  # a leaf: torch's TransformerEncoderLayer holds its dropouts and attention's
        return any(is_stochastic(m) for m in model.get_submodule(node.target).modules())
    if node.op != "call_function":
        return False
    name = getattr(node.target, "__name__", str(node.target))
    if name == "scaled_dot_product_attention":  # attention dropout: a rate its layer passed by its mode (timm, SDPA)
        rate = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
        return not isinstance(rate, (int, float)) or rate > 0
    if not any(kind in name for kind in _RANDOM_FUNCTIONS):
        return False
    # its training flag: by name, else a True among its arguments (dropout's third, stochastic_depth's fourth)
    training = node.kwargs.get("training")
    return bool(training) if training is not None else any(a is True for a in node.args[1:])


def _get_attr(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _prefix_graph(graph: fx.Graph, cut: int, live: fx.Node) -> fx.Graph:
    out, env = fx.Graph(), {}
    for node in list(graph.nodes)[:cut]:
        env[node] = out.node_copy(node, lambda n: env[n])
    out.output(env[live])
    return out


def _suffix_graph(graph: fx.Graph, cut: int, live: fx.Node) -> fx.Graph:
    nodes = list(graph.nodes)
    out, env = fx.Graph(), {}
    env[live] = out.placeholder("features")
    for node in nodes[:cut]:
        if node.op == "get_attr":  # constants used on both sides are simply read again
            env[node] = out.node_copy(node, lambda n: env[n])
    for node in nodes[cut:]:
        env[node] = out.node_copy(node, lambda n: env[n])
    return out


class _HeadOnly(nn.Module):
    """Run only the part of a model after a captured head input (``forward_head`` or the classifier module)."""

    def __init__(self, model: nn.Module, fn_name: str | None, head: str | None) -> None:
        super().__init__()
        self.model, self.fn_name, self.head = model, fn_name, head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.fn_name:
            return getattr(self.model, self.fn_name)(features)
        return self.model.get_submodule(self.head)(features)


class _HeadInput(nn.Module):
    """Compute what the head receives: ``forward_features`` or the classifier module's input (captured by a hook)."""

    def __init__(self, model: nn.Module, head: str | None) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            return self.model.forward_features(x)
        captured = []

        def grab(module, args):
            captured.append(args[0])
            raise _Captured

        handle = self.model.get_submodule(self.head).register_forward_pre_hook(grab)
        try:
            self.model(x)
        except _Captured:
            pass
        finally:
            handle.remove()
        return captured[0]


class _Captured(Exception):
    """Stops the forward pass once the head input is captured (the head itself need not run)."""


def _head_split(model: nn.Module) -> tuple[Split | None, str]:
    *body, head = stages(model)
    if any(p.requires_grad for s in body for p in s.params):
        return None, "layers before the head train, so the head input is not fixed"
    if len(head.modules) != 1:
        return None, "the head is not one module whose input could be captured"
    name = head.modules[0]
    random = [n for n, m in model.named_modules() if is_stochastic(m) and not (n + ".").startswith(name + ".")]
    if random:
        return None, f"{random[0]} is random in training and runs before the head"
    if callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None)):
        return Split(_HeadInput(model, None), *[_HeadOnly(model, "forward_head", None)] * 2, "head", "timm-head"), ""
    # the whole head container (e.g. Sequential(Dropout, Linear)), so its own dropout still runs in training
    return Split(_HeadInput(model, name), *[_HeadOnly(model, None, name)] * 2, "head", "head-hook"), ""
