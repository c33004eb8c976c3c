"""SynthVox voices: one utterance of an identity by a source-filter model (a Rosenberg glottal
source with jitter, shimmer and breath, formant filtering scaled by the vocal-tract length,
fricatives), then the recording channel (room, microphone, noise, loudness) of its video.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import signal

from avpgan.data.synthvox.identity import Identity

SAMPLE_RATE = 16000
UTTERANCE_SECONDS = (4.0, 20.0)  # VoxCeleb1 keeps utterances of 4 s and longer; cut at 20 s

# Peterson & Barney's adult male vowel formants (F1, F2, F3), scaled per speaker below.
_VOWELS = np.array([[270, 2290, 3010], [390, 1990, 2550], [530, 1840, 2480], [660, 1720, 2410],
                    [730, 1090, 2440], [570, 840, 2410], [440, 1020, 2240], [300, 870, 2240],
                    [640, 1190, 2390], [490, 1350, 1690]], dtype=np.float64)
_REF_VTL = 17.0  # cm; the vocal-tract length those formants belong to
_BANDWIDTHS = np.array([60.0, 90.0, 120.0, 160.0, 220.0])


def utterance_seconds(rng: np.random.Generator, seconds: tuple[float, float]) -> float:
    """A long-tailed length like VoxCeleb1's: most near the minimum, mean ~8 s for 4-20 s."""
    lo, hi = seconds
    return float(min(lo + rng.exponential(0.27 * (hi - lo)), hi))


def _plan_speech(ident: Identity, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Phrases of syllables (optional consonant + vowel) separated by pauses, as time tables."""
    sr = SAMPLE_RATE
    t = rng.uniform(0.1, 0.5)
    end = n / sr - rng.uniform(0.1, 0.4)
    vow = []  # (start, end, amp, vowel)
    fric = []  # (start, end, amp, band)
    pitch = []  # (time, semitones)
    while t < end - 0.3:
        n_syl = int(rng.integers(3, 15))
        rate = ident.rate * math.exp(0.12 * rng.standard_normal())
        question = rng.random() < 0.15
        for j in range(n_syl):
            dur = math.exp(0.25 * rng.standard_normal()) / rate
            if t + dur > end:
                break
            kind = rng.choice(4, p=[0.25, 0.35, 0.25, 0.15])  # none, fricative, plosive, voiced fricative
            v0 = t
            if kind:
                c = dur * rng.uniform(0.25, 0.4)
                band = int(rng.integers(3))
                if kind == 1:
                    fric.append((t, t + c, rng.uniform(0.12, 0.35), band))
                elif kind == 2:  # closure, then a short broadband burst
                    fric.append((t + 0.7 * c, t + 0.7 * c + 0.015, rng.uniform(0.3, 0.6), 2))
                else:
                    fric.append((t, t + c, rng.uniform(0.05, 0.15), band))
                    vow.append((t, t + c - 0.002, 0.25, -1))
                v0 = t + c
            stressed = rng.random() < 0.3
            vow.append((v0, t + dur - 0.002, 1.0 if stressed else rng.uniform(0.5, 0.85),
                        int(rng.integers(len(_VOWELS)))))
            pos = j / max(n_syl - 1, 1)
            st = ident.pitch_range * (0.5 - pos) + 0.4 * rng.standard_normal()
            st += 0.6 * ident.pitch_range * stressed
            if question and j == n_syl - 1:
                st += 1.2 * ident.pitch_range
            pitch.append(((v0 + t + dur) / 2, st))
            t += dur
        t += rng.uniform(0.15, 0.8)
    if not vow:  # never an empty utterance, even for odd lengths
        vow.append((t, min(t + 0.25, n / sr), 1.0, 0))
        pitch.append((t + 0.1, 0.0))
    return {"vowels": np.array(vow, dtype=np.float64), "fric": np.array(fric, dtype=np.float64).reshape(-1, 4),
            "pitch": np.array(pitch, dtype=np.float64)}


def _envelope(segments: np.ndarray, n: int, ramp: float = 0.02) -> np.ndarray:
    """Piecewise-linear amplitude over samples: rise, hold `amp`, fall for each segment."""
    if len(segments) == 0:
        return np.zeros(n)
    s, e, a = segments[:, 0], segments[:, 1], segments[:, 2]
    r = np.minimum(ramp, (e - s) / 3)
    x = np.stack([s, s + r, e - r, e], 1).ravel() * SAMPLE_RATE
    y = np.stack([0 * a, a, a, 0 * a], 1).ravel()
    return np.interp(np.arange(n), x, y, left=0.0, right=0.0)


def _glottal_source(f0: np.ndarray, ident: Identity, rng: np.random.Generator) -> np.ndarray:
    """Rosenberg glottal-flow derivative with jitter, shimmer and breath noise, per sample."""
    sr = SAMPLE_RATE
    phase0 = np.cumsum(f0) / sr
    z = rng.standard_normal(int(phase0[-1]) + 2)
    f0j = f0 * (1.0 + ident.jitter * z[phase0.astype(np.int64)])  # one perturbation per period
    phase = np.cumsum(f0j) / sr
    k = phase.astype(np.int64)
    frac = phase - k
    oq = ident.open_quotient
    tp, tn = 0.62 * oq, 0.38 * oq  # opening and closing shares of the period
    flow = np.where(frac < tp, 0.5 * (1 - np.cos(np.pi * frac / tp)),
                    np.where(frac < oq, np.cos(0.5 * np.pi * (frac - tp) / tn), 0.0))
    flow *= np.maximum(1.0 + ident.shimmer * rng.standard_normal(k[-1] + 2)[k], 0.2)
    # The derivative also stands for lip radiation; scaling by the period keeps loudness
    # independent of pitch.
    src = np.diff(flow, prepend=0.0) * (sr / f0j)
    return src + ident.breathiness * (0.4 + flow) * rng.standard_normal(len(f0))


def _vocal_tract(x: np.ndarray, times: np.ndarray, targets: np.ndarray, bandwidths: np.ndarray,
                 nasality: float) -> np.ndarray:
    """Time-varying all-pole filtering done frame by frame in the frequency domain.

    Each 32 ms frame (8 ms hop) is multiplied by the response of that frame's formant
    resonators; zero-padding to twice the frame keeps the filtering linear, and Hann windows
    at a quarter-frame hop add back to a constant. One batched FFT replaces a per-sample
    loop over changing filter coefficients. `targets` [K, P] are formant frequencies at
    `times` [P] (seconds), joined linearly.
    """
    sr, win_len, hop, nfft = SAMPLE_RATE, 512, 128, 1024
    n = len(x)
    pad = np.concatenate([np.zeros(win_len), x, np.zeros(win_len)])
    frames = np.lib.stride_tricks.sliding_window_view(pad, win_len)[::hop]
    spec = np.fft.rfft(frames * np.hanning(win_len + 1)[:-1], nfft)  # [T, F]
    centres = (np.arange(len(frames)) * hop - win_len / 2) / sr
    formants = np.minimum([np.interp(centres, times, f) for f in targets], 0.46 * sr)

    # Each frame's filter as polynomials in z^-1: the denominator multiplies one
    # (1 - c z^-1 + r^2 z^-2) per resonator, and an FFT of the coefficients gives the whole
    # response at once. A nasal pole-zero pair is added whose zero moves away from its pole
    # as nasality grows (equal pole and zero cancel).
    poles = [(f, bw) for f, bw in zip(formants, bandwidths)]
    zeros = []
    if nasality > 0.02:
        poles.append((np.full(len(frames), 270.0), 100.0))
        zeros.append((np.full(len(frames), 270.0 * (1 + 0.9 * nasality)), 120.0))

    def polynomial(pairs: list) -> np.ndarray:
        poly = np.zeros((len(frames), 2 * len(pairs) + 1))
        poly[:, 0] = 1.0
        for j, (freq, bw) in enumerate(pairs):
            r = math.exp(-math.pi * bw / sr)
            c = (2 * r * np.cos(2 * np.pi * freq / sr))[:, None]
            prev = poly[:, : 2 * j + 1].copy()
            poly[:, 1: 2 * j + 2] -= c * prev
            poly[:, 2: 2 * j + 3] += r * r * prev
        return poly

    a, b = polynomial(poles), polynomial(zeros)
    gain = (a.sum(1) / b.sum(1))[:, None]  # unit gain at DC
    response = gain * np.fft.rfft(b, nfft) / np.fft.rfft(a, nfft)
    out_frames = np.fft.irfft(spec * response, nfft)  # [T, nfft]
    n_frames = out_frames.shape[0]
    out = np.zeros((n_frames - 1) * hop + nfft)
    for j in range(nfft // hop):  # overlap-add, one hop-wide column of every frame at a time
        out[j * hop: j * hop + n_frames * hop] += out_frames[:, j * hop:(j + 1) * hop].reshape(-1)
    return out[win_len: win_len + n] * (2 * hop / win_len)  # Hann at hop N/4 sums to 2


def _channel(rng: np.random.Generator, video: dict, x: np.ndarray) -> np.ndarray:
    """Room, microphone, noise and loudness: the recording, not the speaker."""
    sr, n = SAMPLE_RATE, len(x)
    if video["rt60"] > 0:
        m = int(video["rt60"] * sr)
        tail = rng.standard_normal(m) * 10 ** (-3 * np.arange(m) / m)
        ir = np.concatenate([[1.0], video["wet"] * tail / np.sqrt(np.sum(tail ** 2))])
        x = signal.fftconvolve(x, ir)[:n]
    x = signal.sosfilt(video["eq"], x)
    x = x / (np.sqrt(np.mean(x ** 2)) + 1e-9)
    noise = signal.lfilter([1.0], [1.0, -video["noise_colour"]], rng.standard_normal(n))
    noise /= np.sqrt(np.mean(noise ** 2)) + 1e-9
    snr = rng.uniform(8.0, 40.0)
    x = x + noise * 10 ** (-snr / 20)
    if video["hum"] > 0:
        t = np.arange(n) / sr
        x += video["hum"] * sum(np.sin(2 * np.pi * video["mains"] * h * t) / h for h in (1, 2, 3))
    x *= 10 ** (rng.uniform(-32.0, -16.0) / 20) / (np.sqrt(np.mean(x ** 2)) + 1e-9)
    peak = np.max(np.abs(x))
    return x * (0.98 / peak) if peak > 0.98 else x


def video_channel(rng: np.random.Generator) -> dict:
    """What stays fixed within one video: room, microphone band, noise colour, mains hum."""
    hp, lp = rng.uniform(50, 250), rng.uniform(3400, 7600)
    return {
        "rt60": rng.uniform(0.15, 0.6) if rng.random() < 0.6 else 0.0,
        "wet": rng.uniform(0.1, 0.6),
        "eq": np.concatenate([signal.butter(2, hp, "highpass", fs=SAMPLE_RATE, output="sos"),
                              signal.butter(4, lp, "lowpass", fs=SAMPLE_RATE, output="sos")]),
        "noise_colour": rng.uniform(0.0, 0.97),
        "hum": rng.uniform(0.01, 0.05) if rng.random() < 0.15 else 0.0,
        "mains": 50.0 if rng.random() < 0.5 else 60.0,
    }


def synth_utterance(ident: Identity, rng: np.random.Generator, seconds: tuple[float, float] = UTTERANCE_SECONDS,
                    video: dict | None = None) -> np.ndarray:
    """One utterance of `ident` as float32 in [-1, 1] at 16 kHz: speech, pauses, channel."""
    sr = SAMPLE_RATE
    n = int(round(utterance_seconds(rng, seconds) * sr))
    plan = _plan_speech(ident, rng, n)
    vowels, fric, pitch = plan["vowels"], plan["fric"], plan["pitch"]

    # Melody: syllable targets joined linearly, plus a slow wander.
    t = np.arange(n) / sr
    grid = np.arange(0, n / sr + 0.25, 0.25)
    semis = np.interp(t, pitch[:, 0], pitch[:, 1]) + np.interp(t, grid, 0.3 * rng.standard_normal(len(grid)))
    f0 = ident.f0 * 2 ** (semis / 12)
    voiced = _glottal_source(f0, ident, rng) * _envelope(vowels, n)

    # Formant tracks: vowel targets at vowel centres, glides between them.
    scale = _REF_VTL / ident.vtl
    real = vowels[vowels[:, 3] >= 0]
    centres = (real[:, 0] + real[:, 1]) / 2
    targets = _VOWELS[real[:, 3].astype(int)] * scale * np.exp(0.04 * rng.standard_normal((len(real), 3)))
    targets[:, 0] *= ident.f1_bias
    targets[:, 1] *= ident.f2_bias
    f4 = np.full(len(real), 3500.0 * scale)
    f5 = np.full(len(real), 4500.0 * scale)
    bandwidths = _BANDWIDTHS * (1 + 0.3 * ident.breathiness)
    speech = _vocal_tract(voiced, centres, np.stack([*targets.T, f4, f5]), bandwidths, ident.nasality)
    active = _envelope(vowels, n) > 0.5
    speech /= np.sqrt(np.mean(speech[active] ** 2)) + 1e-9 if active.any() else 1.0

    # Fricatives and bursts: noise in a speaker-scaled band, outside the vocal-tract filter.
    if len(fric):
        bands = [(3800, 7400), (2200, 5200), (1200, 7400)]  # s-like, sh-like, f-like/burst
        noise = rng.standard_normal(n)
        for b, (lo, hi) in enumerate(bands):
            seg = fric[fric[:, 3] == b]
            if len(seg):
                sos = signal.butter(2, [lo * scale, min(hi * scale, 7800)], "bandpass", fs=sr, output="sos")
                band = signal.sosfilt(sos, noise)
                speech += band / (np.std(band) + 1e-9) * _envelope(seg, n, ramp=0.005)

    if video is None:
        video = video_channel(rng)
    return _channel(rng, video, speech).astype(np.float32)
