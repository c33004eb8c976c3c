"""The one log-mel implementation: Voice2Face's features, batched, on whatever device the audio is.

Why not precompute features into the shards: the GPU step eats 20-40k samples/s, a CPU log-mel
runs ~250 clips/s per core, while on the device it costs almost nothing. So shards keep 16 kHz
audio and this module runs inside the training step (and in evaluation / generation), giving
the same numbers on CPU and GPU because it is plain float32 torch.

Why not torchaudio: its C++ extension fails to import on CPU-only torch builds (every PyPI
torchaudio wheel is a CUDA build), so the filterbank comes from librosa (HTK scale, no area
normalisation, matching torchaudio's defaults) and the FFT from torch.fft.
"""

from __future__ import annotations

import librosa
import numpy as np
import torch
from torch import nn

from avpgan.config import FeatureConfig


def mel_filterbank(cfg: FeatureConfig, sample_rate: int) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] triangular filters, HTK mel scale, unnormalised (as torchaudio)."""
    return librosa.filters.mel(
        sr=sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax,
        htk=True, norm=None,
    ).astype(np.float32)


class LogMel(nn.Module):
    """Audio [B, S] (int16 PCM or float in [-1, 1]) -> log-mel [B, n_mels, T], T = 1 + (S - win) // hop.

    Steps (Voice2Face): pre-emphasis 0.97, 25 ms Hamming window, 10 ms hop, power spectrum,
    64 mel filters 20-7200 Hz, log(max(power, 1e-5)), then mean/std per mel bin over the
    utterance. Frames are not centred/padded, so no frame sees invented samples.
    """

    def __init__(self, cfg: FeatureConfig | None = None, sample_rate: int = 16000):
        super().__init__()
        self.cfg = cfg or FeatureConfig()
        self.win = int(round(sample_rate * self.cfg.win_ms / 1000))
        self.hop = int(round(sample_rate * self.cfg.hop_ms / 1000))
        if self.win > self.cfg.n_fft:
            raise ValueError(f"window of {self.win} samples is longer than n_fft={self.cfg.n_fft}")
        self.register_buffer("window", torch.hamming_window(self.win, periodic=True), persistent=False)
        self.register_buffer("fbank", torch.from_numpy(mel_filterbank(self.cfg, sample_rate)), persistent=False)

    def num_frames(self, num_samples: int) -> int:
        return 1 + (num_samples - self.win) // self.hop

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        if audio.dim() != 2:
            raise ValueError(f"expected audio [B, S], got shape {tuple(audio.shape)}")
        if audio.shape[1] < self.win:
            raise ValueError(f"audio of {audio.shape[1]} samples is shorter than one {self.win}-sample window")
        x = audio.float()
        if audio.dtype == torch.int16:
            x = x / 32768.0
        if self.cfg.preemphasis:
            x = torch.cat([x[:, :1], x[:, 1:] - self.cfg.preemphasis * x[:, :-1]], dim=1)
        # Frames of exactly `win` samples starting every `hop`, zero-padded to n_fft for the FFT
        # (torch.stft would centre the window inside n_fft-long frames and drop the last frame).
        frames = x.unfold(1, self.win, self.hop) * self.window  # [B, T, win]
        spec = torch.fft.rfft(frames, n=self.cfg.n_fft)  # [B, T, F]
        power = spec.real.square() + spec.imag.square()
        mel = torch.matmul(power, self.fbank.T).transpose(1, 2)  # [B, n_mels, T]
        logmel = torch.log(torch.clamp(mel, min=self.cfg.log_floor))
        if self.cfg.normalize:
            mean = logmel.mean(dim=2, keepdim=True)
            std = logmel.std(dim=2, keepdim=True, unbiased=False)
            logmel = (logmel - mean) / (std + 1e-5)
        return logmel
