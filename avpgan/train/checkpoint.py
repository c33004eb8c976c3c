"""Sharded, atomic training checkpoints (torch.distributed.checkpoint): all ranks write, rank 0 publishes.

Layout
------
A stage's checkpoints live in `ROOT = RUN/<stage>/checkpoints/`::

    ROOT/step-0001000/
        .metadata          DCP's index of every tensor and object below (written by rank 0)
        __0_0.distcp ...   DCP data files, one per writing rank (`torch.distributed.checkpoint`)
        rank-00000.safetensors  each rank's own state, one file per rank: its data-stream position
        rank-00001.safetensors  (tensors as tensors, everything else as JSON in the header)
        meta.json          step, samples seen, world size, MLflow run id, resolved config, stage
        COMPLETE           written last (JSON): step, world size, torch and avpgan versions, and the
                           size and SHA-256 of every other file; its presence = complete
    ROOT/step-0002000/
    ROOT/step-0003000.tmp/ a save in progress, or the leftovers of one that crashed

No RNG state is saved: the training loop re-seeds torch's RNG from (seed, stage, rank, step)
before every step, and the data stream draws from RNGs seeded by its position, so the position
is all a rank needs to continue exactly.

The DCP part holds one entry per name in the `state` dict given to `save`. Each object is seen
through DCP's `Stateful` protocol (`state_dict()` / `load_state_dict()`), the same way on save
and on load: networks (also the EMA copy) through `ModelState`, as plain state dicts keyed
without DDP's `module.` prefix, so they load into an unwrapped network as well as a wrapped
one; optimizers through `OptimizerState`, keyed by parameter name rather than by position;
anything that already is `Stateful` (a GradScaler, a scheduler) as itself.

Replicated state is written once, from rank 0. Under DDP the parameters and optimizer states
are identical on every rank, but batch-norm statistics (and the EMA's copies of them) are each
rank's own until DDP broadcasts rank 0's at the start of the next forward pass (DDP's default
`broadcast_buffers=True`, which Accelerate keeps). Taking rank 0's
copy makes a resumed run do exactly what the uninterrupted one does; letting DCP pick a rank
per tensor would mix ranks. Sharded tensors (FSDP, DTensor) would still be written by the
ranks that own them, in parallel.

Why a save cannot be mistaken for a finished one
------------------------------------------------
1. rank 0 removes leftovers of crashed saves (`*.tmp`), then every rank writes into
   `step-NNNNNNN.tmp/` (files fsynced by the writer);
2. all ranks report success to each other (a failure on any rank fails the save on all ranks);
3. rank 0 writes `COMPLETE`, fsyncs it and the folder, renames the folder to `step-NNNNNNN`
   and fsyncs `ROOT`; only then are checkpoints beyond the newest `keep_last` removed.

Why a damaged or foreign checkpoint is not loaded
-------------------------------------------------
`load` first checks every file against the sizes and SHA-256 hashes in `COMPLETE` (files split
between the ranks, verdict shared), and refuses unlisted files, before anything is parsed; the
error is one line naming the checkpoint, the file and the problem (`CheckpointError`). Then only
DCP's own pickles remain, read through allow-lists (`integrity.py`): `.metadata` builds DCP's
metadata classes only, non-tensor entries load as plain data only. The rank files and meta.json
are not pickles at all. The training loop falls back to the newest checkpoint that verifies.

A kill at any moment therefore leaves either a `.tmp` folder (ignored by `latest()` and removed
by the next save) or a complete checkpoint; older checkpoints are never removed before the new
one is complete. Rotation keeps the checkpoint just written plus the newest `keep_last - 1`
others, and renames a victim to `*.tmp` before deleting it, so a half-deleted folder never
looks valid either. Re-saving a step that already has a checkpoint swaps the old folder out
just before the rename; a crash between those two renames loses that one step (the older
checkpoints remain).

ROOT must be on a file system that every rank sees (a local disk for one node; NFS, Lustre, ...
across nodes). `load` checks that all ranks opened the same checkpoint.

Resuming on a different number of ranks
---------------------------------------
Networks, EMA, optimizers and scaler load on any world size: DCP reads each tensor from
wherever it was written (the networks are replicated under DDP, so nothing is split). The
per-rank files cannot be remapped (four ranks' stream positions say nothing about a split into
two), so `load`
returns `None` for the rank state when the world size differs or the rank's file is missing;
the caller re-seeds its RNGs and restarts the data stream from the new split, and says so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Collection

import safetensors
import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from avpgan import atomic, errors
from avpgan.train import integrity
from avpgan.train.integrity import MARKER, CheckpointError

META = "meta.json"


class CheckpointWriteError(RuntimeError):
    """The file system refused a checkpoint (disk full, read-only, no permission): `reason` is the
    OS's words for it. Whatever was published before is untouched."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason
_STEP_DIR = re.compile(r"step-(\d{7,})")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:07d}"


def complete(root: Path) -> list[Path]:
    """Published checkpoints under `root` (those with the marker), oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def published(root: Path) -> list[Path]:
    """Every `step-NNNNNNN` folder under `root` (with or without a marker; no `.tmp`), newest first:
    what a resume considers, so that one that lost its marker is reported rather than ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None. Unfinished `.tmp` saves are ignored."""
    found = complete(root)
    return found[-1] if found else None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextmanager
def _quiet_single_process():
    """DCP warns on every call without a process group; a single process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _rank_world() -> tuple[int, int]:
    if _distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _inner_optimizer(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Accelerate's optimizer wrapper steps through the grad scaler; DCP's helpers need the real one."""
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


class ModelState(Stateful):
    """A network's weights and buffers without DDP's `module.` prefix (wrapped or not alike)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.module)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.module, state_dict)


class OptimizerState(Stateful):
    """An optimizer's state keyed by parameter name within `modules` (every network of the
    checkpoint under its name), so a load does not depend on the order of parameters."""

    def __init__(self, optimizer: torch.optim.Optimizer, modules: nn.ModuleDict):
        self.optimizer, self.modules = _inner_optimizer(optimizer), modules

    def state_dict(self) -> dict[str, Any]:
        # Also gives a fresh optimizer its (zero) moments, so a load has somewhere to put them.
        return get_optimizer_state_dict(self.modules, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.modules, self.optimizer, state_dict)


def _stateful(state: dict[str, object]) -> dict[str, Stateful]:
    """Every object of `state` as a `Stateful`, under its name: what DCP saves and loads."""
    modules = nn.ModuleDict({k: v for k, v in state.items() if isinstance(v, nn.Module)})
    known = {id(p) for p in modules.parameters()}
    out: dict[str, Stateful] = {}
    for name, obj in state.items():
        if isinstance(obj, nn.Module):
            out[name] = ModelState(obj)
        elif isinstance(obj, torch.optim.Optimizer):
            if any(id(p) not in known for g in obj.param_groups for p in g["params"]):
                raise ValueError(f"checkpoint state: optimizer '{name}' updates parameters of a network that is "
                                 f"not in the state dict ({', '.join(modules) or 'no networks'}); add that network")
            out[name] = OptimizerState(obj, modules)
        elif isinstance(obj, Stateful):
            out[name] = obj
        else:
            raise TypeError(f"checkpoint state '{name}': {type(obj).__name__} has no state_dict()/load_state_dict()")
    return out


def _rank_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"rank-{rank:05d}.safetensors"


RANK_FORMAT = "avpgan-rank-state-1"
_TENSOR = "__tensor__"  # {"__tensor__": "t3"} in the JSON stands for tensor t3 of the file


def _encode_rank_state(rank_state: dict) -> bytes:
    """safetensors bytes: the tensors, and the rest as JSON in the header, so that reading a rank
    file can never run code (no pickle). Refuses anything else now, not at resume time."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, where: str) -> Any:
        if torch.is_tensor(x):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach().cpu().contiguous().clone()
            return {_TENSOR: key}
        if isinstance(x, dict):
            bad = [k for k in x if not isinstance(k, str) or k == _TENSOR]
            if bad:
                raise TypeError(f"checkpoint rank_state: key {bad[0]!r} at {where} (keys must be strings)")
            return {k: walk(v, f"{where}.{k}") for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"checkpoint rank_state must hold only JSON-like values (dict, list, tuple, str, numbers, "
                        f"None) and torch tensors (convert numpy arrays): {where} is a {type(x).__name__}")

    skeleton = walk(rank_state, "rank_state")
    return safetensors.torch.save(tensors, metadata={"format": RANK_FORMAT, "state": json.dumps(skeleton)})


def _decode_rank_state(path: Path) -> dict:
    """The inverse of `_encode_rank_state`; a one-line CheckpointError for a file that is not one."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if header.get("format") != RANK_FORMAT:
            raise ValueError(f"format {header.get('format')!r}, expected {RANK_FORMAT}")
        skeleton = json.loads(header["state"])
    except Exception as e:
        raise CheckpointError(f"{path}: not a rank state file ({type(e).__name__}: {e})".splitlines()[0]) from None

    def build(x: Any) -> Any:
        if isinstance(x, dict):
            if set(x) == {_TENSOR}:
                return tensors[x[_TENSOR]]
            return {k: build(v) for k, v in x.items()}
        if isinstance(x, list):
            return [build(v) for v in x]
        return x

    return build(skeleton)


def _remove(path: Path) -> None:
    """Rename to a `.tmp` name first: a folder that is half deleted must never look complete."""
    doomed = path.with_name(path.name + ".deleting.tmp")
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def _clean_stale(root: Path) -> None:
    for p in root.glob("step-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def _publish(tmp: Path, final: Path, step: int, world: int) -> None:
    """Rank 0, once every rank's files are on disk: marker (with every file's size and hash), fsync, rename."""
    for f in tmp.iterdir():
        if f.is_file():
            atomic.fsync_path(f)
    atomic.write_synced(tmp / MARKER, json.dumps(integrity.make_marker(tmp, step, world), indent=1).encode())
    atomic.fsync_path(tmp)
    if final.exists():  # the same step saved again (e.g. a resumed run that ends where it started)
        old = final.with_name(final.name + ".replaced.tmp")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    atomic.fsync_path(final.parent)


def _rotate(root: Path, keep_last: int, saved: Path) -> None:
    """Keep the checkpoint just saved and the newest `keep_last - 1` others; 0 keeps everything."""
    if keep_last <= 0:
        return
    others = [p for p in complete(root) if p != saved]
    for p in others[: max(0, len(others) - (keep_last - 1))]:
        _remove(p)


def _all_ok(error: Exception | None, world: int, what: str) -> None:
    """Collective: raise on every rank if any rank failed, so no rank waits forever for another."""
    errors = [f"{type(error).__name__}: {error}" if error else None]
    if world > 1:
        mine, errors = errors[0], [None] * world
        dist.all_gather_object(errors, mine)
    failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
    if failed:
        raise RuntimeError(f"{what} failed; " + "; ".join(failed)) from error


def save(root: Path, step: int, state: dict[str, object], *, rank_state: dict, meta: dict, keep_last: int) -> Path:
    """Write checkpoint `ROOT/step-NNNNNNN` (collective: every rank calls it) and return its path.

    `state`: networks (DDP-wrapped or not), optimizers and other objects with state_dict();
    `rank_state`: this rank's own small state (JSON-like values and tensors);
    `meta`: JSON-able facts about the run, written by rank 0;
    `keep_last`: how many complete checkpoints to keep, this one included (0 keeps all).

    An optimizer that has not stepped yet is given zero moments (and a step count of 1) by
    torch's state-dict helpers; save after the first update, as the training loop does.
    """
    root = Path(root)
    rank, world = _rank_world()
    final = step_dir(root, step)
    try:
        return _save(root, final, step, rank, world, state, rank_state, meta, keep_last)
    except (Exception, CheckpointException) as e:  # every rank gets here (the phases agree on failures)
        # Ask why while the half-written save still takes its room, then remove it: left there
        # it would only fill a full disk further (the next save would clean it anyway).
        refused = [c for c in map(errors.os_cause, _rank_errors(e)) if c is not None and c.errno in errors.WRITE_ERRNOS]
        reason = refused[0].strerror if refused else errors.write_problem(root)
        if rank == 0:
            _clean_stale(root)
        if reason:
            raise CheckpointWriteError(f"cannot write checkpoint {final}: {reason}", reason) from e
        raise


def _rank_errors(e: BaseException) -> list[BaseException]:
    """The errors behind a failed save: DCP's CheckpointException (a BaseException) carries each
    failed rank's exception instead of chaining it."""
    if isinstance(e, CheckpointException):
        return [exc for exc, _ in e.failures.values()]
    return [e]


def _save(root: Path, final: Path, step: int, rank: int, world: int, state: dict[str, object], rank_state: dict,
          meta: dict, keep_last: int) -> Path:
    """`save` without the diagnosis of a failed write."""
    tmp = final.with_name(final.name + ".tmp")
    error = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _clean_stale(root)
            tmp.mkdir()
        except Exception as e:
            error = e
    _all_ok(error, world, f"preparing checkpoint {tmp}")  # also the barrier before anyone writes there

    error = None
    try:
        atomic.write_synced(_rank_file(tmp, rank), _encode_rank_state(rank_state))
        if rank == 0:
            atomic.write_synced(tmp / META, json.dumps(meta, indent=1).encode())
    except Exception as e:  # reported to every rank below, after DCP's own collectives
        error = e
    with _quiet_single_process():
        dcp.save(_stateful(state), storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True),
                 planner=dcp.DefaultSavePlanner(dedup_save_to_lowest_rank=True), no_dist=not _distributed())
    _all_ok(error, world, f"saving checkpoint {tmp}")

    error = None
    if rank == 0:
        try:
            _publish(tmp, final, step, world)
            _rotate(root, keep_last, final)
        except Exception as e:
            error = e
    _all_ok(error, world, f"publishing checkpoint {final}")
    return final


def _agree(mine: Any, world: int) -> list[Any]:
    """Every rank's value of `mine` (collective when distributed)."""
    if world == 1:
        return [mine]
    seen: list[Any] = [None] * world
    dist.all_gather_object(seen, mine)
    return seen


def verify(path: Path) -> dict:
    """Check every file of checkpoint `path` against its marker (collective; the ranks share the
    reading) and return the marker; raises the same one-line CheckpointError on every rank."""
    path = Path(path)
    rank, world = _rank_world()
    try:
        marker, error = integrity.read_marker(path), None
    except CheckpointError as e:
        marker, error = None, str(e)
    seen = _agree((path.name, marker, error), world)
    errors = [e for _, _, e in seen if e]
    if errors:
        raise CheckpointError(errors[0])
    if len({json.dumps(s[:2], sort_keys=True) for s in seen}) > 1:  # a stale view of a shared file system
        raise RuntimeError(f"{path}: ranks disagree on the checkpoint to load: {[s[0] for s in seen]}")
    problems = [p for p in _agree(integrity.verify_files(path, marker, rank, world), world) if p]
    if problems:
        raise CheckpointError(problems[0])
    return marker


def _read_meta(path: Path) -> dict:
    try:
        return json.loads((path / META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / META}: unreadable ({type(e).__name__}: {e})") from None


def load(path: Path, state: dict[str, object], *, optional: Collection[str] = ()) -> tuple[dict, dict | None]:
    """Restore `state` in place from a complete checkpoint (collective); returns (meta, rank_state).

    Every file is verified against the marker before anything is parsed (`verify`), and DCP's
    pickles are read through allow-lists: a damaged, incomplete or crafted checkpoint raises a
    one-line `CheckpointError` and runs no code from the files.

    `optional`: names of `state` that a checkpoint written by an older avpgan may lack (the loop's
    grad scaler); absent, they keep their current state. Any other name missing is an error.

    rank_state is None when the checkpoint was written by a different number of ranks or this
    rank's file is missing: the caller must then re-seed and restart its data stream.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    rank, world = _rank_world()
    marker = verify(path)
    meta = _read_meta(path)

    reader = integrity.VerifiedReader(path, marker)
    saved = reader.read_metadata().state_dict_metadata
    # What dcp.load does with Stateful entries (state_dict, fill in place, load_state_dict), by
    # hand so that entries the checkpoint lacks are named (or left alone) before DCP reads anything.
    stateful = _stateful(state)
    sds = {name: obj.state_dict() for name, obj in stateful.items()}
    # An empty state (a disabled GradScaler) needs nothing from the checkpoint.
    absent = [n for n, sd in sds.items() if sd and not any(k == n or k.startswith(n + ".") for k in saved)]
    missing = [n for n in absent if n not in optional]
    if missing:
        names = sorted({k.split(".")[0] for k in saved})
        raise ValueError(f"{path}: checkpoint has no {', '.join(repr(n) for n in missing)} "
                         f"(it holds {', '.join(names)})")
    for name in absent:
        del stateful[name], sds[name]
    planner = integrity.PlainDataPlanner(path)
    try:
        with _quiet_single_process():
            dcp.load(sds, storage_reader=reader, planner=planner, no_dist=not _distributed())
    except CheckpointError:
        raise
    except (Exception, CheckpointException):  # DCP's CheckpointException is no Exception subclass
        if planner.refused:  # DCP wraps the planner's error in a multi-line report
            raise CheckpointError(planner.refused) from None
        raise
    for name, obj in stateful.items():
        obj.load_state_dict(sds[name])

    rank_file = _rank_file(path, rank)
    rank_state = None
    if marker["world_size"] == world and rank_file.is_file():
        rank_state = _decode_rank_state(rank_file)
    return meta, rank_state


def load_newest(root: Path, state: dict[str, object], say: Callable[[str], None] = print, *,
                optional: Collection[str] = ()) -> tuple[Path, dict, dict | None] | None:
    """Resume from the newest checkpoint under `root` that verifies (collective).

    A checkpoint that fails verification is skipped with a line through `say` naming it and
    why, and the next older one is tried. Returns (path, meta, rank_state), or None when `root`
    holds no checkpoint at all; raises CheckpointError when there are some but none verifies,
    since silently starting over would throw away the run.
    """
    candidates = published(root)
    refused: list[str] = []
    for ckpt in candidates:
        try:
            meta, rank_state = load(ckpt, state, optional=optional)
        except CheckpointError as e:
            refused.append(str(e))
            say(f"checkpoint {ckpt.name} cannot be used: {e}; trying the next older one")
            continue
        if refused:
            say(f"falling back to {ckpt}: the newest checkpoint that verifies ({len(refused)} newer one(s) refused)")
        return ckpt, meta, rank_state
    if refused:
        raise CheckpointError(f"{root}: none of the {len(candidates)} checkpoint(s) verifies (newest: {refused[0]}); "
                              f"move them away, or start over with --resume never")
    return None
