"""Two of G's transposed convolutions computed another way on CPU: same values, less time.

G's layers are `nn.ConvTranspose2d` modules (their state-dict layout is the paper's); on CPU,
`transposed_conv` runs two of them differently, because PyTorch's oneDNN kernels are slow on
their shapes. Measured on one CPU thread at batch 16 with the paper's G (docs/performance.md):

- **A small input** (4x4 or less: the 1024 -> 512 layer). oneDNN's weight gradient runs at about
  a third of the speed of the same FLOPs on 8x8 and larger inputs (~90 ms). Written as one
  matrix product of the input with the unfolded output gradient it takes ~65 ms; on 8x8 and
  larger inputs oneDNN is faster, so they keep it.
- **The 1x1 layer to RGB.** A [C, 3, 1, 1] weight has strides that also read as channels-last,
  so oneDNN copies the 64x64 activations to channels-last and back around it; as a matrix
  product over channels the layer's forward and backward take ~23 ms instead of ~35 ms.

Everywhere else (GPU, autocast, other dtypes) the module's own forward runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SMALL_INPUT_PIXELS = 16  # 4x4: where the unfolded weight gradient measured faster


class _WeightGradAsMatmul(torch.autograd.Function):
    """conv_transpose2d whose weight gradient is input^T @ unfold(grad_output).

    A transposed conv adds x[b, ci, i, j] * W[ci, co, kh, kw] into y[b, co, s*i - p + kh, s*j - p + kw],
    so dL/dW[ci, co, kh, kw] sums x[b, ci, i, j] * gy[b, co, s*i - p + kh, ...] over b, i, j: unfold
    with the same kernel, stride and padding gathers exactly those gy entries for every (i, j).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple, padding: tuple):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv_transpose2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # the adjoint of a transposed conv is the conv with the same weight
            gx = F.conv2d(gy, weight, None, ctx.stride, ctx.padding)
        if ctx.needs_input_grad[1]:
            b, cin = x.shape[:2]
            cols = F.unfold(gy, weight.shape[2:], padding=ctx.padding, stride=ctx.stride)  # [B, Cout*kh*kw, H_in*W_in]
            xs = x.reshape(b, cin, -1).transpose(0, 1).reshape(cin, -1)  # [Cin, B*H_in*W_in]
            gw = (xs @ cols.transpose(1, 2).reshape(-1, cols.shape[1])).view_as(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum((0, 2, 3))
        return gx, gw, gb, None, None


def _rgb_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    b, c, h, w = x.shape
    y = torch.matmul(weight.flatten(1).t(), x.reshape(b, c, h * w)).view(b, -1, h, w)
    return y if bias is None else y + bias[:, None, None]


def transposed_conv(conv: nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x), by the faster CPU route where one applies (see the module docstring)."""
    plain = (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
             and conv.output_padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1)
    if not plain:
        return conv(x)
    if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0):
        return _rgb_as_matmul(x, conv.weight, conv.bias)
    if x.shape[-2] * x.shape[-1] <= SMALL_INPUT_PIXELS and torch.is_grad_enabled():
        return _WeightGradAsMatmul.apply(x, conv.weight, conv.bias, conv.stride, conv.padding)
    return conv(x)
