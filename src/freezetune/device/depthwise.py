"""A faster CPU backward pass for depthwise convolutions on small feature maps.

The stages a fine-tune trains are the last ones, where feature maps are small (4x4 and 2x2 in EfficientNet-Lite0 at
64 px). There PyTorch's CPU kernel for the weight gradient of a 5x5 depthwise convolution is slow: 5-9 ms a layer at
batch 32, 20-50x the layer's forward, the largest part of a training step (``benchmarks/depthwise.py``). That
gradient is itself a depthwise convolution: with the batch folded into the channels, the input convolved with the
output gradient as its kernel gives each (channel, image) pair's k x k weight gradient, and a sum over the batch
finishes it. Computed so, the layer's forward and backward take 2-4 ms. Where the native kernel is faster (3x3
kernels on most maps, maps from 14x14 up: ``faster_here``) it keeps the job.

``use_fast_depthwise(model)`` switches a model's depthwise ``nn.Conv2d`` layers of stride 1 or 2 to it. The layers
keep their parameters, their names and their forward (the same ``F.conv2d`` call); only the backward of a trainable
layer, on the CPU, where it is faster, differs, by float rounding. Modules built later (and any copy loaded for
``eval`` or export) are plain ``nn.Conv2d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_FAST_PIXELS = 64  # at most an 8x8 map
MIN_FAST_PIXELS = 4  # at least a 2x2 one: on 1x1 maps the folded gradient was 2.4-12x slower


def faster_here(kernel: tuple[int, int], stride: tuple[int, int], pixels: int) -> bool:
    """Whether the folded weight gradient beats PyTorch's for this layer and input map (``pixels`` = H x W).

    From ``benchmarks/depthwise.py --grid`` (1 CPU thread, batch 32, 240-1152 channels): native is fast for 3x3
    kernels except on 2x2 maps at stride 1 (folded 1.6-3.1x faster there, 0.1-0.5x elsewhere); for 5x5 and larger
    the folded one is 1.7-9.6x faster on maps up to 8x8 at stride 1, and 1.2-3.2x on 4x4 to 8x8 at stride 2 (5x5:
    0.6-0.8x on 2x2). On 14x14 maps it wins only with few channels (240: 2.4x) and draws or loses with many (1152:
    0.9x at 5x5): native keeps those. On 1x1 maps (EfficientNet-Lite0's last stages at 32 px) the folded one is
    slower (0.08-0.42x at stride 1 in the grid): native keeps them too; a training step there had run 3-8x slower.

    >>> faster_here((5, 5), (1, 1), 16), faster_here((3, 3), (1, 1), 16), faster_here((5, 5), (1, 1), 196)
    (True, False, False)
    >>> faster_here((5, 5), (1, 1), 1), faster_here((3, 3), (1, 1), 1)
    (False, False)
    """
    if not MIN_FAST_PIXELS <= pixels <= MAX_FAST_PIXELS:
        return False
    if kernel[0] * kernel[1] >= 25:
        return stride == (1, 1) or pixels >= 16
    return stride == (1, 1) and pixels <= 4


class _DepthwiseConv(torch.autograd.Function):
    """A depthwise convolution (stride 1 or 2, dilation 1) whose weight gradient is computed as a depthwise convolution."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad, ctx.stride, ctx.padding, 1, weight.shape[0])
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(x, grad, weight.shape, ctx.stride, ctx.padding)
            if grad_w.stride() != weight.stride():  # a channels_last weight's gradient in its layout: DDP's buckets
                grad_w = torch.empty_like(weight).copy_(grad_w)  # follow it ("Grad strides do not match", per rank)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


def _weight_grad(x: torch.Tensor, grad: torch.Tensor, shape: torch.Size, stride: tuple[int, int],
                 padding: tuple[int, int]) -> torch.Tensor:  # fmt: skip
    """dL/dW of a depthwise convolution: each (channel, image) pair's input convolved with its output gradient
    (dilated by the stride), summed over the batch.

    At stride 1 an offset farther than the map is wide sees only zero padding, so its gradient is zero: padding less
    than the layer does and zero-padding the result skips computing those (a 2x2 map under a 5x5 kernel: 3x3 of 5x5).
    At stride 2 the result can be a row and column larger than the kernel: cropped.
    """
    n, c, h, w = x.shape
    (ph, pw), (kh, kw) = padding, shape[-2:]
    eh, ew = (min(ph, h - 1), min(pw, w - 1)) if stride == (1, 1) else (ph, pw)
    folded = x.transpose(0, 1).reshape(1, c * n, h, w)
    kernels = grad.transpose(0, 1).reshape(c * n, 1, grad.shape[2], grad.shape[3])
    per_image = F.conv2d(folded, kernels, None, 1, (eh, ew), stride, c * n)
    rows, cols = kh - 2 * (ph - eh), kw - 2 * (pw - ew)
    summed = per_image[..., :rows, :cols].reshape(c, n, rows, cols).sum(1)
    return F.pad(summed, (pw - ew, pw - ew, ph - eh, ph - eh)).view(shape)


class FastDepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` (depthwise, stride 1 or 2) whose training backward on the CPU uses ``_DepthwiseConv`` where
    ``faster_here`` says it is faster."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type == "cpu"
            and self.weight.requires_grad
            and torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")  # mixed dtypes in backward: measured and tested in fp32 only
            and x.dtype == self.weight.dtype
            and x.dim() == 4
            and faster_here(self.kernel_size, self.stride, x.shape[-2] * x.shape[-1])
        ):
            return _DepthwiseConv.apply(x, self.weight, self.bias, self.stride, self.padding)
        return super().forward(x)


def _eligible(module: nn.Module) -> bool:
    return (
        type(module) is nn.Conv2d  # a subclass (timm's Conv2dSame) has its own forward: left as it is
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
        and module.stride in ((1, 1), (2, 2))
        and module.dilation == (1, 1)
        # odd kernels centred by their padding, as _weight_grad's cropping assumes (not "same"/"valid" strings)
        and all(k % 2 == 1 for k in module.kernel_size)
        and module.padding == tuple(k // 2 for k in module.kernel_size)
        and module.padding_mode == "zeros"
    )


def use_fast_depthwise(model: nn.Module) -> int:
    """Switch ``model``'s depthwise convolutions of stride 1 or 2 to ``FastDepthwiseConv2d``; returns how many.

    The class of each layer changes in place, so its parameters, their names in ``state_dict`` and every reference
    to them (an optimizer's groups) stay as they are.

    >>> model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 4, 1))
    >>> use_fast_depthwise(model), type(model[0]).__name__, type(model[1]).__name__
    (1, 'FastDepthwiseConv2d', 'Conv2d')
    """
    switched = 0
    for module in model.modules():
        if _eligible(module):
            module.__class__ = FastDepthwiseConv2d
            switched += 1
    return switched
