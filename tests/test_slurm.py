"""The project's sbatch scripts on a real single-node SLURM cluster (tests/slurm_cluster.py),
running the real `avpgan train` and `avpgan evaluate` on the tiny config and SynthVox shards.

Each preemption test submits a 2-process gloo job with the real scripts and the real signal path:
`scancel -b -s USR1` is what `#SBATCH --signal=B:USR1@120` does before the time limit. The job
must save at a step boundary, requeue itself, come back with SLURM_RESTART_COUNT >= 1, resume from
that checkpoint (not from step 0) and finish the stage.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, subprocess_env
from slurm_cluster import SlurmCluster, missing_tools

STEPS = 24  # of the preempted stage: the signal goes out after step 2, long before the end
TINY = ["tracking.enabled=false", "train.log_every=1", "train.sample_every=1000", "train.checkpoint_every=2",
        "train.voice.batch_size=4", "train.embedder.batch_size=4", "train.gan.batch_size=4"]
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_tools()
    if missing:
        pytest.skip(f"SLURM not installed ({', '.join(missing)} not on PATH; apt-get install slurm-wlm)")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def train_args(shards: Path, run: Path, *extra: str) -> list[str]:
    """The sbatch scripts' arguments: CONFIG key=value ..."""
    return [str(ROOT / "configs" / "tiny.yaml"), f"data.shards={shards}", f"train.run_dir={run}", *TINY, *extra]


def job_env(**extra: str) -> dict[str, str]:
    env = subprocess_env()
    return {k: env[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH", "PYTHONUNBUFFERED")} | extra


def signal_after_checkpoint(cluster: SlurmCluster, job: str, ckpt: Path, out: Path, signal: str) -> None:
    """Send `signal` to the batch shell once `ckpt` is complete: the job is mid-stage by then."""
    deadline = time.monotonic() + 150
    while not (ckpt / "COMPLETE").exists():
        state = cluster.job(job).get("JobState")
        if time.monotonic() > deadline or state in DONE:
            log = out.read_text() if out.exists() else "(no job output)"
            raise AssertionError(f"job {job} ({state}) never wrote {ckpt}:\n{log[-4000:]}\n{cluster.logs()}")
        time.sleep(0.1)
    cluster.run("scancel", "--batch", f"--signal={signal}", job)


def check_preempted_then_resumed(run: Path, job: str, fields: dict, out: str, stage: str) -> int:
    """One preempted attempt, then a requeued one that resumed from its checkpoint and finished."""
    assert fields["JobState"] == "COMPLETED", out
    assert int(fields["Restarts"]) >= 1, out
    # lib.sh prefixes its lines with JOBID/SLURM_RESTART_COUNT.
    assert f"{job}/0: start on" in out and re.search(rf"{job}/[1-9]\d*: start on", out), out

    stopped = re.findall(rf"\[{stage}\] preempted at step (\d+), checkpoint saved", out)
    assert len(stopped) == 1, out
    n = int(stopped[0])
    assert 2 <= n < STEPS, out
    assert "requeueing (preempted, checkpoint saved)" in out
    # The training command exits 0 after a clean preemption save, and again when it finishes.
    assert re.findall(r"command exited with (\d+)", out) == ["0", "0"], out

    # The second attempt starts from the step-N checkpoint and goes on with step N+1.
    resumed = re.findall(rf"\[{stage}\] resumed from (\S+) at step (\d+)", out)
    assert resumed == [(str(run / stage / "checkpoints" / f"step-{n:07d}"), str(n))], out
    after = out[out.index(f"[{stage}] resumed from"):]
    assert int(re.search(rf"\[{stage}\] step (\d+)/{STEPS}", after).group(1)) == n + 1, out
    assert f"[{stage}] step {STEPS}/{STEPS}" in after

    assert json.loads((run / "status.json").read_text()) == {"state": "finished", "stage": stage}
    assert (run / stage / "model.safetensors").is_file()
    return n


def test_node_job_preempted_by_usr1_requeues_and_resumes(cluster, tiny_shards, tmp_path):
    run, out_file = tmp_path / "run", tmp_path / "job.out"
    args = train_args(tiny_shards, run, "train.stages=[voice,gan]", "train.voice.steps=2", f"train.gan.steps={STEPS}")
    job = cluster.sbatch("-n", "2", f"--output={out_file}", str(ROOT / "slurm" / "train_node.sbatch"), *args,
                         env=job_env(), cwd=ROOT)
    signal_after_checkpoint(cluster, job, run / "gan" / "checkpoints" / "step-0000002", out_file, "USR1")
    fields = cluster.wait_job(job, lambda f: f["JobState"] in DONE, 240)
    out = out_file.read_text()
    check_preempted_then_resumed(run, job, fields, out, "gan")
    assert "SIGUSR1 received" in out
    assert "2 processes" in out  # launch.sh: one gloo process per task
    # The restarted job skips the voice stage it finished before the signal.
    assert "[voice] already finished" in out[out.index("[gan] preempted"):]
    assert (run / "voice" / "model.safetensors").is_file()


def test_multinode_job_preempted_by_term_requeues_and_resumes(cluster, tiny_shards, tmp_path):
    """train_multinode.sbatch (srun -> one launcher per node) on the one node, and SIGTERM instead
    of SIGUSR1: the batch shell passes it on as SIGUSR1 through srun."""
    run, out_file = tmp_path / "run", tmp_path / "job.out"
    args = train_args(tiny_shards, run, "train.stages=[voice]", f"train.voice.steps={STEPS}")
    job = cluster.sbatch("--nodes=1", "--cpus-per-task=2", f"--output={out_file}",
                         str(ROOT / "slurm" / "train_multinode.sbatch"), *args,
                         env=job_env(NPROC_PER_NODE="2"), cwd=ROOT)
    signal_after_checkpoint(cluster, job, run / "voice" / "checkpoints" / "step-0000002", out_file, "TERM")
    fields = cluster.wait_job(job, lambda f: f["JobState"] in DONE, 240)
    out = out_file.read_text()
    check_preempted_then_resumed(run, job, fields, out, "voice")
    assert "SIGTERM received" in out
    assert "2 processes" in out


def test_pipeline_runs_stages_in_dependency_order_then_evaluates(cluster, tiny_shards, tmp_path):
    run = tmp_path / "run"
    args = train_args(tiny_shards, run, "train.stages=[voice,embedder,gan]", "train.voice.steps=2",
                      "train.embedder.steps=2", "train.gan.steps=2")
    env = dict(cluster.env, **job_env(GPUS_PER_NODE="0", NPROC_PER_NODE="1", EVAL_ARGS="--seconds 2",
                                      SBATCH_ARGS=f"--output={tmp_path}/%x-%j.out"))
    submitted = subprocess.run([str(ROOT / "slurm" / "pipeline.sh"), *args], env=env, cwd=ROOT,
                               capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    jobs = [line.split() for line in submitted.stdout.splitlines()]
    assert [name for name, _ in jobs] == ["voice", "embedder", "gan", "evaluate"]
    # Every job after the first waits on the one before it.
    for (_, prev), (_, job) in zip(jobs, jobs[1:]):
        dep = cluster.job(job).get("Dependency", "")
        assert dep.startswith(f"afterok:{prev}") or cluster.job(prev).get("JobState") == "COMPLETED", dep

    done = []
    for _, job in jobs:
        fields = cluster.wait_job(job, lambda f: f["JobState"] in DONE
                                  or f["Reason"] == "DependencyNeverSatisfied", 120)
        logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.out")))
        assert fields["JobState"] == "COMPLETED", f"{fields}\n{logs}"
        done.append(fields)
    for prev, nxt in zip(done, done[1:]):
        assert nxt["StartTime"] >= prev["EndTime"]  # ISO timestamps compare as strings

    for stage in ("voice", "embedder", "gan"):
        assert (run / stage / "model.safetensors").is_file()
        assert f"train.stages=[{stage}]" in logs
    assert f"evaluate {run} --shards {tiny_shards} --out {run / 'eval.json'} --seconds 2" in logs
    results = json.loads((run / "eval.json").read_text())
    assert results["model"] == str(run.resolve()) and results["split"] == "test" and results["seconds"] == [2.0]
    test_ids = json.loads((tiny_shards / "manifest.json").read_text())["splits"]["test"]["identities"]
    assert results["identities"] == len(test_ids) and results["corrupt_samples"] == 0
    cosine = results["results"]["2s"]["gan"]["cosine"]
    assert cosine["n"] == len(test_ids) and -1.0 <= cosine["mean"] <= 1.0
