"""Stage discovery, head lookup and head replacement across model families (torchvision, timm, HF, generic)."""

from __future__ import annotations

import re

import pytest
import timm
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import freezetune as ft
from conftest import TinyCNN, tiny_bert
from freezetune.errors import SpecError

RESNET = ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
_HF_SIZE = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}


def _hf(family: str, task: str = "ImageClassification", **config) -> nn.Module:
    """A tiny randomly initialised Hugging Face classifier: ``_hf("ViT", image_size=32, ...)``."""
    import transformers

    return getattr(transformers, f"{family}For{task}")(getattr(transformers, f"{family}Config")(**config))


_BUILDERS = {
    "tv_resnet18": lambda: torchvision.models.resnet18(),
    "tv_efficientnet_b0": lambda: torchvision.models.efficientnet_b0(),
    "tv_vit_b_16": lambda: torchvision.models.vit_b_16(),
    "timm_tf_efficientnet_lite0": lambda: timm.create_model("tf_efficientnet_lite0", pretrained=False),
    "timm_resnet18": lambda: timm.create_model("resnet18", pretrained=False),
    "timm_vit_tiny": lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False),
    "hf_bert": lambda: tiny_bert(),
    "hf_vit": lambda: _hf("ViT", image_size=32, patch_size=8, **_HF_SIZE),
    "hf_deit": lambda: _hf("DeiT", image_size=32, patch_size=8, **_HF_SIZE),
    "hf_convnext": lambda: _hf("ConvNext", hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
    "hf_albert": lambda: _hf("Albert", "SequenceClassification", vocab_size=64, embedding_size=8, **_HF_SIZE),
    "hf_gpt2": lambda: _hf("GPT2", "SequenceClassification", vocab_size=64, n_embd=16, n_layer=2, n_head=2),
    "hf_clip": lambda: _hf("CLIP", vision_config=dict(image_size=32, patch_size=8, **_HF_SIZE), text_config=_HF_SIZE),
    "hf_siglip": lambda: _hf(
        "Siglip", vision_config=dict(image_size=32, patch_size=8, **_HF_SIZE), text_config=_HF_SIZE
    ),
    "sequential": lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)),
}
_EXPECTED = {
    "tv_resnet18": RESNET,
    "tv_efficientnet_b0": [f"features.{i}" for i in range(9)] + ["classifier"],
    # a stage of norms alone (the final norm here) joins the block before it, as timm's coarse matcher does
    "tv_vit_b_16": ["stem"] + [f"encoder_layer_{i}" for i in range(12)] + ["heads"],
    "timm_tf_efficientnet_lite0": ["stem"] + [f"blocks.{i}" for i in range(7)] + ["classifier"],
    "timm_resnet18": RESNET,
    # timm's coarse matcher merges the final norm into the last block (its MATCH_PREV_GROUP rule).
    "timm_vit_tiny": ["stem"] + [f"blocks.{i}" for i in range(12)] + ["head"],
    "hf_bert": ["embeddings", "encoder.layer.0", "encoder.layer.1", "pooler", "classifier"],
    # transformers 5 keeps ViT's blocks in a ModuleList directly under the base model: still one stage per block.
    "hf_vit": ["embeddings", "layers.0", "layers.1", "classifier"],
    "hf_deit": ["embeddings", "layers.0", "layers.1", "classifier"],
    "hf_convnext": ["embeddings", "encoder.stages.0", "encoder.stages.1", "classifier"],
    # ALBERT's input projection (encoder.embedding_hidden_mapping_in, in front of its blocks) joins the embeddings.
    "hf_albert": ["embeddings", "encoder.albert_layer_groups.0", "pooler", "classifier"],
    # what comes in front of the first block is one input stage: token and position embeddings (and CLIP's
    # pre-norm) are not two depths to freeze
    "hf_gpt2": ["wte", "h.0", "h.1", "score"],
    # their base_model_prefix ("clip") names no attribute: the one tower is the base (it was one stage)
    "hf_clip": ["embeddings", "encoder.layers.0", "encoder.layers.1", "classifier"],
    # SigLIP's attention-pooling head is pretrained: in the tower, not the classifier. The classifier reads the
    # tokens' average, not the head's output: no depth of its own (as a stage, "the last two" trained it alone)
    "hf_siglip": ["embeddings", "encoder.layers.0", "encoder.layers.1", "classifier"],
    "sequential": ["0", "2", "4"],
}


@pytest.fixture(scope="module")
def built() -> dict[str, nn.Module]:
    """Every family's model, built once for the module (no pretrained weights)."""
    torch.manual_seed(0)
    return {name: build() for name, build in _BUILDERS.items()}


def assert_partition(model: nn.Module, stages: list[ft.Stage]) -> None:
    """Every parameter of ``model`` is in exactly one stage (by identity), and stages run input -> output."""
    ids = [id(p) for s in stages for p in s.parameters()]
    assert len(ids) == len(set(ids)), "a parameter is in two stages"
    assert set(ids) == {id(p) for p in model.parameters()}, "a parameter is in no stage"
    assert sum(s.num_params for s in stages) == sum(p.numel() for p in model.parameters())
    position = {id(p): i for i, p in enumerate(model.parameters())}
    firsts = [min(position[id(p)] for p in s.parameters()) for s in stages[:-1]]
    assert firsts == sorted(firsts), "stages are not in input -> output order"


@pytest.mark.parametrize("family", list(_BUILDERS))
def test_stage_discovery(built, family):
    model = built[family]
    stages = ft.stages(model)
    assert [s.name for s in stages] == _EXPECTED[family]
    assert_partition(model, stages)
    head = model.get_submodule(ft.head_name(model))
    head_ids = {id(p) for p in head.parameters()}
    assert head_ids and head_ids <= {id(p) for p in stages[-1].parameters()}, "the head is not the last stage"
    for stage in stages:
        assert stage.modules, f"stage {stage.name} lists no module"
        for name in stage.modules:  # qualified names that resolve on the model
            model.get_submodule(name)
        assert stage.num_params == sum(p.numel() for p in stage.parameters())


def test_stage_contents_of_known_families(built):
    resnet = {s.name: s for s in ft.stages(built["tv_resnet18"])}
    assert resnet["stem"].modules == ("conv1", "bn1")
    assert resnet["fc"].modules == ("fc",)
    vit = built["tv_vit_b_16"]
    stem_ids = {id(p) for p in ft.stages(vit)[0].parameters()}
    for p in (vit.class_token, vit.encoder.pos_embedding, *vit.conv_proj.parameters()):
        assert id(p) in stem_ids
    timm_vit = built["timm_vit_tiny"]
    timm_stem = {id(p) for p in ft.stages(timm_vit)[0].parameters()}
    assert {id(timm_vit.cls_token), id(timm_vit.pos_embed)} <= timm_stem
    bert = {s.name: s for s in ft.stages(built["hf_bert"])}
    assert bert["encoder.layer.1"].modules == ("bert.encoder.layer.1",)


@pytest.mark.parametrize(
    ("family", "head"),
    [
        ("tv_resnet18", "fc"),
        ("tv_efficientnet_b0", "classifier.1"),
        ("tv_vit_b_16", "heads.head"),
        ("timm_tf_efficientnet_lite0", "classifier"),
        ("timm_vit_tiny", "head"),
        ("hf_bert", "classifier"),
        ("sequential", "4"),
    ],
)
def test_head_name(built, family, head):
    assert ft.head_name(built[family]) == head


def test_a_stage_shows_its_names_not_its_weights_and_a_models_name_is_no_model():
    shown = repr(ft.stages(torchvision.models.resnet18()))  # a notebook cell: 157 000 characters of tensors before
    assert "Stage(name='stem', modules=('conv1', 'bn1')" in shown and "tensor" not in shown and len(shown) < 10_000
    for fn in (ft.stages, ft.count_parameters, ft.hold_bn_statistics, lambda m: ft.freeze(m, "backbone")):
        with pytest.raises(SpecError, match=r"expected a model \(a torch.nn.Module\), got 'resnet18': build it"):
            fn("resnet18")
    with pytest.raises(SpecError, match="got OrderedDict"):
        ft.freeze(torchvision.models.resnet18().state_dict(), "backbone")


def test_unmatched_parameter_joins_a_neighbouring_stage():
    model = torchvision.models.resnet18()
    model.register_parameter("logit_scale", nn.Parameter(torch.ones(1)))  # no family rule declares it
    model.layer2.register_parameter("gate", nn.Parameter(torch.zeros(3)))
    stages = ft.stages(model)
    assert [s.name for s in stages] == RESNET
    assert_partition(model, stages)
    holders = [s.name for s in stages if any(p is model.logit_scale for p in s.parameters())]
    assert len(holders) == 1
    assert any(p is model.layer2.gate for p in stages[2].parameters())


def test_timm_distilled_model_keeps_both_heads_in_the_head_stage():
    model = timm.create_model("levit_128s", pretrained=False, num_classes=5)  # get_classifier() -> (head, head_dist)
    stages = ft.stages(model)
    assert_partition(model, stages)
    assert ft.head_name(model) == "head"
    assert stages[-1].name == "head"
    assert set(stages[-1].modules) == {"head", "head_dist"}
    ft.freeze(model, "backbone")
    assert all(p.requires_grad for p in model.head.parameters())
    assert all(p.requires_grad for p in model.head_dist.parameters())


def test_timm_callable_group_matcher():
    model = timm.create_model("resnet10t", pretrained=False, num_classes=4)

    def matcher(name: str) -> float:  # the callable form some timm models (inception_v3, cait) return
        top = name.split(".")[0]
        return {"conv1": 0, "bn1": 0, "layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4}.get(top, float("inf"))

    model.group_matcher = lambda coarse=False: matcher
    stages = ft.stages(model)
    assert_partition(model, stages)
    assert stages[-1].name == "fc"
    assert [s.name for s in stages][1:] == ["layer1", "layer2", "layer3", "layer4", "fc"]


def test_generic_fallback_uses_top_level_children_and_last_linear():
    model = TinyCNN()
    stages = ft.stages(model)
    assert [s.name for s in stages] == list(TinyCNN.STAGES)
    assert ft.head_name(model) == "head"
    assert_partition(model, stages)


class _UserModel(nn.Module):
    """A user's own model: a pretrained backbone and a head of their making, in the order they wrote them."""

    def __init__(self, head_first: bool) -> None:
        super().__init__()
        if head_first:
            self.head = nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 5))
        self.backbone = torchvision.models.resnet18()
        self.backbone.fc = nn.Identity()
        if not head_first:
            self.head = nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@pytest.mark.parametrize("head_first", [False, True])
def test_a_users_own_head_trains_whole_wherever_it_is_declared(head_first):
    # its random hidden layer head.0 was a pretrained "neck", frozen for good by freeze("backbone"); a head declared
    # before the backbone lost the head to the backbone's last Linear
    model = _UserModel(head_first)
    assert ft.head_name(model) == "head.3"
    backbone = ["backbone.stem", "backbone.layer1", "backbone.layer2", "backbone.layer3", "backbone.layer4"]
    assert [s.name for s in ft.stages(model)] == [*backbone, "head"]
    ft.freeze(model, "backbone")
    trainable = {n.rpartition(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.0", "head.3"}


def test_a_sequential_models_head_of_several_layers_trains_whole():
    # as the model's own children, Sequential(backbone, Linear, ReLU, Linear) trained its last Linear alone under
    # freeze("backbone"): the hidden one stayed frozen at its random init
    backbone = torchvision.models.resnet18()
    backbone.fc = nn.Identity()
    model = nn.Sequential(backbone, nn.Linear(512, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, 7))
    assert [s.name for s in ft.stages(model)][-2:] == ["0.layer4", "head"]
    ft.freeze(model, "backbone")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"1.weight", "1.bias", "4.weight", "4.bias"}
    convnet = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16),
                            nn.ReLU(), nn.Linear(16, 7))  # fmt: skip
    assert [(s.name, s.modules) for s in ft.stages(convnet)] == [("0", ("0",)), ("head", ("4", "6"))]
    # the backbone's own norm stays the backbone's (conv, BatchNorm2d, ReLU, Flatten, Linear: a head of one layer)
    small = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 26 * 26, 10))
    assert [s.name for s in ft.stages(small)] == ["0", "4"]
    deeper = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                           nn.Flatten(), nn.Linear(4 * 24 * 24, 8), nn.ReLU(), nn.Linear(8, 3))  # fmt: skip
    assert [(s.name, s.modules) for s in ft.stages(deeper)][-2:] == [("2", ("2", "3")), ("head", ("6", "8"))]
    # a single layer after the backbone keeps its name; an MLP alone is not all head
    assert [s.name for s in ft.stages(nn.Sequential(backbone, nn.Flatten(), nn.Linear(512, 7)))][-1] == "2"
    assert [s.name for s in ft.stages(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))] == ["0", "2"]


class _Wrapper(nn.Module):
    """A user's classifier around a library backbone, as tutorials write it (a headless timm model, an AutoModel)."""

    def __init__(self, backbone: nn.Module, width: int) -> None:
        super().__init__()
        self.backbone, self.dropout, self.classifier = backbone, nn.Dropout(0.1), nn.Linear(width, 3)


def _headless_resnet18() -> tuple[nn.Module, int]:
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    return model, 512


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: (timm.create_model("resnet18", num_classes=0), 512), ["stem", "layer1", "layer2", "layer3", "layer4"]),
        (_headless_resnet18, ["stem", "layer1", "layer2", "layer3", "layer4"]),
        (lambda: (tiny_bert().bert, 32), ["embeddings", "encoder.layer.0", "encoder.layer.1", "pooler"]),
        # feature extractors: timm's features_only (a ModuleDict of its layers, or EfficientNetFeatures without a
        # head) and torchvision's create_feature_extractor (an fx.GraphModule) were one stage "backbone"
        (lambda: (timm.create_model("resnet18", features_only=True), 512),
         ["stem", "layer1", "layer2", "layer3", "layer4"]),
        (lambda: (timm.create_model("efficientnet_b0", features_only=True), 320),
         ["conv_stem", *[f"blocks.{i}" for i in range(7)]]),
        (lambda: (create_feature_extractor(torchvision.models.resnet18(), {"layer4": "out"}), 512),
         ["stem", "layer1", "layer2", "layer3", "layer4"]),
    ],
)  # fmt: skip
def test_a_library_backbone_in_a_users_model_keeps_its_stages(build, expected):
    # the whole backbone was one stage: freeze_to(model, -3) trained all of it, freeze("layer4") found no stage
    backbone, width = build()
    model = _Wrapper(backbone, width)
    stages = ft.stages(model)
    assert [s.name for s in stages] == [f"backbone.{n}" for n in expected] + ["classifier"]
    assert_partition(model, stages)
    ft.freeze_to(model, -3)
    assert [s.name for s in ft.stages(model) if s.num_trainable] == [f"backbone.{n}" for n in expected[-2:]] + [
        "classifier"
    ]


class _TwoBackbones(nn.Module):
    """Two library backbones (a list of them, or named), a fusion layer and a head under a name of the user's own."""

    def __init__(self, as_list: bool) -> None:
        super().__init__()
        pair = [timm.create_model("resnet18", num_classes=0), _headless_resnet18()[0]]
        if as_list:
            self.backbones = nn.ModuleList(pair)
        else:
            self.image, self.other = pair
        self.fusion = nn.Linear(1024, 64)
        self.proj = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 3))


@pytest.mark.parametrize(("as_list", "names"), [(True, ["backbones.0", "backbones.1"]), (False, ["image", "other"])])
def test_each_library_backbone_of_a_users_model_keeps_its_stages_and_a_head_of_any_name_trains_whole(as_list, names):
    # with a fusion layer beside them each backbone was one stage; "proj" lost its first layer to a stage of its own
    model = _TwoBackbones(as_list)
    layers = ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert [s.name for s in ft.stages(model)] == [f"{b}.{n}" for b in names for n in layers] + ["fusion", "proj"]
    ft.freeze(model, "backbone")
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"proj"}


@pytest.mark.parametrize("build", [torchvision.models.resnet18, torchvision.models.efficientnet_b0])
def test_a_users_mlp_head_on_a_torchvision_model_trains_whole(build):
    # its hidden layer, at its random init, was taken for a pretrained layer beside the classifier and stayed frozen
    model = build()
    container = "fc" if hasattr(model, "fc") else "classifier"
    mlp = nn.Sequential(nn.Linear(512 if container == "fc" else 1280, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 4))
    setattr(model, container, mlp)
    assert ft.stages(model)[-1].name == container
    ft.freeze(model, "backbone")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"{container}.{i}.{w}" for i in (0, 3) for w in ("weight", "bias")
    ]


def test_a_torchvision_head_as_the_library_builds_it_keeps_its_pretrained_layers_frozen():
    model = torchvision.models.mobilenet_v3_small(num_classes=4)  # classifier: Linear, Hardswish, Dropout, Linear
    ft.freeze(model, "backbone")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["classifier.3.weight", "classifier.3.bias"]


def test_tied_weights_belong_to_one_stage():
    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.body = nn.Linear(4, 4)
            self.out = nn.Linear(4, 10)
            self.out.weight = self.embed.weight

    model = TiedLM()
    stages = ft.stages(model)
    assert_partition(model, stages)
    assert sum(any(p is model.embed.weight for p in s.parameters()) for s in stages) == 1
    # the head keeps its tied weight: it had none and dropped out, so "backbone" trained body and froze the head
    assert [s.name for s in stages] == ["body", "out"]  # embed holds nothing else
    assert any(p is model.embed.weight for p in stages[-1].parameters())
    ft.freeze(model, "backbone")
    assert model.embed.weight.requires_grad and not model.body.weight.requires_grad


def _tiny_hf(family: str) -> tuple[nn.Module, nn.Module]:
    """A tiny Hugging Face text classifier of ``family`` and its base model (what a pretraining checkpoint holds)."""
    import transformers as tf

    config, task, base = {
        "bert": (tf.BertConfig(vocab_size=64, **_HF_SIZE), tf.BertForSequenceClassification, tf.BertModel),
        "distilbert": (
            tf.DistilBertConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, hidden_dim=32),
            tf.DistilBertForSequenceClassification,
            tf.DistilBertModel,
        ),
        "deberta_v2": (
            tf.DebertaV2Config(vocab_size=64, **_HF_SIZE),
            tf.DebertaV2ForSequenceClassification,
            tf.DebertaV2Model,
        ),
    }[family]
    torch.manual_seed(0)
    return task(config), base(config)


@pytest.mark.parametrize("family", ["bert", "distilbert", "deberta_v2"])
def test_hf_head_stage_is_what_a_base_checkpoint_lacks(family, tmp_path):
    # DistilBERT's pre_classifier and DeBERTa's pooler come with the classification class, random when a base
    # checkpoint loads: they must train with the classifier. BERT's pooler is in the checkpoint: backbone.
    model, base = _tiny_hf(family)
    base.save_pretrained(tmp_path)
    _, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    stages = ft.stages(model)
    assert_partition(model, stages)
    assert set(stages[-1].param_names) == set(info["missing_keys"])
    ft.replace_head(model, 4)
    ft.freeze(model, "backbone")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(info["missing_keys"])


def test_model_without_linear_head_raises():
    with pytest.raises(ft.FreezetuneError, match="classifier head"):
        ft.stages(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


def test_timm_model_without_classifier_says_how_to_add_one():
    # num_classes=0 leaves an Identity where the classifier was: layer4 must not pass for the head.
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    for call in (ft.head_name, ft.stages, lambda m: ft.freeze(m, "backbone")):
        with pytest.raises(SpecError, match=r"no classifier head.*num_classes=0.*replace_head"):
            call(model)
    assert all(p.requires_grad for p in model.parameters())
    ft.replace_head(model, 3)  # timm's reset_classifier builds the head back
    ft.freeze(model, "backbone")
    assert [s.name for s in ft.stages(model) if s.num_trainable] == ["fc"]
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_hf_base_model_has_no_head_to_replace():
    # AutoModel gives a base model whose last Linear is the pretrained pooler: it must not be replaced as the head.
    from transformers import BertModel

    from conftest import tiny_bert_config

    model = BertModel(tiny_bert_config())
    pooler = model.pooler.dense
    for call in (ft.head_name, ft.stages, lambda m: ft.replace_head(m, 3)):
        with pytest.raises(SpecError, match="BertModel .*no classifier head.*AutoModelForSequenceClassification"):
            call(model)
    assert model.pooler.dense is pooler


# --- replace_head -------------------------------------------------------------------------------------------


def test_replace_head_torchvision_gives_new_trainable_head():
    model = torchvision.models.resnet18()
    ft.freeze(model, "all")
    old = model.fc
    assert ft.replace_head(model, 7) is model
    assert model.fc is not old and model.fc.out_features == 7 and model.fc.in_features == old.in_features
    assert all(p.requires_grad for p in model.fc.parameters())
    assert ft.count_parameters(model)[0] == 512 * 7 + 7
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_replace_head_nested_and_generic():
    eff = torchvision.models.efficientnet_b0()
    ft.replace_head(eff, 4)
    assert eff.classifier[1].out_features == 4
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    ft.replace_head(seq, 5)
    assert seq(torch.randn(2, 4)).shape == (2, 5)


def test_replace_head_timm_uses_its_own_reset():
    model = timm.create_model("resnet18", pretrained=False)
    ft.replace_head(model, 6)
    assert model.get_classifier().out_features == 6
    assert model.num_classes == 6
    assert ft.stages(model)[-1].name == "fc"


def test_replace_head_hf_keeps_config_and_loss_in_sync():
    model = tiny_bert(num_labels=3)
    ft.replace_head(model, 5)
    assert model.classifier.out_features == 5
    assert model.config.num_labels == 5 and model.num_labels == 5
    ids = torch.randint(0, 64, (2, 6))
    out = model(input_ids=ids, labels=torch.tensor([4, 1]))  # labels >= 3 fail if num_labels were stale
    assert out.logits.shape == (2, 5) and torch.isfinite(out.loss)


@pytest.mark.parametrize("bad", [0, -3])
def test_replace_head_rejects_bad_class_count(bad):
    with pytest.raises(ft.FreezetuneError, match=str(bad)):
        ft.replace_head(nn.Sequential(nn.Linear(4, 2)), bad)


@pytest.mark.parametrize("bad", [0, -2, 2.5, "10", True])
def test_replace_head_takes_a_positive_int_of_classes(bad):
    model = torchvision.models.resnet18()
    with pytest.raises(ft.FreezetuneError, match=rf"num_classes must be an int >= 1, got {re.escape(repr(bad))}"):
        ft.replace_head(model, bad)  # 2.5 and '10' ended in torch's TypeError
    assert model.fc.out_features == 1000


def test_numpy_ints_count_classes_and_stages_as_ints_do():
    # replace_head(model, labels.max() + 1) and freeze(model, np.int64(3)) were refused: "must be an int"
    import numpy as np

    model = ft.replace_head(torchvision.models.resnet18(), np.array([0, 3, 9]).max() + 1)
    assert model.fc.out_features == 10 and type(model.fc.out_features) is int
    ft.freeze(model, np.int64(3))
    assert [s.name for s in ft.stages(model) if s.num_trainable] == ["layer3", "layer4", "fc"]
    ft.freeze_to(model, np.int64(-2))
    assert [s.name for s in ft.stages(model) if s.num_trainable] == ["layer4", "fc"]


@pytest.mark.parametrize(
    ("build", "attr"), [(torchvision.models.vit_b_16, "heads"), (torchvision.models.resnet18, "fc")]
)
def test_a_torchvision_model_with_its_head_taken_off_is_named_headless(build, attr):
    model = build()
    setattr(model, attr, nn.Identity())  # the usual way to get features out of a torchvision model
    with pytest.raises(SpecError, match=rf"has no classifier head \(its {attr} is Identity\)"):
        ft.head_name(model)  # ViT's was encoder's last MLP layer, frozen by "backbone" as if it were the head


def _hf_text(family: str, **config) -> nn.Module:
    import transformers as tf

    size = dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, vocab_size=64)
    torch.manual_seed(0)
    return tf.AutoModelForSequenceClassification.from_config(getattr(tf, f"{family}Config")(**{**size, **config}))


_BART = dict(d_model=16, encoder_layers=3, decoder_layers=3, encoder_attention_heads=2, decoder_attention_heads=2,
             encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32, eos_token_id=2,
             pad_token_id=1)  # fmt: skip
_IN_FRONT = {
    # a position table every block reads, registered after the blocks (and DeBERTa-v3's norm of it)
    "deberta_v3": (
        lambda: _hf_text(
            "DebertaV2",
            relative_attention=True,
            position_buckets=8,
            norm_rel_ebd="layer_norm",
            pos_att_type=["p2c", "c2p"],
            position_biased_input=False,
        ),
        "encoder.layer.0",
        ["deberta.encoder.rel_embeddings", "deberta.encoder.LayerNorm"],
    ),
    "deberta": (
        lambda: _hf_text("Deberta", relative_attention=True),
        "encoder.layer.0",
        ["deberta.encoder.rel_embeddings"],
    ),
    "mpnet": (lambda: _hf_text("MPNet"), "encoder.layer.0", ["mpnet.encoder.relative_attention_bias"]),
    # the embeddings' norm, registered after the layers
    "bart": (
        lambda: _hf_text("Bart", **_BART),
        "decoder.layers.0",
        ["model.decoder.layernorm_embedding"],
    ),
}


@pytest.mark.parametrize("family", list(_IN_FRONT))
def test_hf_layers_registered_after_the_blocks_but_feeding_them_join_the_first_block(family):
    # "the last two stages" trained DeBERTa's position table and the head and no transformer layer, its backward
    # running through every frozen one
    build, first, members = _IN_FRONT[family]
    model = build()
    found = ft.stages(model)
    assert_partition(model, found)
    assert set(members) <= set(next(s for s in found if s.name == first).modules)
    ft.freeze_to(model, -2)  # the last block and the head
    last_block = found[-2]
    assert "layer" in last_block.name and last_block.name.endswith("2"), [s.name for s in found]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(last_block.param_names) | set(found[-1].param_names)


def test_a_norm_after_a_layer_of_an_hf_task_head_trains_with_it():
    # ModernBERT's head is dense -> act -> norm: its norm went to the backbone, frozen after the layer that trains
    model = _hf_text("ModernBert", pad_token_id=0, eos_token_id=1, bos_token_id=2, cls_token_id=2, sep_token_id=1)
    found = ft.stages(model)
    assert_partition(model, found)
    ft.freeze(model, "backbone")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "head.dense.weight", "head.norm.weight", "classifier.weight", "classifier.bias"}  # fmt: skip


@pytest.mark.parametrize(
    ("build", "unused"),
    [
        (lambda: _hf("Siglip", vision_config=dict(image_size=32, patch_size=8, **_HF_SIZE), text_config=_HF_SIZE),
         "vision_model.head"),
        (lambda: _hf_text("Esm", vocab_size=33, position_embedding_type="rotary", pad_token_id=1, mask_token_id=32),
         "esm.contact_head"),
        (lambda: _hf_text("BigBird", attention_type="original_full"), "bert.pooler"),
    ],
)  # fmt: skip
def test_a_pretrained_hf_layer_the_logits_do_not_read_is_no_stage_of_its_own(build, unused, monkeypatch):
    # it was the last stage before the head: freeze_to(-2) trained it (no gradient ever reached it) and no block
    from freezetune.model import stages_hf

    monkeypatch.setattr(stages_hf, "_UNUSED", {})  # measured afresh, not remembered from another test's model
    model = build()
    for name, p in model.named_parameters():  # a caller's own flags and modes, which the measuring pass must keep
        p.requires_grad_("embeddings" not in name)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    with torch.no_grad():  # a notebook's summary under no_grad: every layer looked unused, and was remembered so
        found = ft.stages(model)
    assert_partition(model, found)
    assert unused in found[-2].modules and "layer" in found[-2].name, [(s.name, s.modules) for s in found]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(m.training for m in model.modules()) and all(p.grad is None for p in model.parameters())
    assert len(stages_hf._UNUSED) == 1
    build()  # another model of the same architecture and config is not measured again
    assert [s.name for s in ft.stages(build())] == [s.name for s in found] and len(stages_hf._UNUSED) == 1


def test_a_pretrained_hf_pooler_the_classifier_reads_stays_a_stage(monkeypatch):
    from freezetune.model import stages_hf

    monkeypatch.setattr(stages_hf, "_UNUSED", {})
    with torch.no_grad():
        assert [s.name for s in ft.stages(tiny_bert())][-2:] == ["pooler", "classifier"]
    with torch.inference_mode():
        assert [s.name for s in ft.stages(tiny_bert())][-2:] == ["pooler", "classifier"]


@pytest.mark.parametrize("family", ["bert", "distilbert", "deberta_v2"])
def test_an_hf_head_stage_trains_whole_when_frozen_before_its_head_is_replaced(family):
    # freeze("all") then replace_head made only the last layer new: DistilBERT's pre_classifier (random from a base
    # checkpoint) stayed frozen under it; the other order trained it
    frozen_first, _ = _tiny_hf(family)
    ft.freeze(frozen_first, "all")
    ft.replace_head(frozen_first, 3)
    replaced_first, _ = _tiny_hf(family)
    ft.replace_head(replaced_first, 3)
    ft.freeze(replaced_first, "backbone")
    trained = {n for n, p in frozen_first.named_parameters() if p.requires_grad}
    assert trained == {n for n, p in replaced_first.named_parameters() if p.requires_grad}
    assert trained == set(ft.stages(frozen_first)[-1].param_names)


def test_a_layer_between_features_and_classifier_is_a_stage_of_its_own():
    # a neck beside features/classifier joined the last layer of features (a BatchNorm), which then split from its
    # conv: freeze_to(-2) trained that BatchNorm and froze its conv
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # fmt: skip
            self.neck = nn.Linear(8, 8)
            self.classifier = nn.Linear(8, 3)

        def forward(self, x):
            return self.classifier(self.neck(self.features(x)))

    model = Net()
    found = ft.stages(model)
    assert_partition(model, found)
    assert [(s.name, s.modules) for s in found] == [
        ("features.0", ("features.0", "features.1")),
        ("features.3", ("features.3", "features.4")),
        ("neck", ("neck",)),
        ("classifier", ("classifier",)),
    ]
    ft.freeze_to(model, -2)
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"neck", "classifier"}


@pytest.mark.parametrize("use", [ft.stages, lambda m: ft.freeze(m, "backbone"), lambda m: ft.param_groups(m, 1e-3)])
def test_stages_of_a_model_with_lazy_layers_name_them(use):
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2))  # torch's own ValueError came from numel()
    with pytest.raises(SpecError, match=r"lazy layers have no size yet \('0.weight', '0.bias'\)"):
        use(model)


def test_stages_are_worked_out_once_per_structure_and_again_when_it_changes(monkeypatch):
    # a run's set-up asks for a model's stages 9 times; each answer must still follow a new head or a swapped layer
    from freezetune.model import stages as stages_module

    worked = []
    real = stages_module._worked_out
    monkeypatch.setattr(stages_module, "_worked_out", lambda model: worked.append(1) or real(model))
    model = torchvision.models.resnet18()
    first = ft.stages(model)
    assert [s.name for s in ft.stages(model)] == RESNET and len(worked) == 1
    first.pop()  # a caller's own list
    assert [s.name for s in ft.stages(model)] == RESNET
    ft.replace_head(model, 4)  # new parameters: the head stage holds them
    (head,) = [s for s in ft.stages(model) if s.name == "fc"]
    assert head.params == tuple(model.fc.parameters()) and len(worked) == 2
    model.layer4 = nn.Identity()  # a stage gone
    assert [s.name for s in ft.stages(model)] == ["stem", "layer1", "layer2", "layer3", "fc"] and len(worked) == 3
    other = torchvision.models.resnet18()  # another model of the same structure: its own parameters
    assert ft.stages(other)[-1].params == tuple(other.fc.parameters()) and len(worked) == 4


def test_a_models_stages_reflect_what_trains_now_not_when_they_were_first_asked_for():
    model = torchvision.models.resnet18()
    assert ft.stages(model)[-1].num_trainable == 512 * 1000 + 1000
    ft.freeze(model, "fc")
    assert ft.stages(model)[-1].num_trainable == 0
