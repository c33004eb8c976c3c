"""The restoration losses, eq. (7)-(11), and the facial component discriminators they train.

- `RestoreLosses` (generator side: L1, perceptual, global adversarial, facial component
  adversarial + Gram feature style, identity; discriminator side: global and local softplus,
  R1 on the global one), plus the plain functions they use (`softplus_gan`, `r1_penalty`,
  `r1_loss`, `gram_matrix`, `to_grey`).
- `FacialComponents`: one `ComponentDiscriminator` per facial component. Components are cut
  with fixed fractional boxes of the aligned face (`REGIONS`, `region_box`, `crop_regions`), so
  they exist at every image size (docs/models.md has the reasoning).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from avpgan.models.stylegan2_blocks import EqualConv2d, LReLU


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
