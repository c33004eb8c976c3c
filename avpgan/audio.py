"""Audio in: decode any file to 16 kHz float mono, drop silence, store as int16, cut crops.

soundfile (libsndfile) is the decoder: it reads wav/flac/ogg exactly and fast. librosa's loader
is only the fallback for formats libsndfile does not know (it goes through audioread). torchaudio
is not used here because its C++ extension does not load on CPU-only machines.
"""

from __future__ import annotations

import warnings
import wave
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf

INT16_SCALE = 32768.0  # soundfile's float <-> PCM_16 convention, so a 16-bit wav round-trips exactly


class AudioError(ValueError):
    """A file that cannot be decoded; the message names the file and the problem, `reason` says
    which kind of problem in a few fixed words (for counting)."""

    def __init__(self, message: str, reason: str = "unreadable audio"):
        super().__init__(message)
        self.reason = reason


def _declared_wav_frames(path: Path) -> int | None:
    """Frames a PCM WAV header promises, or None when the stdlib cannot tell (float, extensible).

    libsndfile quietly reads what is there when a WAV was cut short, so a truncated upload would
    otherwise become a shorter clip without anyone noticing.
    """
    try:
        with wave.open(str(path), "rb") as w:
            return w.getnframes()
    except (wave.Error, EOFError, OSError):
        return None


# Below this a recording holds nothing of a voice but its lowest harmonics (speech features reach
# 4 kHz; 8 kHz telephone audio is the usual floor): resampled, it would give a face of noise.
MIN_SAMPLE_RATE = 4000


def read_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Decode `path` to float32 mono at `sample_rate` (stereo is averaged, rate resampled)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise AudioError(f"{path}: cannot read audio ({e.strerror or e})") from None
    if size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)", "empty file")
    try:
        y, sr = sf.read(str(path), dtype="float32", always_2d=True)
        if path.suffix.lower() == ".wav":
            declared = _declared_wav_frames(path)
            if declared is not None and declared > len(y):
                raise AudioError(f"{path}: truncated audio (header declares {declared} frames, file holds {len(y)})", "truncated audio")
        y = y.mean(axis=1) if y.shape[1] > 1 else y[:, 0]
    except sf.LibsndfileError as first:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # librosa warns that it is falling back
                y, sr = librosa.load(str(path), sr=None, mono=True, dtype=np.float32)
        except Exception as second:  # audioread raises several unrelated types
            raise AudioError(f"{path}: cannot decode audio ({first}; fallback: {type(second).__name__}: {second})") from None
    if sr < MIN_SAMPLE_RATE:
        raise AudioError(f"{path}: sample rate {sr} Hz is too low for speech (need at least {MIN_SAMPLE_RATE} Hz)",
                         "sample rate too low")
    return resample(np.ascontiguousarray(y, dtype=np.float32), int(sr), sample_rate)


def resample(y: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """librosa's soxr (high quality) resampler; identity when the rates agree."""
    if orig_sr == target_sr or y.size == 0:
        return y.astype(np.float32, copy=False)
    return librosa.resample(y, orig_sr=orig_sr, target_sr=target_sr, res_type="soxr_hq").astype(np.float32)


def remove_silence(y: np.ndarray, top_db: float) -> np.ndarray:
    """Keep the voiced stretches: frames within `top_db` of the utterance's loudest frame.

    librosa's split is relative to the peak, so an all-zero signal would count as entirely
    voiced; anything that would round to all-zero int16 is therefore returned empty.
    """
    if y.size == 0 or float(np.max(np.abs(y))) < 0.5 / INT16_SCALE:
        return y[:0]
    intervals = librosa.effects.split(y, top_db=top_db)
    if len(intervals) == 0:
        return y[:0]
    return np.concatenate([y[a:b] for a, b in intervals])


def to_int16(y: np.ndarray) -> np.ndarray:
    """Float in [-1, 1) to int16, clipping what lies outside (resampling can overshoot)."""
    return np.clip(np.round(y * INT16_SCALE), -32768, 32767).astype(np.int16)


def from_int16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / INT16_SCALE


# Clips of a fixed length. Training, the embedding bank, evaluation and generation all cut voices
# here, so a clip means the same thing in each: a window of the voiced audio when it is long
# enough, else the audio repeated end to end (Voice2Face's treatment of short test utterances).


def tile(audio: np.ndarray, length: int) -> np.ndarray:
    """`audio` repeated end to end and cut at `length` samples from the start."""
    if len(audio) == 0:
        raise ValueError("tile: empty audio")
    return np.tile(audio, -(-length // len(audio)))[:length]


def crop_or_tile(audio: np.ndarray, length: int, rng: np.random.Generator | None) -> np.ndarray:
    """A clip of exactly `length` samples.

    Longer utterances give a random window drawn from `rng` (the training crop), or the centred
    window when `rng` is None (evaluation: the same clip every time); shorter ones are tiled.
    """
    n = len(audio)
    if n == 0:
        raise ValueError("crop_or_tile: empty audio")
    if n <= length:  # no draw for an exact fit: the stream's later draws from `rng` stay put
        return tile(audio, length) if n < length else audio
    start = int(rng.integers(0, n - length + 1)) if rng is not None else (n - length) // 2
    return audio[start : start + length]


def windows(audio: np.ndarray, length: int) -> np.ndarray:
    """[n, length]: as many consecutive windows as fit, centred in `audio`, or the tiled audio
    when it is shorter than one (generate averages the embeddings of all windows of a file)."""
    n = len(audio) // length
    if n == 0:
        return tile(audio, length)[None]
    start = (len(audio) - n * length) // 2
    return audio[start : start + n * length].reshape(n, length)
