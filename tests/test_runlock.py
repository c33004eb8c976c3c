"""One `avpgan train` per run directory, with real processes: a second one is refused naming the
holder's host and pid; a lock left by a process that died is taken over."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from avpgan.train.runlock import LOCK_NAME, RunLock
from conftest import ROOT, subprocess_env

# A real holder: another process takes the lock through the project's class and waits.
HOLDER = """
import sys, time
from avpgan.train.runlock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def train(run_dir: Path) -> subprocess.CompletedProcess:
    """`avpgan train` with no stage to run: it only takes the lock, writes its files and ends."""
    cmd = [sys.executable, "-m", "avpgan", "train", "--config", str(ROOT / "configs/tiny.yaml"),
           f"train.run_dir={run_dir}", "tracking.enabled=false", "train.stages=[]"]
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=120)


def test_second_train_is_refused_then_a_dead_holders_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              env=subprocess_env(), cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = train(run_dir)
        assert refused.returncode == 1
        (line,) = refused.stderr.splitlines()  # one line, naming the holder
        assert re.fullmatch(rf"avpgan: {re.escape(str(run_dir))}: another `avpgan train` is running on this run "
                            rf"directory \(host {re.escape(socket.gethostname())}, pid {holder.pid}, since [0-9T:+-]+\); "
                            r"wait for it to end or stop it, or use another train.run_dir", line), line
        assert not (run_dir / "config.yaml").exists() and not (run_dir / "status.json").exists()
    finally:
        holder.kill()  # SIGKILL: the recorded holder stays in the file, the kernel drops the lock
        holder.wait()
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == holder.pid

    taken = train(run_dir)
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert f"took over the lock left by a process that is gone (host {socket.gethostname()}, pid {holder.pid}" \
        in taken.stdout
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    assert (run_dir / LOCK_NAME).read_text() == ""  # released on exit: the next run takes it silently
    assert "took over" not in train(run_dir).stdout


def test_lock_is_exclusive_within_one_host_and_released(tmp_path):
    first = RunLock(tmp_path).acquire()
    second = subprocess.run([sys.executable, "-c", HOLDER.replace("time.sleep(120)", ""), str(tmp_path)],
                            capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=60)
    assert second.returncode == 1 and f"pid {os.getpid()}," in second.stderr
    first.release()
    start = time.monotonic()
    again = RunLock(tmp_path).acquire()
    assert again.takeover_note() == "" and time.monotonic() - start < 1
    again.release()
