"""Voices -> faces with an exported bundle: `avpgan generate MODEL VOICE [VOICE ...] --out DIR`.

Every file goes through what the training data went through: decode (any format soundfile or
librosa reads, any rate, stereo averaged), resample to the model's rate, drop silence with the
shards' rule, then S-second clips (S: `--seconds`, default the crop length the model was
trained on):

- longer than S: the file is cut into consecutive S-second windows (as many as fit, centred in
  the voiced audio) and the unit voice embeddings of all windows are averaged and normalised
  again. A single centre crop would throw most of a long recording away; the mean uses all of
  it while every window still looks like the clips the encoder saw in training.
- shorter than S: the voiced audio is repeated end to end up to S, as Voice2Face's test does;
  the output says so, since a face from 1.5 s of voice carries less evidence.
- under MIN_VOICED_SECONDS of voice (empty, silent, or a click): skipped with the reason.

The model loads once; files are taken a batch at a time and all their windows (every window
has the same length, so they stack) run through the networks together. A file that cannot be
decoded is named and skipped; the others are still generated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from avpgan import bundle as bundle_mod
from avpgan.audio import AudioError, read_audio, remove_silence, windows
from avpgan.features import LogMel
from avpgan.images import make_grid, read_image, resize, save_png, to_tensor, to_uint8
from avpgan.models import voice_embedding

MIN_VOICED_SECONDS = 0.25  # less than about one syllable of voice: nothing to base a face on


def open_model(path: str | Path, device: str | torch.device = "cpu") -> bundle_mod.Bundle:
    """A bundle file, or a run directory (collected in memory as `avpgan export` would write it,
    so both paths build the networks the same way)."""
    path = Path(path)
    if path.is_dir():
        return bundle_mod.from_run(path, device)
    return bundle_mod.load(path, device)


class VoiceToFace:
    """The inference path shared by `generate` and `evaluate`: audio -> unit voice embedding ->
    EMA generator face (64 px) -> restored face (when the bundle has a restoration model)."""

    def __init__(self, model: bundle_mod.Bundle, device: str | torch.device):
        self.model, self.device = model, torch.device(device)
        self.logmel = LogMel(model.cfg.features, model.cfg.data.sample_rate).to(self.device)

    @property
    def sample_rate(self) -> int:
        return self.model.cfg.data.sample_rate

    @property
    def has_restorer(self) -> bool:
        return self.model.restorer is not None

    @torch.no_grad()
    def embed(self, audio: torch.Tensor | np.ndarray) -> torch.Tensor:
        """[B, S] int16 or float audio of one length -> [B, E] unit embeddings."""
        audio = torch.as_tensor(np.asarray(audio)) if isinstance(audio, np.ndarray) else audio
        return voice_embedding(self.model.voice(self.logmel(audio.to(self.device))))

    @torch.no_grad()
    def faces(self, embedding: torch.Tensor, restore: bool = True,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, E] -> (64 px faces, restored faces or None), both in [-1, 1].

        The restoration model's prior injects random noise (StyleGAN2); `seed` fixes it, so the
        same call gives the same faces, without touching the caller's random state.
        """
        face = self.model.generator(embedding.to(self.device)).clamp(-1, 1)
        restored = None
        if restore and self.model.restorer is not None:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(seed)
                restored = self.model.restorer(face).clamp(-1, 1)
        return face, restored


@dataclass
class Voice:
    path: Path
    clips: np.ndarray  # [n, S] float32
    voiced_seconds: float
    note: str = ""


@dataclass
class Report:
    made: list[dict] = field(default_factory=list)  # {"voice", "files", "windows", "note"}
    skipped: list[dict] = field(default_factory=list)  # {"voice", "reason"}
    seconds_model: float = 0.0
    seconds_total: float = 0.0

    @property
    def faces_per_s(self) -> float:
        return len(self.made) / self.seconds_model if self.seconds_model > 0 else float("nan")


def prepare(path: Path, sample_rate: int, seconds: float, top_db: float) -> Voice:
    """Decode one file into its S-second clips; AudioError (with the file named) when unusable."""
    try:
        y = read_audio(path, sample_rate)
    except AudioError:
        raise  # already names the file and the problem
    except Exception as e:  # a decoder choking on garbage must not end the whole batch
        raise AudioError(f"{path}: cannot decode audio ({type(e).__name__}: {e})") from None
    return clips_of(y, path, sample_rate, seconds, top_db)


def clips_of(y: np.ndarray, path: Path, sample_rate: int, seconds: float, top_db: float) -> Voice:
    """Mono float audio at the model's rate -> its S-second clips (`path` names it in errors).
    The MLflow model (avpgan/mlflow_model.py) hands waveforms in here directly."""
    if y.size == 0:
        raise AudioError(f"{path}: no audio samples", "empty audio")
    voiced = remove_silence(y, top_db)
    got = voiced.size / sample_rate
    if got < MIN_VOICED_SECONDS:
        raise AudioError(f"{path}: only {got:.2f} s of voice after silence removal "
                         f"(need {MIN_VOICED_SECONDS} s)", "no voice")
    length = int(round(seconds * sample_rate))
    clips = windows(voiced, length).astype(np.float32, copy=False)
    if got < seconds:
        note = f"{got:.2f} s of voice repeated to {seconds:g} s"
    elif len(clips) > 1:
        note = f"mean of {len(clips)} x {seconds:g} s windows"
    else:
        note = ""
    return Voice(path, clips, got, note)


def _out_stem(path: Path, taken: set[str]) -> str:
    """The file's stem, made unique when two inputs share one (a/x.wav and b/x.flac)."""
    stem, n = path.stem or "voice", 1
    while stem in taken:
        n += 1
        stem = f"{path.stem}-{n}"
    taken.add(stem)
    return stem


def grid_image(faces: torch.Tensor, restored: torch.Tensor | None, cols: int = 8,
               real: torch.Tensor | None = None) -> np.ndarray:
    """Up to `cols` voices per row; each row of 64 px faces (scaled up, nearest) sits below the
    speakers' real faces when given and above their restored faces when the bundle restores; a
    margin names each row (real / generated / restored). Empty cells at the end stay black."""
    cols = min(cols, len(faces))
    size = restored.shape[-1] if restored is not None else faces.shape[-1]
    faces = F.interpolate(faces, size=(size, size), mode="nearest")
    if real is not None:
        real = F.interpolate(real, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    pad = -len(faces) % cols
    rows = []
    for part in (real, faces, restored):
        if part is not None and pad:
            part = torch.cat([part, part.new_full((pad, *part.shape[1:]), -1.0)])
        rows.append(part)
    chunks, labels = [], []
    for i in range(0, len(faces) + pad, cols):
        for part, label in zip(rows, ("real", "generated", "restored")):
            if part is not None:
                chunks.append(part[i : i + cols])
                labels.append(label)
    return make_grid(chunks, nrow=cols, row_labels=labels)


def read_faces(paths: list[str | Path], size: int) -> torch.Tensor:
    """Reference pictures for the grid, centre-cropped and resized like the training faces."""
    return torch.stack([to_tensor(resize(read_image(p), size)) for p in paths])


def generate(model: str | Path | bundle_mod.Bundle, voices: list[str | Path], out: str | Path,
             seconds: float | None = None, restore: bool = True, grid: bool = False, batch_size: int = 64,
             device: str | torch.device | None = None, real: list[str | Path] | None = None,
             log: Callable[[str], None] = print) -> Report:
    """Write OUT/<stem>_64.png (and OUT/<stem>_<size>_restored.png) per usable voice file.

    Files go through in chunks of `batch_size`, so memory stays bounded however many are given.
    `real`: one picture of each speaker, in the order of `voices`, shown above its generated
    face in the grid so that a reader can judge whether the face follows the voice.
    """
    if real is not None and len(real) != len(voices):
        raise ValueError(f"--real: {len(real)} pictures for {len(voices)} voices; give one picture per voice")
    t_start = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bundle = model if isinstance(model, bundle_mod.Bundle) else open_model(model, device)
    net = VoiceToFace(bundle, device)
    cfg = bundle.cfg
    seconds = float(seconds or cfg.data.crop_seconds)
    if seconds * net.sample_rate < net.logmel.win:
        raise ValueError(f"--seconds {seconds:g} is shorter than one {cfg.features.win_ms:g} ms analysis window")
    restore = restore and net.has_restorer
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report()
    taken: set[str] = set()
    shown: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # for the grid
    shown_real: list[str | Path] = []  # the reference picture of each shown voice

    for first in range(0, len(voices), batch_size):
        ready: list[Voice] = []
        for i, v in enumerate(voices[first : first + batch_size], start=first):
            try:
                ready.append(prepare(Path(v), net.sample_rate, seconds, cfg.data.vad_top_db))
                if real is not None:
                    shown_real.append(real[i])
            except AudioError as e:
                report.skipped.append({"voice": str(v), "reason": str(e)})
                log(f"skipped {e}")
        if not ready:
            continue
        face, restored, took = faces_of(net, ready, batch_size, restore, seed=first)
        report.seconds_model += took
        if grid:
            shown.append((face, restored))
        face_u8 = to_uint8(face)
        restored_u8 = to_uint8(restored) if restored is not None else None
        for i, v in enumerate(ready):
            stem = _out_stem(v.path, taken)
            files = [out / f"{stem}_{face_u8.shape[1]}.png"]
            save_png(face_u8[i], files[0])
            if restored_u8 is not None:
                files.append(out / f"{stem}_{restored_u8.shape[1]}_restored.png")
                save_png(restored_u8[i], files[1])
            report.made.append({"voice": str(v.path), "files": [str(f) for f in files], "windows": len(v.clips),
                                "note": v.note})
            log(f"{v.path} -> {', '.join(f.name for f in files)}" + (f"  ({v.note})" if v.note else ""))

    if grid and shown:
        path = out / "grid.png"
        with_restored = shown[0][1] is not None
        faces = torch.cat([f for f, _ in shown])
        reference = read_faces(shown_real, faces.shape[-1]) if real is not None else None
        save_png(grid_image(faces, torch.cat([r for _, r in shown]) if with_restored else None, real=reference), path)
        log(f"grid: {path} (" + ("real faces above " if real is not None else "")
            + "generator faces" + (" above their restored faces)" if with_restored else ")"))
    report.seconds_total = time.perf_counter() - t_start
    return report


def faces_of(net: VoiceToFace, ready: list[Voice], batch_size: int, restore: bool,
             seed: int) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """All windows of these files through the voice encoder in batches, one embedding per file
    (the normalised mean of its windows'), then the faces: (CPU faces, CPU restored, seconds)."""
    t0 = time.perf_counter()
    clips = np.concatenate([v.clips for v in ready])
    emb = torch.cat([net.embed(clips[i : i + batch_size]) for i in range(0, len(clips), batch_size)])
    owner = torch.as_tensor(np.repeat(np.arange(len(ready)), [len(v.clips) for v in ready]), device=emb.device)
    per_file = F.normalize(torch.zeros(len(ready), emb.shape[1], device=emb.device).index_add_(0, owner, emb), dim=1)
    face, restored = net.faces(per_file, restore, seed=seed)
    face, restored = face.cpu(), restored.cpu() if restored is not None else None  # .cpu() waits for the GPU
    return face, restored, time.perf_counter() - t0
