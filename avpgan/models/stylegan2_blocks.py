"""StyleGAN2's building blocks, shared by the face prior, its discriminators and the Restorer.

Every layer has StyleGAN's equalised learning rate (N(0, 1) weights scaled by 1/sqrt(fan_in) at
run time) and LeakyReLU 0.2 with gain sqrt(2); docs/models.md has the reasoning.

- `EqualConv2d`, `EqualLinear`: conv and linear layers with the equalised learning rate.
- `ResBlock`: GFPGAN's clean residual block (3x3 conv, bilinear resize, 3x3 conv, 1x1 skip).
- `ModulatedConv2d`, `StyleConv`, `ToRGB`, `MappingNetwork`: the StyleGAN2 generator's layers.
- `widths`: channels per resolution; `lrelu` / `LReLU`: the scaled LeakyReLU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LRELU = 0.2


def log2_size(size: int, who: str) -> int:
    """log2(size) for an image size that must be a power of two >= 8; `who` names the caller in the error."""
    log = int(round(math.log2(size))) if size > 0 else 0
    if size < 8 or 2**log != size:
        raise ValueError(f"{who}: size must be a power of two >= 8, got {size}")
    return log


def widths(size: int, base: int, cap: int = 4) -> dict[int, int]:
    """Channels per resolution 4..size: `base` at full size, doubling per halving up to cap * base.

    StyleGAN's schedule (more channels where the map is small) at a width that suits 64-128 px.
    """
    log2_size(size, "widths")
    out, res = {}, size
    while res >= 4:
        out[res] = base * min(cap, size // res)
        res //= 2
    return out


def lrelu(x: torch.Tensor) -> torch.Tensor:
    # With StyleGAN's gain sqrt(2), a unit-variance input keeps about unit variance.
    return F.leaky_relu(x, LRELU) * math.sqrt(2)


class LReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lrelu(x)


def _resize(x: torch.Tensor, scale: float) -> torch.Tensor:
    # Bilinear x0.5 on an even map averages 2x2 blocks, i.e. an anti-aliased decimation.
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)


class EqualConv2d(nn.Module):
    """Conv with StyleGAN's equalised learning rate: N(0, 1) weights scaled by 1/sqrt(fan_in) at run time.

    Adam's first steps move every weight by about the learning rate; stored at unit scale, that
    is the same *relative* change in every layer, whatever its fan-in. With plain layers the
    recommended 2e-3 shifts a 2048-input layer's output by several units on step one.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.scale = 1 / math.sqrt(cin * kernel * kernel)
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, self.stride, self.padding)


class EqualLinear(nn.Module):
    """Linear layer with the equalised learning rate; `lr_mul` slows it further (the mapping net's 0.01)."""

    def __init__(self, cin: int, cout: int, bias_init: float = 0.0, lr_mul: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / lr_mul)
        self.bias = nn.Parameter(torch.full((cout,), bias_init / lr_mul))
        self.scale, self.lr_mul = lr_mul / math.sqrt(cin), lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class ResBlock(nn.Module):
    """GFPGAN's clean residual block: 3x3 conv, bilinear resize, 3x3 conv; 1x1 conv on the resized
    input. The sum is divided by sqrt(2) (StyleGAN2's residual D) so stacking blocks keeps the scale."""

    def __init__(self, cin: int, cout: int, scale: float):
        super().__init__()
        self.scale = scale
        self.conv1 = EqualConv2d(cin, cin, 3, 1, 1)
        self.conv2 = EqualConv2d(cin, cout, 3, 1, 1)
        self.skip = EqualConv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = lrelu(self.conv2(_resize(lrelu(self.conv1(x)), self.scale)))
        return (out + self.skip(_resize(x, self.scale))) / math.sqrt(2)


class ModulatedConv2d(nn.Module):
    """StyleGAN2's weight (de)modulation, computed on activations instead of per-sample weights.

    conv(x * s, W) * d  with  d[b, o] = 1 / sqrt(sum_{i,k} (W[o, i, k] s[b, i])^2 + eps)  equals a
    convolution with the modulated, demodulated per-sample weight, but runs as one ordinary conv
    (no grouped conv per sample), which is what a GPU and channels_last do fast.
    """

    def __init__(self, cin: int, cout: int, kernel: int, style_dim: int, demodulate: bool = True, upsample: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel))
        self.scale = 1 / math.sqrt(cin * kernel * kernel)
        self.modulation = EqualLinear(style_dim, cin, bias_init=1.0)  # styles start near 1
        self.demodulate, self.upsample, self.padding = demodulate, upsample, kernel // 2

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        s = self.modulation(w)  # [B, cin]
        if self.upsample:
            x = _resize(x, 2.0)
        weight = self.weight * self.scale
        out = F.conv2d(x * s[:, :, None, None], weight, padding=self.padding)
        if self.demodulate:
            d = torch.rsqrt((s.float()[:, None, :] ** 2 * weight.float().pow(2).sum((2, 3))[None]).sum(2) + 1e-8)
            out = out * d.to(out.dtype)[:, :, None, None]
        return out


class StyleConv(nn.Module):
    """Modulated conv, noise injection (learned strength, starts at 0), bias, LeakyReLU."""

    def __init__(self, cin: int, cout: int, style_dim: int, upsample: bool = False, noise: bool = True):
        super().__init__()
        self.conv = ModulatedConv2d(cin, cout, 3, style_dim, upsample=upsample)
        self.noise_strength = nn.Parameter(torch.zeros(1)) if noise else None
        self.bias = nn.Parameter(torch.zeros(1, cout, 1, 1))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = self.conv(x, w)
        if self.noise_strength is not None:
            b, _, h, wd = out.shape
            out = out + self.noise_strength * torch.randn(b, 1, h, wd, device=out.device, dtype=out.dtype)
        return lrelu(out + self.bias)


class ToRGB(nn.Module):
    """Modulated 1x1 conv to RGB without demodulation, added to the upsampled coarser RGB."""

    def __init__(self, cin: int, style_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(cin, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, w: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        out = self.conv(x, w) + self.bias
        return out if skip is None else out + _resize(skip, 2.0)


class MappingNetwork(nn.Module):
    """z -> w: normalise z to the unit-variance sphere, then `n_mlp` Linear + LeakyReLU layers
    (StyleGAN2's learning-rate multiplier 0.01: w drifts slowly, which steadies the GAN)."""

    def __init__(self, style_dim: int, n_mlp: int):
        super().__init__()
        self.layers = nn.ModuleList(EqualLinear(style_dim, style_dim, lr_mul=0.01) for _ in range(n_mlp))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z * torch.rsqrt(z.pow(2).mean(1, keepdim=True) + 1e-8)
        for layer in self.layers:
            x = lrelu(layer(x))
        return x
