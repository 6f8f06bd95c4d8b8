"""Export: safetensors weights, an ONNX graph or a torch.export program, each with a JSON sidecar."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import freezetune as ft
from freezetune.cli.main import main as cli_main
from freezetune.errors import CheckpointError, ConfigError
from freezetune.inference import export as export_module
from freezetune.inference.export import export_checkpoint, weights_digest
from freezetune.model.create import create_model
from freezetune.model.preprocess import Preprocess
from freezetune.run import checkpoint

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


def test_the_sidecar_says_how_transparent_pixels_were_read_also_for_an_older_checkpoint(best_pt, tmp_path):
    # a runtime reading the sidecar must composite transparent images as training did (data/alpha.py)
    record = checkpoint.load(best_pt)
    _, sidecar = export_checkpoint(best_pt, tmp_path / "new.safetensors")
    assert json.loads(sidecar.read_text())["preprocess"]["alpha"] == "white"
    record["preprocess"].pop("alpha")  # saved before the rule: trained on the colours stored under them
    older = checkpoint.save(record, tmp_path / "older.pt")
    _, sidecar = export_checkpoint(older, tmp_path / "older.safetensors")
    assert json.loads(sidecar.read_text())["preprocess"]["alpha"] == "drop"
    # the sidecar an earlier freezetune wrote for it (no alpha) still describes it: another format joins it
    meta = json.loads(sidecar.read_text())
    meta["preprocess"].pop("alpha")
    sidecar.write_text(json.dumps(meta))
    export_checkpoint(older, tmp_path / "older.onnx")
    assert json.loads(sidecar.read_text())["preprocess"]["alpha"] == "drop"


def test_the_sidecar_of_a_mid_epoch_checkpoint_says_how_far_into_its_epoch_it_was_saved(best_pt, tmp_path):
    # its "epoch" counts finished epochs: a last.pt 3 steps into epoch 2 was described as epoch 1's weights
    record = checkpoint.load(best_pt)
    record.update(steps_per_epoch=5, progress={**(record.get("progress") or {}), "epoch": record["epoch"], "step": 3})
    mid = checkpoint.save(record, tmp_path / "mid.pt")
    meta = json.loads(export_checkpoint(mid, tmp_path / "mid.safetensors")[1].read_text())
    assert meta["mid_epoch"] == {"epoch": record["epoch"] + 1, "step": 3, "steps_per_epoch": 5}
    assert "mid_epoch" not in json.loads(export_checkpoint(best_pt, tmp_path / "end.safetensors")[1].read_text())


def test_another_checkpoint_of_the_same_model_classes_and_epoch_does_not_join_a_sidecar(best_pt, tmp_path):
    # the sidecar compared model, classes, preprocessing and epoch: another run's best.pt of the same epoch joined it,
    # and m.onnx and m.safetensors under one m.json held two runs' weights
    record = checkpoint.load(best_pt)
    record["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in record["state_dict"].items()}
    other = checkpoint.save(record, tmp_path / "other.pt")
    export_checkpoint(best_pt, tmp_path / "m.safetensors")
    # refused naming the export the sidecar describes, with --force or without: "pass --force" led to this refusal
    for force in (False, True):
        with pytest.raises(CheckpointError, match=r"m.json describes another checkpoint, exported beside it as "
                                                  r".*m.safetensors; --force would"):  # fmt: skip
            export_checkpoint(other, tmp_path / "m.pt2", force=force)
    export_checkpoint(best_pt, tmp_path / "m.pt2")  # the same weights join it
    # a sidecar written before the digest still describes its checkpoint
    meta = json.loads((tmp_path / "m.json").read_text())
    meta.pop(export_module.WEIGHTS_DIGEST)
    (tmp_path / "m.json").write_text(json.dumps(meta))
    export_checkpoint(best_pt, tmp_path / "m.onnx")
    assert json.loads((tmp_path / "m.json").read_text())[export_module.WEIGHTS_DIGEST]


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


@pytest.mark.parametrize("change", [{"model": "timm:resnet18"}, {"classes": list("abc")}])
def test_weights_that_do_not_fit_the_model_the_sidecar_names_are_refused(best_pt, tmp_path, change):
    # predict and eval refused such a checkpoint; export wrote it, with a sidecar naming a model it cannot load into
    record = {**checkpoint.load(best_pt), **change}
    other = checkpoint.save(record, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="checkpoint weights do not fit"):
        export_checkpoint(other, tmp_path / "m.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.pt"]


def test_export_target_must_be_safetensors(best_pt, tmp_path):
    with pytest.raises(CheckpointError, match="must end in .safetensors"):
        export_checkpoint(best_pt, tmp_path / "m.pt")


def test_tied_weights_export_as_separate_copies(tmp_path):
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    model[1].weight = model[0].weight  # tied: safetensors refuses shared storage unless copied
    # (a Hugging Face model's, as an MLM's decoder and embeddings: its export is not built, so a stand-in does)
    record = checkpoint.model_record(model, {"model": "hf:tied"}, list("vwxyz"), Preprocess(8))
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


# --- Hugging Face models: their config beside the weights, their output an object --------------------------------


@pytest.fixture(scope="module")
def hf_best_pt(tmp_path_factory):
    """A checkpoint of a tiny ViT from a local folder (its config says 2 labels) fine-tuned for 3 classes."""
    import transformers

    from freezetune.model import hf_bundle

    root = tmp_path_factory.mktemp("hf")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                                    image_size=32, patch_size=8)  # fmt: skip
    transformers.ViTForImageClassification(config).save_pretrained(root / "vit")
    name = f"hf:{root / 'vit'}"
    torch.manual_seed(0)
    model, pre = create_model(name, "default")
    ft.replace_head(model, 3)
    record = checkpoint.model_record(model, {"model": name}, ["cat", "dog", "eel"], pre, hf_bundle.bundle(name))
    return checkpoint.save(record, root / "run" / "best.pt")


def test_a_hugging_face_exports_config_builds_the_model_its_weights_load_into(hf_best_pt, tmp_path):
    import transformers

    weights, sidecar = export_checkpoint(hf_best_pt, tmp_path / "m.safetensors")
    assert json.loads(sidecar.read_text())["hf_files"] == "m.hf"
    config = transformers.AutoConfig.from_pretrained(tmp_path / "m.hf")
    # the folder's config said 2 labels: the classifier of the model it built did not fit the weights (3 classes)
    assert config.num_labels == 3 and config.id2label == {0: "cat", 1: "dog", 2: "eel"}
    assert config.architectures == ["ViTForImageClassification"]  # the class the weights are
    model = transformers.AutoModelForImageClassification.from_config(config)
    model.load_state_dict(load_file(weights))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x).logits, _checkpoint_logits(hf_best_pt, x).logits)


def test_a_hugging_face_pt2_gives_logits_without_transformers_and_shares_the_folder(hf_best_pt, tmp_path):
    export_checkpoint(hf_best_pt, tmp_path / "m.safetensors")
    target, _ = export_checkpoint(hf_best_pt, tmp_path / "m.pt2")  # m.hf was refused: "already exists"
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.save(x, tmp_path / "x.pt")
    # a process without transformers: the program returned an ImageClassifierOutput, which it could not rebuild
    script = ("import sys, torch; program = torch.export.load(sys.argv[1]).module(); "
              "out = program(torch.load(sys.argv[2])); assert 'transformers' not in sys.modules; "
              "torch.save(out, sys.argv[3])")  # fmt: skip
    subprocess.run([sys.executable, "-c", script, target, tmp_path / "x.pt", tmp_path / "y.pt"], check=True)
    out = torch.load(tmp_path / "y.pt")
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, _checkpoint_logits(hf_best_pt, x).logits, rtol=1e-5, atol=1e-6)
    (tmp_path / "o.hf").mkdir()
    (tmp_path / "o.hf" / "config.json").write_text("{}")  # the user's, not this checkpoint's
    with pytest.raises(CheckpointError, match="o.hf holds files no export of o wrote .* not even --force replaces"):
        export_checkpoint(hf_best_pt, tmp_path / "o.pt2")
    assert not (tmp_path / "o.pt2").exists() and (tmp_path / "o.hf" / "config.json").read_text() == "{}"
    # a file where the folder goes: --force wrote the weights, then failed on the folder ("File exists"), and left
    # weights without their sidecar, saying "files written before are intact"
    (tmp_path / "f.hf").write_text("mine")
    with pytest.raises(CheckpointError, match=r"f.hf is a file, where this model's config and tokenizer files go"):
        export_checkpoint(hf_best_pt, tmp_path / "f.safetensors", force=True)
    assert not (tmp_path / "f.safetensors").exists() and not (tmp_path / "f.json").exists()
    assert (tmp_path / "f.hf").read_text() == "mine"


def test_a_forced_export_replaces_its_model_folder_whole_and_no_folder_of_the_users(hf_best_pt, tmp_path):
    # --force wrote the bundle's files into the earlier export's folder: a sentence-transformers export's
    # modules.json stayed, and the model built from the folder pooled another way than the checkpoint's
    export_checkpoint(hf_best_pt, tmp_path / "m.safetensors")
    bundle = sorted(p.name for p in (tmp_path / "m.hf").iterdir())
    (tmp_path / "m.hf" / "modules.json").write_text("[]")  # an earlier export's file this bundle does not hold
    with pytest.raises(CheckpointError, match="already exists.*; pass --force to overwrite"):  # an export's: --force
        export_checkpoint(hf_best_pt, tmp_path / "m.safetensors")
    export_checkpoint(hf_best_pt, tmp_path / "m.safetensors", force=True)
    assert sorted(p.name for p in (tmp_path / "m.hf").iterdir()) == bundle
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.hf", "m.json", "m.safetensors"]  # no leftover
    # a folder no export of that name wrote (no sidecar names it): the user's model, say; not even --force
    (tmp_path / "u.hf").mkdir()
    (tmp_path / "u.hf" / "modules.json").write_text("mine")
    for force in (False, True):  # without --force, no "pass --force to overwrite": it would refuse that too
        with pytest.raises(CheckpointError, match="u.hf holds files no export of u wrote .* not even --force"):
            export_checkpoint(hf_best_pt, tmp_path / "u.safetensors", force=force)
    assert (tmp_path / "u.hf" / "modules.json").read_text() == "mine" and not (tmp_path / "u.safetensors").exists()


def test_a_model_that_does_not_trace_is_one_line_and_leaves_nothing(hf_best_pt, tmp_path, capsys, monkeypatch):
    # what torch.onnx raised for a Hugging Face Swin: 130 lines of traceback, exit code 1, and m.hf left behind
    def fails(*args, **kwargs):
        raise RuntimeError("Cannot view a tensor with shape [4*s99, 4, 2, 16]\n...129 more lines")

    monkeypatch.setattr(export_module.torch.export, "export", fails)
    code = cli_main(["export", "--checkpoint", str(hf_best_pt), "--to", str(tmp_path / "m.pt2")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "does not export to .pt2: RuntimeError: Cannot view a tensor" in err
    assert "export it to .safetensors or .onnx" in err and "more lines" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_hugging_face_graph_is_exported_in_eval_mode_without_the_exporters_warning(hf_best_pt, tmp_path):
    # the wrapper giving an ImageClassifierOutput's logits was made after model.eval(): it, and the graph's root,
    # were in training mode ("Exporting a model while it is in training mode"), though docs/export.md says eval-mode
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_checkpoint(hf_best_pt, tmp_path / "m.onnx")
    assert not [w for w in caught if "training mode" in str(w.message)]


def test_a_hugging_face_image_model_whose_folder_is_gone_rebuilds_with_its_image_processor(tmp_path, caplog):
    # the rebuilt folder lacked preprocessor_config.json: predict and export warned "has no image processor config",
    # though the checkpoint's own preprocessing was used
    import shutil

    import transformers

    from freezetune.model import hf_bundle

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                                    image_size=32, patch_size=8)  # fmt: skip
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    name = f"hf:{tmp_path / 'vit'}"
    model, pre = create_model(name, "default")
    ft.replace_head(model, 3)
    record = checkpoint.model_record(model, {"model": name}, ["cat", "dog", "eel"], pre, hf_bundle.bundle(name))
    shutil.rmtree(tmp_path / "vit")
    with caplog.at_level(logging.WARNING):
        checkpoint.build_model(record)
    assert "image processor" not in caplog.text
    export_checkpoint(checkpoint.save(record, tmp_path / "best.pt"), tmp_path / "m.safetensors")
    assert transformers.AutoImageProcessor.from_pretrained(tmp_path / "m.hf").size == {"height": 32, "width": 32}


def test_an_export_stopped_between_its_two_files_is_no_export_of_its_sidecars_and_leaves_no_temp_file(best_pt,
                                                                                                     tmp_path):  # fmt: skip
    # killed after m.safetensors took another checkpoint's weights, before m.json took its description: each later
    # export was refused as "m.json describes another checkpoint, exported beside it as m.safetensors", and the
    # killed writer's hidden copy of the weights stayed
    record = checkpoint.load(best_pt)
    record["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in record["state_dict"].items()}
    other = checkpoint.save(record, tmp_path / "other.pt")
    export_checkpoint(best_pt, tmp_path / "m.safetensors")
    export_checkpoint(other, tmp_path / "o.safetensors")
    (tmp_path / "o.safetensors").replace(tmp_path / "m.safetensors")  # the weights renamed, the sidecar not yet
    stale = tmp_path / ".m.safetensors.999999999.0123abcd.tmp"  # a dead writer's
    stale.write_bytes(b"half")
    target, sidecar = export_checkpoint(other, tmp_path / "m.pt2", force=True)
    meta = json.loads(sidecar.read_text())
    assert meta["weights_sha256"] == weights_digest(load_file(tmp_path / "m.safetensors")) and not stale.exists()


def test_the_sidecar_is_written_before_the_weights_take_their_name_and_takes_its_own_right_after(best_pt, tmp_path,
                                                                                                    monkeypatch):  # fmt: skip
    # the sidecar was written once the weights had their name: a stop in between described them as the checkpoint
    # exported there before
    from freezetune import _io

    renamed, replace = [], _io._replace

    def spy(tmp, path):
        written = [t for t in path.parent.glob(".m.json.*.tmp") if t.stat().st_size]
        renamed.append((path.name, len(written)))
        replace(tmp, path)

    monkeypatch.setattr(_io, "_replace", spy)
    export_checkpoint(best_pt, tmp_path / "m.safetensors")
    assert renamed == [("m.safetensors", 1), ("m.json", 1)]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(
        export_module, "_save_safetensors", lambda record, to: (_ for _ in ()).throw(OSError(28, "full"))
    )
    with pytest.raises(OSError):
        export_checkpoint(best_pt, tmp_path / "m.safetensors", force=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # a failed write: the pair as it was


@pytest.mark.skipif(sys.platform == "win32", reason="a file-size limit (RLIMIT_FSIZE) is POSIX's")
def test_a_pt2_export_the_disk_has_no_room_for_is_one_line_naming_the_file_and_leaves_nothing(best_pt, tmp_path):
    # a file-size limit (as a full disk): torch's zip writer raised ("unexpected pos"), then aborted the process from
    # its destructor (exit 134, "terminate called after throwing an instance of 'c10::Error'"); a subprocess, to live
    import resource

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    target = tmp_path / "m.pt2"
    done = subprocess.run([sys.executable, "-m", "freezetune", "export", "--checkpoint", str(best_pt), "--to",
                           str(target)], preexec_fn=limited, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == f"freezetune: error: File too large ({target}); files written before are intact\n"
    assert list(tmp_path.iterdir()) == []  # neither the sidecar nor a temporary file


@pytest.mark.parametrize("wrapped", [False, True])
def test_an_onnx_export_the_disk_has_no_room_for_is_the_disks_error_not_the_models(best_pt, tmp_path, monkeypatch,
                                                                                   capsys, wrapped):  # fmt: skip
    # "timm:test_efficientnet does not export to .onnx: OSError: [Errno 28] No space left on device; export it to
    # .safetensors or .pt2" sent the user to another format; the exporter may wrap the write's error in its own
    def full(model, example, batch, tmp):
        tmp.write_bytes(b"half a graph")
        try:
            raise OSError(28, "No space left on device")
        except OSError as exc:
            if wrapped:
                raise RuntimeError("Failed to save the ONNX model") from exc
            raise

    monkeypatch.setattr(export_module, "_save_onnx", full)
    target = tmp_path / "out" / "m.onnx"
    code = cli_main(["export", "--checkpoint", str(best_pt), "--to", str(target)])
    assert code == 2 and capsys.readouterr().err == (f"freezetune: error: No space left on device ({target}); files "
                                                     "written before are intact\n")  # fmt: skip
    assert list((tmp_path / "out").iterdir()) == []  # neither the sidecar nor half a graph


def test_a_folder_as_target_or_one_the_user_cannot_write_in_is_said_in_one_line(best_pt, tmp_path, monkeypatch):
    # a folder named m.onnx: "already exists; pass --force", then with --force the OS's "Is a directory"; a folder
    # the user may not write in: "Operation not permitted (m.json); files written before are intact", naming the
    # sidecar, not the export asked for
    import errno

    (tmp_path / "d.onnx").mkdir()
    for force in (False, True):
        with pytest.raises(CheckpointError, match=r"d.onnx is a folder: give the file to write \(a name ending in "
                                                  r"\.onnx\); not even --force replaces a folder"):  # fmt: skip
            export_checkpoint(best_pt, tmp_path / "d.onnx", force=force)

    def refused(path):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(path))

    monkeypatch.setattr(export_module, "atomic_output", refused)
    with pytest.raises(CheckpointError, match=r"cannot write m.safetensors in '.*ro': operation not permitted "
                                              r"\(m.json\); give a folder you can write in$"):  # fmt: skip
        export_checkpoint(best_pt, tmp_path / "ro" / "m.safetensors")
    assert not list((tmp_path / "ro").glob("m.*"))
