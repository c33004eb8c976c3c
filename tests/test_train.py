"""The training system with real processes: 2 gloo ranks under `accelerate launch`.

The central promise: N steps straight and (kill -9 at any moment, resume) give bit-identical
weights, because every random choice is a function of (seed, stage, rank, step) and the batch
source (the shard stream; for the GAN by default the embedding bank) is a function of its saved
position.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from avpgan.train.loop import cpu_has_bf16
from conftest import ROOT, subprocess_env

STEPS = ["train.stages=[voice,gan]", "train.voice.steps=4", "train.gan.steps=8", "train.checkpoint_every=2",
         "train.log_every=2", "train.sample_every=100", "tracking.enabled=false",
         "train.voice.batch_size=4", "train.gan.batch_size=4", "data.bank.crops=2"]
# The GAN stage's two batch sources: the embedding bank (the default) and the audio stream.
GAN_PATHS = {"bank": [], "audio": ["data.bank.enabled=false"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(shards: Path, run_dir: Path, procs: int, *extra: str) -> list[str]:
    args = ["-m", "avpgan", "train", "--config", str(ROOT / "configs/tiny.yaml"),
            f"data.shards={shards}", f"train.run_dir={run_dir}", *STEPS, *extra]
    if procs == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch/cpu2.yaml"),
            "--num_processes", str(procs), "--main_process_port", str(free_port()), *args]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=timeout, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def weights(run_dir: Path) -> dict:
    return {stage: load_file(str(run_dir / stage / "model.safetensors")) for stage in ("voice", "gan")}


def assert_identical(a: dict, b: dict) -> None:
    for stage in a:
        assert a[stage].keys() == b[stage].keys()
        for k in a[stage]:
            assert a[stage][k].equal(b[stage][k]), f"{stage}: {k} differs"


@pytest.fixture(scope="module")
def straight(tiny_shards, tmp_path_factory):
    """`straight(path)`: the uninterrupted 2-rank run on that GAN path, made once per module."""
    runs: dict[str, Path] = {}

    def get(path: str) -> Path:
        if path not in runs:
            runs[path] = tmp_path_factory.mktemp(f"straight-{path}")
            run(train_cmd(tiny_shards, runs[path], 2, *GAN_PATHS[path]))
        return runs[path]

    return get


def kill_when(cmd: list[str], ready, timeout: float = 240) -> None:
    """Start `cmd` and SIGKILL it and every process under it once `ready()` holds."""
    p = subprocess.Popen(cmd, env=subprocess_env(), cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while not ready():
            assert p.poll() is None, "training ended before it could be killed"
            assert time.time() < deadline, "timed out waiting to kill"
            time.sleep(0.005)
    finally:
        # torchrun starts its workers in sessions of their own: kill the whole tree, as a scheduler would
        procs = [p_ for p_ in psutil.Process(p.pid).children(recursive=True)] + [psutil.Process(p.pid)]
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        p.wait()
        psutil.wait_procs(procs, timeout=30)


@pytest.mark.parametrize("path", GAN_PATHS)
def test_kill9_then_resume_is_bit_identical(tiny_shards, straight, tmp_path, path):
    run_dir = tmp_path / "killed"
    ckpts = run_dir / "gan" / "checkpoints"
    # Kill in the middle of writing the step-4 checkpoint of the GAN stage (its temp dir exists).
    kill_when(train_cmd(tiny_shards, run_dir, 2, *GAN_PATHS[path]), lambda: any(ckpts.glob("step-0000004*")))
    assert not (run_dir / "gan" / "model.safetensors").exists()
    out = run(train_cmd(tiny_shards, run_dir, 2, *GAN_PATHS[path])).stdout
    assert "resumed from" in out
    assert "utterances x" not in out  # the bank built before the kill is reused, not rebuilt
    assert (run_dir / "bank" / "train.safetensors").exists() == (path == "bank")
    assert_identical(weights(straight(path)), weights(run_dir))
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished"


def test_resume_on_other_world_size(tiny_shards, tmp_path):
    """Written by 2 ranks, resumed by 1: the models and optimizers load, the stream restarts."""
    run_dir = tmp_path / "resharded"
    ckpts = run_dir / "gan" / "checkpoints"
    kill_when(train_cmd(tiny_shards, run_dir, 2), lambda: (ckpts / "step-0000004" / "COMPLETE").exists())
    voice_before = (run_dir / "voice" / "model.safetensors").read_bytes()
    p = run(train_cmd(tiny_shards, run_dir, 1))
    assert "written by 2 ranks, now 1: the bank sampler goes on at this step" in p.stdout
    assert "resumed from" in p.stdout
    # What the files say, beyond the log: the finished voice stage was not trained again, the GAN
    # went on from step 4 (not 0) on one rank, and the run ended normally.
    assert (run_dir / "voice" / "model.safetensors").read_bytes() == voice_before
    metas = {c.name: json.loads((c / "meta.json").read_text()) for c in sorted(ckpts.glob("step-*")) if c.is_dir()}
    assert [(n, m["step"], m["world_size"]) for n, m in metas.items()] == [
        ("step-0000004", 4, 2), ("step-0000006", 6, 1), ("step-0000008", 8, 1)]
    assert sorted(f.name for f in (ckpts / "step-0000008").glob("rank-*")) == ["rank-00000.safetensors"]
    gan = load_file(str(run_dir / "gan" / "model.safetensors"))
    assert gan and all(t.isfinite().all() for t in gan.values() if t.is_floating_point())
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    # RUN/train.log: the killed session's lines, then the resumed one's (appended), to the bundle
    log = (run_dir / "train.log").read_text()
    assert log.count("avpgan train ") == 2 and log.index("2 process(es)") < log.index("1 process(es)")
    assert f"run directory: {run_dir.resolve()}" in log and "MLflow: off" in log
    assert "[gan] step 8/8 (100%" in log and "resumed from" in log
    assert f"exported bundle: {(run_dir / 'model.safetensors').resolve()}" in log
    assert "exported bundle:" in p.stdout


def test_other_stages_two_ranks_then_export(tiny_shards, straight, tmp_path):
    """embedder, prior and restore (R1, CS-SFT, all losses) a few steps on 2 ranks; then a bundle."""
    import shutil

    from avpgan import bundle

    run_dir = tmp_path / "full"
    shutil.copytree(straight("bank"), run_dir)
    run(train_cmd(tiny_shards, run_dir, 2, "train.stages=[voice,embedder,gan,prior,restore]", "train.embedder.steps=3",
                  "train.prior.steps=3", "train.restore.steps=3", "train.prior.batch_size=2", "train.restore.batch_size=2",
                  "model.restorer.r1_every=2"))
    counts = bundle.export(run_dir, run_dir / "model.safetensors")
    assert set(counts) == {"voice", "generator", "restorer", "embedder"}
    b = bundle.load(run_dir / "model.safetensors")
    import torch

    with torch.no_grad():
        face = b.generator(torch.nn.functional.normalize(torch.randn(2, 64), dim=1))
        assert b.restorer(face.clamp(-1, 1)).shape == (2, 3, 64, 64)


def test_nonfinite_updates_are_skipped_then_the_run_stops(tiny_shards, tmp_path):
    """An absurd learning rate blows the weights up: updates are skipped and counted, and after
    `max_nonfinite` in a row the run stops with a message, a checkpoint and status 'failed'."""
    run_dir = tmp_path / "nan"
    p = subprocess.run(train_cmd(tiny_shards, run_dir, 1, "train.stages=[voice]", "train.voice.lr=1e30",
                                 "train.max_nonfinite=3", "train.voice.steps=50"),
                       capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=ROOT)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "non-finite losses in a row" in p.stderr
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"
    assert any((run_dir / "voice" / "checkpoints").glob("step-*/COMPLETE"))
    assert not (run_dir / "voice" / "model.safetensors").exists()


def test_bf16_mixed_precision_runs_on_cpu(tiny_shards, tmp_path):
    run_dir = tmp_path / "bf16"
    p = run(train_cmd(tiny_shards, run_dir, 1, "train.mixed_precision=bf16", "train.voice.steps=2", "train.gan.steps=2"))
    assert (run_dir / "gan" / "model.safetensors").exists()
    # emulated bf16 is slower than fp32: the run says so where the CPU lacks the instructions, and only there
    warned = "CPU without bf16 instructions" in p.stdout + p.stderr
    assert warned != cpu_has_bf16()


def test_moved_run_directory_resumes_with_its_artifacts(tiny_shards, tmp_path):
    """A run directory moved mid-run (another disk, another machine) keeps working: the resumed
    run writes its artifacts into the moved local store, nothing reappears at the old path, and
    the MLflow client reads every artifact at the new place."""
    import os
    import shutil

    from mlflow import MlflowClient

    old, new = tmp_path / "old" / "run", tmp_path / "new" / "run"
    tracked = ["tracking.enabled=true", "tracking.system_metrics=false", "train.sample_every=4"]
    stop = tmp_path / "stop"
    stop.touch()  # $AVPGAN_STOP_FILE: the first run stops (and checkpoints) after its first step
    env = dict(subprocess_env(), AVPGAN_STOP_FILE=str(stop), MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("MLFLOW_TRACKING_URI", None)
    first = subprocess.run(train_cmd(tiny_shards, old, 1, *tracked), env=env, capture_output=True, text=True,
                           timeout=300, cwd=ROOT)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert json.loads((old / "status.json").read_text())["state"] == "preempted"
    run_id = (old / "mlflow_run_id").read_text()

    shutil.move(old.parent, new.parent)
    del env["AVPGAN_STOP_FILE"]
    done = subprocess.run(train_cmd(tiny_shards, new, 1, *tracked), env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed from" in done.stdout and (new / "mlflow_run_id").read_text() == run_id
    assert "MLflow model: models:/" in done.stdout
    assert not old.parent.exists()  # nothing was written at the old place

    client = MlflowClient(f"sqlite:///{new / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["avpgan.world_size"] == "1" and run.data.tags["avpgan.device"] == "cpu"
    assert run.data.tags["mlflow.note.content"].startswith("avpgan, config `tiny`: voice (4 steps) -> gan (8 steps)")
    assert run.info.artifact_uri.removeprefix("file://").startswith(str(new.resolve()))
    top = {f.path for f in client.list_artifacts(run_id)}
    assert {"config.yaml", "images", "model"} <= top
    got = client.download_artifacts(run_id, "model/model.safetensors", str(tmp_path))
    assert Path(got).read_bytes() == (new / "model.safetensors").read_bytes()
    assert client.download_artifacts(run_id, "config.yaml", str(tmp_path))
    assert os.path.samefile(client.get_experiment(run.info.experiment_id).artifact_location.removeprefix("file://"),
                            new / "mlruns")
