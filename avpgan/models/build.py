"""Config section -> module, one function per network.

The networks take plain arguments (the paper's knobs) so they work without any config; these
helpers are the one place that maps the `model.*` dataclasses of avpgan/config.py onto them,
field for field. They read attributes only, so any object with the same fields works too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from avpgan.models import arcface
from avpgan.models.face_gan import FaceDiscriminator, Generator
from avpgan.models.face_prior import StyleDiscriminator, StyleGAN2Prior
from avpgan.models.restore import Restorer
from avpgan.models.restore_losses import FacialComponents
from avpgan.models.voice import VoiceEncoder

if TYPE_CHECKING:  # type hints only: models/ must import without the config module
    from avpgan.config import DiscriminatorConfig, EmbedderConfig, GeneratorConfig, RestorerConfig, VoiceConfig


def build_voice_encoder(cfg: VoiceConfig) -> VoiceEncoder:
    return VoiceEncoder(mel_bins=cfg.mel_bins, embed_dim=cfg.embed_dim, channels=tuple(cfg.channels))


def _conv_stack(cfg: GeneratorConfig | DiscriminatorConfig) -> dict:
    """The fields G's and D's sections share, mapped the same way for both networks."""
    return dict(channels=tuple(cfg.channels), spectral_norm=cfg.spectral_norm, cbam=cfg.cbam,
                cbam_layers=tuple(cfg.cbam_layers), cbam_reduction=cfg.cbam_reduction, init=cfg.init,
                embed_dim=cfg.embed_dim)


def build_generator(cfg: GeneratorConfig) -> Generator:
    """G; its input width `embed_dim` is the voice embedding's (config.validate checks they agree)."""
    return Generator(**_conv_stack(cfg), batch_norm=cfg.batch_norm, tanh=cfg.tanh, upsample=cfg.upsample)


def build_discriminator(cfg: DiscriminatorConfig, num_identities: int) -> FaceDiscriminator:
    """D and C on one trunk, `cfg.embed_dim` wide at its output; `num_identities` sizes C's head."""
    return FaceDiscriminator(num_identities, **_conv_stack(cfg))


def build_embedder(cfg: EmbedderConfig) -> arcface.IResNet:
    """The ArcFace backbone (the margin head is the embedder stage's, not part of the network)."""
    if cfg.arch not in arcface.ARCHS:
        raise ValueError(f"model.embedder.arch: unknown backbone '{cfg.arch}' (known: {', '.join(arcface.ARCHS)})")
    return arcface.ARCHS[cfg.arch](width=cfg.width, embed_dim=cfg.embed_dim, input_size=cfg.input_size, dropout=cfg.dropout)


def build_prior(cfg: RestorerConfig) -> StyleGAN2Prior:
    """The restoration model's face prior, as the `prior` stage trains it and the Restorer holds it."""
    return StyleGAN2Prior(cfg.out_size, cfg.prior_channels, cfg.style_dim, n_mlp=cfg.mapping_layers, noise=cfg.noise)


def build_restorer(cfg: RestorerConfig) -> Restorer:
    """U-Net + prior with CS-SFT; the pyramid's RGB heads exist only when their loss is trained
    (an unused parameter would stop DDP)."""
    return Restorer(out_size=cfg.out_size, unet_channels=cfg.unet_channels, prior_channels=cfg.prior_channels,
                    style_dim=cfg.style_dim, n_mlp=cfg.mapping_layers, noise=cfg.noise, freeze_prior=cfg.freeze_prior,
                    rgb_outputs=cfg.pyramid_weight > 0)


def build_style_discriminator(cfg: RestorerConfig) -> StyleDiscriminator:
    """The whole-face discriminator of the prior and restore stages."""
    return StyleDiscriminator(cfg.out_size, cfg.prior_channels)


def build_components(cfg: RestorerConfig) -> FacialComponents:
    """The restore stage's eye and mouth discriminators (GFPGAN's facial component loss)."""
    return FacialComponents(max(8, cfg.prior_channels // 2))
