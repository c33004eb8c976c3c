"""Checkpoints a user can trust: every file verified before anything is parsed, fallback to the
newest checkpoint that verifies, and no code run from a checkpoint, even a crafted one whose
marker was rewritten to match."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from avpgan.train import checkpoint, integrity
from avpgan.train.checkpoint import CheckpointError
from ckpt_worker import digest, make_state, rank_state, save, train_step
from conftest import ROOT, subprocess_env


def saved_run(root: Path, steps: int = 3) -> dict[int, str]:
    """One process trains `steps` steps, checkpointing each (keep all); {step: digest of the state}."""
    state = make_state(seed=0, world=1)
    digests = {}
    for step in range(1, steps + 1):
        train_step(state, 0, step)
        save(root, step, state, 0, 1, 0)
        digests[step] = digest(state)
    return digests


def flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def dcp_file(ckpt: Path) -> Path:
    (data,) = ckpt.glob("*.distcp")
    return data


# Each kind of damage: (what, how to do it, what the one-line error says)
DAMAGE = {
    "meta.json not JSON": (lambda c: (c / "meta.json").write_text("{not json"),
                           r"step-0000003: meta.json has \d+ bytes, the marker recorded"),
    "meta.json same size, other content": (lambda c: flip_byte(c / "meta.json"),
                                           "step-0000003: meta.json does not match its SHA-256"),
    "empty .metadata": (lambda c: (c / ".metadata").write_bytes(b""),
                        r"step-0000003: \.metadata has 0 bytes, the marker recorded"),
    "missing .metadata": (lambda c: (c / ".metadata").unlink(),
                          r"step-0000003: \.metadata is missing \(the marker lists it\)"),
    "truncated rank file": (lambda c: truncate(c / "rank-00000.safetensors"),
                            "step-0000003: rank-00000.safetensors has .* bytes, the marker recorded"),
    "flipped byte in .distcp": (lambda c: flip_byte(dcp_file(c), 0.7),
                                r"step-0000003: __0_0\.distcp does not match its SHA-256"),
    "unlisted file": (lambda c: (c / "__1_0.distcp").write_bytes(b"x"),
                      r"step-0000003: __1_0\.distcp is not listed in the marker"),
    "marker not JSON": (lambda c: (c / "COMPLETE").write_text("{"), "step-0000003/COMPLETE: marker is not valid JSON"),
    "marker of the old format": (lambda c: (c / "COMPLETE").write_text('{"step": 3, "world_size": 1}'),
                                 "step-0000003/COMPLETE: marker lists no file hashes"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_newest_checkpoint_is_refused_and_resume_falls_back(tmp_path, kind):
    root = tmp_path / "ckpt"
    digests = saved_run(root)
    damage, message = DAMAGE[kind]
    damage(root / "step-0000003")

    state = make_state(seed=1, world=1)
    before = digest(state)
    with pytest.raises(CheckpointError, match=message) as err:
        checkpoint.load(root / "step-0000003", state)
    assert "\n" not in str(err.value)
    assert digest(state) == before  # refused before anything was loaded

    lines: list[str] = []
    path, meta, rs = checkpoint.load_newest(root, state, say=lines.append)
    assert path == root / "step-0000002" and meta["step"] == 2 and rs["step"] == 2
    assert digest(state) == digests[2]
    assert len(lines) == 2 and "checkpoint step-0000003 cannot be used" in lines[0]
    assert "falling back to" in lines[1] and "step-0000002" in lines[1]


def test_no_checkpoint_verifies_is_a_clear_error(tmp_path):
    root = tmp_path / "ckpt"
    saved_run(root, steps=2)
    flip_byte(dcp_file(root / "step-0000002"))
    (root / "step-0000001" / "meta.json").unlink()
    lines: list[str] = []
    with pytest.raises(CheckpointError, match=r"none of the 2 checkpoint\(s\) verifies .*--resume never"):
        checkpoint.load_newest(root, make_state(seed=1, world=1), say=lines.append)
    assert len(lines) == 2 and "meta.json is missing" in lines[1]
    assert checkpoint.load_newest(tmp_path / "empty", make_state(seed=1, world=1)) is None  # nothing saved yet: start


def test_a_step_folder_without_marker_is_reported_not_ignored(tmp_path):
    root = tmp_path / "ckpt"
    saved_run(root, steps=2)
    (root / "step-0000002" / "COMPLETE").unlink()
    lines: list[str] = []
    path, _, _ = checkpoint.load_newest(root, make_state(seed=1, world=1), say=lines.append)
    assert path.name == "step-0000001" and "no COMPLETE marker" in lines[0]


# ----------------------------------------------------------------------------------------------
# No code from a checkpoint. The payload creates a file: if it ever ran, the file exists.

class Payload:
    """Unpickling this calls builtins.open(path, 'w'), i.e. creates `path`."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def remark(ckpt: Path) -> None:
    """Rewrite the marker to vouch for the files as they are now: a checkpoint from someone else."""
    marker = json.loads((ckpt / "COMPLETE").read_text())
    (ckpt / "COMPLETE").write_text(json.dumps(integrity.make_marker(ckpt, marker["step"], marker["world_size"])))


def test_pickle_payload_in_metadata_never_runs(tmp_path):
    root, ran = tmp_path / "ckpt", tmp_path / "PAYLOAD_RAN"
    saved_run(root, steps=1)
    ckpt = root / "step-0000001"
    (ckpt / ".metadata").write_bytes(pickle.dumps(Payload(ran)))
    with pytest.raises(CheckpointError, match=r"\.metadata does not match its SHA-256|\.metadata has \d+ bytes"):
        checkpoint.load(ckpt, make_state(seed=1, world=1))  # the marker catches it first
    remark(ckpt)
    with pytest.raises(CheckpointError, match=r"\.metadata: refuses to unpickle (builtins|io)\.open \(only torch"):
        checkpoint.load(ckpt, make_state(seed=1, world=1))
    assert not ran.exists()


class Holder:
    """A checkpointed object whose state dict has a non-tensor entry (pickled by DCP)."""

    def __init__(self, value: object) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, sd: dict) -> None:
        self.value = sd["value"]


def test_pickle_payload_in_a_non_tensor_entry_never_runs(tmp_path):
    root, ran = tmp_path / "ckpt", tmp_path / "PAYLOAD_RAN"
    # A checkpoint someone else wrote with the project's own save: its marker is valid.
    ckpt = checkpoint.save(root, 1, {"holder": Holder(Payload(ran))}, rank_state={}, meta={}, keep_last=0)
    assert not ran.exists()
    holder = Holder(0.5)
    with pytest.raises(CheckpointError, match=r"step-0000001: entry 'holder.value' is not plain data, refusing "
                                              r"to unpickle it \(.*(builtins|io)\.open"):
        checkpoint.load(ckpt, {"holder": holder})
    assert not ran.exists() and holder.value == 0.5
    # Plain non-tensor entries (numbers, strings, lists) still load.
    ckpt = checkpoint.save(root, 2, {"holder": Holder([0.25, "x", {"n": 3}])}, rank_state={}, meta={}, keep_last=0)
    holder = Holder([0.0, "", {"n": 0}])  # DCP flattens containers: the loading side has the same structure
    checkpoint.load(ckpt, {"holder": holder})
    assert holder.value == [0.25, "x", {"n": 3}]


def test_rank_file_is_no_pickle(tmp_path):
    """The rank file is safetensors + JSON: a pickle planted there (marker rewritten) is not a rank file."""
    root, ran = tmp_path / "ckpt", tmp_path / "PAYLOAD_RAN"
    saved_run(root, steps=1)
    ckpt = root / "step-0000001"
    torch.save({"stream": Payload(ran)}, ckpt / "rank-00000.safetensors")
    remark(ckpt)
    with pytest.raises(CheckpointError, match=r"rank-00000\.safetensors: not a rank state file"):
        checkpoint.load(ckpt, make_state(seed=1, world=1))
    assert not ran.exists()
    # What it holds round-trips: tensors by value and dtype, the rest as JSON.
    saved_run(tmp_path / "ok", steps=1)
    _, rs = checkpoint.load(tmp_path / "ok" / "step-0000001", make_state(seed=1, world=1))
    expected = rank_state(0, 1)
    assert rs["stream"] == expected["stream"] and rs["torch_rng"].dtype == torch.uint8


def test_metadata_pointing_outside_the_marker_is_refused(tmp_path):
    root = tmp_path / "ckpt"
    saved_run(root, steps=1)
    ckpt = root / "step-0000001"
    md = integrity.load_dcp_metadata(ckpt / ".metadata")
    for info in md.storage_data.values():
        info.relative_path = "../../elsewhere.distcp"
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(md, f)
    remark(ckpt)
    with pytest.raises(CheckpointError, match=r"\.metadata: points at '\.\./\.\./elsewhere\.distcp', which the marker"):
        checkpoint.load(ckpt, make_state(seed=1, world=1))


# ----------------------------------------------------------------------------------------------
# The same through `avpgan train`: a real tiny run whose newest checkpoint is damaged.

def test_train_resume_falls_back_past_a_corrupt_checkpoint(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "avpgan", "train", "--config", str(ROOT / "configs/tiny.yaml"),
           f"data.shards={tiny_shards}", f"train.run_dir={run_dir}", "tracking.enabled=false",
           "train.stages=[voice]", "train.voice.batch_size=4", "train.checkpoint_every=2", "train.log_every=2",
           "train.sample_every=100", "train.keep_last=0", "data.workers=1"]
    first = subprocess.run(cmd + ["train.voice.steps=4"], capture_output=True, text=True, env=subprocess_env(),
                           cwd=ROOT, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = run_dir / "voice" / "checkpoints"
    assert [p.name for p in checkpoint.complete(ckpts)] == ["step-0000002", "step-0000004"]
    flip_byte(dcp_file(ckpts / "step-0000004"))
    os.remove(run_dir / "voice" / "model.safetensors")  # so that the stage runs again, to step 6

    again = subprocess.run(cmd + ["train.voice.steps=6"], capture_output=True, text=True, env=subprocess_env(),
                           cwd=ROOT, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[voice] checkpoint step-0000004 cannot be used: " in again.stdout
    assert "__0_0.distcp does not match its SHA-256" in again.stdout
    assert "resumed from " + str(ckpts / "step-0000002") + " at step 2" in again.stdout

    assert [p.name for p in checkpoint.complete(ckpts)] == ["step-0000002", "step-0000004", "step-0000006"]
    checkpoint.verify(ckpts / "step-0000004")  # the damaged step was written again, and verifies

    for ckpt in checkpoint.complete(ckpts):  # none verifies: stop, do not start over silently
        flip_byte(dcp_file(ckpt))
    os.remove(run_dir / "voice" / "model.safetensors")
    last = subprocess.run(cmd + ["train.voice.steps=8"], capture_output=True, text=True, env=subprocess_env(),
                          cwd=ROOT, timeout=300)
    assert last.returncode == 1
    assert last.stderr.strip().splitlines()[-1].startswith(
        f"avpgan: {ckpts}: none of the 3 checkpoint(s) verifies (newest: {ckpts / 'step-0000006'}: __0_0.distcp")
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"
