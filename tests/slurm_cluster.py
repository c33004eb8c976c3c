"""A real single-node SLURM cluster on localhost, for testing the sbatch scripts end to end.

Nothing is installed here: `slurmctld`/`slurmd` come from Debian's `slurm-wlm`. Everything the
daemons write (state, spool, logs, pid files) lives under one temp folder, the ports are picked
free, and `stop()` kills both daemons whatever happened, so a failed test leaves nothing behind.

Run it by hand to poke at the cluster: `python tests/slurm_cluster.py` starts one, prints the
`SLURM_CONF` to export, and stops it on Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel")


def missing_tools() -> list[str]:
    """The SLURM programs not on PATH (empty when a cluster can be started)."""
    return [name for name in DAEMONS if shutil.which(name) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """slurmctld + one slurmd with `cpus` CPUs on this host; usable as a context manager."""

    def __init__(self, root: Path | None = None, cpus: int = 2, partition: str = "debug") -> None:
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="avpgan-slurm-"))
        self.cpus = cpus
        self.partition = partition
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        # A submitting shell may itself run inside a job: do not let its variables leak in.
        for key in list(self.env):
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and key != "SLURM_CONF":
                del self.env[key]

    def write_conf(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        lines = [
            "ClusterName=avpgantest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/none",
            "CredType=cred/none",
            # A requeued job waits cred_expire seconds (default 120) before it may start again.
            "AuthInfo=cred_expire=5",
            "SlurmUser=root",
            "SlurmdUser=root",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=1",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=10",
            "MinJobAge=600",
            "InactiveLimit=0",
            "MailProg=/bin/true",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=20000 State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        """Start both daemons and wait until the node is idle; raises with the logs if not."""
        self.write_conf()
        log = open(self.root / "log" / "daemons.out", "ab")
        try:
            for cmd in (["slurmctld", "-D", "-i"], ["slurmd", "-D", "-N", self.node]):
                # Own session: the test's signals never reach the daemons, and stop() can kill
                # each daemon's whole group (slurmd leaves slurmstepd children behind).
                self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log,
                                                   start_new_session=True))
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}:\n{self.logs()}")
            state = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"node not idle after {timeout:.0f}s (sinfo says {state!r}):\n{self.logs()}")

    def stop(self) -> None:
        """Kill slurmctld and slurmd (and any job steps left under slurmd); never raises."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
        self.procs = []
        self._kill_strays()

    def _kill_strays(self) -> None:
        """slurmstepd and job processes run in their own sessions: find them by SLURM_CONF."""
        me = os.getpid()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == me:
                continue
            try:
                environ = (d / "environ").read_bytes()
            except OSError:
                continue
            if f"SLURM_CONF={self.conf}".encode() in environ.split(b"\0"):
                try:
                    os.kill(int(d.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def cleanup(self) -> None:
        self.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # -- using the cluster -----------------------------------------------------------------------

    def run(self, *cmd: str, check: bool = True, env: dict | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        full_env = dict(self.env, **(env or {}))
        out = subprocess.run(list(cmd), env=full_env, cwd=cwd, capture_output=True, text=True)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
        return out

    def sbatch(self, *args: str, env: dict | None = None, cwd: str | Path | None = None) -> str:
        """Submit; returns the job id."""
        out = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd)
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, RestartCnt, ExitCode, ...); {} once purged."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if out.returncode != 0:
            return {}
        fields: dict[str, str] = {}
        for token in out.stdout.split():
            if "=" in token:
                key, value = token.split("=", 1)
                fields.setdefault(key, value)
        return fields

    def wait_job(self, job_id: str, until, timeout: float, poll: float = 0.25) -> dict[str, str]:
        """Poll the job until `until(fields)` holds; raises with the job and logs on timeout."""
        deadline = time.monotonic() + timeout
        fields: dict[str, str] = {}
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            if fields and until(fields):
                return fields
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} never reached the wanted state; last: {fields}\n{self.logs()}")

    def logs(self, tail: int = 40) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "daemons.out"):
            p = self.root / "log" / name
            if p.exists():
                lines = p.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {name}\n" + "\n".join(lines))
        return "\n".join(parts)


if __name__ == "__main__":
    missing = missing_tools()
    if missing:
        raise SystemExit(f"not on PATH: {', '.join(missing)} (apt-get install slurm-wlm)")
    with SlurmCluster() as cluster:
        print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C stops the cluster")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
