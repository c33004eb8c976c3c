"""What `avpgan train` prints and keeps in RUN/train.log (avpgan/train/console.py)."""

from __future__ import annotations

import io
import sys

import pytest
from tqdm import tqdm

from avpgan.train import console


def test_log_gets_lines_and_only_the_last_frame_of_a_bar(tmp_path, monkeypatch):
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    log = tmp_path / "run" / "train.log"
    with console.copy_output_to(log):
        print("first line")
        bar = tqdm(total=3, desc="bank", mininterval=0)  # on sys.stderr, as the bank build's bar
        for _ in range(3):
            bar.update()
        bar.close()
        print("after the bar", file=sys.stderr)
    with console.copy_output_to(log):  # a resumed run appends
        print("second session")
    lines = log.read_text().splitlines()
    assert lines[0] == "first line"
    assert len(lines) == 4 and lines[1].startswith("bank: 100%") and "3/3" in lines[1]
    assert lines[2:] == ["after the bar", "second session"]
    assert "bank:   0%" in terminal.getvalue()  # the terminal saw every frame
    assert sys.stdout is terminal and sys.stderr is terminal


def test_log_records_the_error_that_ended_the_run(tmp_path):
    log = tmp_path / "train.log"
    with pytest.raises(KeyboardInterrupt):
        with console.copy_output_to(log):
            print("training")
            raise KeyboardInterrupt
    assert log.read_text().splitlines() == ["training", "stopped: KeyboardInterrupt"]


def test_plain_progress_status_has_rate_and_time_left(monkeypatch):
    clock = iter([100.0, 110.0, 110.0])
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    p = console.StageProgress("gan", total=100, start=20, show=False)
    assert p.status(40) == "step 40/100 (40%, 2 steps/s, 30s left)"
    assert p.status(100) == "step 100/100 (100%, 8 steps/s)"
