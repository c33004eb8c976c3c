"""Plain torch.nn networks and losses; nothing here imports from train/ or data/.

    VoiceEncoder, SpeakerHead, voice_embedding   log-mel -> unit voice embedding (voice.py)
    CBAM                                         eq. (2)-(5) attention block (cbam.py)
    Generator, FaceDiscriminator                 the face GAN: G, and D + C on one trunk (face_gan.py)
    d_loss, c_loss, g_loss                       eq. (12)-(14) (losses.py)
    diff_augment                                 differentiable augmentation of D's inputs (augment.py)
    build_voice_encoder, build_generator,
    build_discriminator, build_embedder,
    build_prior, build_restorer,
    build_style_discriminator, build_components  config section -> module: every network (build.py)
    convert_file, load_converted                 Voice2Face .pth -> safetensors (convert.py)
"""

from avpgan.models.augment import diff_augment
from avpgan.models.build import (
    build_components, build_discriminator, build_embedder, build_generator, build_prior, build_restorer,
    build_style_discriminator, build_voice_encoder,
)
from avpgan.models.cbam import CBAM
from avpgan.models.convert import ConversionError, convert_file, load_converted
from avpgan.models.face_gan import FaceDiscriminator, Generator
from avpgan.models.losses import c_loss, d_loss, g_loss
from avpgan.models.voice import SpeakerHead, VoiceEncoder, voice_embedding

# Face embedder (arcface.py), restoration model (restore.py) with its face GAN prior
# (face_prior.py) and its losses (restore_losses.py), training pairs (degrade.py) and the
# perceptual features (perceptual.py); docs/models.md explains the choices.
from avpgan.models.arcface import IResNet, ArcMarginLoss, iresnet18, iresnet34, iresnet50, iresnet100
from avpgan.models.degrade import DegradeParams, degrade
from avpgan.models.perceptual import PerceptualError, PerceptualNet
from avpgan.models.face_prior import StyleDiscriminator, StyleGAN2Prior
from avpgan.models.restore import Restorer
from avpgan.models.restore_losses import (
    FacialComponents, RestoreLosses, gram_matrix, r1_loss, r1_penalty, softplus_gan,
)
