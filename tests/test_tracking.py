"""MLflow tracking against a real `mlflow server` (and the local sqlite store): what lands in the
run, resume into the same run, outages that must not stop training, ranks that must stay silent."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from avpgan.config import TrackingConfig
from avpgan.tracking import Tracker

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

LOGGER = "avpgan.tracking"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on 127.0.0.1 with a sqlite store; can be stopped and started again on the
    same port and store, as an outage would look."""

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.log = root / "server.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = Path(sys.executable).parent / "mlflow"
        cmd = [str(exe), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # SIGTERM to the server stops its workers too
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow_server"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    # Fail fast on refused connections; the tracker would otherwise set its own defaults once.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _cfg(uri: str, experiment: str, **kw) -> TrackingConfig:
    kw.setdefault("system_metrics", False)
    return TrackingConfig(uri=uri, experiment=experiment, **kw)


def _messages(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and text in r.getMessage()]


def _wait_for_metric(client: MlflowClient, run_id: str, key: str, timeout: float = 60) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if key in client.get_run(run_id).data.metrics:
            return True
        time.sleep(0.2)
    return False


def test_run_gets_params_metrics_images_config_artifacts_and_system_metrics(server, tmp_path):
    cfg = _cfg(server.uri, "full", system_metrics=True, system_metrics_interval_s=0.2)
    params = {"train.gan.steps": 50000, "train.gan.betas": [0.5, 0.999], "long": "v" * 7000, "odd(key)": 1}
    config_yaml = yaml.safe_dump({"train": {"gan": {"steps": 50000}}})
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"\x00weights" * 10)
    grid = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)

    tracker = Tracker(cfg, tmp_path / "run", is_main=True)
    run_id = tracker.start(params, config_yaml, "full-run")
    assert run_id is not None and run_id == tracker.run_id
    assert (tmp_path / "run" / "mlflow_run_id").read_text() == run_id
    for step in range(0, 50, 10):
        tracker.log_metrics({"loss/g": 1.0 / (step + 1), "loss/d": np.float32(0.5), "lr": 2e-4}, step=step)
    tracker.log_image(grid, key="gan_samples", step=40)
    tracker.log_artifact(model, artifact_path="model")

    client = MlflowClient(server.uri)
    # Another node's local rank 0 adds its system metrics to the same run and never ends it.
    node = Tracker(cfg, tmp_path / "run", is_main=False)
    assert node.attach_node_monitor(run_id, "node1")
    assert _wait_for_metric(client, run_id, "system/node1/cpu_utilization_percentage")
    assert _wait_for_metric(client, run_id, "system/cpu_utilization_percentage")
    node.finish()
    assert client.get_run(run_id).info.status == "RUNNING"
    assert tracker.finish() == {}

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "full-run"
    p = run.data.params
    assert p["train.gan.steps"] == "50000" and p["train.gan.betas"] == "[0.5, 0.999]"
    assert len(p["long"]) == 6000 and p["long"].startswith("vvv") and "cut, 7000 chars" in p["long"]
    assert p["odd_key_"] == "1"
    history = client.get_metric_history(run_id, "loss/g")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 10, 20, 30, 40]
    assert {m.step: m.value for m in history}[10] == pytest.approx(1 / 11)
    assert {m.value for m in client.get_metric_history(run_id, "loss/d")} == {0.5}
    top = {f.path for f in client.list_artifacts(run_id)}
    assert {"config.yaml", "images", "model"} <= top
    assert yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()) == \
        yaml.safe_load(config_yaml)
    assert [f.path for f in client.list_artifacts(run_id, "model")] == ["model/model.safetensors"]
    pngs = [f.path for f in client.list_artifacts(run_id, "images") if f.path.endswith(".png")]
    assert len(pngs) == 1 and "gan_samples+step+40+" in pngs[0]
    from PIL import Image

    back = np.asarray(Image.open(client.download_artifacts(run_id, pngs[0], str(tmp_path))))
    np.testing.assert_array_equal(back, grid)


def test_resume_continues_the_same_run(server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    cfg = _cfg(server.uri, "resume")
    first = Tracker(cfg, tmp_path, is_main=True)
    run_id = first.start({"seed": 0, "lr": 0.001}, "seed: 0\n", "r")
    for step in range(5):
        first.log_metrics({"loss": 10.0 - step}, step=step)
    first.finish(status="KILLED")
    client = MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "KILLED"

    # The restarted job reads the run id back (as the loop does from RUN/mlflow_run_id).
    saved = (tmp_path / "mlflow_run_id").read_text()
    second = Tracker(cfg, tmp_path, is_main=True, run_id=saved)
    assert second.start({"seed": 0, "lr": 0.002, "new_key": "x"}, "seed: 0\nlr: 0.002\n", "r") == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    for step in range(5, 10):
        second.log_metrics({"loss": 10.0 - step}, step=step)
    assert second.finish() == {}

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"seed": "0", "lr": "0.001", "new_key": "x"}  # first values kept
    assert any("lr" in m for m in _messages(caplog, "changed params"))
    steps = [m.step for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.timestamp)]
    assert steps == list(range(10))
    names = {f.path for f in client.list_artifacts(run_id)}
    assert "config.yaml" in names and any(n.startswith("config-resumed-") for n in names)
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_outage_mid_run_queues_warns_once_and_catches_up(server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    cfg = _cfg(server.uri, "outage", queue_size=4, retry_max_s=1.0)
    tracker = Tracker(cfg, tmp_path, is_main=True)
    run_id = tracker.start({"a": 1}, "a: 1\n", "outage")
    for step in range(3):
        tracker.log_metrics({"loss": float(step)}, step=step)
    assert tracker.flush(60)

    server.stop()
    try:
        tracker.log_metrics({"loss": 3.0}, step=3)
        deadline = time.time() + 30
        while not _messages(caplog, "failed") and time.time() < deadline:
            time.sleep(0.05)
        assert len(_messages(caplog, "failed")) == 1
        # The sender now waits before retrying; these calls only queue. Queue of 4: steps 3 and 4 go.
        for step in range(4, 9):
            tracker.log_metrics({"loss": float(step)}, step=step)
        assert not tracker.flush(0.5)
        assert len(_messages(caplog, "failed")) == 1  # once per outage, not per call or retry
        assert len(_messages(caplog, "dropping the oldest")) == 1
    finally:
        server.start()
    assert tracker.flush(60)
    assert len(_messages(caplog, "is back")) == 1
    assert tracker.finish() == {"metrics": 2}
    assert any("not logged: 2 metrics" in m for m in _messages(caplog, "not logged"))

    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [0, 1, 2, 5, 6, 7, 8]


def test_unreachable_server_from_the_start_never_stops_training(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT")
    cfg = _cfg(f"http://127.0.0.1:{_free_port()}", "down", start_timeout_s=1.0, http_retries=0, http_timeout_s=3)
    tracker = Tracker(cfg, tmp_path, is_main=True)
    assert tracker.start({"a": 1}, "a: 1\n", "down") is None
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "3"
    w = np.zeros(3)
    for step in range(20):  # a training-like loop: it must run to the end
        w += 0.1
        tracker.log_metrics({"loss": float(w.sum())}, step=step)
    tracker.log_image(np.zeros((8, 8, 3), np.uint8), key="samples", step=19)
    not_logged = tracker.finish()
    assert w.sum() == pytest.approx(6.0)
    assert not_logged == {"params": 1, "config": 1, "metrics": 20, "images": 1, "end": 1}
    assert len(_messages(caplog, "failed")) == 1
    assert tracker.run_id is None and not (tmp_path / "mlflow_run_id").exists()


def test_non_main_rank_does_nothing(server, tmp_path):
    cfg = _cfg(server.uri, "nonmain")
    tracker = Tracker(cfg, tmp_path, is_main=False)
    assert tracker.start({"a": 1}, "a: 1\n", "x") is None
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.log_image(np.zeros((8, 8, 3), np.uint8), key="s", step=0)
    tracker.log_artifact(tmp_path, "nothing")
    assert tracker.finish() == {}
    assert MlflowClient(server.uri).get_experiment_by_name("nonmain") is None
    assert list(tmp_path.iterdir()) == []


def test_local_store_without_server(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "x"
    tracker = Tracker(TrackingConfig(system_metrics=False), run_dir, is_main=True)
    run_id = tracker.start({"a": 1}, "a: 1\n", "local")
    assert run_id is not None
    for step in range(3):
        tracker.log_metrics({"loss": float(step)}, step=step)
    tracker.finish()
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"a": "1"}
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0, 1, 2]
    assert (run_dir / "mlruns" / run_id / "artifacts" / "config.yaml").read_text() == "a: 1\n"
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()


def test_refused_requests_are_dropped_not_retried(server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    tracker = Tracker(_cfg(server.uri, "refused"), tmp_path, is_main=True)
    run_id = tracker.start({"a": 1}, "a: 1\n", "refused")
    assert tracker.flush(60)
    MlflowClient(server.uri).delete_run(run_id)  # from now on the server answers 4xx for this run
    for step in range(3):
        tracker.log_metrics({"loss": 1.0}, step=step)
    assert tracker.flush(60)  # refused items leave the queue instead of blocking it
    report = tracker.finish()
    assert report["metrics"] == 3
    assert len(_messages(caplog, "refused metrics")) == 1
    assert not _messages(caplog, "failed")  # not mistaken for an outage


def test_sqlite_uri_keeps_artifacts_beside_the_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrackingConfig(uri="sqlite:///runs/shared.db", system_metrics=False)
    tracker = Tracker(cfg, tmp_path / "runs" / "a", is_main=True)
    run_id = tracker.start({"a": 1}, "a: 1\n", "a")
    tracker.finish()
    assert (tmp_path / "runs" / "mlruns" / run_id / "artifacts" / "config.yaml").is_file()
    assert not (tmp_path / "mlruns").exists()


def test_reproducibility_tags_and_description(tmp_path, monkeypatch):
    import accelerate
    import torch

    import avpgan
    from avpgan.tracking import _git_state, reproducibility_tags

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-02]")
    tags = reproducibility_tags(world_size=16, device="cuda (H100)", mixed_precision="bf16")
    tags["mlflow.note.content"] = "avpgan, config `tiny`"
    tracker = Tracker(TrackingConfig(system_metrics=False), tmp_path / "run", is_main=True)
    run_id = tracker.start({"a": 1}, "a: 1\n", "tagged", tags=tags)
    assert tracker.finish() == {}

    got = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}").get_run(run_id).data.tags
    assert got["avpgan.version"] == avpgan.__version__
    assert got["avpgan.torch_version"] == torch.__version__
    assert got["avpgan.accelerate_version"] == accelerate.__version__
    assert got["avpgan.mlflow_version"] == mlflow.__version__
    assert (got["avpgan.world_size"], got["avpgan.device"], got["avpgan.mixed_precision"]) == \
        ("16", "cuda (H100)", "bf16")
    assert (got["avpgan.slurm_job_id"], got["avpgan.slurm_nodelist"]) == ("4242", "gpu[01-02]")
    assert got["mlflow.note.content"] == "avpgan, config `tiny`"
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(avpgan.__file__).parent)
    if head.returncode == 0:  # the suite runs from a git checkout
        assert got["avpgan.git_commit"] == head.stdout.strip()
        assert got["avpgan.git_dirty"] in ("true", "false")
    # Not a git checkout (an installed wheel): no commit, and no failure.
    assert _git_state(tmp_path) == (None, False)
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("SLURM_JOB_NODELIST")
    assert not any(k.startswith("avpgan.slurm") for k in reproducibility_tags(1, "cpu", "no"))


def test_trained_run_logs_a_pyfunc_model_that_makes_the_generate_faces(synthvox_dir, tiny_shards, tmp_path_factory,
                                                                       tmp_path):
    """The training run's bundle is an MLflow Model in its local store: listed as the run's logged
    model, loadable with mlflow.pyfunc, and its predict gives the faces `avpgan generate` makes."""
    import soundfile as sf
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from PIL import Image

    from avpgan.generate import generate
    from test_evaluate import tiny_model

    run = tiny_model(tiny_shards, tmp_path_factory)  # trained in-process with a sqlite store
    uri = f"sqlite:///{run / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = (run / "mlflow_run_id").read_text()
    info = client.get_run(run_id)
    (model,) = client.search_logged_models(experiment_ids=[info.info.experiment_id])
    assert model.name == "avpgan" and model.source_run_id == run_id and str(model.status) == "READY"
    assert [o.model_id for o in info.outputs.model_outputs] == [model.model_id]

    wav = sorted((synthvox_dir / "voxceleb1" / "wav").rglob("*.wav"))[:1]
    wave, rate = sf.read(wav[0], dtype="float32")
    assert rate == 16000
    with _use_tracking_uri(uri):
        pyfunc = mlflow.pyfunc.load_model(f"models:/{model.model_id}")
        again = mlflow.pyfunc.load_model(f"runs:/{run_id}/avpgan")
    sig = pyfunc.metadata.signature
    (inp,), (out,) = sig.inputs.inputs, sig.outputs.inputs
    assert (inp.type, tuple(inp.shape)) == (np.dtype(np.float32), (-1, -1))
    assert (out.type, tuple(out.shape)) == (np.dtype(np.uint8), (-1, -1, -1, 3))

    faces = pyfunc.predict(wave[None])
    plain = again.predict(np.stack([wave, wave]), params={"restore": False})
    assert faces.dtype == np.uint8 and faces.shape == (1, 64, 64, 3)  # tiny config: restored at 64 px
    assert plain.shape == (2, 64, 64, 3) and np.array_equal(plain[0], plain[1])
    # The same faces as `avpgan generate` makes from the file
    generate(run / "model.safetensors", [wav[0]], tmp_path, log=lambda line: None)
    np.testing.assert_array_equal(faces[0], np.asarray(Image.open(tmp_path / f"{wav[0].stem}_64_restored.png")))
    np.testing.assert_array_equal(plain[0], np.asarray(Image.open(tmp_path / f"{wav[0].stem}_64.png")))
    with pytest.raises(Exception, match="voice 0"):  # silence: the row is named
        pyfunc.predict(np.zeros((1, 16000), np.float32))


def test_only_the_tracking_modules_import_mlflow():
    """docs/architecture.md: everything MLflow goes through avpgan/tracking.py (and the pyfunc
    model it logs, avpgan/mlflow_model.py), for training and evaluation alike."""
    import ast

    import avpgan

    package = Path(avpgan.__file__).parent
    users = set()
    for f in package.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                users.add(f.relative_to(package).as_posix())
    assert users == {"tracking.py", "mlflow_model.py"}
    assert not (package / "train" / "tracking.py").exists()
