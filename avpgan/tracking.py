"""Experiment tracking on MLflow: global rank 0 only, and never in the way of training.

A tracking server is shared infrastructure: it restarts, its database hiccups, the network to it
drops. Hours of training must not depend on it. So every log call only puts an item on a bounded
queue and returns; one background thread sends the items in order through `MlflowClient`. When a
send fails for a reason that may pass (server down, timeout, 5xx) the thread keeps the item,
warns once for the whole outage, waits (1 s doubling up to `retry_max_s`) and tries again; the run
itself is created the same way, so a run can start while the server is down. When the queue is
full the oldest metric step or image is dropped (params, config, artifacts and the run's end are
never dropped). `finish()` waits for the queue and says what never reached MLflow, per kind.

What lands in the run: the flattened config as params (once: on resume only new keys; MLflow
cannot change a param), the config as `config.yaml`, tags that say how to run it again
(`reproducibility_tags`: versions, git commit, world size, device, SLURM job; set again on
every resume, so they describe the latest session) and a description, one `log_batch` per log step, sample grids
as image time series, files such as the exported model as artifacts, and `system/*` metrics of
rank 0's node (other nodes may add theirs with `attach_node_monitor`).

Default store (no `tracking.uri`, no MLFLOW_TRACKING_URI): `sqlite:///RUN/mlflow.db` with
artifacts in `RUN/mlruns`, so a run directory carries its own history. docs/mlflow.md explains
servers for clusters and browsing.
"""

from __future__ import annotations

import atexit
import logging
import os
import posixpath
import re
import sqlite3
import subprocess
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from avpgan import atomic
from avpgan.config import TrackingConfig

log = logging.getLogger(__name__)

# MLflow's limits (mlflow.utils.validation): longer values or keys are refused, larger batches too.
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000

DROPPABLE = ("metrics", "images")  # what a full queue gives up first, oldest first
WORKER_NAME = "avpgan-mlflow"


@dataclass
class _Item:
    kind: str  # params | config | tags | metrics | images | artifacts | model | end
    payload: Any


def reproducibility_tags(world_size: int, device: str, mixed_precision: str) -> dict[str, str]:
    """What a reader needs to run this run again the same way: the versions of avpgan and of the
    libraries that decide its numbers, the code's git commit (when the package is a git checkout;
    `avpgan.git_dirty` says whether it had uncommitted changes), how many processes on which
    device with which precision, and the SLURM job and nodes (when there is one)."""
    import accelerate
    import mlflow
    import torch

    import avpgan

    tags = {"avpgan.version": avpgan.__version__, "avpgan.torch_version": torch.__version__,
            "avpgan.accelerate_version": accelerate.__version__, "avpgan.mlflow_version": mlflow.__version__,
            "avpgan.world_size": str(world_size), "avpgan.device": device,
            "avpgan.mixed_precision": mixed_precision}
    commit, dirty = _git_state(Path(avpgan.__file__).resolve().parent)
    if commit:
        tags["avpgan.git_commit"] = commit
        tags["avpgan.git_dirty"] = str(dirty).lower()
    for env, key in (("SLURM_JOB_ID", "avpgan.slurm_job_id"), ("SLURM_JOB_NODELIST", "avpgan.slurm_nodelist")):
        if os.environ.get(env):
            tags[key] = os.environ[env]
    return tags


def _git_state(folder: Path) -> tuple[str | None, bool]:
    """(HEAD commit, uncommitted changes?) of the git checkout holding `folder`; (None, False)
    when it is no checkout (an installed wheel) or git is missing or slow."""
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, False
    return commit or None, bool(status.strip())


def resolve_uri(cfg: TrackingConfig, run_dir: Path) -> str:
    """cfg.uri, else $MLFLOW_TRACKING_URI, else a sqlite store inside the run directory."""
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def sqlite_artifact_root(uri: str) -> str | None:
    """For a sqlite store: `mlruns/` beside the .db file. MLflow's own default is ./mlruns of
    whatever directory the job happens to start in, which scatters artifacts."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):].split("?", 1)[0])
    return (db.parent / "mlruns").resolve().as_posix()


def repoint_moved_store(uri: str) -> int:
    """Make a moved or copied sqlite store point at its own artifacts again; returns rows changed.

    MLflow records artifact locations as absolute paths: `/old/RUN/mlruns` for the experiment,
    `/old/RUN/mlruns/<run>/artifacts` for each run, `.../models/<id>/artifacts` for logged models.
    After `mv /old/RUN /new/RUN` (or a copy to another machine) the store would still serve, and
    a resumed run still write, artifacts at the old place. This project always keeps artifacts in
    `mlruns/` beside the .db file, so any location of that form under another directory is
    rewritten to the store's own `mlruns/`. A store that never moved is left as it is."""
    root = sqlite_artifact_root(uri)
    db = Path(uri[len("sqlite:///"):].split("?", 1)[0]) if root else None
    if db is None or not db.is_file():
        return 0
    changed = 0
    con = sqlite3.connect(db, timeout=60)
    try:
        with con:  # one transaction
            changed = _repoint(con, root)
    finally:
        con.close()
    if changed:
        log.warning("MLflow store %s was moved: its artifact locations now point at %s", db, root)
    return changed


def _repoint(con: sqlite3.Connection, root: str) -> int:
    """Rewrite every `<dir>/mlruns` location other than `root` (and what lies under it) to `root`."""
    tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "experiments" not in tables:
        return 0
    old_roots = {loc for (loc,) in con.execute("SELECT artifact_location FROM experiments")
                 if loc and loc.removeprefix("file://").endswith("/mlruns") and loc.removeprefix("file://") != root}
    changed = 0
    for old in old_roots:
        changed += con.execute("UPDATE experiments SET artifact_location = ? WHERE artifact_location = ?",
                               (root, old)).rowcount
        for table, column in (("runs", "artifact_uri"), ("logged_models", "artifact_location")):
            if table in tables:  # logged_models: MLflow 3
                changed += con.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                    (root, len(old) + 1, len(old) + 1, old + "/")).rowcount
    return changed


def ui_hint(uri: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """How to look at a run: its page on a tracking server, or the `mlflow ui` command for a
    local store (with job execution off, so that no worker processes stay behind after Ctrl-C)."""
    if uri.startswith(("http://", "https://")):
        if experiment_id and run_id:
            return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        return uri
    return (f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri {uri} --port 5000 "
            "(then open http://127.0.0.1:5000)")


def _set_http_defaults(cfg: TrackingConfig) -> None:
    """MLflow's own defaults (120 s timeout, 7 retries with backoff) would stall a send for
    minutes per attempt; our queue retries anyway. The user's environment wins."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(cfg.http_timeout_s))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(cfg.http_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


class _HideWorkerRetries(logging.Filter):
    """urllib3 warns on every HTTP retry; during an outage that is noise from the tracking threads
    (ours and MLflow's system metrics monitor) only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName not in (WORKER_NAME, "SystemMetricsMonitor")


logging.getLogger("urllib3.connectionpool").addFilter(_HideWorkerRetries())


def _permanent(e: Exception) -> bool:
    """True when retrying cannot help: MLflow refused the request itself (4xx except 429), or a
    file to upload is gone. Everything else (connection, timeout, 5xx) may pass."""
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover - mlflow is a dependency
        return False
    if isinstance(e, MlflowException):
        code = e.get_http_status_code()
        return 400 <= code < 500 and code != 429
    return isinstance(e, (FileNotFoundError, IsADirectoryError, ValueError, TypeError))


def _short(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:300] + "..."


def clean_key(key: str) -> str:
    """MLflow accepts letters, digits, _ - . / space and : in keys, at most 250 characters, and
    no key that reads as a different file path ('a//b', '/a', '../a')."""
    key = posixpath.normpath(re.sub(r"[^\w.\-/ :]", "_", str(key))[:MAX_KEY]).lstrip("/")
    return "_" + key if key in ("", ".") or key.startswith("..") else key


def clean_params(params: dict[str, Any]) -> dict[str, str]:
    """Params as MLflow takes them: str values cut at 6000 characters (marked), clean keys."""
    out = {}
    for k, v in params.items():
        text = str(v)
        if len(text) > MAX_PARAM_VALUE:
            note = f"...[cut, {len(text)} chars]"
            text = text[: MAX_PARAM_VALUE - len(note)] + note
        out[clean_key(k)] = text
    return out


class Tracker:
    """MLflow run of one training run; every method is a no-op unless `cfg.enabled and is_main`.

    `run_id`: the run to continue (read from the checkpoint on resume); None starts a new run.
    `self.run_id` holds the run's id once it exists and is also written to RUN/mlflow_run_id.
    """

    def __init__(self, cfg: TrackingConfig, run_dir: Path, is_main: bool, run_id: str | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.active = bool(cfg.enabled and is_main)
        self.run_id = run_id
        self.uri = resolve_uri(cfg, self.run_dir) if cfg.enabled else ""
        self.not_logged: Counter = Counter()  # kind -> items dropped, refused or left at finish
        self.sent: Counter = Counter()
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._wake = threading.Event()  # cuts a retry wait short (flush, finish)
        self._opened = threading.Event()
        self._tried = threading.Event()  # the first attempt to open the run is over (either way)
        self._thread: threading.Thread | None = None
        self._inflight: _Item | None = None
        self._closing = False
        self._stop = False
        self._finished = False
        self._outage_since: float | None = None
        self._dropping_warned = False
        self._warned: set[str] = set()
        self._client = None
        self.experiment_id: str | None = None
        self.model_uri: str | None = None  # the logged MLflow Model, once sent
        self._run_name: str | None = None
        self._resumed = False
        self._existing_params: dict[str, str] = {}
        self._config_name: str | None = None  # set when params are sent: where the config goes
        self._monitor = None  # rank 0's SystemMetricsMonitor
        self._node_monitors: list = []

    # ------------------------------------------------------------------------------------------
    # The training loop's side: cheap, never raises.

    def start(self, params: dict[str, Any], config_yaml: str, run_name: str | None = None,
              tags: dict[str, str] | None = None) -> str | None:
        """Queue params, config and tags, start sending, wait up to start_timeout_s for the run to exist.

        Returns the run id, or None when the tracking store is not reachable yet (training goes on;
        the run is created when it comes back) or on ranks that do not track.
        """
        if not self.active:
            return None
        if self._thread is not None or self._finished:
            return self.run_id
        _set_http_defaults(self.cfg)
        self._run_name = run_name or self.cfg.run_name or None
        self._put("params", clean_params(params))
        self._put("config", config_yaml)
        if tags:
            self._put("tags", {clean_key(k): str(v) for k, v in tags.items()})
        self._thread = threading.Thread(target=self._work, name=WORKER_NAME, daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)
        self._opened.wait(self.cfg.start_timeout_s)
        if not self.uri.startswith(("http://", "https://")):
            # A local store is never "down", only slow to create its tables on a busy machine.
            self._tried.wait()
        return self.run_id if self._opened.is_set() else None

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """One MLflow `log_batch` per call; values may be floats, ints, 0-d tensors or arrays."""
        if not self.active or self._finished:
            return
        ts = int(time.time() * 1000)
        batch = []
        for k, v in metrics.items():
            try:
                value = float(v)
            except (TypeError, ValueError):
                self._warn_once(f"value:{k}", "MLflow: metric %r has a non-numeric value (%r); not logged", k, v)
                continue
            batch.append((clean_key(k), value, ts, int(step)))
        if batch:
            self._put("metrics", batch)

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        """One frame of the image time series `key` (uint8, HxW, HxWx3 or HxWx4)."""
        if not self.active or self._finished:
            return
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
            log.warning("MLflow: image %r must be uint8 HxW or HxWxC (C in 1, 3, 4), got %s %s; not logged",
                        key, arr.dtype, arr.shape)
            with self._cond:
                self.not_logged["images"] += 1
            return
        safe_key = re.sub(r"[^A-Za-z0-9_\-./ ]", "_", str(key)) or "image"
        self._put("images", (safe_key, arr.copy(), int(step), int(time.time() * 1000)))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file (e.g. the exported model); it must still exist when the queue reaches it."""
        if not self.active or self._finished:
            return
        path = Path(path)
        if not path.is_file():
            log.warning("MLflow: artifact %s is not a file; not logged", path)
            with self._cond:
                self.not_logged["artifacts"] += 1
            return
        self._put("artifacts", (str(path.resolve()), artifact_path))

    def log_model(self, bundle_path: Path, step: int) -> None:
        """Log an exported bundle as the run's MLflow Model (avpgan/mlflow_model.py): it shows
        under the run's logged models and `mlflow.pyfunc.load_model(uri).predict(waveforms)`
        makes faces. `self.model_uri` holds its models:/ URI once sent."""
        if not self.active or self._finished:
            return
        self._put("model", (str(Path(bundle_path).resolve()), int(step)))

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued so far is sent (or refused); False if that did not happen
        within `timeout_s` (during an outage it cannot)."""
        if not self.active or self._thread is None:
            return not self._queue
        self._wake.set()
        with self._cond:
            self._cond.wait_for(lambda: (not self._queue and self._inflight is None) or not self._thread.is_alive(),
                                timeout_s)
            return not self._queue and self._inflight is None

    def finish(self, status: str = "FINISHED", timeout_s: float | None = None) -> dict[str, int]:
        """End the run (FINISHED | FAILED | KILLED) after sending what is queued.

        Waits up to `timeout_s` (default finish_timeout_s) while the store takes items; gives up
        at once when it is unreachable. Returns {kind: items not logged}, which is also logged
        as a warning.
        """
        self._stop_node_monitors()
        if not self.active or self._finished:
            return {}
        self._finished = True
        atexit.unregister(self._at_exit)
        if self._thread is None:  # never started: nothing was sent
            return self._report()
        with self._cond:
            self._queue.append(_Item("end", status))
            self._closing = True
            self._cond.notify_all()
        self._wake.set()
        self._thread.join(self.cfg.finish_timeout_s if timeout_s is None else timeout_s)
        return self._report()

    def attach_node_monitor(self, run_id: str, node_id: str) -> bool:
        """Log this node's system metrics as system/<node_id>/* into rank 0's run `run_id`.

        For local rank 0 of every node except rank 0's; never ends the run. MLflow's monitor
        stops for good on the first failed request, so an outage ends this node's system metrics.
        """
        if not (self.cfg.enabled and self.cfg.system_metrics) or not run_id:
            return False
        if self.uri.startswith("sqlite:"):
            log.warning("MLflow: node system metrics need a tracking server (%s is a sqlite file); "
                        "node %s not monitored", self.uri, node_id)
            return False
        _set_http_defaults(self.cfg)
        monitor = self._new_monitor(run_id, node_id=str(node_id), resume=True)
        if monitor is None:
            return False
        self._node_monitors.append(monitor)
        atexit.register(self._stop_node_monitors)
        return True

    # ------------------------------------------------------------------------------------------
    # Queue.

    def _put(self, kind: str, payload: Any) -> None:
        with self._cond:
            if len(self._queue) >= self.cfg.queue_size:
                for i, old in enumerate(self._queue):
                    if old.kind in DROPPABLE:
                        del self._queue[i]
                        self.not_logged[old.kind] += 1
                        if not self._dropping_warned:
                            self._dropping_warned = True
                            log.warning("MLflow: %d log calls queued; dropping the oldest metric steps and "
                                        "images from now on", len(self._queue) + 1)
                        break
            self._queue.append(_Item(kind, payload))
            self._cond.notify_all()

    def _work(self) -> None:
        """The sender thread: open the run, then send items in order, holding on during outages."""
        delay = 1.0
        while True:
            with self._cond:
                while not self._queue and not self._closing and self._opened.is_set():
                    self._cond.wait()
                if self._stop or (self._closing and not self._queue):
                    self._cond.notify_all()
                    return
                item = self._inflight = self._queue.popleft() if self._queue else None
            try:
                if not self._opened.is_set():
                    try:
                        self._open()
                    finally:
                        self._tried.set()
                if item is not None:
                    self._send(item)
            except Exception as e:  # noqa: BLE001 - nothing from MLflow may reach training
                if item is not None and self._opened.is_set() and _permanent(e):
                    self._warn_once(f"refused:{item.kind}:{type(e).__name__}", "MLflow refused %s (%s); not "
                                    "logged (said once per kind)", item.kind, _short(e))
                    self._done(item, sent=False)
                    continue
                with self._cond:
                    self._inflight = None
                    if item is not None:
                        self._queue.appendleft(item)
                    self._cond.notify_all()
                self._outage(e)
                if self._closing:  # finish(): one more try was made; do not hold the job up
                    with self._cond:
                        self._stop = True
                        self._cond.notify_all()
                    return
                self._wake.wait(delay)
                self._wake.clear()
                delay = min(delay * 2, self.cfg.retry_max_s)
                continue
            delay = 1.0
            self._back()
            if item is not None:
                self._done(item, sent=True)

    def _done(self, item: _Item, sent: bool) -> None:
        with self._cond:
            (self.sent if sent else self.not_logged)[item.kind] += 1
            self._inflight = None
            self._cond.notify_all()

    def _outage(self, e: Exception) -> None:
        if self._outage_since is None:
            self._outage_since = time.time()
            log.warning("MLflow tracking at %s failed: %s. Training continues; logging is queued (up to %d "
                        "calls) and retried.", self.uri, _short(e), self.cfg.queue_size)

    def _back(self) -> None:
        if self._outage_since is None:
            return
        log.warning("MLflow tracking at %s is back after %.0f s; sending %d queued calls.",
                    self.uri, time.time() - self._outage_since, len(self._queue))
        self._outage_since = None
        self._dropping_warned = False
        if self.cfg.system_metrics and self._monitor is not None:  # it stopped on the first failure
            self._stop_monitor(self._monitor)
            self._monitor = self._new_monitor(self.run_id, node_id=None, resume=True)

    def _report(self) -> dict[str, int]:
        """Count what is still queued as not logged and say what never reached MLflow."""
        with self._cond:
            self._stop = True
            for item in list(self._queue) + ([self._inflight] if self._inflight else []):
                self.not_logged[item.kind] += 1
            self._queue.clear()
        missing = {k: v for k, v in self.not_logged.items() if v}
        if missing:
            what = ", ".join(f"{n} {'run end' if k == 'end' else k}" for k, n in sorted(missing.items()))
            tail = ""
            if self.run_id is None:
                tail = "; no run was created"
            elif "end" in missing:
                tail = "; the run's end was not recorded (it shows RUNNING)"
            log.warning("MLflow run %s at %s: not logged: %s (metrics count log steps)%s",
                        self.run_id, self.uri, what, tail)
        else:
            log.info("MLflow run %s at %s: everything logged", self.run_id, self.uri)
        return missing

    def _warn_once(self, tag: str, msg: str, *args) -> None:
        if tag not in self._warned:
            self._warned.add(tag)
            log.warning(msg, *args)

    def _at_exit(self) -> None:
        """A process leaving without finish() (an uncaught exception) marks its run FAILED."""
        if not self._finished:
            self.finish("FAILED")

    # ------------------------------------------------------------------------------------------
    # MLflow calls, all on the sender thread.

    def _open(self) -> None:
        """Continue `self.run_id` (set it RUNNING again) or create a run in the experiment."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        if self.uri.startswith("sqlite:///"):
            repoint_moved_store(self.uri)
        client = MlflowClient(self.uri)
        if self.run_id:
            try:
                run = client.get_run(self.run_id)
            except MlflowException as e:
                if e.get_http_status_code() != 404:
                    raise
                log.warning("MLflow run %s not found at %s; starting a new run", self.run_id, self.uri)
                self.run_id = None
            else:
                if run.info.status != "RUNNING":
                    client.update_run(self.run_id, status="RUNNING")
                self._existing_params = dict(run.data.params)
                self._resumed = True
        if not self.run_id:
            experiment_id = self._experiment(client)
            run = client.create_run(experiment_id, run_name=self._run_name, tags=_source_tags())
            self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id
        self._client = client
        self._save_run_id()
        if self.cfg.system_metrics:
            self._monitor = self._new_monitor(self.run_id, node_id=None, resume=self._resumed)
        log.info("MLflow run %s (%s) at %s", self.run_id, "continued" if self._resumed else "new", self.uri)
        self._opened.set()

    def _experiment(self, client) -> str:
        from mlflow.exceptions import MlflowException

        name = self.cfg.experiment
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(name, artifact_location=sqlite_artifact_root(self.uri))
        except MlflowException as e:  # created meanwhile by another run
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise e
            return exp.experiment_id

    def _save_run_id(self) -> None:
        """RUN/mlflow_run_id, so a restart continues this run even before the first checkpoint."""
        try:
            atomic.write_text(self.run_dir / "mlflow_run_id", self.run_id)
        except OSError as e:
            log.warning("MLflow: cannot write %s/mlflow_run_id: %s", self.run_dir, e)

    def _send(self, item: _Item) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client, run_id = self._client, self.run_id
        if item.kind == "params":
            params: dict[str, str] = item.payload
            old = self._existing_params
            changed = sorted(k for k, v in params.items() if k in old and old[k] != v)
            new = [Param(k, v) for k, v in params.items() if k not in old]
            if changed:
                log.warning("MLflow run %s keeps its first values for %d changed params (%s); the new config "
                            "is logged as a config-resumed-*.yaml artifact", run_id, len(changed),
                            ", ".join(changed[:5]) + (", ..." if len(changed) > 5 else ""))
            # First params of this run: config.yaml; a resume that changed the config: a dated copy.
            if not old:
                self._config_name = "config.yaml"
            elif changed or new:
                self._config_name = time.strftime("config-resumed-%Y%m%d-%H%M%S.yaml", time.gmtime())
            for i in range(0, len(new), PARAMS_PER_BATCH):
                client.log_batch(run_id, params=new[i:i + PARAMS_PER_BATCH], synchronous=True)
            old.update({p.key: p.value for p in new})
        elif item.kind == "config":
            if self._config_name:
                client.log_text(run_id, item.payload, self._config_name)
        elif item.kind == "tags":
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in item.payload.items()], synchronous=True)
        elif item.kind == "metrics":
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in item.payload]
            for i in range(0, len(metrics), METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=metrics[i:i + METRICS_PER_BATCH], synchronous=True)
        elif item.kind == "images":
            key, arr, step, ts = item.payload
            client.log_image(run_id, arr, key=key, step=step, timestamp=ts, synchronous=True)
        elif item.kind == "artifacts":
            path, artifact_path = item.payload
            client.log_artifact(run_id, path, artifact_path)
        elif item.kind == "model":
            from avpgan.mlflow_model import log_bundle_model

            path, step = item.payload
            self.model_uri = log_bundle_model(self.uri, self.experiment_id, run_id, Path(path), step)
            log.info("MLflow run %s: model %s", run_id, self.model_uri)
        elif item.kind == "end":
            if self._monitor is not None:
                self._stop_monitor(self._monitor)
                self._monitor = None
            client.set_terminated(run_id, status=item.payload)
        else:  # pragma: no cover - programming error
            raise TypeError(f"unknown tracking item {item.kind}")

    # ------------------------------------------------------------------------------------------
    # System metrics (MLflow's own monitor thread per node).

    def _new_monitor(self, run_id: str, node_id: str | None, resume: bool):
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, sampling_interval=self.cfg.system_metrics_interval_s,
                                           resume_logging=resume, node_id=node_id, tracking_uri=self.uri)
            monitor.start()
            return monitor
        except Exception as e:  # noqa: BLE001 - e.g. psutil missing; tracking goes on without them
            self._warn_once("monitor", "MLflow: system metrics not logged: %s", _short(e))
            return None

    def _stop_monitor(self, monitor) -> None:
        """MLflow's finish() joins a thread that may sit in an HTTP request: bound the wait."""
        t = threading.Thread(target=monitor.finish, daemon=True, name="avpgan-mlflow-monitor-stop")
        t.start()
        t.join(self.cfg.http_timeout_s * (self.cfg.http_retries + 1) + 5)

    def _stop_node_monitors(self) -> None:
        while self._node_monitors:
            self._stop_monitor(self._node_monitors.pop())


def _source_tags() -> dict[str, str]:
    """user, source file, git commit: what `mlflow.start_run` would record."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return resolve_tags()
    except Exception:  # noqa: BLE001 - tags are a convenience
        return {}
