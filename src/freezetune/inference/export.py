"""Export a trained checkpoint for use outside freezetune, always with a JSON sidecar (classes, preprocessing, model).

Formats, chosen by the target's suffix:

- ``.safetensors``: the weights; rebuild the architecture named in the sidecar and load them.
- ``.onnx``: the eval-mode graph with a dynamic batch dimension (input ``"input"``, output ``"logits"``), for
  onnxruntime, TensorRT and friends; needs the ``[onnx]`` extra.
- ``.pt2``: a ``torch.export`` program with a dynamic batch dimension; ``torch.export.load(path).module()`` runs it
  without the model's Python code.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import io
import json
import re
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from freezetune._io import atomic_output, remove_stale_temps_of
from freezetune.errors import CheckpointError, MissingExtra
from freezetune.model import hf_bundle
from freezetune.model.preprocess import Preprocess
from freezetune.run import checkpoint
from freezetune.training.eval_loop import logits_of

FORMATS = (".safetensors", ".onnx", ".pt2")
ONNX_INPUT, ONNX_OUTPUT = "input", "logits"
_ONNX_MODULES = ("onnx", "onnxscript")  # the torch.export-based ONNX exporter needs both


def export_checkpoint(ckpt_path: str | Path, to: str | Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write ``to`` (format by suffix, see the module docstring) and ``to`` with ``.json`` beside it.

    Never overwrites an existing file unless ``force``; the sidecar of another export of the same checkpoint (``m.json``
    of ``m.safetensors`` when exporting ``m.onnx``) is not another file's: it gains the new format's keys.

    Raises:
        CheckpointError: an unknown suffix, an existing target without ``force``, an unreadable checkpoint, a text
            model to a graph format.
        ConfigError: ``.onnx`` without the ``onnx``/``onnxscript`` packages.

    >>> export_checkpoint("runs/x/best.pt", "model.safetensors")  # doctest: +SKIP
    (PosixPath('model.safetensors'), PosixPath('model.json'))
    >>> export_checkpoint("runs/x/best.pt", "model.onnx")  # doctest: +SKIP
    (PosixPath('model.onnx'), PosixPath('model.json'))
    """
    to = Path(to)
    _check_target(to, force, ckpt_path)
    record = checkpoint.load(ckpt_path)
    text = _text_model(record)
    if to.suffix != ".safetensors" and text:
        # the graph is traced on an image batch: a text model's raised deep inside transformers
        raise CheckpointError(f"{ckpt_path} is a text model ({record['model']}): it exports to .safetensors (its "
                              f"weights, with its config and tokenizer in {to.stem}.hf/ beside them), not to "
                              f"{to.suffix}")  # fmt: skip
    if to.suffix == ".safetensors" and not record["model"].startswith("hf:"):  # the sidecar names the model: the
        # weights must fit it (the graph formats build it anyway; a Hugging Face model may need its hub files, which
        # an offline machine lacks, so it is not built for its weights alone)
        checkpoint.build_model(record)  # weights that do not fit: the same refusal as eval's and predict's
    sidecar, meta = to.with_suffix(".json"), _meta(record)
    folder = to.with_suffix(".hf")  # an hf:DIR model's config and tokenizer files, which its checkpoint carries
    files = hf_bundle.with_classes(record["hf_files"], record["classes"], text=text) if record.get("hf_files") else None
    files = hf_bundle.with_pad_token(files) if files and text else files  # its tokenizer pads as the run's did
    if files:
        if folder.exists() and not folder.is_dir():  # not even --force replaces a file with a folder
            raise CheckpointError(f"{folder} is a file, where this model's config and tokenizer files go (a folder "
                                  f"{folder.name}/ beside the weights): move it, or export under another name")  # fmt: skip
        if folder.exists() and not hf_bundle.holds(folder, files):  # not another format's export
            ours = _bundle_of_an_export(sidecar, folder)  # --force replaces the whole folder: only an export's
            if not force and ours:
                raise CheckpointError(f"{folder} already exists and holds other files; pass --force to overwrite")
            if not ours:  # (--force was advised for a folder it then would not replace)
                raise CheckpointError(f"{folder} holds files no export of {to.stem} wrote (its sidecar {sidecar.name} "
                                      "names no such folder): not even --force replaces them; move it, or export "
                                      "under another name")  # fmt: skip
        meta["hf_files"] = folder.name  # beside the sidecar: AutoConfig / AutoTokenizer.from_pretrained(it)
        if text:  # the tokenizer travels in that folder: the training machine's path is no use where the export goes
            meta["preprocess"]["tokenizer"] = folder.name
    meta = _sidecar(sidecar, meta, force, to)
    # what an export of this name (any format) killed mid-write left beside it: nothing removed it
    remove_stale_temps_of([sidecar, *(to.with_suffix(f) for f in FORMATS)])
    if to.suffix == ".onnx":
        meta["onnx"] = {"input": ONNX_INPUT, "output": ONNX_OUTPUT}
    # the sidecar is written first and takes its name right after the weights take theirs: written after them, a stop
    # between left one checkpoint's weights described as another's (a model that does not trace leaves nothing)
    try:
        with atomic_output(sidecar) as described:
            described.write_text(json.dumps(meta, indent=1))
            if to.suffix == ".safetensors":
                _save_safetensors(record, to)
            else:
                _save_graph(record, to)
            if files:
                hf_bundle.write_anew(files, folder)
    except OSError as exc:  # a folder the user may not write in: the OS's words named the sidecar, not the export
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        where = Path(exc.filename).name if exc.filename else to.name
        raise CheckpointError(f"cannot write {to.name} in '{to.parent}': {(exc.strerror or str(exc)).lower()} "
                              f"({where}); give a folder you can write in") from None  # fmt: skip
    return to, sidecar


def _bundle_of_an_export(sidecar: Path, folder: Path) -> bool:
    """Whether ``folder`` is the one an earlier export's ``sidecar`` names as its model's files (not a folder of the
    user's that happens to bear the name: a model of their own, ``m.hf`` beside ``m.safetensors``)."""
    try:
        return json.loads(sidecar.read_text()).get("hf_files") == folder.name
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def _text_model(record: dict) -> bool:
    """Whether the checkpoint ``record`` is a text model's (its preprocessing is a tokenizer): its weights alone
    export, its graph takes token ids."""
    return bool((record.get("preprocess") or {}).get("tokenizer"))


def _check_target(to: Path, force: bool, ckpt_path: str | Path) -> None:
    """Refuse a target of no format, or one that exists without ``force``, before the checkpoint's weights are read
    (a wrong suffix names the formats this checkpoint exports to: a text model's is one)."""
    if to.suffix not in FORMATS:
        try:
            text = _text_model(checkpoint.load(ckpt_path, mmap=True))
        except CheckpointError:  # said next, when the target is right
            text = False
        formats = ".safetensors (a text model exports its weights)" if text else \
            f"{', '.join(FORMATS[:-1])} or {FORMATS[-1]}"  # fmt: skip
        raise CheckpointError(f"export target {str(to)!r} must end in {formats}")
    if to.is_dir():  # "already exists; pass --force", then with --force an "Is a directory" of the OS
        raise CheckpointError(f"{to} is a folder: give the file to write (a name ending in {to.suffix}); not even "
                              "--force replaces a folder")  # fmt: skip
    if to.exists() and not force:
        raise CheckpointError(f"{to} already exists; pass --force to overwrite")
    if to.suffix == ".onnx":
        _require_onnx()  # before loading anything: a missing package is the first thing the user should hear


def _meta(record: dict) -> dict:
    """The sidecar's description of a checkpoint: model, classes and the preprocessing its inputs need."""
    pre = record["preprocess"]
    if pre.get("tokenizer"):  # a text model's input is its tokenizer's: no image size or normalisation to claim
        pre = {k: pre[k] for k in ("tokenizer", "max_length") if k in pre}
    else:  # every field, an older checkpoint's filled in as it reads them: how its images were read (alpha) too
        pre = Preprocess.from_dict(pre).to_dict()
    return {"model": record["model"], "classes": record["classes"], "preprocess": pre,
            "freezetune_version": record.get("freezetune_version"), "epoch": record.get("epoch"), **_mid_epoch(record),
            WEIGHTS_DIGEST: weights_digest(record["state_dict"]),
            # a sentence-transformers model's own pooling stands in for its task class's pooler (model/text_pooling.py)
            **({"text_pooling": record["text_pooling"]} if record.get("text_pooling") else {})}  # fmt: skip


def _mid_epoch(record: dict) -> dict:
    """Where a checkpoint saved part of the way through an epoch stands (``epoch`` counts the finished ones: a
    last.pt 3 steps into epoch 2 was described as epoch 1's weights); nothing for one saved at an epoch's end.

    >>> _mid_epoch({"epoch": 1, "steps_per_epoch": 5, "progress": {"epoch": 1, "step": 3}})
    {'mid_epoch': {'epoch': 2, 'step': 3, 'steps_per_epoch': 5}}
    """
    progress = record.get("progress") or {}
    if not progress.get("step"):
        return {}
    return {MID_EPOCH: {"epoch": progress.get("epoch", 0) + 1, "step": progress["step"],
                        "steps_per_epoch": record.get("steps_per_epoch")}}  # fmt: skip


MID_EPOCH = "mid_epoch"
WEIGHTS_DIGEST = "weights_sha256"  # which weights the sidecar describes: two runs' best.pt of one epoch look alike


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names and tensor bytes, in name order.

    >>> zeros, ones = weights_digest({"w": torch.zeros(2)}), weights_digest({"w": torch.ones(2)})
    >>> zeros == weights_digest({"w": torch.zeros(2)}) != ones
    True
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(state_dict[name].shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _sidecar(path: Path, meta: dict, force: bool, target: Path) -> dict:
    """What the sidecar will hold: ``meta``, plus the keys of an existing sidecar of the same checkpoint (another
    format's export). A sidecar of anything else is the user's: kept, unless ``force``; and even then kept while
    another export beside it (``m.onnx`` for ``m.json``) still reads its description."""
    if not path.exists():
        return meta
    try:
        old = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        old = None
    if isinstance(old, dict) and isinstance(old.get("preprocess"), dict) and "input_size" in old["preprocess"]:
        # an image model's, written by an earlier freezetune with fewer fields: compared as this one reads it
        try:
            old = {**old, "preprocess": Preprocess.from_dict(old["preprocess"]).to_dict()}
        except (KeyError, TypeError, ValueError):  # not a sidecar of ours: compared as it is
            pass
    # a sidecar written before the weights' digest (or a mid-epoch checkpoint's place) was kept: compared on the rest,
    # as it was then
    compared = {k: v for k, v in meta.items()
                if k not in (WEIGHTS_DIGEST, MID_EPOCH) or (isinstance(old, dict) and k in old)}  # fmt: skip
    if isinstance(old, dict) and all(old.get(k) == v for k, v in compared.items()):
        return {**old, **meta}
    others = [str(p) for p in (path.with_suffix(f) for f in FORMATS) if p != target and p.exists()]
    others = [p for p in others if _described(Path(p), old)]  # (an export stopped between its two files: not)
    if not force and not others:
        raise CheckpointError(f"{path} already exists and does not describe this checkpoint; pass --force to "
                              "overwrite")  # fmt: skip
    if others:  # its preprocessing and classes would then be this checkpoint's: a silent lie to those files' users
        # (said at once: "pass --force" led only to this refusal)
        raise CheckpointError(f"{path} describes another checkpoint, exported beside it as {', '.join(others)}; "
                              "--force would give those this checkpoint's description: remove them too, or export "
                              "under another name")  # fmt: skip
    return meta


def _described(export: Path, sidecar: object) -> bool:
    """Whether ``sidecar`` (a sidecar's content) may describe the weights of ``export``: an export's ``.safetensors``
    is checked against its weights' digest (an export stopped after its weights took their name, before its sidecar
    did, left one checkpoint's weights beside another's description); a graph format is taken at its word."""
    digest = sidecar.get(WEIGHTS_DIGEST) if isinstance(sidecar, dict) else None
    if export.suffix != ".safetensors" or not digest:
        return True
    from safetensors.torch import load_file

    try:
        return weights_digest(load_file(export)) == digest
    except Exception:  # noqa: BLE001 - not a safetensors file: no weights of anything it describes
        return False


def _save_safetensors(record: dict, to: Path) -> None:
    # safetensors refuses tensors that share memory (tied weights) and non-contiguous ones: store plain copies
    tensors = {k: v.contiguous().clone() for k, v in record["state_dict"].items()}
    # written into the temporary file atomic_output made (save_file would recreate it as mode 0600, unreadable to
    # the rest of a team, where every other file a run writes is 0644)
    data = safetensors_bytes(tensors, metadata={"format": "pt", "model": record["model"]})
    with atomic_output(to) as tmp:
        tmp.write_bytes(data)


def _require_onnx() -> None:
    missing = [m for m in _ONNX_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(
            f"exporting to .onnx needs {' and '.join(missing)}: pip install 'freezetune[onnx]' "
            f"(or choose {FORMATS[0]} or {FORMATS[2]})"
        )


class _Logits(nn.Module):
    """A model whose output is an object (a Hugging Face ``ImageClassifierOutput``), giving its class scores alone: a
    loaded ``.pt2`` could not rebuild the object without importing that model's transformers module."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(x))


def _save_graph(record: dict, to: Path) -> None:
    """Trace the eval-mode model once and write it as ONNX or a ``torch.export`` program.

    Raises:
        CheckpointError: the model does not trace to that format (the exporter's own error, in one line).
        OSError: the file could not be written (a full disk), naming ``to``; nothing is left there.
    """
    model, pre = checkpoint.build_model(record)
    model.eval()
    # batch 2, not 1: torch.export specialises a size-1 dimension to the constant 1, which would pin the batch
    example = (torch.zeros(2, 3, pre.input_size, pre.input_size),)
    with torch.no_grad():
        if not isinstance(model(*example), torch.Tensor):
            model = _Logits(model).eval()  # a new module trains by default: the exporter warned of training mode
    batch = ({0: torch.export.Dim("batch")},)
    others = " or ".join(f for f in FORMATS if f != to.suffix)
    with atomic_output(to) as tmp:
        try:
            if to.suffix == ".onnx":
                _save_onnx(model, example, batch, tmp)
            else:
                program = _pt2_bytes(torch.export.export(model, example, dynamic_shapes=batch))
        except Exception as exc:  # the exporters raise many kinds (torch, onnx, sympy): each is this model's limit
            failed = _os_error_in(exc)
            if failed is not None and failed.errno is not None:  # ... but a full disk's: said of the file, as any
                # write's (atomic_output names the target); it read "does not export to .onnx: OSError: [Errno 28]"
                raise OSError(failed.errno, failed.strerror, failed.filename) from exc
            raise CheckpointError(f"{record['model']} does not export to {to.suffix}: {type(exc).__name__}: "
                                  f"{_first_line(exc)}; export it to {others}") from exc  # fmt: skip
        if to.suffix == ".pt2":
            tmp.write_bytes(program)  # a full disk is a plain OSError here


def _pt2_bytes(program: torch.export.ExportedProgram) -> bytes:
    """A ``torch.export`` program's ``.pt2`` archive, in memory. Written straight to the file, a full disk made
    torch's zip writer raise its own error ("unexpected pos"), then abort the process from its destructor (exit 134,
    "terminate called after throwing an instance of 'c10::Error'"); a file object, not the temporary file's name,
    also spares torch's warning that the name does not end in .pt2."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def _os_error_in(exc: BaseException) -> OSError | None:
    """The ``OSError`` ``exc`` is, or that caused it (an exporter wraps a failed write in its own error)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # the ONNX exporter colours its text, in a file or not


def _first_line(exc: Exception) -> str:
    r"""The exporter's message in one line: its first, without terminal colour codes, cut at its first sentence's end
    past 300 characters.

    >>> _first_line(RuntimeError("Failed to decompose. \x1b[96mThis is step 2/3\x1b[0m of exporting.\nNext"))
    'Failed to decompose. This is step 2/3 of exporting.'
    """
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    if not lines:
        return "(no message)"
    line = lines[0]
    return line if len(line) <= 300 else line[: line.find(". ", 0, 300) + 1 or 300]


def _save_onnx(model: nn.Module, example: tuple, batch: tuple, tmp: Path) -> None:
    # external_data=False: one self-contained file that can be renamed atomically (ONNX caps that at 2 GB, far
    # above the image classifiers freezetune fine-tunes).
    torch.onnx.export(
        model,
        example,
        str(tmp),
        input_names=[ONNX_INPUT],
        output_names=[ONNX_OUTPUT],
        dynamic_shapes=batch,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
