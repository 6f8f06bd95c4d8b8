"""Export: safetensors weights, an ONNX graph or a torch.export program, each with a JSON sidecar."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import freezetune as ft
from freezetune import checkpoint
from freezetune import export as export_module
from freezetune.cli import main as cli_main
from freezetune.errors import CheckpointError, ConfigError
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
    # readable as every other file written (safetensors' own save_file left 0600: a team's model folder could not read)
    assert weights.stat().st_mode & 0o777 == sidecar.stat().st_mode & 0o777


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


# --- ONNX and torch.export ---------------------------------------------------------------------------------------


def _checkpoint_logits(best_pt, x: torch.Tensor) -> torch.Tensor:
    model, _ = checkpoint.build_model(checkpoint.load(best_pt))
    with torch.no_grad():
        return model.eval()(x)


def test_onnx_export_runs_in_onnxruntime_with_the_checkpoint_logits_at_any_batch(best_pt, tmp_path, capsys):
    code = cli_main(["export", "--checkpoint", str(best_pt), "--to", str(tmp_path / "m.onnx")])
    assert code == 0 and "m.onnx" in capsys.readouterr().out
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["classes"] == list("abcd") and meta["onnx"] == {"input": "input", "output": "logits"}
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "input" and isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]  # dynamic batch
    for n in (1, 5):  # neither is the batch of 2 it was traced with
        x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))
        (logits,) = session.run(["logits"], {"input": x.numpy()})
        np.testing.assert_allclose(logits, _checkpoint_logits(best_pt, x).numpy(), rtol=1e-4, atol=1e-5)


def test_pt2_export_loads_and_gives_the_checkpoint_logits_at_any_batch(best_pt, tmp_path, capfd):
    target, sidecar = export_checkpoint(best_pt, tmp_path / "m.pt2")
    assert "Expect archive file" not in capfd.readouterr().err  # torch's warning about the temporary file's name
    assert json.loads(sidecar.read_text())["model"] == "timm:test_efficientnet"
    program = torch.export.load(str(target)).module()
    for n in (1, 3):
        x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            torch.testing.assert_close(program(x), _checkpoint_logits(best_pt, x), rtol=1e-5, atol=1e-6)


def test_formats_of_one_checkpoint_share_its_sidecar(best_pt, tmp_path):
    export_checkpoint(best_pt, tmp_path / "m.safetensors")
    target, sidecar = export_checkpoint(best_pt, tmp_path / "m.pt2")  # refused before: m.json already existed
    assert target.is_file() and json.loads(sidecar.read_text())["classes"] == list("abcd")
    other = tmp_path / "o.json"
    other.write_text(json.dumps({"model": "another", "classes": ["x"]}))
    with pytest.raises(CheckpointError, match="o.json already exists and does not describe this checkpoint"):
        export_checkpoint(best_pt, tmp_path / "o.pt2")
    assert not (tmp_path / "o.pt2").exists() and json.loads(other.read_text())["model"] == "another"
    # --force with another checkpoint's export beside the sidecar: the export would keep a wrong description
    (tmp_path / "o.onnx").write_bytes(b"another model's graph")
    with pytest.raises(CheckpointError, match=r"o.json describes another checkpoint, exported beside it as .*o.onnx"):
        export_checkpoint(best_pt, tmp_path / "o.safetensors", force=True)
    assert not (tmp_path / "o.safetensors").exists() and json.loads(other.read_text())["model"] == "another"


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_graph_export_never_overwrites_without_force(best_pt, tmp_path, suffix):
    target = tmp_path / f"m{suffix}"
    target.write_bytes(b"keep me")
    with pytest.raises(CheckpointError, match=f"m{suffix} already exist"):
        export_checkpoint(best_pt, target)
    assert target.read_bytes() == b"keep me" and not (tmp_path / "m.json").exists()


def test_onnx_export_without_onnx_names_the_extra_to_install(best_pt, tmp_path, monkeypatch):
    real_find_spec = export_module.importlib.util.find_spec
    monkeypatch.setattr(
        export_module.importlib.util, "find_spec", lambda name: None if name == "onnxscript" else real_find_spec(name)
    )
    with pytest.raises(ConfigError, match=r"needs onnxscript: pip install 'freezetune\[onnx\]'") as info:
        export_checkpoint(best_pt, tmp_path / "m.onnx")
    assert "\n" not in str(info.value) and not list(tmp_path.iterdir())


def test_unknown_export_suffix_lists_the_formats(best_pt, tmp_path):
    with pytest.raises(CheckpointError, match=r"must end in .safetensors, .onnx or .pt2"):
        export_checkpoint(best_pt, tmp_path / "m.tflite")
