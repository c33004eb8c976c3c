"""`avpgan train --resume PATH` and `--resume never`, in-process on one rank (the default, `auto`,
is covered with real processes and kill -9 in test_train.py)."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from avpgan.cli import main
from conftest import ROOT

STEPS = ["train.stages=[voice]", "train.voice.steps=4", "train.voice.batch_size=4", "train.checkpoint_every=2",
         "train.log_every=2", "train.sample_every=100", "train.keep_last=0", "tracking.enabled=false",
         "data.workers=0"]


def argv(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(ROOT / "configs" / "tiny.yaml"), f"data.shards={shards}",
            f"train.run_dir={run_dir}", *STEPS, *extra]


def train(shards: Path, run_dir: Path, resume: str | None, capsys) -> str:
    assert main(argv(shards, run_dir, *(["--resume", resume] if resume else []))) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def straight(tiny_shards, tmp_path_factory) -> Path:
    """4 voice steps in one go, keeping the step-2 and step-4 checkpoints."""
    run_dir = tmp_path_factory.mktemp("straight")
    assert main(argv(tiny_shards, run_dir)) == 0
    return run_dir


def model(run_dir: Path) -> dict:
    return load_file(str(run_dir / "voice" / "model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def unfinished_copy(straight: Path, to: Path) -> Path:
    """The straight run's directory without its final model, as if it had stopped after step 4."""
    shutil.copytree(straight, to)
    (to / "voice" / "model.safetensors").unlink()
    return to


def test_resume_path_continues_from_that_checkpoint(straight, tiny_shards, tmp_path, capsys):
    run_dir = unfinished_copy(straight, tmp_path / "run")
    named = run_dir / "voice" / "checkpoints" / "step-0000002"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    out = train(tiny_shards, run_dir, str(named), capsys)
    # train() catches Ctrl-C only while it runs: the caller's handlers are back afterwards
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert f"resumed from {named} at step 2" in out
    assert "step 2/4" not in out and "step 4/4" in out  # steps 3 and 4 only
    assert same(model(run_dir), model(straight))  # the same weights as the run that never stopped


def test_resume_never_starts_over(straight, tiny_shards, tmp_path, capsys):
    run_dir = unfinished_copy(straight, tmp_path / "run")
    out = train(tiny_shards, run_dir, "never", capsys)
    assert "resumed from" not in out
    assert "step 2/4" in out and "step 4/4" in out  # all four steps again, despite the step-4 checkpoint
    assert same(model(run_dir), model(straight))  # from scratch, deterministically


def test_resume_auto_takes_the_newest(straight, tiny_shards, tmp_path, capsys):
    run_dir = unfinished_copy(straight, tmp_path / "run")
    out = train(tiny_shards, run_dir, None, capsys)
    assert f"resumed from {run_dir / 'voice' / 'checkpoints' / 'step-0000004'} at step 4" in out
    assert same(model(run_dir), model(straight))


def test_resume_path_that_is_not_a_checkpoint_fails_with_its_name(straight, tiny_shards, tmp_path, capsys):
    run_dir = unfinished_copy(straight, tmp_path / "run")
    assert main(argv(tiny_shards, run_dir, "--resume", str(tmp_path / "nowhere"))) == 1
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
