"""Writing a SynthVox data set in VoxCeleb1's and VGGFace1's on-disk layout: one job per identity
(its videos, utterances and faces) in a pool of spawned worker processes, then the two tables.

Each utterance and face is drawn from its own node of the identity's spawn tree, so the files
are the same bit for bit whatever the number of worker processes.
"""

from __future__ import annotations

import csv
import io
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image
from tqdm import tqdm

from avpgan import atomic
from avpgan.data.synthvox.face import draw_face
from avpgan.data.synthvox.identity import KEY_FACE, KEY_UTTERANCE, KEY_VIDEOS, Identity, draw_identities, spawn_rng
from avpgan.data.synthvox.voice import SAMPLE_RATE, UTTERANCE_SECONDS, synth_utterance, video_channel

JPEG_QUALITY = 92
META_HEADER = ["VoxCeleb1 ID", "VGGFace1 ID", "Gender", "Nationality", "Set"]


def _video_plan(seed: int, index: int, utterances: int) -> list[tuple[str, int]]:
    """(11-character video id, utterance count) per video, like VoxCeleb1's YouTube folders."""
    rng = spawn_rng(seed, index, KEY_VIDEOS)
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))
    per_video = rng.uniform(1.5, 8.0)  # speakers differ in how many clips each video gives
    plan, left = [], utterances
    while left > 0:
        k = int(min(left, 1 + rng.poisson(per_video - 1)))
        plan.append(("".join(rng.choice(alphabet, 11)), k))
        left -= k
    return plan


def _wav_bytes(x: np.ndarray) -> bytes:
    pcm = np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, pcm, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _jpg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _make_identity(job: tuple) -> dict:
    """All files of one identity; runs in a worker process."""
    out, seed, ident, n_utt, n_faces, seconds = job
    t0 = time.perf_counter()
    audio_s = 0.0
    u = 0
    for video_id, count in _video_plan(seed, ident.index, n_utt):
        vdir = out / "voxceleb1" / "wav" / ident.voxceleb_id / video_id
        vdir.mkdir(parents=True, exist_ok=True)
        video = None
        for k in range(count):
            rng = spawn_rng(seed, ident.index, KEY_UTTERANCE, u)
            if video is None:  # the first utterance's stream also draws its video's channel
                video = video_channel(spawn_rng(seed, ident.index, KEY_VIDEOS, u))
            x = synth_utterance(ident, rng, seconds, video)
            atomic.write_bytes(vdir / f"{k + 1:05d}.wav", _wav_bytes(x))
            audio_s += len(x) / SAMPLE_RATE
            u += 1
    t1 = time.perf_counter()
    fdir = out / "vggface" / ident.vggface_name
    fdir.mkdir(parents=True, exist_ok=True)
    for j in range(n_faces):
        img = draw_face(ident, spawn_rng(seed, ident.index, KEY_FACE, j))
        atomic.write_bytes(fdir / f"{j + 1:08d}.jpg", _jpg_bytes(img))
    return {"utterances": n_utt, "audio_seconds": audio_s, "faces": n_faces,
            "voice_s": t1 - t0, "face_s": time.perf_counter() - t1}


def _write_tables(out: Path, idents: list[Identity]) -> None:
    rows = sorted(idents, key=lambda i: i.voxceleb_id)
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(META_HEADER)
    test_letters = "E"  # VoxCeleb1's verification test speakers are the 40 names starting with E
    for i in rows:
        w.writerow([i.voxceleb_id, i.vggface_name, i.gender, i.nationality,
                    "test" if i.vggface_name[0] in test_letters else "dev"])
    atomic.write_bytes(out / "vox1_meta.csv", buf.getvalue().encode())
    buf = io.StringIO()
    cols = [f.name for f in fields(Identity)]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for i in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(i).items()})
    atomic.write_bytes(out / "attributes.csv", buf.getvalue().encode())


def generate(out: Path, identities: int, utterances_per_id: int, faces_per_id: int, seed: int, workers: int,
             seconds: tuple[float, float] = UTTERANCE_SECONDS) -> dict:
    """Write a SynthVox data set under `out` and return what was made and how fast.

    Layout: out/voxceleb1/wav/idNNNNN/<video>/NNNNN.wav, out/vggface/<Name>/NNNNNNNN.jpg,
    out/vox1_meta.csv (the real file's columns) and out/attributes.csv (the hidden truth).
    The two tables are written last, so a folder without them is an interrupted run.
    """
    out = Path(out)
    if utterances_per_id < 0 or faces_per_id < 0:
        raise ValueError("synthvox: utterances and faces per identity must be >= 0")
    lo, hi = seconds
    if not 0 < lo <= hi:
        raise ValueError(f"synthvox: bad utterance length range {seconds}")
    for sub in ("voxceleb1", "vggface"):
        if (out / sub).is_dir() and any((out / sub).iterdir()):
            raise FileExistsError(f"synthvox: {out / sub} already holds files; generate into an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    idents = draw_identities(identities, seed)
    jobs = [(out, seed, i, utterances_per_id, faces_per_id, (float(lo), float(hi))) for i in idents]
    bar_args = dict(total=len(jobs), desc=f"synthvox -> {out}", unit="identity", disable=None)  # no bar in a log file
    if workers <= 1:
        results = [_make_identity(j) for j in tqdm(jobs, **bar_args)]
    else:
        # spawn: workers start clean, whatever threads or torch state the caller holds; an
        # executor (unlike Pool) raises BrokenProcessPool instead of hanging if workers die.
        ctx = multiprocessing.get_context("spawn")
        try:
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                results = list(tqdm(pool.map(_make_identity, jobs), **bar_args))
        except BrokenProcessPool as e:
            raise RuntimeError("synthvox: a worker process died (out of memory, or the calling program "
                               "cannot be re-imported by spawned workers, e.g. code piped to stdin); "
                               "run from a script or with workers=1") from e
    _write_tables(out, idents)
    secs = time.perf_counter() - t0
    n_utt = sum(r["utterances"] for r in results)
    n_faces = sum(r["faces"] for r in results)
    stats = {
        "identities": identities, "utterances": n_utt, "faces": n_faces, "seconds": round(secs, 3),
        "utterances_per_s": round(n_utt / secs, 3), "faces_per_s": round(n_faces / secs, 3),
        "audio_seconds": round(sum(r["audio_seconds"] for r in results), 2),
        "voice_cpu_s": round(sum(r["voice_s"] for r in results), 3),
        "face_cpu_s": round(sum(r["face_s"] for r in results), 3),
    }
    print(f"synthvox: {identities} identities, {n_utt} utterances ({stats['audio_seconds']:.0f} s of audio), "
          f"{n_faces} faces in {secs:.1f} s ({stats['utterances_per_s']:.2f} utterances/s, "
          f"{workers} workers) -> {out}")
    return stats
