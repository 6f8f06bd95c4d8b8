"""Export: safetensors weights plus a JSON sidecar that together rebuild the model outside freezetune."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import freezetune as ft
from freezetune import checkpoint
from freezetune.errors import CheckpointError
from freezetune.export import export_checkpoint
from freezetune.models import create_model
from freezetune.preprocess import Preprocess

pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module")
def best_pt(tmp_path_factory):
    torch.manual_seed(0)
    model, _ = create_model("timm:test_efficientnet", "none")
    ft.replace_head(model, 4)
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32))  # move BatchNorm statistics off their init
    record = checkpoint.model_record(model, {"model": "timm:test_efficientnet"}, list("abcd"), Preprocess(32))
    record["epoch"] = 3
    return checkpoint.save(record, tmp_path_factory.mktemp("run") / "best.pt")


def test_export_writes_weights_and_sidecar(best_pt, tmp_path):
    weights, sidecar = export_checkpoint(best_pt, tmp_path / "out" / "m.safetensors")
    assert (weights, sidecar) == (tmp_path / "out" / "m.safetensors", tmp_path / "out" / "m.json")
    meta = json.loads(sidecar.read_text())
    assert meta["classes"] == list("abcd") and meta["model"] == "timm:test_efficientnet" and meta["epoch"] == 3
    assert Preprocess.from_dict(meta["preprocess"]) == Preprocess(32)
    tensors = load_file(weights)
    record = checkpoint.load(best_pt)
    assert set(tensors) == set(record["state_dict"])  # BatchNorm buffers included
    assert all(torch.equal(tensors[k], v) for k, v in record["state_dict"].items())


def test_exported_weights_give_the_checkpoint_logits(best_pt, tmp_path):
    import timm

    weights, sidecar = export_checkpoint(best_pt, tmp_path / "m.safetensors")
    classes = json.loads(sidecar.read_text())["classes"]
    fresh = ft.replace_head(timm.create_model("test_efficientnet"), len(classes))
    fresh.load_state_dict(load_file(weights), strict=True)
    original, _ = checkpoint.build_model(checkpoint.load(best_pt))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), original.eval()(x))


def test_export_never_overwrites_without_force(best_pt, tmp_path):
    target = tmp_path / "m.safetensors"
    (tmp_path / "m.json").write_text("{}")  # the sidecar alone is enough to refuse
    with pytest.raises(CheckpointError, match="m.json already exist"):
        export_checkpoint(best_pt, target)
    assert not target.exists() and (tmp_path / "m.json").read_text() == "{}"
    export_checkpoint(best_pt, target, force=True)
    assert json.loads((tmp_path / "m.json").read_text())["classes"] == list("abcd")


def test_export_target_must_be_safetensors(best_pt, tmp_path):
    with pytest.raises(CheckpointError, match="must end in .safetensors"):
        export_checkpoint(best_pt, tmp_path / "m.pt")


def test_tied_weights_export_as_separate_copies(tmp_path):
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    model[1].weight = model[0].weight  # tied: safetensors refuses shared storage unless copied
    record = checkpoint.model_record(model, {"model": "custom:tied"}, list("vwxyz"), Preprocess(8))
    path = checkpoint.save(record, tmp_path / "best.pt")
    weights, _ = export_checkpoint(path, tmp_path / "tied.safetensors")
    tensors = load_file(weights)
    assert torch.equal(tensors["0.weight"], tensors["1.weight"])
