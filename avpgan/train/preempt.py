"""Preemption and Ctrl-C: SIGUSR1/SIGTERM/SIGINT (or a stop file) -> a flag -> every rank stops
at the same step.

A cluster warns a job before killing it (`#SBATCH --signal=B:USR1@120`, or SIGTERM on
preemption/cancel). The handler only records the signal: doing I/O, collectives or a checkpoint
inside a signal handler can deadlock (it may interrupt a collective or a write half way).
Signals can reach one rank and not another (or in a different step), so the loop asks
`should_stop(accelerator)` at each step boundary; it reduces the flag across ranks, so all ranks
get the same answer at the same step, save together and exit 0.

Ctrl-C (SIGINT) takes the same path, so an interrupted run keeps its last steps and resumes like a
preempted one; the command then exits 130 instead of 0. The first Ctrl-C puts Python's default
handler back, so a second one raises KeyboardInterrupt at once, for a user who cannot wait for
the step to end (nothing is saved then; the previous checkpoint stays).

The stop file (`$AVPGAN_STOP_FILE`, set by `launch/launch.sh`) is the second way in: a signal that
arrives before the workers installed their handlers is ignored by them (the launcher makes the
torchrun agent and its children ignore SIGUSR1, see docs/slurm.md), while a file cannot be missed.
"""

from __future__ import annotations

import os
import signal
from typing import Any

STOP_FILE_ENV = "AVPGAN_STOP_FILE"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

# Written by the handler, read by the loop; plain module globals (assignment is atomic in Python).
_requested = False
_signal_name: str | None = None


def _handler(signum: int, frame: Any) -> None:
    global _requested, _signal_name
    _requested = True
    _signal_name = signal.Signals(signum).name
    if signum == signal.SIGINT:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # os.write, not print: a handler that runs while print holds the stream's buffer must not print
        os.write(2, b"\nCtrl-C: saving a checkpoint at the end of this step, then stopping "
                    b"(Ctrl-C again stops at once, without saving)\n")


def install(signals: tuple[int, ...] = SIGNALS) -> dict[int, Any]:
    """Route SIGUSR1, SIGTERM and SIGINT to the flag, forgetting any earlier request. Call from the
    main thread before training; returns the handlers it replaced, for `restore`."""
    reset()
    return {sig: signal.signal(sig, _handler) for sig in signals}


def restore(previous: dict[int, Any]) -> None:
    """Put back the handlers `install` replaced: after `train()` returns inside a longer-lived
    program (a notebook, the test suite), Ctrl-C interrupts it as before."""
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def stop_file() -> str | None:
    return os.environ.get(STOP_FILE_ENV) or None


def requested() -> bool:
    """This process alone: has a stop signal arrived, or does the stop file exist?"""
    path = stop_file()
    return _requested or (path is not None and os.path.exists(path))


def reason() -> str | None:
    """'SIGUSR1', 'SIGTERM', 'SIGINT', 'stop file', or None when this rank saw nothing itself."""
    if _signal_name is not None:
        return _signal_name
    path = stop_file()
    if path is not None and os.path.exists(path):
        return "stop file"
    return None


def reset() -> None:
    """Forget a request (a new run in the same process)."""
    global _requested, _signal_name
    _requested = False
    _signal_name = None


def should_stop(accelerator: Any) -> bool:
    """True on every rank when any rank was asked to stop. A collective: call it on all ranks at
    the same step boundary. Costs one scalar all-reduce and a host sync, so a loop that wants to
    avoid the sync every step can call it every few steps (the same steps on every rank)."""
    if requested():
        accelerator.set_trigger()
    return bool(accelerator.check_trigger())
