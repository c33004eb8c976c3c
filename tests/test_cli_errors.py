"""Every command's bad input gets one line `avpgan: ...` naming the file, a documented exit code
(avpgan.errors) and no traceback; a checkpoint the file system refuses stops training cleanly.

The inputs are real files (a truncated bundle, a text file named .wav, a 1-sample recording...);
the disk tests mount a real tmpfs / read-only bind mount and skip where mounting is not allowed.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from avpgan import errors
from avpgan.cli import main
from conftest import ROOT, subprocess_env
from test_evaluate import tiny_model

TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def bad(tiny_shards, tmp_path_factory) -> dict[str, Path]:
    """One of each bad input, next to a good bundle."""
    d = tmp_path_factory.mktemp("bad")
    good = tiny_model(tiny_shards, tmp_path_factory) / "model.safetensors"
    data = good.read_bytes()
    (d / "trunc.safetensors").write_bytes(data[:3000])
    garbled = bytearray(data)
    garbled[8:40] = b"x" * 32  # the JSON header
    (d / "garbled.safetensors").write_bytes(bytes(garbled))
    (d / "text.wav").write_text("hello, not audio\n")
    sf.write(d / "one.wav", np.full(1, 0.1, dtype=np.float32), 16000)
    sf.write(d / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    sf.write(d / "rate3.wav", np.random.default_rng(0).standard_normal(30).astype(np.float32) * 0.1, 3)
    (d / "bad.yaml").write_text("train: [1, 2\n")
    (d / "empty").mkdir()
    return {"dir": d, "model": good}


# (argv with {d} = the bad-input folder and {model} = a good bundle, exit code, text the line holds)
CASES = {
    "config missing": (["config", "show", "{d}/nope.yaml"], 2, "{d}/nope.yaml: config file not found"),
    "config garbled yaml": (["config", "show", "{d}/bad.yaml"], 2, "{d}/bad.yaml: not valid YAML at line 2"),
    "config a folder": (["config", "show", "{d}/empty"], 2, "{d}/empty: config file not found"),
    "train config missing": (["train", "--config", "{d}/nope.yaml"], 2, "{d}/nope.yaml: config file not found"),
    "train shards empty": (["train", "--config", TINY, "data.shards={d}/empty", "train.run_dir={d}/run1",
                            "tracking.enabled=false"], 1, "{d}/empty/manifest.json: manifest not found"),
    "train shards missing": (["train", "--config", TINY, "data.shards={d}/nope", "train.run_dir={d}/run2",
                              "tracking.enabled=false"], 1, "{d}/nope/manifest.json: manifest not found"),
    "export run missing": (["export", "{d}/nope", "--out", "{d}/x.safetensors"], 1, "{d}/nope/config.yaml: not a training run"),
    "export run empty": (["export", "{d}/empty", "--out", "{d}/x.safetensors"], 1, "{d}/empty/config.yaml: not a training run"),
    "evaluate model missing": (["evaluate", "{d}/nope.safetensors"], 1, "{d}/nope.safetensors: model bundle not found"),
    "evaluate model truncated": (["evaluate", "{d}/trunc.safetensors"], 1, "{d}/trunc.safetensors: not a safetensors file"),
    "evaluate shards empty": (["evaluate", "{model}", "--shards", "{d}/empty"], 1, "{d}/empty/manifest.json: manifest not found"),
    "generate model missing": (["generate", "{d}/nope.safetensors", "{d}/one.wav", "--out", "{d}/o"], 1,
                               "{d}/nope.safetensors: model bundle not found"),
    "generate model truncated": (["generate", "{d}/trunc.safetensors", "{d}/one.wav", "--out", "{d}/o"], 1,
                                 "{d}/trunc.safetensors: not a safetensors file"),
    "generate model garbled": (["generate", "{d}/garbled.safetensors", "{d}/one.wav", "--out", "{d}/o"], 1,
                               "{d}/garbled.safetensors: not a safetensors file"),
    "generate model empty folder": (["generate", "{d}/empty", "{d}/one.wav", "--out", "{d}/o"], 1,
                                    "{d}/empty/config.yaml: not a training run"),
    "generate text as wav": (["generate", "{model}", "{d}/text.wav", "--out", "{d}/o"], 1,
                             "{d}/text.wav: cannot decode audio"),
    "generate 1 sample": (["generate", "{model}", "{d}/one.wav", "--out", "{d}/o"], 1,
                          "{d}/one.wav: only 0.00 s of voice"),
    "generate silent": (["generate", "{model}", "{d}/silent.wav", "--out", "{d}/o"], 1,
                        "{d}/silent.wav: only 0.00 s of voice"),
    "generate 3 Hz rate": (["generate", "{model}", "{d}/rate3.wav", "--out", "{d}/o"], 1,
                           "{d}/rate3.wav: sample rate 3 Hz is too low"),
    "generate voice missing": (["generate", "{model}", "{d}/nope.wav", "--out", "{d}/o"], 1,
                               "{d}/nope.wav: cannot read audio (No such file or directory)"),
    "shards build missing": (["shards", "build", "--voxceleb", "{d}/nope", "--vggface", "{d}/nope", "--meta",
                              "{d}/nope.csv", "--out", "{d}/s1"], 1, "{d}/nope: --voxceleb folder not found"),
    "shards build garbled meta": (["shards", "build", "--voxceleb", "{d}/empty", "--vggface", "{d}/empty", "--meta",
                                   "{d}/bad.yaml", "--out", "{d}/s2"], 1, "{d}/bad.yaml: line 1: expected the tab-separated header"),
    "synth no identities": (["synth", "--out", "{d}/sv", "--identities", "0", "--workers", "1"], 1,
                            "synthvox: 0 identities cannot fill"),
    "synth out unwritable": (["synth", "--out", "/proc/avpgan-nope", "--identities", "3", "--workers", "1"], 1,
                             "/proc/avpgan-nope: No such file or directory"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_an_exit_code(bad, case, capsys):
    argv, code, expect = CASES[case]
    fill = {"d": str(bad["dir"]), "model": str(bad["model"])}
    rc = main([a.format(**fill) for a in argv])
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("avpgan: "), err
    assert expect.format(**fill) in lines[0]


def test_real_command_line_and_debug(bad):
    """Through the installed entry point: one line without --debug, the traceback with it."""
    cmd = [sys.executable, "-m", "avpgan", "config", "show", str(bad["dir"] / "bad.yaml")]
    plain = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=60)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.count("\n") == 1 and "bad.yaml: not valid YAML" in plain.stderr
    debug = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], capture_output=True, text=True, env=subprocess_env(),
                           cwd=ROOT, timeout=60)
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip()


def test_a_real_enospc_reads_no_space_left():
    """The kernel's own ENOSPC (writing to /dev/full) maps to its words and exit code 3."""
    try:
        with open("/dev/full", "wb", buffering=0) as f:
            f.write(b"x")
    except OSError as e:
        assert e.errno == errno.ENOSPC
        assert errors.explain(e) == (errors.EXIT_WRITE, "No space left on device")
        e.filename = "/dev/full"  # as open() reports it
        assert errors.explain(e) == (errors.EXIT_WRITE, "/dev/full: No space left on device")
        wrapped = RuntimeError("saving checkpoint failed; unexpected pos 704 vs 598")
        wrapped.__cause__ = e
        assert errors.os_cause(wrapped) is e
    else:
        pytest.fail("/dev/full took a write")


# -- the run directory refuses a checkpoint ------------------------------------------------------

def mount(*args: str) -> None:
    p = subprocess.run(["mount", *args], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount here ({p.stderr.strip()})")


def train_cmd(shards: Path, run_dir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "avpgan", "train", "--config", TINY, f"data.shards={shards}",
            f"train.run_dir={run_dir}", "tracking.enabled=false", "train.stages=[voice]", "train.voice.batch_size=4",
            f"train.voice.steps={steps}", "train.checkpoint_every=2", "train.log_every=2", "train.sample_every=1000",
            "data.workers=0"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["full disk", "read-only"])
def test_checkpoint_refused_by_the_disk_stops_cleanly(tiny_shards, tmp_path, how):
    """A run saved step 2; its checkpoint folder then fills up (a 1.2 MB tmpfs holds one voice
    checkpoint, not two) or turns read-only. Resumed, it must stop at the step-4 save with the OS's
    words and exit 3, leave step 2 verifying and no half-written step 4 behind."""
    from avpgan.train import checkpoint

    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    run_dir = tmp_path / f"run-{uuid.uuid4().hex[:6]}"
    ckpts = run_dir / "voice" / "checkpoints"
    ckpts.mkdir(parents=True)
    if how == "full disk":
        mount("-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(ckpts))
    try:
        first = subprocess.run(train_cmd(tiny_shards, run_dir, 2), capture_output=True, text=True,
                               env=subprocess_env(), cwd=ROOT, timeout=180)
        assert first.returncode == 0, first.stderr[-3000:]
        (run_dir / "voice" / "model.safetensors").unlink()  # so that the stage goes on from step 2
        if how == "read-only":
            mount("--bind", str(ckpts), str(ckpts))
            mount("-o", "remount,ro,bind", str(ckpts))
        again = subprocess.run(train_cmd(tiny_shards, run_dir, 6), capture_output=True, text=True,
                               env=subprocess_env(), cwd=ROOT, timeout=180)
        kept = ckpts / "step-0000002"
        assert checkpoint.verify(kept)["step"] == 2
        assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002"]
    finally:
        subprocess.run(["umount", str(ckpts)], capture_output=True)
    assert again.returncode == errors.EXIT_WRITE, again.stderr[-3000:]
    assert "Traceback" not in again.stderr
    line = again.stderr.strip().splitlines()[-1]
    reason = "No space left on device" if how == "full disk" else "Read-only file system"
    assert line.startswith(f"avpgan: [voice] cannot write checkpoint {ckpts / 'step-0000004'}: {reason}"), line
    assert f"the previous checkpoint {kept} is intact" in line
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"
