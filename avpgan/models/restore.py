"""The image enhancement module (section 3.3): GFPGAN-style restoration with a face GAN prior.

    x (64 px, degraded) --resize--> U-Net encoder --linear--> per-layer style codes w_1..w_L
                                     U-Net decoder --convs--> per-scale SFT (scale, shift)
    StyleGAN2Prior.synthesis(w, SFT) --> restored face (64 or 128 px)

- `StyleGAN2Prior`: a small StyleGAN2 generator (mapping z -> w, modulated 3x3 convs with
  demodulation, optional noise injection, toRGB skips). It is trained first, unconditionally,
  on the data set's faces against `StyleDiscriminator` (softplus loss + R1): no public face
  GAN exists at 64-128 px, so the prior has to be ours.
- `Restorer`: the degradation-removal U-Net (3x3 conv, bilinear resize, 3x3 conv, 1x1 skip,
  LeakyReLU 0.2) whose bottleneck gives the style codes and whose decoder gives, at every scale
  from 8 px up, an SFT (scale, shift) pair. The prior applies them after the first conv of each
  scale to the second HALF of the channels only (channel-split SFT): the untouched half keeps
  the prior's realism, the modulated half carries the input's identity. `freeze_prior` keeps
  the prior's weights fixed; otherwise it is fine-tuned with the rest.
- Losses, eq. (7)-(11): `RestoreLosses` (generator side: L1, perceptual, global adversarial,
  facial component adversarial + Gram feature style, identity; discriminator side: global and
  local softplus, R1 on the global one), plus the plain functions they use.

Choices made here (docs/models.md has the reasoning): SFT multiplies by (1 + scale) so a zero
condition leaves the prior unchanged; the input is resized to the output size before the
U-Net (GFPGAN resizes every input to 512 first too); facial components are cut with fixed
fractional boxes of the aligned face, so they exist at every image size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

LRELU = 0.2


def _log2_size(size: int, who: str) -> int:
    log = int(round(math.log2(size))) if size > 0 else 0
    if size < 8 or 2**log != size:
        raise ValueError(f"{who}: size must be a power of two >= 8, got {size}")
    return log


def widths(size: int, base: int, cap: int = 4) -> dict[int, int]:
    """Channels per resolution 4..size: `base` at full size, doubling per halving up to cap * base.

    StyleGAN's schedule (more channels where the map is small) at a width that suits 64-128 px.
    """
    _log2_size(size, "widths")
    out, res = {}, size
    while res >= 4:
        out[res] = base * min(cap, size // res)
        res //= 2
    return out


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    # With StyleGAN's gain sqrt(2), a unit-variance input keeps about unit variance.
    return F.leaky_relu(x, LRELU) * math.sqrt(2)


class LReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _lrelu(x)


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
        out = _lrelu(self.conv2(_resize(_lrelu(self.conv1(x)), self.scale)))
        return (out + self.skip(_resize(x, self.scale))) / math.sqrt(2)


# ----------------------------------------------------------------------------------------------
# The StyleGAN2 prior.


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
        return _lrelu(out + self.bias)


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
            x = _lrelu(layer(x))
        return x


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
        log = _log2_size(out_size, "StyleGAN2Prior")
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
        _log2_size(size, "StyleDiscriminator")
        w = widths(size, channels, channel_cap)
        self.size, self.stddev_group = size, stddev_group
        self.from_rgb = EqualConv2d(3, w[size], 1)
        self.blocks = nn.ModuleList(ResBlock(w[r], w[r // 2], 0.5) for r in sorted(w, reverse=True) if r > 4)
        self.final_conv = EqualConv2d(w[4] + 1, w[4], 3, 1, 1)
        self.final = nn.Sequential(EqualLinear(w[4] * 16, w[4]), LReLU(), EqualLinear(w[4], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1:] != (3, self.size, self.size):
            raise ValueError(f"StyleDiscriminator: expected [B, 3, {self.size}, {self.size}], got {tuple(x.shape)}")
        x = _lrelu(self.from_rgb(x))
        for block in self.blocks:
            x = block(x)
        b, c, h, w = x.shape
        g = min(self.stddev_group, b)
        while b % g:
            g -= 1
        # std over groups of samples, averaged to one map: lets D see a collapsed batch.
        std = x.float().view(g, b // g, c, h, w).var(0, unbiased=False).add(1e-8).sqrt().mean((1, 2, 3))
        std = std.to(x.dtype).view(b // g, 1, 1, 1).repeat(g, 1, h, w)
        x = _lrelu(self.final_conv(torch.cat([x, std], 1)))
        return self.final(x.flatten(1))[:, 0]


# ----------------------------------------------------------------------------------------------
# The Restorer.


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
        feat = _lrelu(self.conv_first(x))
        skips = []
        for block in self.down:
            feat = block(feat)
            skips.append(feat)  # 1/2, 1/4, ..., 4 px
        feat = _lrelu(self.conv_last(feat))
        w = self.to_styles(feat.flatten(1)).view(-1, self.prior.num_latent, self.style_dim)
        conditions, rgbs = [], []
        for k, block in enumerate(self.up):
            feat = block(feat + skips[-1 - k])
            conditions.append((self.sft_scale[k](feat), self.sft_shift[k](feat)))
            if return_rgb:
                rgbs.append(self.to_rgbs[k](feat))
        image = self.prior.synthesis(w, conditions)
        return (image, rgbs) if return_rgb else image


# ----------------------------------------------------------------------------------------------
# Facial components: fixed fractional boxes on the aligned face and their local discriminators.

# (x0, y0, x1, y1) as fractions of width and height; "left" is the image's left. Generous boxes
# around where aligned face crops put eyes and mouth; pass your own for another alignment.
REGIONS: dict[str, tuple[float, float, float, float]] = {
    "left_eye": (0.22, 0.28, 0.50, 0.54),
    "right_eye": (0.50, 0.28, 0.78, 0.54),
    "mouth": (0.30, 0.56, 0.70, 0.82),
}


def region_box(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """Fractions -> pixel (top, bottom, left, right). Rounding the products (never an integer
    ratio of size / 512, GFPGAN's bug below 512 px) keeps a box the same part of the face at
    every size."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"region box {tuple(box)}: expected 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    top, left = round(y0 * height), round(x0 * width)
    bottom, right = max(top + 1, round(y1 * height)), max(left + 1, round(x1 * width))
    return top, bottom, left, right


def crop_regions(img: torch.Tensor, regions: Mapping[str, Sequence[float]] = REGIONS) -> dict[str, torch.Tensor]:
    out = {}
    for name, box in regions.items():
        t, b, l, r = region_box(box, img.shape[-2], img.shape[-1])
        if b - t < 8 or r - l < 8:
            raise ValueError(f"region '{name}' is {b - t}x{r - l} px on a {img.shape[-2]}x{img.shape[-1]} image; need >= 8x8")
        out[name] = img[..., t:b, l:r]
    return out


class ComponentDiscriminator(nn.Module):
    """A small patch discriminator for one facial component; also returns two feature maps
    (after each downsampling stage) for the Gram-matrix feature style loss of eq. (9)."""

    def __init__(self, channels: int = 32):
        super().__init__()
        c = channels
        self.stage1 = nn.Sequential(
            EqualConv2d(3, c, 3, 1, 1), LReLU(),
            EqualConv2d(c, 2 * c, 3, 2, 1), LReLU(),
            EqualConv2d(2 * c, 2 * c, 3, 1, 1), LReLU(),
        )
        self.stage2 = nn.Sequential(
            EqualConv2d(2 * c, 4 * c, 3, 2, 1), LReLU(),
            EqualConv2d(4 * c, 4 * c, 3, 1, 1), LReLU(),
        )
        self.final = EqualConv2d(4 * c, 1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f1 = self.stage1(x)
        f2 = self.stage2(f1)
        return self.final(f2), [f1, f2]


class FacialComponents(nn.Module):
    """One ComponentDiscriminator per region (left eye, right eye, mouth); crops happen inside."""

    def __init__(self, channels: int = 32, regions: Mapping[str, Sequence[float]] = REGIONS):
        super().__init__()
        self.regions = {k: tuple(float(v) for v in box) for k, box in regions.items()}
        self.nets = nn.ModuleDict({name: ComponentDiscriminator(channels) for name in self.regions})

    def forward(self, img: torch.Tensor) -> dict[str, tuple[torch.Tensor, list[torch.Tensor]]]:
        return {name: self.nets[name](crop) for name, crop in crop_regions(img, self.regions).items()}


# ----------------------------------------------------------------------------------------------
# Losses, eq. (7)-(11). All reduce in float32, so they read the same under bf16 autocast.


def softplus_gan(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """-log sigmoid(l) for "real", -log(1 - sigmoid(l)) for "fake": the non-saturating GAN loss."""
    logits = logits.float()
    return F.softplus(-logits).mean() if real else F.softplus(logits).mean()


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """E ||d D(x) / d x||^2 over real images (which must require grad)."""
    (grad,) = torch.autograd.grad(real_logits.float().sum(), real_images, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


def gram_matrix(f: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, C] = F F^T / (C H W)."""
    b, c, h, w = f.shape
    f = f.float().reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


def to_grey(x: torch.Tensor) -> torch.Tensor:
    """RGB -> luma replicated to 3 channels (the identity loss's input, as GFPGAN's)."""
    y = 0.2989 * x[:, 0:1] + 0.5870 * x[:, 1:2] + 0.1140 * x[:, 2:3]
    return y.expand(-1, 3, -1, -1)


class RestoreLosses(nn.Module):
    """Eq. (7)-(11) around two frozen networks: the perceptual features and the face embedder.

    The discriminators are arguments, not members: they have their own optimiser, and under DDP
    the generator step should pass the unwrapped modules with requires_grad off.

        g_total, parts = losses.generator(restored, target, disc, components)
        d_total, parts = losses.discriminator(restored, target, disc, components)
        if step % losses.r1_every == 0: r1, parts = losses.r1(target, disc)
    """

    def __init__(
        self,
        perceptual: nn.Module,
        embedder: nn.Module | None = None,
        *,
        l1_weight: float = 0.1,
        perceptual_weight: float = 1.0,
        adv_weight: float = 0.1,
        r1_weight: float = 10.0,
        r1_every: int = 16,
        local_weight: float = 1.0,
        feature_style_weight: float = 200.0,
        identity_weight: float = 10.0,
        pyramid_weight: float = 0.0,
        identity_grey: bool = True,
    ):
        super().__init__()
        if identity_weight > 0 and embedder is None:
            raise ValueError("RestoreLosses: identity_weight > 0 needs a face embedder")
        self.perceptual = perceptual.requires_grad_(False).eval()
        self.embedder = embedder.requires_grad_(False).eval() if embedder is not None else None
        self.l1_weight, self.perceptual_weight, self.adv_weight = l1_weight, perceptual_weight, adv_weight
        self.r1_weight, self.r1_every = r1_weight, r1_every
        self.local_weight, self.feature_style_weight = local_weight, feature_style_weight
        self.identity_weight, self.pyramid_weight, self.identity_grey = identity_weight, pyramid_weight, identity_grey

    def train(self, mode: bool = True) -> RestoreLosses:
        # Both networks are frozen references: their BatchNorms stay in inference mode.
        return super().train(False)

    def generator(
        self,
        restored: torch.Tensor,
        target: torch.Tensor,
        disc: nn.Module | None = None,
        components: FacialComponents | None = None,
        rgbs: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_total of eq. (11) for the Restorer; parts are detached, for logging."""
        if restored.shape != target.shape:
            raise ValueError(f"RestoreLosses: restored {tuple(restored.shape)} != target {tuple(target.shape)}")
        target = target.detach()
        parts: dict[str, torch.Tensor] = {}
        parts["l1"] = self.l1_weight * F.l1_loss(restored.float(), target.float())
        if self.perceptual_weight:
            parts["perceptual"] = self.perceptual_weight * self.perceptual.loss(restored, target)
        if rgbs is not None and self.pyramid_weight:
            parts["pyramid"] = self.pyramid_weight * sum(
                F.l1_loss(rgb.float(), F.interpolate(target.float(), size=rgb.shape[-2:], mode="bilinear",
                                                      align_corners=False, antialias=True)) for rgb in rgbs)
        if disc is not None and self.adv_weight:
            parts["adv"] = self.adv_weight * softplus_gan(disc(restored), real=True)
        if components is not None:
            fake = components(restored)
            with torch.no_grad():
                real = components(target)
            local, style = 0.0, 0.0
            for name, (logits, feats) in fake.items():
                local = local + softplus_gan(logits, real=True)
                real_feats = real[name][1]
                # GFPGAN halves the shallower feature's weight: its Gram is dominated by colour.
                style = style + 0.5 * F.l1_loss(gram_matrix(feats[0]), gram_matrix(real_feats[0])) \
                    + F.l1_loss(gram_matrix(feats[1]), gram_matrix(real_feats[1]))
            parts["local"] = self.local_weight * local
            parts["feature_style"] = self.feature_style_weight * style
        if self.identity_weight:
            prep = to_grey if self.identity_grey else (lambda t: t)
            with torch.no_grad():
                real_id = self.embedder(prep(target))
            parts["identity"] = self.identity_weight * F.l1_loss(self.embedder(prep(restored)).float(), real_id.float())
        total = sum(parts.values())
        return total, {k: v.detach() for k, v in parts.items()}

    def discriminator(
        self,
        restored: torch.Tensor,
        target: torch.Tensor,
        disc: nn.Module,
        components: FacialComponents | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Global softplus loss, plus the local (component) ones; restored is detached here."""
        restored, target = restored.detach(), target.detach()
        parts = {"d_real": softplus_gan(disc(target), real=True), "d_fake": softplus_gan(disc(restored), real=False)}
        if components is not None:
            real, fake = components(target), components(restored)
            parts["d_local"] = sum(softplus_gan(real[n][0], real=True) + softplus_gan(fake[n][0], real=False) for n in real)
        total = sum(parts.values())
        return total, {k: v.detach() for k, v in parts.items()}

    def r1(self, target: torch.Tensor, disc: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Lazy R1 on the global D: (gamma / 2) * penalty * r1_every, for a step every r1_every."""
        return r1_loss(disc, target, self.r1_weight, self.r1_every)


def r1_loss(disc: nn.Module, real: torch.Tensor, weight: float = 10.0, every: int = 16) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weight / 2) * E||grad D(real)||^2 * every, in float32 (autocast off for the double backward)."""
    real = real.detach().float().requires_grad_(True)
    with torch.autocast(device_type=real.device.type, enabled=False):
        logits = disc(real)
        penalty = r1_penalty(logits, real)
    # `0 * logits` keeps D's output in the graph, so DDP sees every parameter used.
    loss = weight / 2 * penalty * every + 0 * logits.float().mean()
    return loss, {"r1": penalty.detach()}

