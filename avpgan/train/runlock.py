"""One `avpgan train` per run directory: `RUN/train.lock`.

Two trainings writing the same run directory would interleave checkpoints, rotate each other's
files away and overwrite `config.yaml` and `status.json`. The lock is an advisory `flock` on
`RUN/train.lock`, held by the run's main process for its whole life; the file also records who
holds it (host, pid, start time) so that a refusal can name them.

The kernel drops a `flock` when its process dies, however it dies (kill -9, a node lost and its
job requeued elsewhere), so a lock left by a dead process is taken over without anyone deleting
files; the recorded holder is then only reported. A normal exit empties the file. The file is
never deleted: deleting it while another process opens it would let two processes lock two
different files of the same name.

File systems without `flock` (some Lustre mounts) make the lock a no-op, with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = "train.lock"


class RunLocked(RuntimeError):
    """Another process trains in this run directory; the message names its host and pid."""


def _holder(fd: int) -> dict:
    """Who the lock file says holds it ({} when empty or unreadable: a lock never recorded)."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 4096):
        raw += chunk
    try:
        holder = json.loads(raw.decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('started', '?')}"


class RunLock:
    """The held lock of one run directory; `release()` (or process exit) gives it up."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None
        self.previous: dict = {}  # the holder recorded by a process that died holding it
        self.warning = ""

    def acquire(self) -> "RunLock":
        """Take the lock or raise RunLocked naming the holder. Returns self."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                holder = _holder(fd)
                os.close(fd)
                raise RunLocked(f"{self.path.parent}: another `avpgan train` is running on this run directory "
                                f"({_describe(holder)}); wait for it to end or stop it, or use another "
                                f"train.run_dir") from None
            # No flock on this file system: train without the lock rather than not at all.
            self.warning = f"{self.path}: cannot lock ({e.strerror}); nothing stops a second run on this directory"
        self.previous = _holder(fd)
        mine = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(mine).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def takeover_note(self) -> str:
        """A line for the log when the lock was left by a process that is gone, else ''."""
        if not self.previous:
            return ""
        return f"{self.path}: took over the lock left by a process that is gone ({_describe(self.previous)})"

    def release(self) -> None:
        """Empty the file (no holder) and drop the lock."""
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
