"""The log-mel against an independent float64 numpy reference, and torchaudio where it loads."""

import importlib.util

import librosa
import numpy as np
import pytest
import torch

from avpgan.config import FeatureConfig
from avpgan.features import LogMel, mel_filterbank


def reference_logmel(x: np.ndarray, cfg: FeatureConfig, sr: int = 16000) -> np.ndarray:
    """Voice2Face's recipe written out in float64 numpy, frame by frame."""
    win, hop = int(sr * cfg.win_ms / 1000), int(sr * cfg.hop_ms / 1000)
    x = np.concatenate([x[:1], x[1:] - cfg.preemphasis * x[:-1]])
    frames = librosa.util.frame(x, frame_length=win, hop_length=hop).T  # [T, win]
    window = np.hamming(win + 1)[:-1]  # periodic Hamming
    spec = np.abs(np.fft.rfft(frames * window, n=cfg.n_fft)) ** 2  # [T, F]
    fb = librosa.filters.mel(sr=sr, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax, htk=True, norm=None)
    logmel = np.log(np.maximum(spec @ fb.T.astype(np.float64), cfg.log_floor)).T  # [M, T]
    return (logmel - logmel.mean(1, keepdims=True)) / (logmel.std(1, keepdims=True) + 1e-5)


def speechlike(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    x = 0.3 * np.sin(2 * np.pi * (120 + 40 * np.sin(2 * np.pi * 0.5 * t)) * t) + 0.02 * rng.standard_normal(t.size)
    return (x * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)).astype(np.float32)


def test_matches_float64_reference_on_int16_batch():
    cfg = FeatureConfig()
    clips = [speechlike(2.0, s) for s in range(3)]
    pcm = np.stack([np.round(c * 32767).astype(np.int16) for c in clips])
    got = LogMel(cfg)(torch.from_numpy(pcm)).numpy()
    assert got.shape == (3, 64, 1 + (32000 - 400) // 160)
    for i in range(3):
        want = reference_logmel(pcm[i].astype(np.float64) / 32768.0, cfg)
        np.testing.assert_allclose(got[i], want, atol=2e-3)
        # normalised per bin per utterance
        np.testing.assert_allclose(got[i].mean(1), 0, atol=1e-4)


def test_frame_count_and_short_input_error():
    lm = LogMel(FeatureConfig())
    assert lm.num_frames(16000 * 8) == 798
    with pytest.raises(ValueError, match="shorter than one"):
        lm(torch.zeros(1, 100))


def test_filterbank_spans_configured_band():
    cfg = FeatureConfig()
    fb = mel_filterbank(cfg, 16000)
    freqs = np.linspace(0, 8000, fb.shape[1])
    used = freqs[fb.sum(0) > 0]
    assert fb.shape == (64, 257)
    assert used.min() >= 20 and used.max() <= 7200


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_same_numbers_on_gpu():
    pcm = torch.from_numpy(np.round(speechlike(4.0, 7) * 32767).astype(np.int16))[None]
    lm = LogMel(FeatureConfig())
    np.testing.assert_allclose(lm.cuda()(pcm.cuda()).cpu().numpy(), LogMel(FeatureConfig())(pcm).numpy(), atol=1e-3)


def _torchaudio_loads() -> bool:
    if importlib.util.find_spec("torchaudio") is None:
        return False
    try:
        import torchaudio  # noqa: F401
    except (OSError, ImportError):
        return False
    return True


@pytest.mark.skipif(not _torchaudio_loads(), reason="torchaudio's C++ extension does not load with this torch (CPU build)")
def test_filterbank_equals_torchaudio():
    """Where torchaudio loads (GPU builds), its HTK filterbank is the same matrix as ours."""
    import torchaudio

    cfg = FeatureConfig()
    ta = torchaudio.functional.melscale_fbanks(
        n_freqs=cfg.n_fft // 2 + 1, f_min=cfg.fmin, f_max=cfg.fmax, n_mels=cfg.n_mels, sample_rate=16000,
        norm=None, mel_scale="htk",
    )
    np.testing.assert_allclose(mel_filterbank(cfg, 16000), ta.T.numpy(), atol=1e-5)
