"""Read a weights file safely into a state dict: ``.safetensors`` or a torch file, unwrapped from the containers
training scripts save, with wrapper prefixes (DDP, ``torch.compile``) undone, and never running the file's code.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from freezetune.errors import WeightsError

_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model_state", "model")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile

StateDict = dict[str, torch.Tensor]
_FORCE_SAFE, _FORCE_UNSAFE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextmanager
def weights_only_loads(name: str, where: str | Path) -> Iterator[None]:
    """Make every ``torch.load`` inside a library's model builder use ``weights_only=True``.

    torchvision's builders read hub files through ``torch.hub.load_state_dict_from_url``, whose ``weights_only``
    defaults to False: a tampered file in a shared hub cache would run code when the model is built. The builders
    take no such argument, so torch's own switch forces it for the duration of the build (it is read per load).

    Raises:
        WeightsError: the file holds more than tensors and plain data (refused, never executed).

    >>> with weights_only_loads("torchvision:resnet18", "~/.cache/torch/hub"):
    ...     pass
    """
    saved = {key: os.environ.pop(key, None) for key in (_FORCE_SAFE, _FORCE_UNSAFE)}
    os.environ[_FORCE_SAFE] = "1"
    try:
        yield
    except pickle.UnpicklingError as e:
        raise WeightsError(f"refused the pretrained weights of {name} in {str(where)!r}: the file holds more than "
                           f"tensors, and loading it could run code; delete it to download it again, or pass "
                           f"--weights PATH") from e  # fmt: skip
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def read_state_dict(path: str | Path) -> StateDict:
    """Read a state dict from ``.safetensors`` or a torch file (``.pth``/``.pt``/``.bin``), unwrapping containers.

    Training scripts often save ``{"state_dict": ...}``, ``{"model": ...}`` or ``{"model_state": ...}``, and DDP or
    ``torch.compile`` prefix every key with ``module.`` / ``_orig_mod.``; all of these are undone here.

    Raises:
        WeightsError: the file is missing, unreadable, or holds no state dict.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "w.pth"
    >>> torch.save({"state_dict": {"module.fc.bias": torch.zeros(2)}}, p)
    >>> list(read_state_dict(p))
    ['fc.bias']
    """
    path = Path(path)
    return state_dict_in(read_saved(path), path)


def state_dict_in(obj: object, path: Path) -> StateDict:
    """The state dict that ``obj``, read from ``path``, holds: unwrapped from its containers, without wrapper
    prefixes."""
    return _strip_wrapper_prefix(_unwrap(obj, path))


def read_saved(path: Path) -> object:
    """What the weights file ``path`` holds, as saved (a state dict, or a container of one)."""
    if path.is_dir():
        raise WeightsError(f"weights {str(path)!r} is a folder: give a weights file (.pth, .pt, .bin, .safetensors)")
    if not path.is_file():
        raise WeightsError(f"weights file not found: {str(path)!r}")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            # weights_only: a weights file must not be able to run code when it is opened. timm's train.py keeps its
            # arguments beside the weights (model_best.pth.tar): an argparse.Namespace is plain data, safe to rebuild
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch/safetensors raise many types for corrupt or pickled-object files
        if path.suffix.lower() == ".safetensors":
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        else:  # torch's own advice, "re-run torch.load with weights_only=False", would run the file's code
            first = load_failure(path, e)
        raise WeightsError(f"could not read weights file {str(path)!r}: {first}") from None
    return obj


def load_failure(path: Path, exc: Exception) -> str:
    """What a file ``torch.load`` (weights only) could not read is, in words: a checkpoint's, a weights file's."""
    # torch's own messages mislead here ("KeyError: '101'" for a text file; "re-run with weights_only=False",
    # which would execute arbitrary pickled code): say what the file is instead.
    objects = ("holding Python objects beyond tensors and plain data, which are not read (reading them could run "
               "code): a whole model saved with torch.save(model)? save its state_dict()")  # fmt: skip
    with open(path, "rb") as f:
        head = f.read(4)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:  # every PyTorch zip file holds its pickle as <name>/data.pkl
            if not any(n.endswith("data.pkl") for n in archive.namelist()):
                return "a zip archive, not a PyTorch checkpoint or weights file"
        return f"a PyTorch file {objects} ({_unsupported(exc)})"
    if head == b"PK\x03\x04":  # how every PyTorch zip file begins; its index is at the end
        return "cut short or corrupt: it begins as a PyTorch checkpoint but its end is missing (a copy or download " \
               "that did not finish?)"  # fmt: skip
    if head[:2] == b"\x80\x02":  # a pickle, as PyTorch's files before 1.6 were (and as torch.save writes a model)
        return f"a PyTorch file of the format before 1.6 {objects}, or not a PyTorch file ({_unsupported(exc)})"
    return f"not a PyTorch checkpoint file ({type(exc).__name__})"


def _unsupported(exc: Exception) -> str:
    """The error's type, and the object the file holds that torch would not rebuild, where its message names one
    ("Unsupported global: GLOBAL argparse.Namespace"): the file's maker is told by it (a trainer's config class)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return f"{type(exc).__name__}: it holds a {found.group(1)}" if found else type(exc).__name__


def _unwrap(obj: object, path: Path) -> StateDict:
    for _ in range(3):  # containers nest at most a couple of levels in practice
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    found = f"a dict with keys {list(obj)[:8]}" if isinstance(obj, Mapping) else type(obj).__name__
    raise WeightsError(
        f"no state dict in {str(path)!r}: found {found}; expected tensors by name, possibly under one of {list(_CONTAINER_KEYS)}"
    )


def _strip_wrapper_prefix(sd: StateDict) -> StateDict:
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd
