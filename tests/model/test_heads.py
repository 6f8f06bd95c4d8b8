"""The classifier head (``freezetune.model.heads``): what is new after ``replace_head`` is the head stage, and nothing
pretrained is; every output of the classes is replaced."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

import freezetune as ft
from test_stages import assert_partition


def _backbone_frozen(model, num_classes=3):
    ft.replace_head(model, num_classes)
    ft.freeze(model, "backbone")
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "build, head, neck",
    [
        # the classifier Sequential holds two pretrained 4096-wide layers in front of the new one
        (lambda: torchvision.models.vgg11(), ["classifier.6"], "neck"),  # classifier.0 and .3: no one module
        (lambda: torchvision.models.mobilenet_v3_small(), ["classifier.3"], "classifier.0"),
        # timm leaves conv_head out of every group: it was taken for the head
        (lambda: timm.create_model("mobilenetv3_small_050"), ["classifier"], "conv_head"),
        # a pretrained norm in front of the classifier joins the last stage (a stage of norms alone is no depth)
        (lambda: timm.create_model("convnext_atto"), ["head.fc"], None),
    ],
)
def test_pretrained_layers_beside_the_head_are_not_head(build, head, neck):
    model = build()
    trainable = _backbone_frozen(model)
    assert trainable == {f"{h}.{p}" for h in head for p in ("weight", "bias")}  # a linear probe trains only these
    found = ft.stages(model)
    assert_partition(model, found)
    assert found[-1].modules == tuple(head)
    if neck:
        assert found[-2].name == neck and found[-2].num_params > 0


@pytest.mark.parametrize(
    "build, at_least",
    [
        (lambda: torchvision.models.regnet_y_400mf(), ["trunk_output.block1", "trunk_output.block4"]),
        (lambda: torchvision.models.mnasnet0_5(), ["layers.8", "layers.13"]),
        (lambda: timm.create_model("poolformer_s12"), ["stages.0", "stages.3"]),
    ],
)
def test_a_model_whose_trunk_is_one_sequential_gets_a_stage_per_block(build, at_least):
    # as one stage, the auto recipe's "last 3 stages" became a linear probe (Swin, MaxViT, RegNet, MetaFormers)
    model = build()
    found = ft.stages(model)
    assert_partition(model, found)
    assert set(at_least) <= {s.name for s in found} and len(found) >= 5


def test_aux_classifiers_are_replaced_and_their_trunks_are_no_stage():
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    trainable = _backbone_frozen(model, 4)
    assert trainable == {f"{h}.{p}" for h in ("fc", "aux1.fc2", "aux2.fc2") for p in ("weight", "bias")}
    found = ft.stages(model)
    assert_partition(model, found)
    assert not any(s.name.startswith("aux") for s in found)
    out = model.train()(torch.randn(2, 3, 64, 64))
    assert out.logits.shape == out.aux_logits1.shape == out.aux_logits2.shape == (2, 4)  # an aux loss fits


def test_a_hugging_face_distilled_model_gets_both_heads_replaced():
    import transformers as tr

    config = tr.DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=8, num_labels=10)  # fmt: skip
    model = tr.DeiTForImageClassificationWithTeacher(config)
    trainable = _backbone_frozen(model)
    assert {n.split(".")[0] for n in trainable} == {"cls_classifier", "distillation_classifier"}
    assert model.eval()(torch.randn(1, 3, 32, 32)).logits.shape == (1, 3)  # the two heads' sum failed: 10 vs 3
    # named after the class token's classifier, as timm's distilled models name theirs "head": stage_lrs
    # {"cls_classifier": ...} was refused as an unknown stage, the stage being called distillation_classifier
    assert ft.head_name(model) == "cls_classifier" and ft.stages(model)[-1].name == "cls_classifier"
    assert len(ft.param_groups(model, 1e-3, stage_lrs={"cls_classifier": 1e-4})) >= 1


@pytest.mark.parametrize("problem", ["multi_label_classification", "regression"])
def test_a_hugging_face_head_replaced_takes_class_ids_as_its_labels(problem):
    # a checkpoint's multi-label (or regression) problem_type stayed: the new head's loss, given class ids, was BCE
    # ("Target size ... must be the same as input size") or MSE
    import transformers as tr

    config = tr.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, num_labels=6, problem_type=problem)  # fmt: skip
    model = ft.replace_head(tr.BertForSequenceClassification(config), 3)
    out = model(input_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]), labels=torch.tensor([0, 2]))
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 2])))


def test_squeezenets_convolution_classifier_is_its_head():
    model = torchvision.models.squeezenet1_1()
    assert ft.head_name(model) == "classifier.1"
    trainable = _backbone_frozen(model, 5)
    assert trainable == {"classifier.1.weight", "classifier.1.bias"}
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_a_timm_model_without_coarse_grouping_falls_back_to_its_children():
    model = timm.create_model("rdnet_tiny", num_classes=3)  # "coarse grouping is not implemented for RDNet"
    found = ft.stages(model)
    assert_partition(model, found)
    assert found[-1].modules == ("head.fc",) and len(found) >= 5


def test_a_stage_after_a_models_blocks_is_named_for_what_it_holds():
    # T5's encoder.final_layer_norm was a stage called "encoder": freeze("encoder") froze that norm alone
    import transformers as tr

    config = tr.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, num_labels=3,
                         decoder_start_token_id=0, pad_token_id=0)  # fmt: skip
    model = tr.T5ForSequenceClassification(config)
    assert "encoder" not in [s.name for s in ft.stages(model)]
    with pytest.raises(ft.FreezetuneError, match=r"'encoder' matches no stage, module or parameter \(module names are "
                                                 r"full: did you mean 'transformer\.encoder'\?\); stages are: .*"
                                                 "'encoder.block.1'"):  # fmt: skip
        ft.freeze(model, "encoder")
    ft.freeze(model, "transformer.encoder")  # the module: all of it
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".encoder." in n)


def test_an_input_too_small_for_an_aux_classifier_is_refused_at_set_up(monkeypatch):
    # Inception v3 passed the eval-mode size check at 160 px and died in a traceback at the first training step, in
    # the aux classifier that only training runs; and its random-init default was 224 px, already too small for it.
    # (create_model leaves torchvision's aux classifiers out now: the check still guards a model that keeps one)
    from freezetune.errors import ConfigError
    from freezetune.model import create

    monkeypatch.setattr(create, "drop_aux_classifiers", lambda model: [])
    with pytest.raises(ConfigError, match="inception_v3 does not take 160 px images .* give --img-size 299"):
        create.create_model("torchvision:inception_v3", "none", img_size=160)


def test_inception_v3_without_its_aux_classifier_trains_at_a_size_only_that_classifier_refused():
    from freezetune.model.create import create_model

    model, pre = create_model("torchvision:inception_v3", "none", img_size=160)
    assert pre.input_size == 160 and model.train()(torch.randn(2, 3, 160, 160)).shape == (2, 1000)


@pytest.mark.parametrize(
    "name, new",
    [
        ("volo_d1_224", {"head", "aux_head"}),  # reset_classifier renews aux_head too: frozen, it added noise
        ("efficientvit_m0", {"head"}),  # a BNLinear: its norm is renewed with the classifier
        ("pit_ti_distilled_224", {"head", "head_dist"}),
        ("poolformer_s12", {"head"}),  # head.fc alone: its head Sequential keeps the pretrained head.norm
    ],
)
def test_what_timms_reset_classifier_renews_is_the_head_stage(name, new):
    model = timm.create_model(name, pretrained=False)
    old = list(model.parameters())  # kept alive: a freed parameter's id could be reused by a new one
    before = {id(p) for p in old}
    ft.replace_head(model, 7)
    renewed = {n for n, p in model.named_parameters() if id(p) not in before}
    head = ft.stages(model)[-1]
    assert set(head.param_names) == renewed and {n.split(".")[0] for n in renewed} == new
    assert len(ft.stages(model)) >= 5  # PiT's distillation head kept its trunk in one stage


def test_a_head_stage_never_narrows_what_a_module_name_means():
    # the head stage was called "classifier" and held classifier.6 alone: unfreeze(vgg, "classifier") opened only it
    model = torchvision.models.vgg11()
    ft.freeze(model, "all")
    ft.unfreeze(model, "classifier")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")
    }
    assert [s.name for s in ft.stages(model)][-2:] == ["neck", "classifier.6"]


def test_timm_stage_names_are_the_modules_they_hold_and_unique():
    model = timm.create_model("cait_xxs24_224", pretrained=False)  # a callable group matcher
    names = [s.name for s in ft.stages(model)]
    assert len(set(names)) == len(names) and "blocks" not in names and "blocks.22" in names  # "blocks" was 1 of 24
    # its first group holds the class token, the position embedding and the patch embedding: named "cls_token" after
    # the first of them, as if it were that parameter alone
    assert names[0] == "stem" and "patch_embed.proj.weight" in ft.stages(model)[0].param_names
    # CoaT's matcher names each stage's embeddings (stem1 ... stem4) without numbering them in its regex
    coat = [s.name for s in ft.stages(timm.create_model("coat_lite_tiny", pretrained=False))]
    assert coat[:4] == ["stem1", "serial_blocks1.0", "serial_blocks1.1", "stem2"] and "cls_token3" not in coat


def test_a_hugging_face_classifiers_norm_is_no_head():
    # LeViT's classifier.batch_norm is kept by replace_head and pretrained in its ImageNet checkpoint: as head, a
    # linear probe trained it and moved its running statistics
    import transformers as tr

    model = tr.LevitForImageClassification(tr.LevitConfig(num_labels=10))
    trainable = _backbone_frozen(model)
    assert trainable == {"classifier.linear.weight", "classifier.linear.bias"}
    assert ft.stages(model)[-1].name == "classifier.linear"  # not "classifier": that module holds the norm too


def test_hugging_face_encoder_decoders_and_parallel_block_lists_get_a_stage_per_block():
    # OPT's embeddings and final norm were folded into its first block; BART's decoder positions sat in the encoder's
    # last stage; PVT's encoder (parallel lists of patch embeddings, blocks and norms) was one stage
    import transformers as tr

    opt = tr.OPTForSequenceClassification(tr.OPTConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2,
                                                       ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16,
                                                       num_labels=3))  # fmt: skip
    assert [s.name for s in ft.stages(opt)] == ["decoder.embed_tokens", "decoder.layers.0", "decoder.layers.1", "score"]
    assert "model.decoder.final_layer_norm.weight" in ft.stages(opt)[2].param_names  # after the blocks, as it runs
    bart = tr.BartForSequenceClassification(tr.BartConfig(vocab_size=100, d_model=16, encoder_layers=2, decoder_layers=2,
                                                          encoder_attention_heads=2, decoder_attention_heads=2,
                                                          encoder_ffn_dim=32, decoder_ffn_dim=32, num_labels=3))  # fmt: skip
    decoder_0 = next(s for s in ft.stages(bart) if s.name == "decoder.layers.0")
    assert "model.decoder.embed_positions.weight" in decoder_0.param_names
    pvt = tr.PvtForImageClassification(tr.PvtConfig(image_size=32, num_encoder_blocks=3, depths=[1, 1, 1],
                                                    hidden_sizes=[8, 16, 32], num_attention_heads=[1, 1, 1],
                                                    sequence_reduction_ratios=[4, 2, 1], patch_sizes=[4, 2, 2],
                                                    strides=[4, 2, 2], mlp_ratios=[2, 2, 2], num_labels=3))  # fmt: skip
    found = ft.stages(pvt)
    assert_partition(pvt, found)
    assert [s.name for s in found] == ["encoder.block.0", "encoder.block.1", "encoder.block.2", "classifier"]


def test_a_classifier_beside_a_parameter_free_classifier_list_is_the_head():
    # HGNetV2 keeps its Linear in `fc` and pooling + flatten in a ModuleList called `classifier`: it was refused as
    # a model whose head had been taken off ("its classifier is ModuleList; build it with its classifier")
    import transformers as tr

    model = tr.HGNetV2ForImageClassification(tr.HGNetV2Config(num_labels=3))
    assert ft.head_name(model) == "fc" and ft.stages(model)[-1].name == "fc"
    # its four blocks sit in encoder.stages: as the one stage "encoder", freezing by depth was all or nothing
    assert [s.name for s in ft.stages(model)] == ["embedder", *(f"encoder.stages.{i}" for i in range(4)), "fc"]
    assert_partition(model, ft.stages(model))
    ft.replace_head(model, 5)
    ft.freeze(model, "backbone")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert model(torch.randn(2, 3, 32, 32)).logits.shape == (2, 5)
