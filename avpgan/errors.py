"""What the `avpgan` command says when its input cannot work: one line and an exit code.

A user who hands over a missing folder, a damaged model file or a text file named `.wav`
needs the file and the problem, not a traceback; a bug still deserves its traceback. So the
command line turns the errors below (raised by input checks that name the file) into
`avpgan: <one line>` and an exit code, and anything else goes through unchanged
(`avpgan --debug ...` shows the traceback of every error). The codes (README "Commands"):

    0  done
    1  an input cannot be used (missing, empty, damaged or of the wrong kind), or the command
       stopped on purpose (non-finite losses, no checkpoint verifies, run directory locked,
       no voice gave a face)
    2  the command line or the config is wrong (argparse's own code, config values, YAML)
    3  the system refused a write: disk full, read-only file system, no permission
  130  interrupted (Ctrl-C)

This module imports nothing heavy: the command's own error types are looked up only in modules
already imported (an error cannot come from a module that never ran).
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from pathlib import Path

EXIT_OK = 0
EXIT_INPUT = 1
EXIT_USAGE = 2
EXIT_WRITE = 3
EXIT_INTERRUPTED = 130

# errno values that mean "the system would not store what we wrote", not "your file is wrong".
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM})

# Error types of avpgan and its libraries whose message already names the file and the problem.
_INPUT_ERRORS = {
    "avpgan.data.layout": "IngestError",
    "avpgan.data.stream": "StreamError",
    "avpgan.data.bank": "BankError",
    "avpgan.train.integrity": "CheckpointError",
    "avpgan.train.loop": "TrainingStopped",
    "avpgan.train.runlock": "RunLocked",
    "avpgan.models.perceptual": "PerceptualError",
    "safetensors": "SafetensorError",
}
_USAGE_ERRORS = {"avpgan.config": "ConfigError", "yaml": "YAMLError"}


def _types(table: dict[str, str]) -> tuple[type, ...]:
    return tuple(getattr(sys.modules[m], n) for m, n in table.items() if m in sys.modules and hasattr(sys.modules[m], n))


def one_line(text: object) -> str:
    """Any message folded onto one line (YAML and safetensors errors span several)."""
    return " ".join(str(text).split())


def os_error_line(e: OSError) -> str:
    """'PATH: No space left on device': the OS's own words for the errno, and the file."""
    reason = e.strerror or (os.strerror(e.errno) if e.errno else one_line(e))
    return f"{e.filename}: {reason}" if e.filename else reason


def os_cause(e: BaseException) -> OSError | None:
    """The OSError somewhere in `e`'s chain of causes (a failed checkpoint wraps the rank's error)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def write_problem(folder: str | Path, size: int = 1 << 16) -> str | None:
    """Why `folder` refuses a small synced write, in the OS's words ('No space left on device',
    'Read-only file system'), or None when it takes one.

    Asked after a write failed with a message that hides the reason: torch's zip writer reports
    a full disk as 'unexpected pos 704 vs 598', safetensors as an 'I/O error'. The probe file is
    removed again."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    path = None
    try:
        fd, path = tempfile.mkstemp(prefix=".avpgan-write-probe-", dir=folder)
        try:
            os.write(fd, b"\0" * size)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        return e.strerror or os.strerror(e.errno or 0)
    finally:
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass
    return None


def explain(e: BaseException) -> tuple[int, str] | None:
    """(exit code, one line) for an error the user's input or system caused; None for a bug."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(e, _types(_USAGE_ERRORS)):
        return EXIT_USAGE, f"config error: {one_line(e)}"
    if isinstance(e, OSError):
        code = EXIT_WRITE if e.errno in WRITE_ERRNOS else EXIT_INPUT
        return code, os_error_line(e) if e.strerror else one_line(e)
    if isinstance(e, _types(_INPUT_ERRORS)) or isinstance(e, ValueError):
        if isinstance(getattr(e, "exit_code", None), int):  # the raiser knows better (a failed save)
            return e.exit_code, one_line(e)
        cause = os_cause(e)
        code = EXIT_WRITE if cause is not None and cause.errno in WRITE_ERRNOS else EXIT_INPUT
        return code, one_line(e)
    return None
