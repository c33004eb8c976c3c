"""The voice encoder: log-mel [B, mel_bins, T] -> one embed_dim vector per utterance.

Voice2Face's 1-D CNN (the paper's Fig. 2): four Conv1d(k3, s2, p1, no bias) + BatchNorm1d + ReLU
blocks, a final Conv1d(k3, s2, p1, bias) to embed_dim, then the mean over time. Each block halves
T, and the time mean makes the output independent of the length, so 0.3 s to 20 s crops (and
anything longer) share one network. The encoder carries no classifier: the speaker head used to
pre-train it is a separate module that is thrown away afterwards, so the saved encoder is exactly
the network the GAN consumes (and exactly Voice2Face's published `voice_embedding.pth` layout,
see `avpgan.models.convert`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class VoiceEncoder(nn.Module):
    def __init__(self, mel_bins: int = 64, embed_dim: int = 64, channels: Sequence[int] = (256, 384, 576, 864)):
        super().__init__()
        if len(channels) < 1:
            raise ValueError("VoiceEncoder: channels must name at least one block width")
        self.mel_bins = mel_bins
        widths = [mel_bins, *channels]
        self.convs = nn.ModuleList(nn.Conv1d(a, b, 3, 2, 1, bias=False) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(c) for c in channels)
        self.proj = nn.Conv1d(channels[-1], embed_dim, 3, 2, 1, bias=True)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """[B, mel_bins, T] -> [B, embed_dim], not normalised (see `voice_embedding`)."""
        if mel.dim() != 3 or mel.shape[1] != self.mel_bins or mel.shape[2] < 1:
            raise ValueError(
                f"VoiceEncoder: expected a log-mel batch [B, {self.mel_bins}, T>=1], got {tuple(mel.shape)}"
            )
        x = mel
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x)))
        return self.proj(x).mean(dim=2)


class SpeakerHead(nn.Module):
    """Linear speaker classifier on the encoder output, for cross-entropy pre-training only."""

    def __init__(self, embed_dim: int, num_speakers: int):
        super().__init__()
        self.fc = nn.Linear(embed_dim, num_speakers)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.fc(embedding)


def voice_embedding(encoder_out: torch.Tensor, noise_std: float = 0.0) -> torch.Tensor:
    """L2-normalised embedding the generator consumes.

    With noise_std > 0 (training), Voice2Face's perturbation: add noise_std * N(0, 1) to the unit
    vector and normalise again, so that G sees a small neighbourhood of each voice rather than
    a single point and does not memorise one face per utterance.
    """
    e = F.normalize(encoder_out.flatten(1), dim=1)
    if noise_std > 0:
        e = F.normalize(e + noise_std * torch.randn_like(e), dim=1)
    return e
