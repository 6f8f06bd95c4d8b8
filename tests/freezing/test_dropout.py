"""Dropout in the frozen stages (``freezetune/freezing/dropout.py``): drawn as built by default, or as at inference."""

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

import freezetune as ft
from freezetune.cache.model_split import split_model
from freezetune.errors import SpecError
from freezetune.freezing.dropout import dropout_note, held_layers


class _Block(nn.Module):
    """A residual block with stochastic depth, as torchvision's MBConv and CNBlock."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.drop = nn.Linear(8, 8), torchvision.ops.StochasticDepth(0.5, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.linear(x))


def _model() -> nn.Module:
    torch.manual_seed(0)  # four block stages, then dropout and the head
    return nn.Sequential(_Block(), _Block(), _Block(), _Block(), nn.Dropout(0.5), nn.Linear(8, 3))


def _efficientnet() -> nn.Module:
    model = torchvision.models.efficientnet_b0()  # stochastic depth 0.2 in 15 blocks, as torchvision ships it
    ft.replace_head(model, 3)
    return model


def _draws(module: nn.Module, x: torch.Tensor | None = None) -> bool:
    """Whether two training forwards of ``module`` differ (a random mask drawn)."""
    module.train()
    x = torch.randn(64, 8) if x is None else x
    with torch.no_grad():
        return not torch.equal(module(x), module(x))


def test_off_runs_the_frozen_stages_stochastic_depth_as_at_inference_and_the_heads_dropout_as_built():
    model = _model()
    assert [s.name for s in ft.stages(model)] == ["0", "1", "2", "3", "5"]  # the dropout before the head: in none
    ft.freeze(model, "backbone", dropout="off")
    assert not _draws(model[:4])  # model.train() does not bring the masks back
    assert _draws(model)  # the dropout by the head still draws: it regularises what trains
    assert held_layers(model) == ["0.drop", "1.drop", "2.drop", "3.drop"]


def test_by_default_the_frozen_stages_draw_as_the_model_was_built():
    model = _model()
    ft.freeze(model, "backbone")
    assert _draws(model[:4]) and held_layers(model) == []


def test_an_unfreeze_opens_the_masks_of_the_stages_it_opens_and_keeps_the_policy():
    model = _model()
    ft.freeze_to(model, -3, dropout="off")  # stages 2, 3 and the head train
    assert not _draws(model[:2]) and _draws(model[2])
    ft.unfreeze(model, "1")
    assert _draws(model[1]) and not _draws(model[0])
    # the stages before the first that trains alone: a frozen stage after a trainable one draws, regularising it
    ft.freeze(model, ["1", "2"], dropout="off")
    ft.unfreeze(model, "0")
    assert held_layers(model) == [] and _draws(model[1])
    ft.freeze(model, "backbone", dropout="keep")
    ft.unfreeze(model, "3")  # unfreeze keeps the policy freeze was given (keep)
    assert held_layers(model) == [] and _draws(model[:3])
    ft.freeze_to(model, 2, dropout="off")  # and freeze_to gives its own
    assert held_layers(model) == ["0.drop", "1.drop"]
    ft.freeze_to(model, 3)  # a later call that names none keeps it ("adds to what is frozen")
    assert held_layers(model) == ["0.drop", "1.drop", "2.drop"]
    ft.freeze(model, "3")
    assert held_layers(model) == ["0.drop", "1.drop", "2.drop", "3.drop"]


def test_the_hold_survives_deepcopy_and_torchscript():
    model = _model()
    ft.freeze(model, "backbone", dropout="off")
    copied = copy.deepcopy(model)
    assert held_layers(copied) == held_layers(model) and not _draws(copied[:4])
    scripted = torch.jit.script(model.eval())  # the hook compiles with the model
    assert scripted(torch.randn(2, 8)).shape == (2, 3)


def test_an_unknown_dropout_policy_names_the_choices():
    with pytest.raises(SpecError, match="unknown dropout policy 'drop'.*'keep', 'off'"):
        ft.freeze(_model(), "backbone", dropout="drop")
    with pytest.raises(SpecError, match="'keep', 'off'"):
        ft.freeze_to(_model(), -2, dropout="maybe")


def test_the_run_says_which_layers_of_its_frozen_stages_run_as_at_inference():
    model = _efficientnet()
    ft.freeze(model, "backbone", dropout="off")
    assert dropout_note(model) == ("frozen stages: 15 stochastic depth layers run as at inference (--frozen-dropout "
                                   "off; keep draws them in training, as built)")  # fmt: skip
    ft.freeze(model, "backbone", dropout="keep")
    assert dropout_note(model) is None  # drawn as built: the feature cache's line says where they moved its cut


@pytest.mark.parametrize("bn", ["affine", "affine-only"])
def test_the_batchnorm_a_policy_trains_does_not_make_a_frozen_stage_one_that_trains(bn):
    # bn="affine" trains every frozen stage's BatchNorm scale and shift: "off" held nothing, and said nothing
    model = _efficientnet()
    ft.freeze(model, "backbone", bn=bn, dropout="off")
    assert len(held_layers(model)) == 15


def test_off_that_holds_nothing_says_so():
    model = _model()
    ft.freeze(model, "bitfit", dropout="off")  # every stage's biases train: no stage before the first that trains
    assert held_layers(model) == [] and dropout_note(model).startswith("note: --frozen-dropout off changes nothing")


def test_a_dropout_of_no_stage_draws_as_built_and_the_cache_says_why_it_cuts_before_it():
    # where a layer of no stage runs is not told by where it is registered (pytorch/examples' MNIST net registers
    # both dropouts before its linear layers): it is left as built; the cache cut before it had blamed "more than one
    # tensor" crossing
    model = nn.Sequential(
        nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 3)
    )
    ft.freeze_to(model, -1, dropout="off")
    assert [s.name for s in ft.stages(model)] == ["0", "3", "5"] and held_layers(model) == []
    split, why = split_model(model)
    assert why.startswith("cached at the input of 3 (fx), not of 5: frozen layers between them draw"), why


def test_an_attention_layer_holding_its_dropouts_rate_for_a_fused_kernel_is_held_with_it():
    # timm's Attention passes attn_drop.p to scaled_dot_product_attention by its own mode: the note said its
    # dropout ran as at inference while the frozen blocks still drew
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=3,
                            attn_drop_rate=0.5)  # fmt: skip
    ft.freeze_to(vit, -2, dropout="off")  # blocks.2 and the head train
    assert held_layers(vit) == ["blocks.0.attn.attn_drop", "blocks.1.attn.attn_drop"]
    x = torch.randn(2, 3, 32, 32)
    assert not _draws(vit.blocks[:2], vit.patch_embed(x)) and _draws(vit.blocks[2], vit.patch_embed(x))


def test_torchs_attention_is_held_under_off_and_named_as_attention():
    # torch's MultiheadAttention applies its own dropout (a float, torchvision's ViT's attention_dropout) by its mode
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.3, batch_first=True),
                          nn.Flatten(), nn.Linear(32, 3))  # fmt: skip
    ft.freeze_to(model, -1, dropout="off")
    assert "1.self_attn" in held_layers(model)
    assert dropout_note(model).startswith("frozen stages: 4 attention and dropout layers run as at inference")
    assert not _draws(model[:2], torch.randn(2, 4, 8))
