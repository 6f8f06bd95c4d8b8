import copy
import dataclasses

import pytest
import torch
from torch import nn

from freezetune.device import depthwise
from freezetune.device.depthwise import FastDepthwiseConv2d, use_fast_depthwise


def _grads(conv: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    out = conv(x)
    params = [conv.weight] + ([conv.bias] if conv.bias is not None else [])
    grads = torch.autograd.grad(out, [x, *params], grad)
    return out, grads, out.grad_fn.name()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize(
    ("channels", "size", "kernel", "stride", "bias"),
    [(16, 4, 5, 1, False), (24, 2, 5, 1, True), (8, 2, 3, 1, False), (8, 1, 3, 1, True), (12, 8, 3, 1, True),
     (6, 3, 7, 1, False), (16, 8, 3, 2, False), (16, 7, 5, 2, True), (8, 4, 5, 2, False), (8, 2, 3, 2, True)],
)  # fmt: skip
def test_gradients_equal_the_native_kernels(fmt, channels, size, kernel, stride, bias, monkeypatch):
    monkeypatch.setattr(depthwise, "faster_here", lambda *_: True)  # every shape through the folded gradient
    torch.manual_seed(0)
    native = nn.Conv2d(channels, channels, kernel, stride, padding=kernel // 2, groups=channels, bias=bias)
    fast = copy.deepcopy(native)
    assert use_fast_depthwise(fast) == 1
    x = torch.randn(5, channels, size, size).contiguous(memory_format=fmt)
    grad = torch.randn_like(native(x))
    out_n, grads_n, _ = _grads(native, x, grad)
    out_f, grads_f, fn = _grads(fast, x, grad)
    assert fn == "_DepthwiseConvBackward"  # the small map took the fast path
    assert torch.equal(out_n, out_f)  # the forward is the same call
    for a, b in zip(grads_n, grads_f, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # in the weight's own layout: DDP's bucket views follow it, and warned "Grad strides do not match" on each rank
    fast.to(memory_format=fmt)  # channels_last: strides (k*k, 1, k, 1), as the trainer lays the model out
    assert _grads(fast, x, grad)[1][1].stride() == fast.weight.stride()


def test_where_native_is_faster_frozen_layers_and_inference_keep_the_native_kernel():
    conv = nn.Conv2d(8, 8, 5, padding=2, groups=8)
    use_fast_depthwise(conv)
    assert isinstance(conv, FastDepthwiseConv2d)
    assert conv(torch.randn(2, 8, 4, 4)).grad_fn.name() == "_DepthwiseConvBackward"
    assert conv(torch.randn(2, 8, 16, 16)).grad_fn.name() != "_DepthwiseConvBackward"  # 16x16: native is faster
    three = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    use_fast_depthwise(three)
    assert three(torch.randn(2, 8, 4, 4)).grad_fn.name() != "_DepthwiseConvBackward"  # 3x3 on 4x4: native
    assert three(torch.randn(2, 8, 2, 2)).grad_fn.name() == "_DepthwiseConvBackward"
    small = torch.randn(2, 8, 4, 4, requires_grad=True)
    with torch.no_grad():
        assert conv(small).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 on the CPU: the native kernels, and a working backward
        out = conv(small)
    assert out.dtype == torch.bfloat16 and out.grad_fn.name() != "_DepthwiseConvBackward"
    out.float().sum().backward()
    conv.weight.requires_grad_(False)
    conv.bias.requires_grad_(False)
    out = conv(small)
    assert out.grad_fn.name() != "_DepthwiseConvBackward"
    out.sum().backward()  # the input gradient of a frozen layer still flows
    assert small.grad is not None


def test_only_plain_centred_depthwise_layers_switch_and_the_state_dict_stays():
    class Same(nn.Conv2d):  # a subclass with its own forward (as timm's Conv2dSame) is left alone
        pass

    model = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # switches
        nn.Conv2d(8, 8, 3, padding=1, groups=8, stride=2),  # switches
        nn.Conv2d(8, 8, 3, padding=1, groups=8, stride=3),
        nn.Conv2d(8, 8, 3, padding=2, groups=8),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8),
        nn.Conv2d(8, 16, 3, padding=1, groups=8),
        nn.Conv2d(8, 8, 1),
        Same(8, 8, 3, padding=1, groups=8),
        nn.Conv2d(8, 8, (3, 5), padding=(1, 2), groups=8),  # switches
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert use_fast_depthwise(model) == 3
    fast = "FastDepthwiseConv2d"
    assert [type(m).__name__ for m in model] == [fast, fast] + ["Conv2d"] * 5 + ["Same", fast]
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert optimizer.param_groups[0]["params"][0] is model[0].weight  # references held elsewhere stay valid


def test_a_whole_efficientnet_step_matches_the_native_gradients():
    import timm

    torch.manual_seed(0)
    native = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3).train()
    fast = copy.deepcopy(native)
    assert use_fast_depthwise(fast) == 12  # 16 depthwise layers; the 4 of stride 2 are timm's Conv2dSame
    x = torch.randn(4, 3, 64, 64)
    for model in (native, fast):
        nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    for (name, a), b in zip(native.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_a_cpu_run_trains_with_the_fast_layers_and_saves_plain_weights(tmp_path):
    from _engine_fixtures import make_image_folder
    from freezetune.config.train_config import TrainConfig
    from freezetune.run import checkpoint
    from freezetune.training.trainer import Trainer

    data = make_image_folder(tmp_path / "images", train=4, val=2, test=0)
    cfg = TrainConfig(model="timm:test_efficientnet", weights="none", img_size=32, device="cpu", workers=0,
                      batch_size=4, cache="off", data=str(data), out=str(tmp_path / "run"), epochs=1, freeze="none",
                      progress=False, tensorboard=False)  # fmt: skip
    lines = []
    # (--cache memory: under auto, one epoch streams the prefix's features instead of storing them)
    trainer = Trainer(dataclasses.replace(cfg, freeze=-3, cache="memory"), echo=lines.append)
    assert any(isinstance(m, FastDepthwiseConv2d) and m.weight.requires_grad for m in trainer.model.modules())
    # the switched layers are leaves of the fx trace: the frozen prefix is still cut off and cached
    assert trainer.features.cached and any("cached at the input of blocks.3 (fx)" in line for line in lines), lines
    trainer.fit()
    model, _ = checkpoint.build_model(checkpoint.load(tmp_path / "run" / checkpoint.BEST))
    assert not any(isinstance(m, FastDepthwiseConv2d) for m in model.modules())  # a loaded model is plain
    assert model.state_dict().keys() == trainer.model.state_dict().keys()
