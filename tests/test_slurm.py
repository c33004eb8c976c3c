"""The project's sbatch scripts on a real single-node SLURM cluster (tests/slurm_cluster.py).

Each test submits with the real scripts and the real signal path: `scancel -b -s USR1` is what
`#SBATCH --signal=B:USR1@120` does before the time limit. The trainer is tests/fake_stage.py,
a 2-process gloo program with `avpgan train`'s command line and status/checkpoint conventions;
ENTRY below is the one line that points the scripts at it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, missing_tools

ROOT = Path(__file__).resolve().parents[1]
ENTRY = str(ROOT / "tests" / "fake_stage.py")  # "-m avpgan" runs the real trainer
STAGE_STEPS = 24

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


def write_config(tmp: Path, stages: list[str], steps: int = STAGE_STEPS) -> Path:
    cfg = tmp / "config.yaml"
    body = {"train": {"run_dir": str(tmp / "run"), "stages": stages, "checkpoint_every": 1000,
                      **{s: {"steps": steps, "batch_size": 8} for s in stages}},
            "tracking": {"enabled": False}}
    cfg.write_text(json.dumps(body))  # JSON is YAML
    return cfg


def job_env(**extra: str) -> dict[str, str]:
    return {"AVPGAN_ENTRY": ENTRY, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra}


def step_of(progress: Path) -> int:
    try:
        return json.loads(progress.read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


def wait_until_training(cluster: SlurmCluster, job: str, progress: Path, min_step: int = 3) -> None:
    deadline = time.monotonic() + 90
    while step_of(progress) < min_step:
        if time.monotonic() > deadline or cluster.job(job).get("JobState") in ("FAILED", "COMPLETED"):
            raise AssertionError(f"job {job} never trained: {cluster.job(job)}\n{cluster.logs()}")
        time.sleep(0.1)


def attempts(stage_dir: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / f"attempts-rank{rank}.jsonl").read_text().splitlines()]


def check_preempted_then_resumed(tmp: Path, job_fields: dict, out: str, stage: str) -> None:
    """One preempted attempt, then a requeued one that resumed from its checkpoint and finished."""
    assert job_fields["JobState"] == "COMPLETED", out
    assert int(job_fields["Restarts"]) >= 1, out
    m = re.search(r"preempted at step (\d+), checkpoint saved", out)
    assert m, out
    stopped = int(m.group(1))
    assert 0 < stopped < STAGE_STEPS
    assert "requeueing (preempted, checkpoint saved)" in out
    # The training command exits 0 after a clean preemption save, and again when it finishes.
    assert re.findall(r"command exited with (\d+)", out) == ["0", "0"], out
    assert list((tmp / "run" / stage / "checkpoints").glob(f"step-{stopped:07d}*"))
    assert json.loads((tmp / "run" / "status.json").read_text()) == {"state": "finished", "step": STAGE_STEPS}

    ranks = [attempts(tmp / "run" / stage, r) for r in (0, 1)]
    for runs in ranks:
        assert len(runs) == 2, runs
        first, second = runs
        assert first["restart"] == 0 and first["preempted"] and first["stop"] == stopped
        assert second["restart"] >= 1 and not second["preempted"]
        assert second["start"] == stopped  # resumed from the checkpoint, not from step 0
        assert second["stop"] == STAGE_STEPS
        assert first["world"] == second["world"] == 2
    # Both ranks stopped at the same step and ended with the same (synchronised) weights.
    assert ranks[0][1]["weights"] == ranks[1][1]["weights"]


def test_node_job_preempted_by_usr1_requeues_and_resumes(cluster, tmp_path):
    cfg = write_config(tmp_path, ["gan"])
    out_file = tmp_path / "job.out"
    job = cluster.sbatch("-n", "2", f"--output={out_file}", str(ROOT / "slurm" / "train_node.sbatch"),
                         str(cfg), env=job_env(FAKE_STEP_SECONDS="0.15"), cwd=ROOT)
    wait_until_training(cluster, job, tmp_path / "run" / "gan" / "progress.json")
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    fields = cluster.wait_job(job, lambda f: f["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"), 150)
    out = out_file.read_text()
    check_preempted_then_resumed(tmp_path, fields, out, "gan")
    assert "SIGUSR1 received" in out


def test_multinode_job_preempted_by_term_requeues_and_resumes(cluster, tmp_path):
    """train_multinode.sbatch (srun -> one launcher per node) on the one node, and SIGTERM instead
    of SIGUSR1: the batch shell passes it on as SIGUSR1 through srun."""
    cfg = write_config(tmp_path, ["voice"])
    out_file = tmp_path / "job.out"
    job = cluster.sbatch("--nodes=1", "--cpus-per-task=2", f"--output={out_file}",
                         str(ROOT / "slurm" / "train_multinode.sbatch"), str(cfg),
                         env=job_env(FAKE_STEP_SECONDS="0.15", NPROC_PER_NODE="2"), cwd=ROOT)
    wait_until_training(cluster, job, tmp_path / "run" / "voice" / "progress.json")
    cluster.run("scancel", "--batch", "--signal=TERM", job)
    fields = cluster.wait_job(job, lambda f: f["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"), 150)
    out = out_file.read_text()
    check_preempted_then_resumed(tmp_path, fields, out, "voice")
    assert "SIGTERM received" in out


def test_pipeline_runs_stages_in_dependency_order(cluster, tmp_path):
    cfg = write_config(tmp_path, ["voice", "gan"], steps=4)
    env = dict(cluster.env, **job_env(GPUS_PER_NODE="0", NPROC_PER_NODE="1",
                                      SBATCH_ARGS=f"--output={tmp_path}/%x-%j.out"))
    submitted = subprocess.run([str(ROOT / "slurm" / "pipeline.sh"), str(cfg)], env=env, cwd=ROOT,
                               capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    jobs = [line.split() for line in submitted.stdout.splitlines()]
    assert [name for name, _ in jobs] == ["voice", "gan", "evaluate"]
    # Every job after the first waits on the one before it.
    for (_, prev), (_, job) in zip(jobs, jobs[1:]):
        dep = cluster.job(job).get("Dependency", "")
        assert dep.startswith(f"afterok:{prev}") or cluster.job(prev).get("JobState") == "COMPLETED", dep

    done = []
    for _, job in jobs:
        fields = cluster.wait_job(job, lambda f: f["JobState"] in ("COMPLETED", "FAILED", "CANCELLED")
                                  or f["Reason"] == "DependencyNeverSatisfied", 90)
        logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.out")))
        assert fields["JobState"] == "COMPLETED", f"{fields}\n{logs}"
        done.append(fields)
    for prev, nxt in zip(done, done[1:]):
        assert nxt["StartTime"] >= prev["EndTime"]  # ISO timestamps compare as strings
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["stages"] == {"voice": 4, "gan": 4}
    assert "train --config" in logs and "train.stages=[voice]" in logs and "evaluate --config" in logs
