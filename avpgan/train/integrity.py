"""What makes a checkpoint trustworthy before any byte of it is interpreted.

Two guarantees, used by `checkpoint.py`:

1. **Integrity.** The completion marker (`COMPLETE`, JSON) lists every file of the checkpoint
   with its size and SHA-256, plus the torch and avpgan versions and the world size that wrote
   it. `verify_files` checks each file against the marker (missing, unlisted, wrong size, wrong
   hash) and raises `CheckpointError` with one line naming the checkpoint, the file and the
   problem. Nothing is parsed, let alone unpickled, before that check passed.
2. **No code from a checkpoint.** The only pickles left in a checkpoint are DCP's own: its
   `.metadata` index and the non-tensor entries of the state dicts (optimizer hyper-parameters,
   counters). `.metadata` is read by `RestrictedUnpickler`, which builds only DCP's metadata
   dataclasses, `torch.Size`, dtypes, layouts and paths; non-tensor entries are read with
   `torch.load(weights_only=True)` (plain containers, numbers and strings); tensors DCP already
   reads with `weights_only=True`. A pickle that names any other callable is refused, so a
   crafted file cannot run code even when its marker was rewritten to match.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

import avpgan
from avpgan.atomic import sha256_file

MARKER = "COMPLETE"
FORMAT = "avpgan-checkpoint-2"


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded: corrupt, incomplete, foreign or unsafe. One line."""


def file_record(path: Path) -> dict[str, Any]:
    """What the marker stores per file: enough to tell truncation (size) from corruption (hash)."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def make_marker(folder: Path, step: int, world: int) -> dict[str, Any]:
    """The marker's content for a checkpoint whose files are all written and synced."""
    files = {p.name: file_record(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER}
    return {"format": FORMAT, "step": step, "world_size": world, "torch": torch.__version__,
            "avpgan": avpgan.__version__, "files": files}


def read_marker(ckpt: Path) -> dict[str, Any]:
    """The parsed marker, or a one-line error when it is missing, unreadable or from an old format."""
    f = ckpt / MARKER
    if not f.is_file():
        raise CheckpointError(f"{ckpt}: incomplete checkpoint (no {MARKER} marker; its save was interrupted)")
    try:
        marker = json.loads(f.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: marker is not valid JSON ({e})") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        raise CheckpointError(f"{f}: marker lists no file hashes (written by an avpgan older than format {FORMAT}, "
                              f"or damaged); it cannot be verified, so it is not loaded")
    for key in ("step", "world_size"):
        if not isinstance(marker.get(key), int):
            raise CheckpointError(f"{f}: marker has no integer '{key}'")
    return marker


def file_problem(ckpt: Path, name: str, record: Any) -> str | None:
    """Why file `name` does not match its marker record, or None when it does."""
    if not isinstance(record, dict) or not isinstance(record.get("bytes"), int) or \
            not isinstance(record.get("sha256"), str):
        return f"{ckpt / MARKER}: malformed record for '{name}'"
    if "/" in name or name in ("", ".", ".."):
        return f"{ckpt / MARKER}: file name '{name}' points outside the checkpoint"
    path = ckpt / name
    if not path.is_file():
        return f"{ckpt}: {name} is missing (the marker lists it)"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"{ckpt}: {name} has {size} bytes, the marker recorded {record['bytes']} (truncated or rewritten)"
    if sha256_file(path) != record["sha256"]:
        return f"{ckpt}: {name} does not match its SHA-256 in the marker (corrupted or modified)"
    return None


def unlisted(ckpt: Path, marker: dict[str, Any]) -> list[str]:
    """Files in the folder that the marker does not vouch for (nothing unverified may be read)."""
    return sorted(p.name for p in ckpt.iterdir() if p.name != MARKER and p.name not in marker["files"])


def verify_files(ckpt: Path, marker: dict[str, Any], rank: int = 0, world: int = 1) -> str | None:
    """Check this rank's share of the files (every `world`-th, from `rank`); the first problem or None."""
    if rank == 0:
        extra = unlisted(ckpt, marker)
        if extra:
            return f"{ckpt}: {extra[0]} is not listed in the marker (unverified files are not loaded)"
    for name in sorted(marker["files"])[rank::world]:
        problem = file_problem(ckpt, name, marker["files"][name])
        if problem:
            return problem
    return None


# ----------------------------------------------------------------------------------------------
# The pickles DCP itself writes, read without running anything else.

def _dtype_or_layout(module: str, name: str) -> bool:
    """`torch.float32`, `torch.strided`: looked up as attributes, harmless values."""
    if module != "torch":
        return False
    return isinstance(getattr(torch, name, None), (torch.dtype, torch.layout))


_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps "torch.strided" to the layout object, nothing else
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes and plain values only; any other global is refused by name."""

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or _dtype_or_layout(module, name):
            return super().find_class(module, name)
        raise CheckpointError(f"{self.source}: refuses to unpickle {module}.{name} "
                              f"(only torch.distributed.checkpoint metadata classes are allowed)")


def load_dcp_metadata(path: Path) -> Metadata:
    """DCP's `.metadata`, through the allow-list; a one-line error for anything else."""
    try:
        with open(path, "rb") as f:
            metadata = RestrictedUnpickler(f, str(path)).load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated or garbled pickle
        raise CheckpointError(f"{path}: not a readable DCP index ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class VerifiedReader(FileSystemReader):
    """DCP's file reader for a checkpoint whose files were verified against its marker: the index
    goes through the allow-list, and every data file it points at must be one the marker lists."""

    def __init__(self, ckpt: Path, marker: dict[str, Any]) -> None:
        super().__init__(str(ckpt))
        self.ckpt = Path(ckpt)
        self.listed = set(marker["files"])

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = load_dcp_metadata(self.ckpt / ".metadata")
        for info in (metadata.storage_data or {}).values():
            rel = str(getattr(info, "relative_path", ""))
            if rel not in self.listed:
                raise CheckpointError(f"{self.ckpt / '.metadata'}: points at '{rel}', which the marker does not list")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class PlainDataPlanner(DefaultLoadPlanner):
    """DCP's default planner, except that non-tensor entries (pickled by DCP) load as plain data
    only (`weights_only=True`); a refusal is kept as one line, since DCP wraps errors in tracebacks."""

    def __init__(self, ckpt: Path) -> None:
        super().__init__()
        self.ckpt = Path(ckpt)
        self.refused: str | None = None

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            # torch's message goes on to suggest allow-listing the global: not advice for a foreign file
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            why = f"it names {found.group(1)}" if found else type(e).__name__
            self.refused = f"{self.ckpt}: entry '{fqn}' is not plain data, refusing to unpickle it ({why})"
            raise CheckpointError(self.refused) from None
        super().load_bytes(read_item, _as_bytes_io(obj))


def _as_bytes_io(obj: Any) -> io.BytesIO:
    """DefaultLoadPlanner.load_bytes takes a stream (and unpickles it without restrictions): hand it
    the already checked value, saved again, so its own unpickling only ever sees plain data."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf
