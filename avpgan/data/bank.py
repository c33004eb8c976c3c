"""The GAN stage's embedding bank: every utterance of a split embedded once by the frozen encoder.

Why: Algorithm 1 keeps the voice encoder F_e frozen while G and D train, so decoding audio,
computing a log-mel and running F_e on every GAN step redoes the same work epoch after epoch.
The bank does it once, for K random crops per utterance, and keeps the result next to the
utterance's identity and 64 px face. On a GPU the whole bank sits in device memory, so a GAN
step gathers rows and never waits on a loader.

File `RUN/bank/<split>.safetensors` (no pickle)::

    embedding  float32 [N, K, D]       voice_embedding(F_e(logmel(crop)), noise_std=0): unit vectors
    label      int64   [N]             identity index within the split (the shards' label)
    face       uint8   [N, 64, 64, 3]  the sample's 64 px face, as stored in the shard

The header's metadata holds, under `avpgan_bank`, the JSON facts the bank was cut from (see
`expected_meta`): the encoder file's sha256, crop length, K, log-mel settings, sample rate, the
split's shard list, seed and format. A bank whose facts differ from the current run's is refused
with the field named, never silently used: stale embeddings would train G on another encoder.

Building is deterministic and resumable: crop k of sample i (its index within the split) comes
from an RNG seeded by (seed, i, k), and each shard becomes one part file
`RUN/bank/<split>.parts/<shard>.safetensors` (written atomically, with the facts and the shard's
sha256 in its header) whose encoder batches never cross a part. A rebuild therefore skips the
parts that are already there and reproduces the others bit for bit; a crash loses at most the
part being written. Ranks build disjoint parts, rank 0 assembles them into the bank file (temp
name + os.replace) and removes the parts.

Sampling (`BankSampler`) is stateless: every draw for step s on rank r comes from a generator
seeded by (seed, world size, rank, s), so the sampler restarts exactly at any step and its
checkpointed position is only the next step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterator

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from avpgan import atomic, models, seeding
from avpgan.atomic import sha256_file
from avpgan.audio import crop_or_tile
from avpgan.config import Config, flatten
from avpgan.data.shards import CorruptSample, decode_sample, load_manifest, read_shards
from avpgan.features import LogMel

FORMAT = 1
SPLITS = ("train", "val")  # val: the sample grids show voices the GAN never trained on
HEADER = "avpgan_bank"

# What each recorded fact means, for the message that refuses a bank.
_FACTS = {
    "format": "bank format version",
    "split": "shard split",
    "encoder_sha256": "sha256 of the voice encoder weights",
    "crop_seconds": "crop length (data.bank.seconds, 0 = data.crop_seconds)",
    "crops": "crops per utterance (data.bank.crops)",
    "features": "log-mel settings (features.*)",
    "sample_rate": "sample rate (data.sample_rate)",
    "shards_sha256": "sha256 of the split's shard list in manifest.json",
    "seed": "crop seed (train.seed)",
    "shard": "shard file",  # the three below: a part's own facts
    "shard_sha256": "sha256 of the shard",
    "first_index": "index of the shard's first sample in the split",
}


class BankError(RuntimeError):
    """A bank that cannot serve this run; one line naming the file, what differs and the fix."""


def bank_file(run_dir: Path, split: str) -> Path:
    return Path(run_dir) / "bank" / f"{split}.safetensors"


def crop_seconds(cfg: Config) -> float:
    return cfg.data.bank.seconds or cfg.data.crop_seconds


def _split_shards(cfg: Config, split: str) -> list[dict]:
    root = Path(cfg.data.shards)
    info = load_manifest(root)["splits"].get(split)
    if not info or not info["shards"]:
        raise BankError(f"{root / 'manifest.json'}: split '{split}' has no shards to build a bank from")
    return info["shards"]


def expected_meta(cfg: Config, split: str, encoder_weights: Path) -> dict:
    """The facts a bank for this run must have been built from (its header must hold exactly these)."""
    encoder_weights = Path(encoder_weights)
    if not encoder_weights.is_file():
        raise FileNotFoundError(f"{encoder_weights}: voice encoder weights not found. Train the 'voice' stage first "
                                "(train.stages=[voice]) or set train.voice_weights to an existing file.")
    shard_list = json.dumps(_split_shards(cfg, split), sort_keys=True, separators=(",", ":")).encode()
    return {
        "format": FORMAT,
        "split": split,
        "encoder_sha256": sha256_file(encoder_weights),
        "crop_seconds": float(crop_seconds(cfg)),
        "crops": cfg.data.bank.crops,
        "features": dataclasses.asdict(cfg.features),
        "sample_rate": cfg.data.sample_rate,
        "shards_sha256": hashlib.sha256(shard_list).hexdigest(),
        "seed": cfg.train.seed,
    }


def read_meta(path: Path) -> dict:
    """The facts in a bank's (or part's) header."""
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {})[HEADER])
    except (OSError, SafetensorError, KeyError, ValueError) as e:
        raise BankError(f"{path}: not a readable bank file ({type(e).__name__}: {e}); delete it, or rebuild it with "
                        "`avpgan bank build --config CFG`") from None


def mismatch(path: Path, found: dict, expected: dict) -> str | None:
    """Why the facts `found` in `path` do not fit this run (one line), or None when they do."""
    have, want = flatten(found), flatten(expected)
    for key, value in want.items():
        if have.get(key) != value:
            shown = [str(v)[:12] + "..." if key.endswith("sha256") and v else v for v in (have.get(key), value)]
            return (f"{path}: built with {key}={shown[0]}, this run has {key}={shown[1]} "
                    f"({_FACTS[key.split('.')[0]]} differs); delete it, or rebuild it with `avpgan bank build --config CFG`")
    return None


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    with atomic.replacing(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={HEADER: json.dumps(meta, sort_keys=True, separators=(",", ":"))})


@contextmanager
def _exact_float32():
    """Plain float32 kernels while building: a bank rebuilt after a crash, by another world size or
    by `avpgan bank build` instead of the training run must come out with the same bytes."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) = flags


class _Embedder:
    """The frozen encoder on the build device, fed crops in fixed-size batches."""

    def __init__(self, cfg: Config, encoder_weights: Path, device: torch.device):
        encoder = models.build_voice_encoder(cfg.model.voice)
        encoder.load_state_dict(load_file(str(encoder_weights)))
        self.encoder = encoder.to(device).eval().requires_grad_(False)
        self.logmel = LogMel(cfg.features, cfg.data.sample_rate).to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, clips: list[np.ndarray]) -> torch.Tensor:
        audio = torch.from_numpy(np.stack(clips)).to(self.device)
        return models.voice_embedding(self.encoder(self.logmel(audio)), noise_std=0.0).cpu()


def _embed_shard(cfg: Config, url: str, first_index: int, embed: _Embedder, bar: tqdm) -> tuple[dict[str, torch.Tensor], int]:
    """One part: every decodable sample of one shard; returns its tensors and how many were skipped."""
    crops, seed, batch_size = cfg.data.bank.crops, cfg.train.seed, cfg.data.bank.batch_size
    length = int(round(crop_seconds(cfg) * cfg.data.sample_rate))
    skipped = 0

    def tar_error(message: str) -> None:
        nonlocal skipped
        skipped += 1

    clips: list[np.ndarray] = []
    embeddings: list[torch.Tensor] = []
    faces: list[np.ndarray] = []
    labels: list[int] = []

    def flush() -> None:
        embeddings.append(embed(clips))
        bar.update(len(clips))
        clips.clear()

    # Raw samples, decoded here: a corrupt one still takes its index, which seeds the crops.
    for index, raw in enumerate(read_shards([url], tar_error)):
        try:
            sample = decode_sample(raw)
        except CorruptSample:
            skipped += 1
            continue
        for k in range(crops):
            clips.append(crop_or_tile(sample["audio"], length, seeding.rng(seed, first_index + index, k)))
            if len(clips) == batch_size:
                flush()
        faces.append(np.array(sample["face"]))  # a copy: the view would keep the whole member alive
        labels.append(int(sample["meta"]["label"]))
    if clips:
        flush()
    d, fs = cfg.model.voice.embed_dim, cfg.data.face_size
    tensors = {
        "embedding": torch.cat(embeddings).reshape(len(labels), crops, -1) if labels else torch.zeros(0, crops, d),
        "label": torch.tensor(labels, dtype=torch.int64),
        "face": torch.from_numpy(np.stack(faces)) if faces else torch.zeros(0, fs, fs, 3, dtype=torch.uint8),
    }
    return tensors, skipped


def _part_done(path: Path, want: dict) -> bool:
    if not path.is_file():
        return False
    try:
        return mismatch(path, read_meta(path), want) is None
    except BankError:
        return False


def build(cfg: Config, split: str, encoder_weights: Path, out: Path, *, device: torch.device | str = "cpu", rank: int = 0,
          world_size: int = 1, barrier: Callable[[], None] = lambda: None, progress: bool = True) -> dict:
    """Build (or finish building) the bank of `split` into `out`; collective when world_size > 1.

    Rank r embeds the shards r, r + world_size, ... that have no valid part yet, `barrier()`
    waits for all ranks, rank 0 assembles. Returns the bank's header facts (with `samples` and
    `skipped`, the samples that could not be read).
    """
    out = Path(out)
    expected = expected_meta(cfg, split, encoder_weights)
    shards = _split_shards(cfg, split)
    parts_dir = out.parent / f"{split}.parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    offsets = np.cumsum([0] + [int(s["samples"]) for s in shards]).tolist()
    jobs = []
    for i, shard in enumerate(shards):
        want = dict(expected, shard=shard["file"], shard_sha256=shard["sha256"], first_index=offsets[i])
        jobs.append((parts_dir / f"{Path(shard['file']).stem}.safetensors", shard, want))
    todo = [job for i, job in enumerate(jobs) if i % world_size == rank and not _part_done(job[0], job[2])]
    if todo:
        with _exact_float32(), tqdm(total=sum(int(s["samples"]) for _, s, _ in todo) * cfg.data.bank.crops,
                                    desc=f"bank {split}", unit="crop", disable=not progress or rank != 0) as bar:
            embed = _Embedder(cfg, Path(encoder_weights), torch.device(device))
            for path, shard, want in todo:
                tensors, skipped = _embed_shard(cfg, str(Path(cfg.data.shards) / shard["file"]), want["first_index"], embed, bar)
                _write(path, tensors, dict(want, skipped=skipped))
    barrier()
    if rank == 0:
        parts = [load_file(str(path)) for path, _, _ in jobs]
        tensors = {k: torch.cat([p[k] for p in parts]) for k in ("embedding", "label", "face")}
        skipped = sum(read_meta(path)["skipped"] for path, _, _ in jobs)
        out.parent.mkdir(parents=True, exist_ok=True)
        _write(out, tensors, dict(expected, samples=int(tensors["label"].numel()), skipped=skipped))
        shutil.rmtree(parts_dir)
    barrier()
    return read_meta(out)


def prepare(cfg: Config, run_dir: Path, encoder_weights: Path, *, device: torch.device | str = "cpu", rank: int = 0,
            world_size: int = 1, barrier: Callable[[], None] = lambda: None, rebuild: bool = False,
            progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Make sure the run's banks (train and val) exist and fit this run; collective.

    A missing bank is built. One built from other facts is rebuilt when `rebuild` (what
    `avpgan bank build` asks for) and refused otherwise (training: the user decides).
    """
    paths = {}
    for split in SPLITS:
        out = bank_file(run_dir, split)
        expected = expected_meta(cfg, split, encoder_weights)
        if out.exists():
            problem = mismatch(out, read_meta(out), expected)
            if problem is None:
                paths[split] = out
                continue
            if not rebuild:
                raise BankError(problem)
            log(f"{problem.split(';')[0]}; rebuilding")
        meta = build(cfg, split, encoder_weights, out, device=device, rank=rank, world_size=world_size,
                     barrier=barrier, progress=progress)
        log(f"{out}: {meta['samples']} utterances x {meta['crops']} crops of {meta['crop_seconds']:g} s"
            + (f", {meta['skipped']} unreadable samples skipped" if meta["skipped"] else ""))
        paths[split] = out
    return paths


@dataclass
class Bank:
    """A loaded bank: its tensors on one device, and the facts it was built from."""

    path: Path
    embedding: torch.Tensor  # float32 [N, K, D], unit vectors
    label: torch.Tensor  # int64 [N]
    face: torch.Tensor  # uint8 [N, H, W, 3]
    meta: dict

    def __len__(self) -> int:
        return int(self.label.numel())

    @property
    def device(self) -> torch.device:
        return self.embedding.device

    def faces(self, index: torch.Tensor) -> torch.Tensor:
        """Faces `index` as float NCHW in [-1, 1], (x - 127.5) / 127.5 like the shard stream."""
        return self.face[index].permute(0, 3, 1, 2).contiguous().float().sub_(127.5).div_(127.5)


def load(cfg: Config, split: str, path: Path, encoder_weights: Path, device: torch.device | str = "cpu") -> Bank:
    """The bank at `path`, checked against this run's facts, with its tensors on `device`."""
    path = Path(path)
    if not path.is_file():
        raise BankError(f"{path}: no bank; build it with `avpgan bank build --config CFG` (training builds it when missing)")
    meta = read_meta(path)
    problem = mismatch(path, meta, expected_meta(cfg, split, encoder_weights))
    if problem:
        raise BankError(problem)
    t = {k: v.to(device) for k, v in load_file(str(path)).items()}
    bank = Bank(path, t["embedding"], t["label"], t["face"], meta)
    if len(bank) == 0:
        raise BankError(f"{path}: holds no utterances (no sample of split '{split}' could be read); "
                        f"run `avpgan shards check {cfg.data.shards}`")
    return bank


@dataclass
class BankPosition:
    """Where a `BankSampler` stands, for checkpoints: the next step, and nothing else (its draws
    are a function of (seed, world size, rank, step))."""

    step: int = 0
    # What a resume on another world size does (the loop says so): draws continue at the step.
    on_new_world: ClassVar[str] = "the bank sampler goes on at this step, drawing for the new ranks (see docs/training.md)"

    def state_dict(self) -> dict:
        return {"step": self.step}

    @classmethod
    def from_state_dict(cls, state: dict) -> "BankPosition":
        return cls(int(state["step"]))


class BankSampler:
    """One rank's infinite batches from a bank, on the bank's device.

    Voice2Face's sampling: a voice is utterance i (uniform) with one of its K crops (uniform),
    its face one of the bank's faces of the same identity (uniform; not necessarily i's own),
    flipped horizontally with p = 0.5. Batches: `embedding` float32 [B, D] (unit), `face`
    float32 [B, 3, H, W] in [-1, 1], `label` int64 [B]. Like the shard stream's `Batches`, it
    tells its `position` after the last batch taken, and `skipped` (always 0: nothing to read).
    """

    skipped = 0

    def __init__(self, bank: Bank, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1, start_step: int = 0):
        self.bank, self.batch_size = bank, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.next_step = start_step
        # Faces grouped by identity: the bank rows of label l are order[start[l] : start[l] + count[l]].
        self.order = torch.argsort(bank.label, stable=True)
        self.count = torch.bincount(bank.label)
        self.start = torch.cumsum(self.count, 0) - self.count

    def batch(self, step: int) -> dict:
        """The batch of `step`: the same on every call, whatever ran before."""
        dev, b = self.bank.device, self.batch_size
        gen = torch.Generator(device=dev).manual_seed(seeding.seed64(self.seed, self.world_size, self.rank, step))
        n, k = self.bank.embedding.shape[:2]
        voice = torch.randint(0, n, (b,), generator=gen, device=dev)
        crop = torch.randint(0, k, (b,), generator=gen, device=dev)
        label = self.bank.label[voice]
        pick = torch.rand(b, generator=gen, device=dev, dtype=torch.float64)
        count = self.count[label]
        face_row = self.order[self.start[label] + torch.minimum((pick * count).long(), count - 1)]
        face = self.bank.faces(face_row)
        flip = torch.rand(b, generator=gen, device=dev) < 0.5
        face = torch.where(flip[:, None, None, None], face.flip(3), face)
        return {"embedding": self.bank.embedding[voice, crop], "face": face, "label": label}

    @property
    def position(self) -> BankPosition:
        return BankPosition(self.next_step)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        batch = self.batch(self.next_step)
        self.next_step += 1
        return batch
