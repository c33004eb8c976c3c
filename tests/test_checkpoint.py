"""Checkpoints with real processes: 2 gloo ranks on CPU, world-size changes, kill -9 during saves."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from avpgan.train import checkpoint
from ckpt_worker import digest, make_state, rank_state, save, snapshot, train_step
from conftest import subprocess_env

WORKER = Path(__file__).with_name("ckpt_worker.py")


def launch(tmp: Path, world: int, *args) -> list[tuple[subprocess.Popen, Path]]:
    store = tmp / f"store-{uuid.uuid4().hex}"
    procs = []
    for rank in range(world):
        log = tmp / f"{store.name}-{rank}.log"
        with open(log, "w") as out:
            cmd = [sys.executable, "-X", "faulthandler", str(WORKER), str(rank), str(world), str(store),
                   *map(str, args)]
            procs.append((subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env()), log))
    return procs


def run(tmp: Path, world: int, *args) -> None:
    procs = launch(tmp, world, *args)
    for p, log in procs:
        try:
            p.wait(timeout=300)
        except subprocess.TimeoutExpired:
            kill(procs, dump=True)
        assert p.returncode == 0, f"worker {args[0]} failed (rc {p.returncode}):\n{log.read_text()}"


def kill(procs, dump: bool = False) -> None:
    """SIGKILL; with dump=True, first SIGABRT so that faulthandler writes where each one hung."""
    for p, _ in procs:
        if dump and p.poll() is None:
            p.send_signal(signal.SIGABRT)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        p.kill()
    for p, _ in procs:
        p.wait()


def assert_same(a, b, where="") -> None:
    """Bit-identical nested state (tensors by value and dtype)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def differs(a, b) -> bool:
    try:
        assert_same(a, b)
    except AssertionError:
        return True
    return False


def check_valid(ckpt: Path) -> None:
    """A checkpoint that claims to be complete holds exactly the state its meta.json describes."""
    state = make_state(seed=1, world=1)
    meta, _ = checkpoint.load(ckpt, state)
    assert meta["step"] == int(ckpt.name.split("-")[1])
    assert digest(state) == meta["digest"], f"{ckpt}: loaded state is not the state that was saved"


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    """2 ranks train 4 steps, saving at steps 2 and 3; snapshots of every rank at steps 2, 3, 4.
    A single process trains 3 steps and saves at 3. Then 2 ranks load both checkpoints and train
    one more step from each (one launch for both: starting processes is what costs time)."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    run(tmp, 2, "train", tmp / "ckpt", 4, "2,3", 2, tmp / "snap")
    state = make_state(seed=0, world=1)  # here, without a process group
    for step in (1, 2, 3):
        train_step(state, 0, step)
    save(tmp / "ckpt1", 3, state, 0, 1, 1)
    torch.save({"state": snapshot(state)}, tmp / "snap1-3-0.pt")
    run(tmp, 2, "load", 1, tmp / "ckpt" / "step-0000003", tmp / "from2", tmp / "ckpt1" / "step-0000003", tmp / "from1")
    return tmp


def without_batchnorm_stats(snap: dict) -> dict:
    return {name: {k: v for k, v in sd.items() if "running_" not in k and "num_batches" not in k}
            for name, sd in snap.items()}


def test_two_ranks_to_two_ranks_is_bit_identical(two_rank_run):
    ckpt = two_rank_run / "ckpt" / "step-0000003"
    assert [p.name for p in checkpoint.complete(two_rank_run / "ckpt")] == ["step-0000002", "step-0000003"]
    names = {p.name for p in ckpt.iterdir()}
    assert {".metadata", "meta.json", "COMPLETE", "rank-00000.safetensors", "rank-00001.safetensors"} <= names
    marker = json.loads((ckpt / "COMPLETE").read_text())
    assert (marker["step"], marker["world_size"], marker["format"]) == (3, 2, "avpgan-checkpoint-2")
    assert marker["torch"] == torch.__version__ and "avpgan" in marker
    assert set(marker["files"]) == names - {"COMPLETE"}  # every other file, with its size and hash
    assert marker["files"]["meta.json"]["bytes"] == (ckpt / "meta.json").stat().st_size

    saved = [torch.load(two_rank_run / f"snap-3-{rank}.pt", weights_only=False) for rank in (0, 1)]
    # Under DDP the ranks share parameters and optimizer states but keep their own batch-norm
    # statistics until the next forward pass: the checkpoint holds rank 0's.
    assert differs(saved[0]["state"], saved[1]["state"])
    assert_same(without_batchnorm_stats(saved[0]["state"]), without_batchnorm_stats(saved[1]["state"]))
    assert differs(saved[0]["state"], snapshot(make_state(seed=1, world=1))), "the test would pass without a load"
    for rank in (0, 1):
        loaded = torch.load(two_rank_run / f"from2-{rank}.pt", weights_only=False)
        assert_same(saved[0]["state"], loaded["state"], f"rank {rank}")
        assert loaded["state"]["opt_g"]["state"][0]["exp_avg"].abs().sum() > 0  # Adam moments are in there
        assert_same(saved[rank]["rank_state"], loaded["rank_state"], f"rank {rank} rank_state")
        assert loaded["meta"]["step"] == 3 and loaded["meta"]["mlflow_run_id"] == "abc"
        # One more step after the resume is bit-identical to step 4 of the uninterrupted run, on every rank.
        after = torch.load(two_rank_run / f"from2-after-{rank}.pt", weights_only=False)
        straight = torch.load(two_rank_run / f"snap-4-{rank}.pt", weights_only=False)
        assert_same(straight["state"], after["state"], f"rank {rank} after resuming")


def test_two_ranks_to_one_process_loads_into_unwrapped_models(two_rank_run):
    saved = torch.load(two_rank_run / "snap-3-0.pt", weights_only=False)
    state = make_state(seed=1, world=1)  # plain nn.Modules, no process group
    meta, rs = checkpoint.load(two_rank_run / "ckpt" / "step-0000003", state)
    assert rs is None and meta["world_size"] == 2
    assert_same(saved["state"], snapshot(state))


def test_one_process_to_two_ranks(two_rank_run):
    saved = torch.load(two_rank_run / "snap1-3-0.pt", weights_only=False)
    for rank in (0, 1):
        loaded = torch.load(two_rank_run / f"from1-{rank}.pt", weights_only=False)
        assert loaded["rank_state"] is None  # written by 1 rank: the caller re-seeds
        assert_same(saved["state"], loaded["state"], f"rank {rank}")


def test_single_process_round_trip(tmp_path):
    state = make_state(seed=0, world=1)
    for step in (1, 2, 3):
        train_step(state, 0, step)
    mine = rank_state(0, 3)
    ckpt = checkpoint.save(tmp_path / "ckpt", 3, state, rank_state=mine, meta={"step": 3}, keep_last=3)
    assert ckpt == tmp_path / "ckpt" / "step-0000003" and checkpoint.latest(tmp_path / "ckpt") == ckpt
    fresh = make_state(seed=1, world=1)
    assert differs(snapshot(state), snapshot(fresh))
    meta, rs = checkpoint.load(ckpt, fresh)
    assert meta == {"step": 3}
    assert_same(snapshot(state), snapshot(fresh))
    assert_same(mine, rs)
    # The restored optimizers and scaler continue exactly like the originals.
    train_step(state, 0, 4)
    train_step(fresh, 0, 4)
    assert_same(snapshot(state), snapshot(fresh))


def test_rotation_runs_only_after_a_complete_save(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    state = make_state(seed=0, world=1)
    for step in (1, 2, 3, 4):
        train_step(state, 0, step)
        checkpoint.save(root, step, state, rank_state={}, meta={"step": step}, keep_last=2)
    assert [p.name for p in checkpoint.complete(root)] == ["step-0000003", "step-0000004"]

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_publish", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save(root, 5, state, rank_state={}, meta={"step": 5}, keep_last=1)
    assert [p.name for p in checkpoint.complete(root)] == ["step-0000003", "step-0000004"]
    assert not (root / "step-0000005.tmp").exists()  # the half-written save is cleared away
    assert checkpoint.latest(root) == root / "step-0000004"
    checkpoint.verify(root / "step-0000004")

    monkeypatch.undo()
    checkpoint.save(root, 5, state, rank_state={}, meta={"step": 5}, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-0000005"]
    # Saving the same step again replaces it; keep_last=0 keeps everything.
    checkpoint.save(root, 5, state, rank_state={}, meta={"step": 5, "again": True}, keep_last=0)
    checkpoint.save(root, 6, state, rank_state={}, meta={"step": 6}, keep_last=0)
    assert sorted(p.name for p in root.iterdir()) == ["step-0000005", "step-0000006"]
    assert json.loads((root / "step-0000005" / "meta.json").read_text())["again"] is True


def test_clear_errors(tmp_path):
    state = make_state(seed=0, world=1)
    with pytest.raises(FileNotFoundError, match="nowhere: no such checkpoint"):
        checkpoint.load(tmp_path / "nowhere", state)
    assert checkpoint.latest(tmp_path / "nowhere") is None
    ckpt = checkpoint.save(tmp_path, 1, {"g": state["g"]}, rank_state={}, meta={}, keep_last=1)
    with pytest.raises(ValueError, match=r"step-0000001: checkpoint has no 'd', 'opt_d'"):
        checkpoint.load(ckpt, {"g": state["g"], "d": state["d"], "opt_d": state["opt_d"]})
    with pytest.raises(RuntimeError, match="convert numpy arrays"):
        import numpy as np

        checkpoint.save(tmp_path, 2, state, rank_state={"np_rng": np.random.get_state()}, meta={}, keep_last=1)
    with pytest.raises(ValueError, match="optimizer 'opt_g' updates parameters of a network that is not in"):
        checkpoint.save(tmp_path, 3, {"opt_g": state["opt_g"]}, rank_state={}, meta={}, keep_last=1)


def test_optional_entries_may_be_absent(tmp_path):
    """A checkpoint from before the grad scaler was saved still loads when the scaler is optional."""
    state = make_state(seed=0, world=1)
    train_step(state, 0, 1)
    ckpt = checkpoint.save(tmp_path, 1, {k: v for k, v in state.items() if k != "scaler"},
                           rank_state={}, meta={}, keep_last=1)
    fresh = make_state(seed=1, world=1)
    before = fresh["scaler"].state_dict()
    with pytest.raises(ValueError, match="checkpoint has no 'scaler'"):
        checkpoint.load(ckpt, fresh)
    checkpoint.load(ckpt, fresh, optional=("scaler",))
    assert fresh["scaler"].state_dict() == before
    assert_same(snapshot(state)["g"], snapshot(fresh)["g"])


def wait_for(cond, procs, what: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not cond():
        for p, log in procs:
            if p.poll() is not None:
                kill(procs)
                raise AssertionError(f"worker exited (rc {p.returncode}) while waiting for {what}:\n{log.read_text()}")
        if time.monotonic() > end:
            kill(procs, dump=True)
            raise AssertionError(f"timed out waiting for {what}:\n" + "\n".join(log.read_text() for _, log in procs))
        time.sleep(0.05)


def test_kill_between_shards_and_marker(tmp_path):
    root, flag = tmp_path / "ckpt", tmp_path / "blocked"
    procs = launch(tmp_path, 2, "block", root, 1, flag)
    wait_for(flag.exists, procs, "rank 0 to block before the marker")
    tmp = root / "step-0000002.tmp"
    # Every rank's data is on disk; only the marker and the rename are missing.
    assert {".metadata", "meta.json", "rank-00000.safetensors", "rank-00001.safetensors"} <= {p.name for p in tmp.iterdir()}
    kill(procs)

    assert checkpoint.latest(root) == root / "step-0000001"  # keep_last=1, yet step 1 was not rotated away
    check_valid(root / "step-0000001")
    run(tmp_path, 2, "train", root, 3, "3", 1, tmp_path / "snap")
    assert sorted(p.name for p in root.iterdir()) == ["step-0000003"]  # stale .tmp gone, rotation done
    check_valid(root / "step-0000003")


def test_kill_at_random_times_never_leaves_an_invalid_checkpoint(tmp_path):
    """Ranks resume and save every step; kill -9 them at random moments, three times."""
    root, rng = tmp_path / "ckpt", random.Random(0)
    last = 0
    for cycle in range(3):
        procs = launch(tmp_path, 2, "loop", root, 2)
        target = last + 2  # it resumed and published at least two checkpoints of its own

        def progressed():
            newest = checkpoint.latest(root)
            return newest is not None and int(newest.name.split("-")[1]) >= target

        wait_for(progressed, procs, f"step {target} (cycle {cycle})")
        time.sleep(rng.uniform(0.0, 0.4))
        order = procs if rng.random() < 0.5 else procs[::-1]
        order[0][0].kill()
        time.sleep(rng.uniform(0.0, 0.05))
        kill(procs)
        if cycle:
            assert "resumed from" in procs[0][1].read_text()

        found = checkpoint.complete(root)
        assert 1 <= len(found) <= 3, found  # 3: killed after publishing, before rotation
        for ckpt in found:
            assert {"rank-00000.safetensors", "rank-00001.safetensors"} <= {p.name for p in ckpt.iterdir()}
            check_valid(ckpt)
        unfinished = [p for p in root.iterdir() if p not in found]
        # a kill during the free-space probe may leave its empty probe file; never a half checkpoint
        assert all(p.name.endswith(".tmp") or p.name.startswith(".avpgan-write-probe-") for p in unfinished), unfinished
        last = int(found[-1].name.split("-")[1])
