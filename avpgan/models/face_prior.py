"""The face GAN prior of the image enhancement module (section 3.3) and its discriminator.

- `StyleGAN2Prior`: a small StyleGAN2 generator (mapping z -> w, modulated 3x3 convs with
  demodulation, optional noise injection, toRGB skips). It is trained first, unconditionally,
  on the data set's faces against `StyleDiscriminator` (softplus loss + R1): no public face
  GAN exists at 64-128 px, so the prior has to be ours. Its `synthesis` takes the Restorer's
  per-layer style codes and channel-split SFT conditions (restore.py).
- `StyleDiscriminator`: a StyleGAN2-style residual discriminator, used for the prior and the
  Restorer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from avpgan.models.stylegan2_blocks import (
    EqualConv2d, EqualLinear, LReLU, MappingNetwork, ResBlock, StyleConv, ToRGB, log2_size, lrelu, widths,
)


Conditions = Sequence[tuple[torch.Tensor, torch.Tensor]]


class StyleGAN2Prior(nn.Module):
    """Unconditional face generator: z [B, style_dim] -> image [B, 3, out_size, out_size].

    `synthesis` takes per-layer codes w [B, num_latent, style_dim] and optional CS-SFT
    conditions, one (scale, shift) pair per resolution 8..out_size, each [B, C_res / 2, res, res].
    Codes are indexed as in StyleGAN2: conv 0 and toRGB 0 at 4 px use w_0 and w_1; at each finer
    scale the two convs and the toRGB use w_i, w_{i+1}, w_{i+2}, i = 1, 3, 5, ...
    """

    def __init__(self, out_size: int = 128, channels: int = 64, style_dim: int = 256, n_mlp: int = 8,
                 noise: bool = True, channel_cap: int = 4):
        super().__init__()
        log = log2_size(out_size, "StyleGAN2Prior")
        self.out_size, self.style_dim = out_size, style_dim
        self.widths = widths(out_size, channels, channel_cap)
        self.num_latent = 2 * log - 2
        self.mapping = MappingNetwork(style_dim, n_mlp)
        w4 = self.widths[4]
        self.const = nn.Parameter(torch.randn(1, w4, 4, 4))
        self.conv1 = StyleConv(w4, w4, style_dim, noise=noise)
        self.to_rgb1 = ToRGB(w4, style_dim)
        self.convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        for res in self.resolutions:
            cin, cout = self.widths[res // 2], self.widths[res]
            self.convs.append(StyleConv(cin, cout, style_dim, upsample=True, noise=noise))
            self.convs.append(StyleConv(cout, cout, style_dim, noise=noise))
            self.to_rgbs.append(ToRGB(cout, style_dim))

    @property
    def resolutions(self) -> list[int]:
        """The scales that get an upsampling conv pair (and CS-SFT): 8, 16, ..., out_size."""
        return [2**k for k in range(3, int(math.log2(self.out_size)) + 1)]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Unconditional sample: one w, broadcast to every layer."""
        if z.dim() != 2 or z.shape[1] != self.style_dim:
            raise ValueError(f"StyleGAN2Prior: expected z [B, {self.style_dim}], got {tuple(z.shape)}")
        w = self.mapping(z)
        return self.synthesis(w[:, None].expand(-1, self.num_latent, -1))

    def synthesis(self, w: torch.Tensor, conditions: Conditions | None = None) -> torch.Tensor:
        if w.dim() != 3 or w.shape[1:] != (self.num_latent, self.style_dim):
            raise ValueError(f"StyleGAN2Prior: expected codes [B, {self.num_latent}, {self.style_dim}], got {tuple(w.shape)}")
        if conditions is not None and len(conditions) != len(self.resolutions):
            raise ValueError(f"StyleGAN2Prior: {len(self.resolutions)} SFT conditions needed (8..{self.out_size} px), got {len(conditions)}")
        x = self.conv1(self.const.expand(w.shape[0], -1, -1, -1), w[:, 0])
        rgb = self.to_rgb1(x, w[:, 1], None)
        for k in range(len(self.resolutions)):
            i = 2 * k + 1
            x = self.convs[2 * k](x, w[:, i])
            if conditions is not None:
                scale, shift = conditions[k]
                keep, mod = torch.split(x, [x.shape[1] - scale.shape[1], scale.shape[1]], dim=1)
                x = torch.cat([keep, mod * (1 + scale) + shift], dim=1)
            x = self.convs[2 * k + 1](x, w[:, i + 1])
            rgb = self.to_rgbs[k](x, w[:, i + 2], rgb)
        return rgb


class StyleDiscriminator(nn.Module):
    """StyleGAN2-style residual discriminator: image [B, 3, S, S] -> logit [B].

    1x1 from-RGB, residual blocks halving to 4 px, minibatch standard deviation (one feature,
    groups of up to 4), 3x3 conv, two linear layers. Used for the prior and the Restorer.
    """

    def __init__(self, size: int = 128, channels: int = 64, channel_cap: int = 4, stddev_group: int = 4):
        super().__init__()
        log2_size(size, "StyleDiscriminator")
        w = widths(size, channels, channel_cap)
        self.size, self.stddev_group = size, stddev_group
        self.from_rgb = EqualConv2d(3, w[size], 1)
        self.blocks = nn.ModuleList(ResBlock(w[r], w[r // 2], 0.5) for r in sorted(w, reverse=True) if r > 4)
        self.final_conv = EqualConv2d(w[4] + 1, w[4], 3, 1, 1)
        self.final = nn.Sequential(EqualLinear(w[4] * 16, w[4]), LReLU(), EqualLinear(w[4], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1:] != (3, self.size, self.size):
            raise ValueError(f"StyleDiscriminator: expected [B, 3, {self.size}, {self.size}], got {tuple(x.shape)}")
        x = lrelu(self.from_rgb(x))
        for block in self.blocks:
            x = block(x)
        b, c, h, w = x.shape
        g = min(self.stddev_group, b)
        while b % g:
            g -= 1
        # std over groups of samples, averaged to one map: lets D see a collapsed batch.
        std = x.float().view(g, b // g, c, h, w).var(0, unbiased=False).add(1e-8).sqrt().mean((1, 2, 3))
        std = std.to(x.dtype).view(b // g, 1, 1, 1).repeat(g, 1, h, w)
        x = lrelu(self.final_conv(torch.cat([x, std], 1)))
        return self.final(x.flatten(1))[:, 0]
