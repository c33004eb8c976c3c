"""Writing files so that neither a reader nor a crash ever sees half of one.

Every file avpgan writes for someone else to read (weights, bundles, shards, manifests, status
and run-id files, PNGs, results) goes through `replacing`: the bytes go to a hidden temp file
beside the target (same folder, so same file system) and `os.replace` renames it over the
target, which POSIX makes atomic. A reader sees the old file or the new one, and a crash leaves
at most a `.<name>.<pid>.partial` file (`avpgan shards build` removes its own on restart).

`sha256_file` is the one way a written file is fingerprinted (shards, bank inputs, checkpoints).

`write_synced` and `fsync_path` are for the checkpoint, which makes a whole folder durable
before renaming it: there the files must reach the disk, not just the page cache.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PARTIAL = ".partial"  # suffix of every temp file; `shards build` cleans up leftovers by it


def partial_path(path: Path) -> Path:
    """The temp name beside `path`: hidden, and per process, so two writers never share one."""
    return path.with_name(f".{path.name}.{os.getpid()}{PARTIAL}")


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write; when the block ends without error it replaces `path`.

    On an error the temp file is removed and `path` is left as it was. The parent folder is
    created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    """`path` holds exactly `data` afterwards, and never anything in between."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """`write_bytes` for UTF-8 text."""
    write_bytes(path, text.encode())


def write_synced(path: str | Path, data: bytes) -> None:
    """Write and fsync in place: for files inside a folder that is itself renamed when complete."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder (a folder's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, streamed: a multi-GB shard never has to fit in memory."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
