"""What `avpgan train` shows while it runs, and the copy it keeps in RUN/train.log.

A run is watched in two places. On a terminal each stage gets a progress bar (tqdm: steps, rate,
time left). In a batch job's log file (SLURM) a bar would be one endless line of carriage
returns, so there the stage prints a plain progress line instead, at every log step and at least
every `PLAIN_EVERY_S` seconds. Only global rank 0 shows progress.

Everything the run prints to stdout and stderr (its own lines, warnings, MLflow's outage notes)
is also appended to RUN/train.log, so the run directory explains itself after the terminal is
gone, and a resumed run continues the same log. Of a progress bar only its last frame reaches
the file.
"""

from __future__ import annotations

import io
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO

from tqdm import tqdm

from avpgan import errors

PLAIN_EVERY_S = 60.0


class _Tee(io.TextIOBase):
    """A text stream that writes to `stream` and appends to `file`. A write starting with a
    carriage return is a progress bar redrawing itself: only the frame shown last before the
    next line goes to the file (a bar cleared to print a line leaves nothing)."""

    def __init__(self, stream: TextIO, file: TextIO):
        self.stream, self.file = stream, file
        self._frame = ""

    def write(self, s: str) -> int:
        self.stream.write(s)
        if not s:  # tqdm writes empty strings between frames
            return 0
        if s.startswith("\r"):
            self._frame = s.strip("\r").rstrip()  # blank: the bar was cleared to print a line
            return len(s)
        if self._frame:
            self.file.write(self._frame + ("" if s.startswith("\n") else "\n"))
            self._frame = ""
        self.file.write(s)
        return len(s)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", "utf-8")


@contextmanager
def copy_output_to(path: Path | None) -> Iterator[None]:
    """Append stdout and stderr to `path` while the block runs (nothing when `path` is None).

    The error that ends a run is printed by the command line after this block, so it is written
    here to the file alone: the log says how the run ended."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8", buffering=1) as f:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, f), _Tee(err, f)
        try:
            yield
        except BaseException as e:
            why = errors.one_line(e)
            f.write(f"stopped: {type(e).__name__}" + (f": {why}\n" if why else "\n"))
            raise
        finally:
            sys.stdout, sys.stderr = out, err


def duration(seconds: float) -> str:
    """'42s', '9m12s', '3h05m'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class StageProgress:
    """One stage's progress on rank 0; on other ranks (`show=False`) every call does nothing."""

    def __init__(self, stage: str, total: int, start: int, show: bool):
        self.stage, self.total, self.start, self.show = stage, total, start, show
        self.t0 = self.last_line = time.monotonic()
        self.bar = None
        if show and sys.stdout.isatty():
            self.bar = tqdm(total=total, initial=start, desc=f"[{stage}]", unit="step", file=sys.stdout,
                            dynamic_ncols=True)

    def status(self, step: int) -> str:
        """'step 40/1500 (3%, 2.72 steps/s, 8m57s left)': the rate over this process's steps."""
        done = step - self.start
        rate = done / max(time.monotonic() - self.t0, 1e-9)
        left = f", {duration((self.total - step) / rate)} left" if done > 0 and step < self.total else ""
        speed = f", {rate:.3g} steps/s" if done > 0 else ""
        return f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%{speed}{left})"

    def update(self, step: int) -> None:
        if not self.show:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
        elif time.monotonic() - self.last_line >= PLAIN_EVERY_S:
            self.say(f"[{self.stage}] {self.status(step)}")

    def say(self, line: str) -> None:
        """Print a line above the bar (or as a plain line, which restarts the plain-line clock)."""
        if not self.show:
            return
        if self.bar is not None:
            tqdm.write(line, file=sys.stdout)
        else:
            print(line, flush=True)
            self.last_line = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
