"""A sentence-embedding checkpoint's own pooling, kept when it becomes a classifier.

A sentence-transformers folder (``modules.json`` naming a ``Pooling`` module, whose ``config.json`` sets the mode)
says how its encoder's token vectors become one vector: all-MiniLM-L6-v2 averages them over the text's tokens, and
was trained that way. Its Hugging Face task class reads instead the first token through BERT's pooler (a dense layer
and tanh that the sentence training never used). Where the task class reads its base model's pooler, freezetune
replaces that pooler with ``TokenPooler``, which pools as the folder declares (mean, first token or max over the
text's tokens, the attention mask read from the base model's call) and has no weights. Where the task class's head is
new and reads the first token itself (RoBERTa's, MPNet's, DistilBERT's: all-mpnet-base-v2, all-distilroberta-v1),
the pooled vector is put at that token, so the head learns on it (not measured: no such weights ship in a package
here).

Measured on MiniLM (``benchmarks/text_transfer.py``, 3 seeds, 100 texts a class, 3 epochs; man-page sections, Debian
package sections): the auto recipe 65.96 -> 70.09 % and 78.59 -> 79.22 %, ``--recipe linear-probe`` 49.47 -> 62.04 %
and 72.19 -> 76.26 %.

A checkpoint rebuilds with the pooling it trained with, which it records (``match_record``): one trained through the
task class's pooler (by a freezetune before this) rebuilds with that pooler.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from torch import nn

from freezetune.model.heads import hf_base_prefix
from freezetune.run.log import warn_once

log = logging.getLogger(__name__)

MODULES_FILE = "modules.json"  # a sentence-transformers folder's list of its modules (encoder, pooling, normalize)
POOLING_TYPE = "Pooling"  # the class name of sentence-transformers' pooling module (sentence_transformers.models.*)
# the pooling config's switches freezetune reads, one at a time (sentence-transformers concatenates several)
MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}
# task classes whose new head reads the first token of the base model's last hidden states: RoBERTa's classification
# head (XLM-R's, CamemBERT's), MPNet's, DistilBERT's pre_classifier, ELECTRA's head, DeBERTa's context pooler
FIRST_TOKEN_HEADS = frozenset({"roberta", "xlm-roberta", "camembert", "mpnet", "distilbert", "electra", "deberta",
                               "deberta-v2"})  # fmt: skip
FIRST_TOKEN = "sentence_pooling"  # the base model's attribute that holds the TokenPooler of such a model
_NAMED_MODES = {mode: switch for switch, mode in MODES.items()}  # a mode's switch
DECLARED, RECORDED = "the model's sentence-transformers config declares", "the checkpoint it starts from records"
POOLED = {
    "mean": "the mean of its tokens' last hidden states",
    "cls": "its first token's last hidden state",
    "max": "the maximum of its tokens' last hidden states",
}  # said in the logs


class TokenPooler(nn.Module):
    """The stand-in for a base model's pooler (or what its first token holds): one vector per text from the last
    hidden states, pooled over the text's tokens (``mean``, ``max``) or its first token (``cls``), without weights.
    The base model's forward pre-hook (``install``) hands it the call's attention mask; without one every position
    counts.

    Args:
        mode: ``mean`` | ``cls`` | ``max``.
        replaced: the class of the pooler it stands in for (``match_record`` puts one back for a checkpoint of it);
            None where it fills the first token.
    """

    def __init__(self, mode: str, replaced: type[nn.Module] | None = None) -> None:
        super().__init__()
        if mode not in MODES.values():
            raise ValueError(f"unknown pooling mode {mode!r}; one of {', '.join(MODES.values())}")
        self.mode, self.replaced = mode, replaced
        self.mask: torch.Tensor | None = None
        self.origin = DECLARED  # what says this mode (said in the run's line)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mode == "cls":
            return hidden_states[:, 0]
        mask = self.mask
        if mask is None or tuple(mask.shape) != tuple(hidden_states.shape[:2]):
            mask = torch.ones(hidden_states.shape[:2], device=hidden_states.device)
        keep = mask.to(device=hidden_states.device, dtype=torch.bool).unsqueeze(-1)
        if self.mode == "max":
            return hidden_states.masked_fill(~keep, torch.finfo(hidden_states.dtype).min).amax(dim=1)
        weights = keep.to(torch.float32)  # summed in float32: a bf16 sum of 128 tokens loses digits
        total = (hidden_states.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return total.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def declared(arch: str, *, cache_only: bool = True) -> str | None:
    """The pooling a sentence-transformers model folder or hub id declares (``mean``, ``cls``, ``max``); None where
    it declares none (not a sentence-transformers model) or one freezetune does not read (several modes at once,
    weighted mean, last token: said once in the log)."""
    modules = _read_json(arch, MODULES_FILE, cache_only)
    paths = _pooling_paths(modules)
    config = _read_json(arch, f"{paths[0]}/config.json", cache_only) if paths else None
    if not isinstance(config, dict):
        return None
    named = _NAMED_MODES.get(config.get("pooling_mode"))  # the constructor's single name, in a config written by hand
    if named and not any(v is True for k, v in config.items() if k.startswith("pooling_mode_")):
        config = {**config, named: True}
    on = sorted(k for k, v in config.items() if k.startswith("pooling_mode_") and v is True)
    if len(on) == 1 and on[0] in MODES:
        return MODES[on[0]]
    warn_once(log, "%s: its sentence-transformers pooling (%s) is not one freezetune reads (the mean, the first or "
              "the max token alone): the classifier reads its task class's pooled output, not the vector the model "
              "was trained to give", arch, ", ".join(on) or "none")  # fmt: skip
    return None


def declaration_files(folder: Path) -> list[str]:
    """The files of ``folder`` that declare its pooling (``modules.json`` and the pooling module's config), relative
    to it: a checkpoint carries them with the config and tokenizer (``hf_bundle``)."""
    try:
        modules = json.loads((folder / MODULES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    paths = _pooling_paths(modules)
    return [MODULES_FILE, *(f"{p}/config.json" for p in paths[:1] if (folder / p / "config.json").is_file())]


def _pooling_paths(modules: object) -> list[str]:
    """The folders of the Pooling modules a ``modules.json`` (parsed) lists, those inside the model's folder."""
    if not isinstance(modules, list):
        return []
    return [m["path"] for m in modules if isinstance(m, dict) and inside_folder(m.get("path"))
            and str(m.get("type", "")).rsplit(".", 1)[-1] == POOLING_TYPE]  # fmt: skip


# Names Windows gives its devices in every folder, whatever the extension ("NUL.json" is NUL): written to, they are
# the console, a printer port or nowhere, not a file of the model's folder.
WINDOWS_DEVICES = frozenset({"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
                             *(f"{port}{i}" for port in ("COM", "LPT") for i in "123456789\u00b9\u00b2\u00b3")})  # fmt: skip


def inside_folder(path: object) -> bool:
    """Whether a module's ``path`` in modules.json names a folder inside the model's (not the folder itself, not
    ``/etc`` or ``../x``: a checkpoint carries the file and writes it back under its folder), read as a path on any
    system: on Windows ``/x`` is no absolute path (its drive is the current one's), ``D:x`` is the current folder
    of drive D, both outside the model's, and ``NUL`` or ``con.json`` is a device in every folder.

    >>> [inside_folder(p) for p in ("1_Pooling", "/etc", "../x", "D:x", "//host/share", "NUL", "x/con.json")]
    [True, False, False, False, False, False, False]
    """
    if not isinstance(path, str) or not path or ":" in path or "\\" in path:  # a drive, or Windows' separator
        return False
    posix, windows = PurePosixPath(path), PureWindowsPath(path)
    devices = any(part.split(".")[0].rstrip(" ").upper() in WINDOWS_DEVICES for part in windows.parts)
    return not (posix.anchor or windows.anchor or devices) and ".." not in (*posix.parts, *windows.parts)


def install(model: nn.Module, mode: str, name: str) -> bool:
    """Make ``model``'s classifier read the pooling ``mode`` declares: the pooler its task class reads (its base
    model's ``pooler``: BERT's and its kin's) becomes a ``TokenPooler``; where the task class's new head reads the
    base model's first token itself (``FIRST_TOKEN_HEADS``), the pooled vector is put at that token. False, said in
    the log, for any other task class (a decoder's reads its last token) and for ``cls`` there (already read)."""
    base = _base(model)
    pooler = getattr(base, "pooler", None)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(base, nn.Module) or pooling_of(base) is not None:
        return False
    if _reads_hidden_states(pooler):
        base.pooler = TokenPooler(mode, type(pooler))
    elif model_type in FIRST_TOKEN_HEADS and mode != "cls":  # its head is new: it learns to read the pooled vector
        setattr(base, FIRST_TOKEN, TokenPooler(mode))
        _hook_once(base, _pooled_first_token)
    else:
        if model_type in FIRST_TOKEN_HEADS:  # cls pooling, which its head reads already: nothing to say
            log.info("%s: declares cls pooling, which %s reads already", name, type(model).__name__)
        else:  # a vector other than the one the model was trained to give
            warn_once(log, "%s: declares %s pooling, but %s pools in its own way: its classifier reads that, not the "
                      "vector the model was trained to give", name, mode, type(model).__name__)  # fmt: skip
        return False
    if _take_mask not in base._forward_pre_hooks.values():  # installed again after an _uninstall: hooked once
        base.register_forward_pre_hook(_take_mask, with_kwargs=True)
    _hook_once(base, _drop_mask, last=True)  # after the first-token hook: it clears the mask that hook pooled with
    return True


def _hook_once(base: nn.Module, hook, *, last: bool = False) -> None:
    """``hook`` as a forward hook of ``base``, once (an ``_uninstall`` leaves the hooks, which then pass the output
    through); ``last``: moved behind the others."""
    for key in [k for k, h in base._forward_hooks.items() if h is hook]:
        if not last:
            return
        del base._forward_hooks[key]
    base.register_forward_hook(hook)


def _reads_hidden_states(pooler: object) -> bool:
    """Whether ``pooler`` is one the base model hands its last hidden states (BERT's ``BertPooler``: a dense layer
    and tanh on the first token, taken inside it); ALBERT's and BigBird's are a bare ``nn.Linear`` their base model
    hands the first token, which a ``TokenPooler`` cannot pool."""
    return (isinstance(pooler, nn.Module) and type(pooler).__name__.endswith("Pooler")
            and isinstance(getattr(pooler, "dense", None), nn.Linear))  # fmt: skip


def pooling_of(model: nn.Module) -> str | None:
    """The mode of ``model``'s ``TokenPooler``; None where it has none."""
    pooler = _token_pooler(model)
    return pooler.mode if pooler is not None else None


def _token_pooler(model: nn.Module) -> TokenPooler | None:
    return next((m for m in model.modules() if isinstance(m, TokenPooler)), None)


def note(model: nn.Module) -> str | None:
    """The run's line on a ``TokenPooler``: what the classifier reads, and where that comes from; None without one."""
    pooler = _token_pooler(model)
    if pooler is None:
        return None
    where = "in place of its task class's pooler" if pooler.replaced else "at the first token, which its head reads"
    return f"text pooling: the classifier reads {POOLED[pooler.mode]}, as {pooler.origin} ({where})"


def match_record(model: nn.Module, record: dict) -> None:
    """Make ``model`` pool as the checkpoint ``record`` trained: its recorded ``text_pooling``, else (a checkpoint
    of a freezetune before sentence pooling, or of a model that declares none) its task class's own pooling. The
    model folder read now may say otherwise (its modules.json edited or gone, a hub id's cache without it, a
    folder that gained one), and a head scores as it learned only on the vector it learned on."""
    recorded = record.get("text_pooling")
    pooler = _token_pooler(model)
    if pooler is not None and recorded in MODES.values():
        pooler.mode, pooler.origin = recorded, pooler.origin if pooler.mode == recorded else RECORDED
    elif pooler is not None:
        _uninstall(model)
    elif recorded in MODES.values() and install(model, recorded, str(record.get("model"))):
        _token_pooler(model).origin = RECORDED


def bundled_as(files: dict[str, str] | None, mode: str | None) -> dict[str, str] | None:
    """A checkpoint's bundled model files (``hf_bundle``) declaring the pooling its model has, ``mode``: the
    folder's, read when the run began, may say otherwise (``match_record`` followed an ``--init`` or a resume), and
    an export rebuilt from them pooled by it (``create_model("hf:model.hf", ...)``). None keeps no declaration."""
    if not files:
        return files
    modules = _decoded(files, MODULES_FILE)
    paths = _pooling_paths(modules)
    config_name = f"{paths[0]}/config.json" if paths else "1_Pooling/config.json"
    config = _decoded(files, config_name) if paths else None
    config = config if isinstance(config, dict) else {}
    on = [MODES[k] for k, v in config.items() if k in MODES and v is True]
    if on == ([mode] if mode else []) and (mode is None) == (not paths):
        return files  # they declare it already (or nothing, as the model pools): kept byte for byte
    if mode is None:
        return {n: d for n, d in files.items() if n not in (MODULES_FILE, config_name)}
    config = {k: v for k, v in config.items() if not k.startswith("pooling_mode")}
    config.update({key: name == mode for key, name in MODES.items()})
    if not paths:  # the folder no longer declares one (its modules.json gone): the checkpoint's own declaration
        modules = [{"idx": 1, "name": "1", "path": "1_Pooling", "type": f"sentence_transformers.models.{POOLING_TYPE}"}]
    written = {MODULES_FILE: json.dumps(modules, indent=2), config_name: json.dumps(config, indent=2)}
    return {**files, **{n: base64.b64encode(t.encode()).decode("ascii") for n, t in written.items()}}


def _decoded(files: dict[str, str], name: str) -> object:
    try:
        return json.loads(base64.b64decode(files[name])) if name in files else None
    except ValueError:
        return None


def replaced_keys(model: nn.Module, state_dict: Mapping[str, object]) -> set[str]:
    """The keys of ``state_dict`` that belong to a pooler a ``TokenPooler`` replaced in ``model``: a weights file
    of the same architecture (another fine-tune of it) has them, and nothing reads them here."""
    names = [n for n, m in model.named_modules() if isinstance(m, TokenPooler) and m.replaced is not None]
    return {k for k in state_dict for n in names if k.startswith(f"{n}.")}


def _uninstall(model: nn.Module) -> None:
    """The task class's own pooling back: the replaced pooler (its weights come with the checkpoint), or no vector
    at the first token."""
    base = _base(model)
    pooler = getattr(base, "pooler", None)
    if isinstance(pooler, TokenPooler) and pooler.replaced is not None:
        like = next(model.parameters())
        base.pooler = pooler.replaced(model.config).to(device=like.device, dtype=like.dtype)
    elif isinstance(getattr(base, FIRST_TOKEN, None), TokenPooler):
        delattr(base, FIRST_TOKEN)  # its hooks find no TokenPooler: they pass the output through


def _base(model: nn.Module) -> nn.Module | None:
    """The base model of a Hugging Face task model (``bert`` of ``BertForSequenceClassification``); None without one."""
    prefix = hf_base_prefix(model)
    return getattr(model, prefix) if prefix else None


def _pooler_of(base: nn.Module) -> TokenPooler | None:
    return next((p for p in (getattr(base, "pooler", None), getattr(base, FIRST_TOKEN, None))
                 if isinstance(p, TokenPooler)), None)  # fmt: skip


def _take_mask(base: nn.Module, args: tuple, kwargs: dict) -> None:
    """The base model's forward pre-hook: its call's attention mask (else, from token ids, every token but padding),
    for its ``TokenPooler``."""
    pooler = _pooler_of(base)
    if pooler is None:
        return
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    ids = kwargs.get("input_ids", args[0] if args else None)
    pad = getattr(getattr(base, "config", None), "pad_token_id", None)
    if mask is None and isinstance(ids, torch.Tensor) and isinstance(pad, int):
        mask = ids != pad
    pooler.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _drop_mask(base: nn.Module, args: tuple, output: object) -> None:
    if (pooler := _pooler_of(base)) is not None:
        pooler.mask = None  # not kept alive past the call


def _pooled_first_token(base: nn.Module, args: tuple, output: object) -> object:
    """The base model's forward hook where the task class's head reads the first token: the pooled vector there."""
    pooler = getattr(base, FIRST_TOKEN, None)
    hidden = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", None)
    if not isinstance(pooler, TokenPooler) or not isinstance(hidden, torch.Tensor):
        return output
    pooled = torch.cat([pooler(hidden).unsqueeze(1), hidden[:, 1:]], dim=1)
    if isinstance(output, tuple):
        return (pooled, *output[1:])
    output.last_hidden_state = pooled  # a ModelOutput: its key and its position 0 too
    return output


def _read_json(arch: str, name: str, cache_only: bool) -> object:
    """A JSON file of a model folder, or of a hub id's files (the local cache, or the hub when online); None where
    there is none or it does not parse."""
    if Path(arch).is_dir():
        path: Path | None = Path(arch) / name
    else:
        try:
            from transformers.utils import cached_file

            found = cached_file(arch, name, local_files_only=cache_only, _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False)  # fmt: skip
        except (OSError, ValueError, ImportError):
            found = None
        path = Path(found) if found else None
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path is not None else None
    except (OSError, ValueError):
        return None
