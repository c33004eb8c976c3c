"""Why the shards store one raw binary member per sample, and how fast a build runs.

    python benchmarks/bench_shards.py [--identities 32 --utterances 8 --seconds 8]

Prints, on one CPU core unless stated:
1. decode speed and size of one 8 s utterance as WAV (soundfile), FLAC (soundfile), .npy
   (np.load) and raw int16 (np.frombuffer), and of a face at 64 and 128 px as PNG, JPEG q95,
   .npy and raw uint8: the candidates side by side;
2. webdataset's tar reading with the same bytes split into 4, 2 or 1 members per sample;
3. shard build throughput (utterances/s, and per worker) with 1 and 2 worker processes on a
   generated VoxCeleb/VGGFace-layout tree of 8 s 16 kHz wavs and 224 px JPEG faces, and the
   whole read path of the result (tar parsing + decode_sample).
The GPU step eats 20-40k samples/s per GPU: divide that by the read path's rate for the loader
cores one GPU needs.
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
import soundfile as sf
from PIL import Image

from avpgan.config import DataConfig
from avpgan.data import shards, shards_build

SR = 16000


def rate(fn, min_time: float = 0.5) -> float:
    """Calls per second of fn(), after one warm-up call, over at least min_time seconds."""
    fn()
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < min_time:
        for _ in range(10):
            fn()
        n += 10
    return n / elapsed


def speech(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Harmonic, pitch- and amplitude-modulated tone with pauses and a little noise."""
    t = np.arange(int(seconds * SR)) / SR
    f0 = rng.uniform(90, 250) * (1 + 0.1 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    y = sum(np.sin(k * phase) / k for k in range(1, 8)) * np.clip(np.sin(2 * np.pi * 0.4 * t) + 0.3, 0, None)
    return (0.25 * y / np.abs(y).max() + 0.003 * rng.standard_normal(t.size)).astype(np.float32)


def face(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour field plus sensor-like noise: compresses roughly like a face photo."""
    y, x = np.mgrid[:size, :size] / size
    base = rng.uniform(60, 190, 3)
    img = np.stack([base[c] + 60 * np.sin(5 * x + c) * np.cos(4 * y + 2 * c) for c in range(3)], -1)
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def encoded(fmt: str, write) -> bytes:
    b = io.BytesIO()
    write(b, fmt)
    return b.getvalue()


def bench_formats() -> None:
    rng = np.random.default_rng(0)
    pcm = np.clip(np.round(speech(rng, 8.0) * 32768), -32768, 32767).astype(np.int16)
    wav = encoded("WAV", lambda b, f: sf.write(b, pcm, SR, format=f, subtype="PCM_16"))
    flac = encoded("FLAC", lambda b, f: sf.write(b, pcm, SR, format=f, subtype="PCM_16"))
    npy = encoded("", lambda b, f: np.save(b, pcm))
    raw = pcm.tobytes()
    rows = [
        ("WAV PCM_16 (soundfile)", len(wav), rate(lambda: sf.read(io.BytesIO(wav), dtype="int16"))),
        ("FLAC (soundfile)", len(flac), rate(lambda: sf.read(io.BytesIO(flac), dtype="int16"))),
        (".npy int16 (np.load)", len(npy), rate(lambda: np.load(io.BytesIO(npy)))),
        ("raw int16 (np.frombuffer)  <- stored", len(raw), rate(lambda: np.frombuffer(raw, "<i2"))),
    ]
    print("audio: one 8 s utterance, 16 kHz mono, decode on one core")
    print(f"  {'format':38s} {'bytes':>9s} {'decodes/s':>11s} {'us each':>9s}")
    for name, size, r in rows:
        print(f"  {name:38s} {size:9d} {r:11.0f} {1e6 / r:9.1f}")
    for side in (64, 128):
        img = np.asarray(Image.fromarray(face(rng, 224)).resize((side, side), Image.LANCZOS))
        png = encoded("PNG", lambda b, f: Image.fromarray(img).save(b, f))
        jpg = encoded("JPEG", lambda b, f: Image.fromarray(img).save(b, f, quality=95))
        npy = encoded("", lambda b, f: np.save(b, img))
        raw = img.tobytes()
        rows = [
            ("PNG (PIL)", len(png), rate(lambda: np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))),
            ("JPEG q95 (PIL)", len(jpg), rate(lambda: np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")))),
            (".npy uint8 (np.load)", len(npy), rate(lambda: np.load(io.BytesIO(npy)))),
            ("raw uint8 (np.frombuffer)  <- stored", len(raw), rate(lambda: np.frombuffer(raw, np.uint8).reshape(side, side, 3))),
        ]
        print(f"face {side}x{side} RGB, decode on one core")
        for name, size, r in rows:
            print(f"  {name:38s} {size:9d} {r:11.0f} {1e6 / r:9.1f}")


def bench_members() -> None:
    """Per-member cost of webdataset's tar reader: same bytes, different member counts."""
    import tarfile

    import webdataset as wds  # imported here: spawned build workers re-import this file

    rng = np.random.default_rng(2)
    parts = [b"{" + b"x" * 500 + b"}", rng.bytes(256000), rng.bytes(64 * 64 * 3), rng.bytes(128 * 128 * 3)]
    layouts = {"4 (json|audio|face|face128)": parts, "2 (json|bin)  <- stored": [parts[0], b"".join(parts[1:])],
               "1 (everything)": [b"".join(parts)]}
    print("tar reading (webdataset tarfile_to_samples), 512 samples of 318 KB, one core")
    with tempfile.TemporaryDirectory() as tmp:
        for name, members in layouts.items():
            path = f"{tmp}/t.tar"
            with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
                for i in range(512):
                    for j, b in enumerate(members):
                        info = tarfile.TarInfo(f"{i:06d}.m{j}")
                        info.size = len(b)
                        t.addfile(info, io.BytesIO(b))
            runs = []
            for _ in range(5):
                t0 = time.perf_counter()
                k = sum(1 for _ in wds.DataPipeline(wds.SimpleShardList([path]), wds.tarfile_to_samples()))
                runs.append(k / (time.perf_counter() - t0))
            print(f"  members per sample {name:28s} {sorted(runs)[2]:8.0f} samples/s (median of 5)")


def make_tree(root: Path, identities: int, utterances: int, seconds: float) -> dict:
    rng = np.random.default_rng(1)
    rows = []
    for i in range(identities):
        name = f"{'ACFHKMPRTW'[i % 10]}{i:03d}_Person"  # spread over val / test / train
        vid = f"id1{i:04d}"
        for u in range(utterances):
            p = root / "wav" / vid / f"video{u % 3}" / f"{u:05d}.wav"
            p.parent.mkdir(parents=True, exist_ok=True)
            sf.write(p, speech(rng, seconds * rng.uniform(0.7, 1.3)), SR, subtype="PCM_16")
        for f in range(max(1, utterances // 2)):
            p = root / "faces" / name / f"{f:04d}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(face(rng, 224)).save(p, quality=90)
        rows.append(f"{vid}\t{name}\tm\tNowhere\tdev")
    meta = root / "vox1_meta.csv"
    meta.write_text("VoxCeleb1 ID\tVGGFace1 ID\tGender\tNationality\tSet\n" + "\n".join(rows) + "\n")
    return {"voxceleb": root / "wav", "vggface": root / "faces", "meta": meta}


def bench_build(identities: int, utterances: int, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tree = make_tree(tmp / "raw", identities, utterances, seconds)
        n = identities * utterances
        print(f"shard build: {n} utterances of ~{seconds:.0f} s (16 kHz wav), faces 224 px jpg, "
              f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
        outs, timings = [], []
        # The first build in a process pays librosa's lazy imports (~3-5 s); the second shows the
        # steady rate per core; with 2 workers each spawned process pays its own start-up.
        for label, workers in (("workers=1, first in process", 1), ("workers=1, warm", 1), ("workers=2, spawned", 2)):
            out = tmp / f"out{len(outs)}"
            t0 = time.perf_counter()
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                shards_build.build(tree["voxceleb"], tree["vggface"], tree["meta"], out, DataConfig(), 32, workers)
            dt = time.perf_counter() - t0
            print(f"  {label:28s} {dt:6.1f} s  {n / dt:7.1f} utterances/s  {n / dt / workers:7.1f} per worker")
            outs.append(out)
            timings.append(dt)
        print(f"  full VoxCeleb1 (153,516 utterances) at the warm rate: {153516 / (n / timings[1]) / 3600:.1f} core-hours")
        same = all((outs[0] / p.name).read_bytes() == p.read_bytes() for o in outs[1:] for p in sorted(o.glob("*.tar")))
        print(f"  shards byte-identical across worker counts: {same}")
        import webdataset as wds  # here, not at the top: spawned build workers re-import this file

        out = outs[0]
        files = [str(out / s["file"]) for sp in shards.load_manifest(out)["splits"].values() for s in sp["shards"]]
        per_sample = sum(os.path.getsize(f) for f in files) / n
        raws = list(wds.DataPipeline(wds.SimpleShardList(files), wds.tarfile_to_samples()))

        def read_all() -> None:
            for raw in wds.DataPipeline(wds.SimpleShardList(files), wds.tarfile_to_samples()):
                shards.decode_sample(raw)

        print(f"read path, one core ({per_sample / 1024:.0f} KiB per sample on disk):")
        print(f"  tar parsing + decode_sample:           {rate(read_all, 1.0) * len(raws):9.0f} samples/s")
        print(f"  decode_sample alone:                   {rate(lambda: [shards.decode_sample(r) for r in raws]) * len(raws):9.0f} samples/s")
        print(f"  decode_sample(verify=True) (check):    "
              f"{rate(lambda: [shards.decode_sample(r, True, True) for r in raws]) * len(raws):9.0f} samples/s")
        shutil.rmtree(tmp / "raw")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--identities", type=int, default=32)
    ap.add_argument("--utterances", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    bench_formats()
    bench_members()
    bench_build(args.identities, args.utterances, args.seconds)


if __name__ == "__main__":
    main()
