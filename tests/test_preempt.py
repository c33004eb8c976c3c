"""Preemption across real processes: a signal to ONE rank stops ALL ranks at the same step.

The workers are this file run as a script (`python tests/test_preempt.py worker OUT`): a real
Accelerator(cpu=True) over gloo with a DDP model, calling avpgan.train.preempt.should_stop at
every step boundary, like the training loop does.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "launch.sh"
MAX_STEPS = 400  # never reached when the signal works: the stop step is asserted below it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "AVPGAN_STOP"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), STEP_SECONDS="0.05", **extra)
    return env


def wait_for(cond, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a process exited ({p.returncode}) while waiting for {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def progress(out: Path, rank: int) -> int:
    try:
        return json.loads((out / f"progress-{rank}.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


def results(out: Path, n: int) -> list[dict]:
    return [json.loads((out / f"result-{r}.json").read_text()) for r in range(n)]


def finish(procs: list[subprocess.Popen], timeout: float = 60) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def start_ranks(out: Path, n: int = 2, **extra: str) -> list[subprocess.Popen]:
    """n ranks started directly (the env torchrun would give them), so each pid is known."""
    port = str(free_port())
    procs = []
    for rank in range(n):
        env = worker_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n),
                         LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra)
        procs.append(subprocess.Popen([sys.executable, __file__, "worker", str(out)], env=env))
    return procs


@pytest.mark.slow
@pytest.mark.parametrize("sig,target", [(signal.SIGUSR1, 1), (signal.SIGTERM, 0)])
def test_signal_to_one_rank_stops_all_at_same_step(tmp_path, sig, target):
    procs = start_ranks(tmp_path)
    try:
        wait_for(lambda: min(progress(tmp_path, r) for r in (0, 1)) >= 3, 60, "training", procs)
        os.kill(procs[target].pid, sig)
    finally:
        codes = finish(procs)
    assert codes == [0, 0]
    res = results(tmp_path, 2)
    assert res[0]["world"] == res[1]["world"] == 2
    assert res[0]["backend"] == "gloo"
    assert res[0]["stop"] == res[1]["stop"]
    assert 3 <= res[0]["stop"] < MAX_STEPS
    # Only the signalled rank saw the signal; the other stopped because the ranks agreed.
    assert res[target]["reason"] == sig.name
    assert res[1 - target]["reason"] is None
    # DDP kept the replicas identical up to the stop: they really trained together.
    assert res[0]["weights"] == res[1]["weights"]


@pytest.mark.slow
def test_launcher_signal_before_workers_start_is_not_lost(tmp_path):
    """SIGUSR1 while the workers are still importing torch: they cannot catch a signal yet (the
    launcher makes them ignore it until preempt.install()), so the stop file must carry it and
    they stop at their very first step boundary."""
    log = tmp_path / "launcher.err"
    env = worker_env(AVPGAN_ENTRY=__file__, PYTHON=sys.executable, NPROC_PER_NODE="2",
                     HEAD_PORT=str(free_port()))
    with open(log, "wb") as err:
        launcher = subprocess.Popen([str(LAUNCH), "worker", str(tmp_path)], env=env, cwd=ROOT,
                                    stderr=err)
    try:
        # The banner comes after the traps are set and before accelerate starts.
        wait_for(lambda: b"launch.sh:" in log.read_bytes(), 30, "the launcher banner", [launcher])
        launcher.send_signal(signal.SIGUSR1)
    finally:
        (code,) = finish([launcher])
    assert code == 0, log.read_text()
    res = results(tmp_path, 2)
    assert [r["stop"] for r in res] == [1, 1]
    assert [r["reason"] for r in res] == ["stop file", "stop file"]
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"avpgan-stop.local.0.{launcher.pid}"))


@pytest.mark.slow
def test_launcher_gives_two_gloo_processes_and_forwards_usr1(tmp_path):
    """launch/launch.sh -> accelerate launch (launch/cpu2.yaml) -> 2 workers; SIGUSR1 to the
    launcher reaches both workers, the accelerate process survives it, and everything exits 0."""
    env = worker_env(AVPGAN_ENTRY=__file__, PYTHON=sys.executable, NPROC_PER_NODE="2",
                     HEAD_PORT=str(free_port()))
    launcher = subprocess.Popen([str(LAUNCH), "worker", str(tmp_path)], env=env, cwd=ROOT)
    try:
        wait_for(lambda: min(progress(tmp_path, r) for r in (0, 1)) >= 3, 90, "training", [launcher])
        launcher.send_signal(signal.SIGUSR1)
    finally:
        (code,) = finish([launcher])
    assert code == 0
    res = results(tmp_path, 2)
    assert [r["world"] for r in res] == [2, 2]
    assert res[0]["backend"] == "gloo"
    assert res[0]["pid"] != res[1]["pid"]
    assert res[0]["ppid"] == res[1]["ppid"]  # both children of the one accelerate process
    assert res[0]["stop"] == res[1]["stop"] < MAX_STEPS
    assert res[0]["weights"] == res[1]["weights"]


@pytest.mark.slow
def test_launcher_two_nodes_c10d_usr1_on_one_node(tmp_path):
    """Two launchers as two 'nodes' of one rendezvous (c10d, launch/multinode.yaml) on localhost:
    a signal to the second node's launcher alone stops every rank at the same step."""
    port = str(free_port())
    launchers = []
    for node in (0, 1):
        env = worker_env(AVPGAN_ENTRY=__file__, PYTHON=sys.executable, NNODES="2",
                         NODE_RANK=str(node), NPROC_PER_NODE="1", HEAD_ADDR="127.0.0.1",
                         HEAD_PORT=port)
        launchers.append(subprocess.Popen([str(LAUNCH), "worker", str(tmp_path)], env=env, cwd=ROOT))
    try:
        wait_for(lambda: min(progress(tmp_path, r) for r in (0, 1)) >= 3, 90, "training", launchers)
        launchers[1].send_signal(signal.SIGUSR1)
    finally:
        codes = finish(launchers)
    assert codes == [0, 0]
    res = results(tmp_path, 2)
    assert [r["world"] for r in res] == [2, 2]
    assert res[0]["stop"] == res[1]["stop"] < MAX_STEPS
    assert sorted(r["reason"] for r in res if r["reason"]) in (["SIGUSR1"], ["stop file"])


class Stopped(NamedTuple):
    pid: int  # the trainer's, which is also its process group's
    workers: list[psutil.Process]  # its live children (the loader workers) just before the signal
    text: str  # what it printed
    step: int  # the step it stopped and saved at
    ckpt: Path  # that checkpoint


def stop_training(cmd: list[str], env: dict[str, str], run_dir: Path, log: Path, sig: int, *, exit_code: int,
                  says: str, state: str) -> Stopped:
    """Run `cmd` for 400 voice steps in its own session (a job's process group), send `sig` to the
    whole group once it trains with loader workers, and check that it stopped as a stop must: exit
    `exit_code`, no traceback, `[voice] <says> at step N, checkpoint saved`, a complete checkpoint
    of step N and status.json's `state`."""
    from avpgan.train import checkpoint

    with open(log, "wb") as out:
        p = subprocess.Popen([*cmd, "train.voice.steps=400"], env=env, cwd=ROOT, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: b"step 2/400" in log.read_bytes(), 120, "training with loader workers", [p])
        workers = [c for c in psutil.Process(p.pid).children() if c.is_running()]
        os.killpg(p.pid, sig)  # p leads its own session: pgid == pid
        code = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    text = log.read_text()
    assert code == exit_code, text[-3000:]
    assert "Traceback" not in text and "killed by signal" not in text, text[-3000:]
    stopped = re.search(rf"\[voice\] {re.escape(says)} at step (\d+), checkpoint saved", text)
    assert stopped, text[-3000:]
    step = int(stopped.group(1))
    ckpt = run_dir / "voice" / "checkpoints" / f"step-{step:07d}"
    assert checkpoint.verify(ckpt)["step"] == step
    assert json.loads((run_dir / "status.json").read_text()) == {"state": state, "stage": "voice"}
    return Stopped(p.pid, workers, text, step, ckpt)


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_still_saves(tiny_shards, tmp_path):
    """What `scancel` and SLURM preemption do: SIGTERM to every process of the job, the loader
    workers included. The workers must outlive it (they ignore it), so the trainer saves at the
    next step boundary, says `preempted`, leaves no process behind, and a resume loses no step."""
    from conftest import subprocess_env

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "avpgan", "train", "--config", str(ROOT / "configs/tiny.yaml"),
           f"data.shards={tiny_shards}", f"train.run_dir={run_dir}", "tracking.enabled=false",
           "train.stages=[voice]", "train.voice.batch_size=4", "data.workers=2", "train.log_every=2",
           "train.checkpoint_every=1000", "train.sample_every=1000"]
    stop = stop_training(cmd, subprocess_env(), run_dir, tmp_path / "train.out", signal.SIGTERM,
                         exit_code=0, says="preempted", state="preempted")
    step, ckpt = stop.step, stop.ckpt
    assert len(stop.workers) == 2, stop.workers  # the two loader workers, in the job's process group
    psutil.wait_procs(stop.workers, timeout=30)
    with pytest.raises(ProcessLookupError):  # the workers did not outlive the trainer
        os.killpg(stop.pid, 0)

    done = subprocess.run([*cmd, f"train.voice.steps={step + 2}"], env=subprocess_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resumed from {ckpt} at step {step}" in done.stdout
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    assert (run_dir / "voice" / "model.safetensors").exists()


def test_ctrl_c_saves_exits_130_run_killed_and_resume_continues(tiny_shards, tmp_path):
    """Ctrl-C as a terminal sends it: SIGINT to the whole foreground group, loader workers
    included. The trainer saves at the next step boundary, exits 130, ends its MLflow run as
    KILLED (not FAILED), and the same command resumes from that checkpoint into the same run."""
    from conftest import subprocess_env
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "avpgan", "train", "--config", str(ROOT / "configs/tiny.yaml"),
           f"data.shards={tiny_shards}", f"train.run_dir={run_dir}", "tracking.system_metrics=false",
           "train.stages=[voice]", "train.voice.batch_size=4", "data.workers=2", "train.log_every=2",
           "train.checkpoint_every=1000", "train.sample_every=1000"]
    env = dict(subprocess_env(), MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("MLFLOW_TRACKING_URI", None)
    # SIGINT to the whole group: the terminal's Ctrl-C reaches every process of the foreground group.
    stop = stop_training(cmd, env, run_dir, tmp_path / "train.out", signal.SIGINT,
                         exit_code=130, says="interrupted (Ctrl-C)", state="interrupted")
    text, step, ckpt = stop.text, stop.step, stop.ckpt
    assert "avpgan: [voice] interrupted (Ctrl-C); checkpoint saved in" in text
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text()
    assert client.get_run(run_id).info.status == "KILLED"
    assert (run_dir / "train.log").read_text().rstrip().endswith("run the same command to resume")

    done = subprocess.run([*cmd, f"train.voice.steps={step + 2}"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resumed from {ckpt} at step {step}" in done.stdout
    assert (run_dir / "mlflow_run_id").read_text() == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert max(m.step for m in client.get_metric_history(run_id, "voice/loss")) == step + 2
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


def test_process_exits_with_a_loader_worker_still_alive(tiny_shards):
    """Loader workers ignore SIGTERM, which multiprocessing's exit hook relies on to end them: a
    program that exits with a live loader iterator (a run that raised) must not wait forever."""
    from conftest import subprocess_env

    code = ("import sys; from pathlib import Path; sys.path.insert(0, 'tests'); from conftest import tiny_config; "
            "from avpgan.data.stream import make_stream; "
            f"cfg = tiny_config(Path({str(tiny_shards)!r}), Path('unused')); "
            "it = make_stream(cfg.data, 'train', 4, workers=1); next(it); keep = [it]; print('exiting')")
    p = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "exiting" in p.stdout, p.stderr[-2000:]


def test_handler_only_sets_the_flag():
    from avpgan.train import preempt

    old = {s: signal.getsignal(s) for s in preempt.SIGNALS}
    try:
        preempt.reset()
        preempt.install()
        assert not preempt.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)  # Python runs the handler at the next bytecode boundary
        assert preempt.requested() and preempt.reason() == "SIGUSR1"
    finally:
        preempt.reset()
        for s, h in old.items():
            signal.signal(s, h)


def test_second_ctrl_c_raises_at_once():
    """The first Ctrl-C only sets the flag (the step finishes and a checkpoint is saved); the
    second raises KeyboardInterrupt where the program is, for a user who cannot wait."""
    from avpgan.train import preempt

    old = {s: signal.getsignal(s) for s in preempt.SIGNALS}
    try:
        preempt.reset()
        preempt.install()
        signal.raise_signal(signal.SIGINT)
        assert preempt.requested() and preempt.reason() == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        preempt.reset()
        for s, h in old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------------------------
# The worker process.


def worker(out: Path) -> int:
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    from avpgan.train import preempt
    from avpgan.train.loop import shutdown

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    preempt.install()
    rank = accelerator.process_index
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model, opt = accelerator.prepare(model, opt)
    pause = float(os.environ.get("STEP_SECONDS", "0"))
    step = 0
    while step < MAX_STEPS:
        g = torch.Generator().manual_seed(step * 10 + rank)  # different data per rank
        x = torch.randn(4, 8, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        accelerator.backward(loss)
        opt.step()
        step += 1
        tmp = out / f"progress-{rank}.json.tmp"
        tmp.write_text(json.dumps({"step": step}))
        os.replace(tmp, out / f"progress-{rank}.json")
        time.sleep(pause)
        if preempt.should_stop(accelerator):
            break
    result = {"rank": rank, "world": accelerator.num_processes, "stop": step, "reason": preempt.reason(),
              "backend": dist.get_backend() if dist.is_initialized() else None,
              "pid": os.getpid(), "ppid": os.getppid(),
              "weights": accelerator.unwrap_model(model).weight.detach().flatten().tolist()}
    tmp = out / f"result-{rank}.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out / f"result-{rank}.json")
    # The training loop's teardown: wait for every rank, then release DDP and destroy the group.
    # Without the barrier, one rank could close its gloo sockets while the other still finished
    # the last all-reduce, and that rank aborted (exit -6, seen about once in 60 loaded runs).
    model = opt = loss = None
    shutdown(accelerator)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        sys.path.insert(0, str(ROOT))
        raise SystemExit(worker(Path(sys.argv[2])))
    raise SystemExit(f"usage: {sys.argv[0]} worker OUT_DIR")
