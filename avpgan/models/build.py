"""Config section -> module, one function per network.

The networks take plain arguments (the paper's knobs) so they work without any config; these
helpers are the one place that maps the `model.*` dataclasses of avpgan/config.py onto them,
field for field. They read attributes only, so any object with the same fields works too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from avpgan.models.face_gan import FaceDiscriminator, Generator
from avpgan.models.voice import VoiceEncoder

if TYPE_CHECKING:  # type hints only: models/ must import without the config module
    from avpgan.config import DiscriminatorConfig, GeneratorConfig, VoiceConfig


def build_voice_encoder(cfg: VoiceConfig) -> VoiceEncoder:
    return VoiceEncoder(mel_bins=cfg.mel_bins, embed_dim=cfg.embed_dim, channels=tuple(cfg.channels))


def build_generator(cfg: GeneratorConfig) -> Generator:
    return Generator(
        embed_dim=cfg.embed_dim,
        channels=tuple(cfg.channels),
        spectral_norm=cfg.spectral_norm,
        cbam=cfg.cbam,
        cbam_layers=tuple(cfg.cbam_layers),
        cbam_reduction=cfg.cbam_reduction,
        batch_norm=cfg.batch_norm,
        tanh=cfg.tanh,
        init=cfg.init,
        upsample=cfg.upsample,
    )


def build_discriminator(cfg: DiscriminatorConfig, num_identities: int, embed_dim: int | None = None) -> FaceDiscriminator:
    """`embed_dim` overrides cfg.embed_dim (kept for sections written before that field existed)."""
    return FaceDiscriminator(
        num_identities,
        channels=tuple(cfg.channels),
        spectral_norm=cfg.spectral_norm,
        cbam=cfg.cbam,
        cbam_layers=tuple(cfg.cbam_layers),
        cbam_reduction=cfg.cbam_reduction,
        embed_dim=embed_dim if embed_dim is not None else getattr(cfg, "embed_dim", 64),
        init=cfg.init,
    )
