"""How fast SynthVox writes voices and faces, and why its vocal tract is filtered in the FFT domain.

    python benchmarks/bench_synth.py [--identities 40 --utterances 4 --faces 4 --workers 1 2]

Prints:
1. the time-varying vocal-tract filter on one 8 s utterance: SynthVox's batched FFT
   (one multiply per 8 ms frame) against the obvious alternative, a cascade of scipy lfilter
   resonators re-tuned every 8 ms with the filter state carried over (a Python loop);
2. `synthvox.generate` with 1 and 2 worker processes, voices and faces timed in separate runs
   (default VoxCeleb1-like lengths, 4-20 s, mean ~8 s): utterances/s, audio seconds per second
   (against real time, 1.0x), faces/s, the speed-up over one worker, and the time projected for
   3,000 utterances and for a VoxCeleb1-sized set (153,516 utterances).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import signal

from avpgan.data import synthvox

VOXCELEB1_UTTERANCES = 153_516


def vocal_tract_lfilter(x: np.ndarray, times: np.ndarray, targets: np.ndarray, bandwidths: np.ndarray) -> np.ndarray:
    """The per-frame time-domain reference: 5 two-pole resonators per 8 ms hop, state carried."""
    sr, hop = synthvox.SAMPLE_RATE, 128
    y = x.copy()
    for k in range(targets.shape[0]):
        zi = np.zeros(2)
        r = np.exp(-np.pi * bandwidths[k] / sr)
        out = np.empty_like(y)
        for s in range(0, len(y), hop):
            f = np.interp((s + hop / 2) / sr, times, targets[k])
            c = 2 * r * np.cos(2 * np.pi * f / sr)
            out[s:s + hop], zi = signal.lfilter([1 - c + r * r], [1, -c, r * r], y[s:s + hop], zi=zi)
        y = out
    return y


def filter_speeds() -> None:
    ident = synthvox.draw_identities(12, 0)[0]
    rng = np.random.default_rng(0)
    n = 8 * synthvox.SAMPLE_RATE
    x = rng.standard_normal(n)
    times = np.linspace(0, 8, 40)
    targets = np.stack([synthvox.voice._VOWELS[rng.integers(10, size=40)][:, j] for j in range(3)]
                       + [np.full(40, 3500.0), np.full(40, 4500.0)])
    bw = synthvox.voice._BANDWIDTHS

    def best(fn, reps=3):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    t_fft = best(lambda: synthvox.voice._vocal_tract(x, times, targets, bw, ident.nasality))
    t_lf = best(lambda: vocal_tract_lfilter(x, times, targets, bw))
    t_utt = best(lambda: synthvox.synth_utterance(ident, np.random.default_rng(1), (8.0, 8.0)))
    print("1. vocal-tract filter, one 8 s utterance, one core")
    print(f"   batched FFT (SynthVox)          {1000 * t_fft:8.1f} ms   {8 / t_fft:7.0f}x real time")
    print(f"   per-frame lfilter (reference)   {1000 * t_lf:8.1f} ms   {8 / t_lf:7.0f}x real time")
    print(f"   whole utterance (source, filter, fricatives, channel): {1000 * t_utt:.1f} ms, "
          f"{8 / t_utt:.0f}x real time")


def generate_speeds(identities: int, utterances: int, faces: int, workers: list[int]) -> None:
    load = os.getloadavg()[0]
    print(f"2. synthvox.generate, {identities} identities x {utterances} utterances (4-20 s) "
          f"and x {faces} faces, wall clock incl. process start (~1 s per spawned worker); "
          f"load average {load:.1f} on {os.cpu_count()} cores")
    print(f"   {'workers':>7} {'utt/s':>8} {'audio s/s':>10} {'vs real time':>13} {'faces/s':>8} "
          f"{'speed-up':>9} {'3k utt':>8} {'VoxCeleb1-size':>15}")
    base = None
    for w in workers:
        tmp = Path(tempfile.mkdtemp(prefix="bench_synth_"))
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                v = synthvox.generate(tmp / "v", identities, utterances, 0, seed=0, workers=w)
                f = synthvox.generate(tmp / "f", identities, 0, faces, seed=0, workers=w)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        ups = v["utterances"] / v["seconds"]
        fps = f["faces"] / f["seconds"]
        base = base or ups
        xrt = v["audio_seconds"] / v["seconds"]
        print(f"   {w:>7} {ups:>8.2f} {xrt:>10.1f} {'1.0x -> %.0fx' % xrt:>13} "
              f"{fps:>8.1f} {ups / base:>8.2f}x {3000 / ups / 60:>6.1f} m {VOXCELEB1_UTTERANCES / ups / 3600:>13.1f} h")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--identities", type=int, default=40)
    p.add_argument("--utterances", type=int, default=4)
    p.add_argument("--faces", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    filter_speeds()
    generate_speeds(args.identities, args.utterances, args.faces, args.workers)


if __name__ == "__main__":
    main()
