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


# accelerate makes no grad scaler for fp16 on a CPU (it drops fp16 there), and its process-wide
# state refuses a second mixed-precision setting in one interpreter. So each fp16 run is its own
# process, and its Accelerator is handed the CPU GradScaler, the kind accelerate makes on a GPU,
# before the stage prepares its optimizers. growth_interval=1 changes the scale every step, so a
# scaler that is not saved, or not restored, shows in the next checkpoint.
FP16_TRAIN = """
import sys, torch
from avpgan.cli import main
from avpgan.train import loop
made = loop.make_accelerator
def with_scaler(cfg):
    accelerator = made(cfg)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    return accelerator
loop.make_accelerator = with_scaler
sys.exit(main(sys.argv[1:]))
"""


def train_fp16(shards: Path, run_dir: Path, *extra: str) -> str:
    import subprocess
    import sys

    from conftest import subprocess_env

    done = subprocess.run([sys.executable, "-c", FP16_TRAIN, *argv(shards, run_dir, "train.mixed_precision=fp16", *extra)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def saved_scaler(ckpt: Path) -> dict:
    import torch

    from avpgan.train import checkpoint

    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)  # differs from the run's before the load
    checkpoint.load(ckpt, {"scaler": scaler})  # raises when the checkpoint has no scaler
    return scaler.state_dict()


def test_fp16_grad_scaler_round_trips_through_resume(tiny_shards, tmp_path):
    straight = tmp_path / "straight"
    train_fp16(tiny_shards, straight)
    at2, at4 = (saved_scaler(straight / "voice" / "checkpoints" / f"step-{s:07d}") for s in (2, 4))
    assert at2["_growth_tracker"] == 0 and at2["scale"] != 2.0**8  # the scale moved, as growth_interval=1 makes it
    assert at4["scale"] != at2["scale"]

    resumed = unfinished_copy(straight, tmp_path / "resumed")
    out = train_fp16(tiny_shards, resumed, "--resume", str(resumed / "voice" / "checkpoints" / "step-0000002"))
    assert "resumed from" in out and "at step 2" in out
    # Steps 3 and 4 again, from the restored scale: the same scale as the run that never stopped.
    assert saved_scaler(resumed / "voice" / "checkpoints" / "step-0000004") == at4
    assert same(model(resumed), model(straight))
