"""Export a trained checkpoint as ``.safetensors`` weights plus a JSON sidecar (classes, preprocessing, model)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from freezetune import checkpoint
from freezetune._io import atomic_output, atomic_write_text
from freezetune.errors import CheckpointError


def export_checkpoint(ckpt_path: str | Path, to: str | Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write ``to`` (safetensors) and ``to`` with ``.json`` beside it; never overwrite unless ``force``.

    >>> export_checkpoint("runs/x/best.pt", "model.safetensors")  # doctest: +SKIP
    (PosixPath('model.safetensors'), PosixPath('model.json'))
    """
    to = Path(to)
    if to.suffix != ".safetensors":
        raise CheckpointError(f"export target {str(to)!r} must end in .safetensors")
    sidecar = to.with_suffix(".json")
    existing = [str(p) for p in (to, sidecar) if p.exists()]
    if existing and not force:
        raise CheckpointError(f"{' and '.join(existing)} already exist(s); pass --force to overwrite")
    record = checkpoint.load(ckpt_path)
    # safetensors refuses tensors that share memory (tied weights) and non-contiguous ones: store plain copies
    tensors = {k: v.contiguous().clone() for k, v in record["state_dict"].items()}
    to.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(to) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "model": record["model"]})
    meta = {
        "model": record["model"],
        "classes": record["classes"],
        "preprocess": record["preprocess"],
        "freezetune_version": record.get("freezetune_version"),
        "epoch": record.get("epoch"),
    }
    atomic_write_text(sidecar, json.dumps(meta, indent=1))
    return to, sidecar
