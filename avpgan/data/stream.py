"""The training data stream: WebDataset shards -> batches, as a list of stages.

    shard list (shuffled per epoch) -> node + worker split -> tar to samples (broken members
    skipped) -> [sample split when shards are scarce] -> shuffle buffer -> fast-forward ->
    decode (corrupt samples skipped and counted) -> crop / flip -> batch

Why it is built this way:
- Deterministic for (seed, world size, rank, worker): every random choice (shard order,
  shuffle buffer, crop offset, flip) comes from an RNG seeded by those numbers and the epoch
  or the sample's index in the epoch, never from global state. So a run can be restarted at
  any batch and see exactly the samples, crops and order an uninterrupted run would have seen.
- Restartable without decoding: a `StreamPosition` records, per loader worker, the epoch and
  the number of samples taken out of the shuffle buffer. Resuming replays the shuffle of that
  epoch (reading tar bytes, not decoding audio or images) up to that index; earlier epochs are
  skipped without reading. The cost is at most one epoch of tar reading per worker.
- Infinite per rank: each worker cycles through epochs forever, so every rank yields the same
  number of full batches (as many as the loop asks for) and DDP never waits on a rank whose
  data ran out. The loop decides how many steps make a run.
- Not wrapped by `accelerator.prepare`: batches are plain CPU tensors that the loop moves to
  its device (preparing a WebDataset loader hangs or re-shards).
- Batches hold tensors only. Where a batch came from (worker, epoch, index, samples skipped)
  travels beside it as a `BatchOrigin`, through the DataLoader's prefetching, and `Batches`
  moves its `StreamPosition` only when the loop takes the batch: a prefetched batch that was
  never trained on is not counted as seen.
- DataLoader workers hand out batches round-robin, always starting at worker 0; after a resume
  at batch k the workers are relabelled by k mod W so that the batch order continues exactly.
- Loader workers ignore the stop signals (SIGTERM, SIGUSR1, SIGINT). SLURM's cancel and
  preemption signal every process of the job, as Ctrl-C signals every process of the terminal's
  foreground group; a worker that died of it would make the trainer's next
  DataLoader check raise (torch's SIGCHLD handler, "worker ... killed by signal"), in the middle of
  the very checkpoint the signal asked for. The trainer alone decides to stop (train/preempt.py)
  and then ends its workers itself.
"""

from __future__ import annotations

import atexit
import itertools
import os
import random
import signal
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from avpgan import seeding
from avpgan.audio import crop_or_tile
from avpgan.config import DataConfig
from avpgan.data.shards import CorruptSample, decode_sample, load_manifest, read_shards
from avpgan.train.preempt import SIGNALS as STOP_SIGNALS


class StreamError(RuntimeError):
    """The shards cannot feed a stream at all (empty split, nothing decodable); names the folder."""


@dataclass
class StreamPosition:
    """Where each loader worker of one rank stands; saved in every checkpoint (per rank)."""

    workers: int = 1
    next_worker: int = 0  # which logical worker yields the next batch
    epoch: list[int] = field(default_factory=list)
    index: list[int] = field(default_factory=list)  # samples taken from the shuffle buffer this epoch
    # What a resume on another world size does (the loop says so): positions cannot be remapped.
    on_new_world: ClassVar[str] = "the data stream restarts from its first epoch with the new split (see docs/training.md)"

    def __post_init__(self) -> None:
        if not self.epoch:
            self.epoch = [0] * self.workers
            self.index = [0] * self.workers

    def update(self, origin: "BatchOrigin") -> None:
        """Record a batch the loop has taken (prefetched but untaken batches do not count)."""
        w = origin.worker
        self.epoch[w], self.index[w] = origin.epoch, origin.index
        self.next_worker = (w + 1) % self.workers

    def state_dict(self) -> dict:
        return {"workers": self.workers, "next_worker": self.next_worker, "epoch": list(self.epoch), "index": list(self.index)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "StreamPosition":
        return cls(state["workers"], state["next_worker"], list(state["epoch"]), list(state["index"]))


@dataclass(frozen=True)
class BatchOrigin:
    """Where one batch came from; made by the loader worker, it travels beside the batch."""

    worker: int
    epoch: int
    index: int  # samples the worker has taken from its shuffle buffer in `epoch`, this batch's included
    skipped: int  # corrupt samples and broken tar members this worker has skipped so far
    keys: tuple[str, ...]  # the samples' keys, in batch order


class Batches:
    """One rank's infinite batches (dicts of CPU tensors) and where the stream stands after the
    last batch taken: `position` (what a checkpoint saves), `origin` (that batch's
    `BatchOrigin`), `skipped` (samples this rank's workers could not read so far)."""

    def __init__(self, items: Iterator[tuple[dict[str, torch.Tensor], BatchOrigin]], position: StreamPosition):
        self._items, self.position = items, position
        self.origin: BatchOrigin | None = None
        self._skipped: dict[int, int] = {}  # per worker: each counts its own

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch, origin = next(self._items)
        self.position.update(origin)
        self.origin = origin
        self._skipped[origin.worker] = origin.skipped
        return batch

    @property
    def skipped(self) -> int:
        return sum(self._skipped.values())


class ShardStream(IterableDataset):
    """One rank's infinite, deterministic stream of batches from one split."""

    def __init__(
        self,
        data: DataConfig,
        split: str,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        crop_seconds: float | None = None,
        restore_face: bool = False,
        flip: bool = True,
        workers: int | None = None,
        position: StreamPosition | None = None,
    ):
        self.root = Path(data.shards)
        manifest = load_manifest(self.root)
        if split not in manifest["splits"] or not manifest["splits"][split]["shards"]:
            raise ValueError(f"{self.root / 'manifest.json'}: split '{split}' has no shards")
        info = manifest["splits"][split]
        self.shards = [str(self.root / s["file"]) for s in info["shards"]]
        self.num_samples = int(info["samples"])
        self.num_identities = len(info["identities"])
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.restore_face, self.flip = restore_face, flip
        self.shuffle_buffer = data.shuffle_buffer
        self.crop_samples = int(round((crop_seconds or data.crop_seconds) * data.sample_rate))
        self.workers = data.workers if workers is None else workers
        self.position = position or StreamPosition(max(1, self.workers))
        if self.position.workers != max(1, self.workers):
            raise ValueError(
                f"stream position was saved with {self.position.workers} loader workers, now {self.workers}: "
                "resume with the same data.workers for an exact stream"
            )
        if self.num_samples < world_size * max(1, self.workers):
            raise ValueError(
                f"{self.root}: split '{split}' has {self.num_samples} samples, fewer than "
                f"{world_size} ranks x {max(1, self.workers)} workers"
            )

    # -- stages ---------------------------------------------------------------------------

    def _epoch_shards(self, epoch: int, stream_id: int, streams: int) -> tuple[list[str], int]:
        """Shard list shuffled by (seed, epoch), then split by node and worker.

        With fewer shards than rank x worker streams every stream reads all shards and keeps
        every `streams`-th sample instead (returned as the sample stride), so none goes idle.
        """
        order = list(self.shards)
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        if len(order) >= streams:
            return order[stream_id::streams], 1
        return order, streams

    def _raw_samples(self, epoch: int, stream_id: int, streams: int) -> Iterator[dict]:
        urls, stride = self._epoch_shards(epoch, stream_id, streams)
        samples = read_shards(urls, self._tar_error)
        if stride > 1:
            samples = itertools.islice(samples, stream_id, None, stride)
        shuffle = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                              rng=random.Random(f"{self.seed}/{epoch}/{stream_id}/{streams}"))
        return iter(shuffle(samples))

    def _tar_error(self, message: str) -> None:
        self.tar_errors += 1
        self.last_error = message

    def _prepare(self, raw: dict, epoch: int, index: int, stream_id: int) -> dict | None:
        try:
            s = decode_sample(raw, restore_face=self.restore_face)
        except CorruptSample as e:
            self.corrupt += 1
            self.last_error = str(e)
            return None
        rng = seeding.rng(self.seed, epoch, stream_id, index)
        audio = crop_or_tile(s["audio"], self.crop_samples, rng)
        face, restore_face = s["face"], s.get("restore_face")
        if self.flip and rng.random() < 0.5:
            face = face[:, ::-1]
            restore_face = restore_face[:, ::-1] if restore_face is not None else None
        out = {"audio": audio, "face": face, "label": int(s["meta"]["label"]), "key": s["key"]}
        if self.restore_face:
            out["restore_face"] = restore_face
        return out

    @staticmethod
    def _faces(images: list[np.ndarray]) -> torch.Tensor:
        """uint8 HWC -> contiguous float NCHW in [-1, 1] ((x - 127.5) / 127.5, as Voice2Face).

        Contiguous on purpose: a channels-last view fed to some CPU backward kernels (seen with
        the IResNet on torch 2.13) corrupts the heap."""
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        return x.float().sub_(127.5).div_(127.5)

    def _collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = {
            "audio": torch.from_numpy(np.stack([it["audio"] for it in items])),
            "face": self._faces([it["face"] for it in items]),
            "label": torch.tensor([it["label"] for it in items], dtype=torch.int64),
        }
        if self.restore_face:
            batch["restore_face"] = self._faces([it["restore_face"] for it in items])
        return batch

    # -- one logical worker -----------------------------------------------------------------

    def _worker_batches(self, worker: int) -> Iterator[tuple[dict[str, torch.Tensor], BatchOrigin]]:
        workers = max(1, self.workers)
        streams = self.world_size * workers
        stream_id = self.rank * workers + worker
        epoch, skip = self.position.epoch[worker], self.position.index[worker]
        self.tar_errors = self.corrupt = 0
        self.last_error = ""
        items: list[dict] = []
        while True:
            seen = decoded = 0
            for index, raw in enumerate(self._raw_samples(epoch, stream_id, streams)):
                seen += 1
                if index < skip:
                    continue  # fast-forward: replay the shuffle, decode nothing
                item = self._prepare(raw, epoch, index, stream_id)
                if item is None:
                    continue
                decoded += 1
                items.append(item)
                if len(items) == self.batch_size:
                    origin = BatchOrigin(worker, epoch, index + 1, self.corrupt + self.tar_errors,
                                         tuple(it["key"] for it in items))
                    yield self._collate(items), origin
                    items = []
            if seen == 0:
                raise StreamError(f"{self.root}: split '{self.split}' gave stream {stream_id} no samples in epoch {epoch}")
            if decoded == 0 and seen > skip:
                raise StreamError(
                    f"{self.root}: none of the {seen - skip} samples of split '{self.split}' read by stream {stream_id} "
                    f"in epoch {epoch} could be decoded (last error: {self.last_error}); run `avpgan shards check {self.root}`"
                )
            # A batch may straddle two epochs: it is recorded at its last sample's position,
            # which is exact because every earlier sample belongs to it or to an earlier batch.
            epoch, skip = epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], BatchOrigin]]:
        info = get_worker_info()
        workers = max(1, self.workers)
        physical = info.id if info is not None else 0
        if info is not None and info.num_workers != workers:
            raise RuntimeError(f"DataLoader has {info.num_workers} workers, stream expects {workers}")
        return self._worker_batches((physical + self.position.next_worker) % workers)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: this worker ignores SIGTERM/SIGUSR1/SIGINT (see the module notes).

    torch installs a SIGTERM handler that kills the worker just before calling this; replacing it
    with SIG_IGN also discards a signal left pending while `_stop_signals_blocked` held it."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


# Loader workers still alive when the interpreter exits (a run that raised, an iterator kept in a
# cycle): torch leaves them to multiprocessing's exit hook, which SIGTERMs and then joins them
# without a timeout; ignoring SIGTERM, they would hold the exit forever. They keep nothing worth
# a clean end (they only read shards), so this hook, registered after multiprocessing's and thus
# run before it, SIGKILLs them.
_live_workers: "weakref.WeakSet" = weakref.WeakSet()
_reaper_registered = False


def _kill_live_workers() -> None:
    # torch's SIGCHLD handler raises as soon as one worker dies by a signal, which would abort
    # this hook before the other workers are killed (and multiprocessing's hook would then wait
    # on them forever): at exit those deaths are the point, so the default handler goes back
    # first, every worker is killed, and only then are they joined.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    procs = list(_live_workers)
    for proc in procs:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, TypeError):  # gone already, or never started (pid None)
            pass
    for proc in procs:
        try:
            proc.join(5)
        except (AssertionError, ValueError, OSError):  # not our child, or already closed
            pass


def _reap_at_exit(batches: object) -> None:
    """Remember the loader iterator's worker processes for `_kill_live_workers`. `_workers` is
    torch's attribute (DataLoader has no public handle on its processes); without it, nothing
    is remembered and only the exit hang guard is lost."""
    global _reaper_registered
    for proc in getattr(batches, "_workers", ()):
        _live_workers.add(proc)
    if not _reaper_registered:
        atexit.register(_kill_live_workers)
        _reaper_registered = True


@contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Hold the stop signals while the loader forks its workers, so that none can reach a worker
    before `ignore_stop_signals` runs in it (a forked child inherits the mask). The trainer gets
    a signal that arrived meanwhile when the mask is restored: it is delayed, never lost."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def make_stream(data: DataConfig, split: str, batch_size: int, *, pin_memory: bool = False, **options) -> Batches:
    """This rank's infinite batches: `audio` int16 [B, S], `face` float32 [B, 3, 64, 64] in
    [-1, 1], `label` int64 [B] (identity index within the split), optionally `restore_face`; the
    returned `Batches` also keeps the position a checkpoint saves (`position`).

    `options` are `ShardStream`'s keyword arguments, passed on as they are: rank, world_size,
    seed, crop_seconds, restore_face, flip, workers, position. `pin_memory` is the DataLoader's.
    """
    ds = ShardStream(data, split, batch_size, **options)
    if ds.workers == 0:
        return Batches(iter(ds), ds.position)
    loader = DataLoader(ds, batch_size=None, num_workers=ds.workers, pin_memory=pin_memory,
                        persistent_workers=False, prefetch_factor=2, multiprocessing_context="fork",
                        worker_init_fn=ignore_stop_signals)
    with _stop_signals_blocked():  # the workers are forked here
        items = iter(loader)
    _reap_at_exit(items)
    return Batches(items, ds.position)
