"""The image enhancement module (section 3.3): GFPGAN-style restoration with a face GAN prior.

    x (64 px, degraded) --resize--> U-Net encoder --linear--> per-layer style codes w_1..w_L
                                     U-Net decoder --convs--> per-scale SFT (scale, shift)
    StyleGAN2Prior.synthesis(w, SFT) --> restored face (64 or 128 px)

- `Restorer`: the degradation-removal U-Net (3x3 conv, bilinear resize, 3x3 conv, 1x1 skip,
  LeakyReLU 0.2) whose bottleneck gives the style codes and whose decoder gives, at every scale
  from 8 px up, an SFT (scale, shift) pair. The prior applies them after the first conv of each
  scale to the second HALF of the channels only (channel-split SFT): the untouched half keeps
  the prior's realism, the modulated half carries the input's identity. `freeze_prior` keeps
  the prior's weights fixed; otherwise it is fine-tuned with the rest.

Elsewhere: the prior `StyleGAN2Prior` and its `StyleDiscriminator` in face_prior.py, the layers
they share in stylegan2_blocks.py, the losses of eq. (7)-(11) in restore_losses.py.

Choices made here (docs/models.md has the reasoning): SFT multiplies by (1 + scale) so a zero
condition leaves the prior unchanged; the input is resized to the output size before the
U-Net (GFPGAN resizes every input to 512 first too).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from avpgan.models.face_prior import StyleGAN2Prior
from avpgan.models.stylegan2_blocks import EqualConv2d, EqualLinear, LReLU, ResBlock, lrelu, widths


class Restorer(nn.Module):
    """Degraded faces [B, 3, H, W] in [-1, 1] (64 px here) -> restored [B, 3, out_size, out_size].

    `rgb_outputs` adds a 1x1 RGB head to every decoder scale (GFPGAN's intermediate outputs for
    its pyramid L1); off by default so that no parameter goes unused under DDP when the
    pyramid loss is not trained.
    """

    def __init__(self, out_size: int = 128, unet_channels: int = 32, prior_channels: int = 64, style_dim: int = 256,
                 n_mlp: int = 8, noise: bool = True, freeze_prior: bool = False, rgb_outputs: bool = False,
                 channel_cap: int = 4):
        super().__init__()
        self.prior = StyleGAN2Prior(out_size, prior_channels, style_dim, n_mlp, noise, channel_cap)
        self.out_size, self.style_dim = out_size, style_dim
        uw = widths(out_size, unet_channels, channel_cap)
        pw = self.prior.widths
        ups = self.prior.resolutions  # 8..out_size
        self.conv_first = EqualConv2d(3, uw[out_size], 3, 1, 1)
        self.down = nn.ModuleList(ResBlock(uw[r], uw[r // 2], 0.5) for r in reversed(ups))
        self.conv_last = EqualConv2d(uw[4], uw[4], 3, 1, 1)
        self.to_styles = EqualLinear(uw[4] * 16, self.prior.num_latent * style_dim)
        self.up = nn.ModuleList(ResBlock(uw[r // 2], uw[r], 2.0) for r in ups)

        def sft(r: int) -> nn.Sequential:  # decoder features -> half the prior's channels at r
            return nn.Sequential(EqualConv2d(uw[r], uw[r], 3, 1, 1), LReLU(), EqualConv2d(uw[r], pw[r] // 2, 3, 1, 1))

        self.sft_scale = nn.ModuleList(sft(r) for r in ups)
        self.sft_shift = nn.ModuleList(sft(r) for r in ups)
        self.to_rgbs = nn.ModuleList(EqualConv2d(uw[r], 3, 1) for r in ups) if rgb_outputs else None
        self.freeze_prior = freeze_prior

    @property
    def freeze_prior(self) -> bool:
        return self._freeze_prior

    @freeze_prior.setter
    def freeze_prior(self, frozen: bool) -> None:
        self._freeze_prior = bool(frozen)
        self.prior.requires_grad_(not frozen)
        # Styles come from the U-Net, never from z: the mapping net is unused here, and a
        # trainable but unused parameter would stall DDP's gradient reduction.
        self.prior.mapping.requires_grad_(False)

    def load_prior(self, state: Mapping[str, torch.Tensor] | StyleGAN2Prior) -> None:
        """Load a trained prior (its state dict or module), strictly; the freeze setting stays."""
        if isinstance(state, nn.Module):
            state = state.state_dict()
        self.prior.load_state_dict(state, strict=True)
        self.freeze_prior = self._freeze_prior

    def forward(self, x: torch.Tensor, return_rgb: bool = False):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"Restorer: expected images [B, 3, H, W], got {tuple(x.shape)}")
        if return_rgb and self.to_rgbs is None:
            raise ValueError("Restorer: return_rgb=True needs a Restorer built with rgb_outputs=True")
        if x.shape[-2:] != (self.out_size, self.out_size):
            x = F.interpolate(x, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        feat = lrelu(self.conv_first(x))
        skips = []
        for block in self.down:
            feat = block(feat)
            skips.append(feat)  # 1/2, 1/4, ..., 4 px
        feat = lrelu(self.conv_last(feat))
        w = self.to_styles(feat.flatten(1)).view(-1, self.prior.num_latent, self.style_dim)
        conditions, rgbs = [], []
        for k, block in enumerate(self.up):
            feat = block(feat + skips[-1 - k])
            conditions.append((self.sft_scale[k](feat), self.sft_shift[k](feat)))
            if return_rgb:
                rgbs.append(self.to_rgbs[k](feat))
        image = self.prior.synthesis(w, conditions)
        return (image, rgbs) if return_rgb else image
