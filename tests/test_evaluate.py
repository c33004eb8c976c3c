"""Evaluation: the metrics on hand-computed cases, then end to end on a tiny trained model, in
one process and in two gloo processes under `accelerate launch`, with results logged to MLflow."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from avpgan import evaluate as ev
from conftest import ROOT, subprocess_env, tiny_config


def tiny_model(shards: Path, tmp_path_factory) -> Path:
    """A run trained for a few steps (voice, embedder, gan) and exported; built once per session
    even though two test files use it (cached under the session's base temp folder).

    The restoration model is random here: these tests check plumbing and metric bookkeeping, not
    quality, and its two stages (prior, restore) are by far the slowest to train.
    """
    from avpgan import bundle, models
    from avpgan.train.loop import train
    from avpgan.train.stages import write_weights

    run = tmp_path_factory.getbasetemp() / "eval-run"
    if (run / "model.safetensors").is_file():
        return run
    cfg = tiny_config(shards, run, "train.stages=[voice,embedder,gan]", "train.voice.steps=3",
                      "train.embedder.steps=3", "train.gan.steps=3", "train.voice.batch_size=4",
                      "train.embedder.batch_size=4", "train.gan.batch_size=4", "train.checkpoint_every=1000",
                      "train.sample_every=1000", "tracking.enabled=true", "tracking.system_metrics=false",
                      f"tracking.uri=sqlite:///{run / 'mlflow.db'}")
    torch.manual_seed(0)
    write_weights(models.build_restorer(cfg.model.restorer), run / "restore" / "model.safetensors")
    train(cfg)
    bundle.export(run, run / "model.safetensors")
    return run


@pytest.fixture(scope="module")
def run_dir(tiny_shards, tmp_path_factory) -> Path:
    return tiny_model(tiny_shards, tmp_path_factory)


# ----------------------------------------------------------------------------------------------
# Metrics on hand-computed cases.


def test_cosine_identical_is_one_orthogonal_is_zero():
    a = np.array([[3.0, 0.0, 0.0]])
    assert ev.identity_cosine(a, 2 * a) == pytest.approx(1.0)
    assert ev.identity_cosine(a, np.array([[0.0, 5.0, 0.0], [0.0, 0.0, -1.0]])) == pytest.approx(0.0)
    assert ev.identity_cosine(a, -a) == pytest.approx(-1.0)
    # mean over generated x real: cos 1 and cos 0 -> 0.5
    assert ev.identity_cosine(a, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])) == pytest.approx(0.5)


def test_centroid_cosine_uses_the_mean_of_unit_real_embeddings():
    real = np.array([[1.0, 0.0], [0.0, 10.0]])  # unit mean points at 45 degrees whatever the norms
    gen = np.array([[1.0, 1.0]])
    assert ev.centroid_cosine(gen, real) == pytest.approx(1.0)
    assert ev.identity_cosine(gen, real) == pytest.approx(math.sqrt(0.5))


def test_confidence_interval_on_a_known_sample():
    ci = ev.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    # s = sqrt(2.5), se = s / sqrt(5) = 0.70711, t(0.975, 4) = 2.776445
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)
    assert ci["mean"] == pytest.approx(3.0)
    assert ci["low"] == pytest.approx(3.0 - half, abs=1e-5)
    assert ci["high"] == pytest.approx(3.0 + half, abs=1e-5)
    assert ci["n"] == 5
    one = ev.mean_ci([0.4])
    assert one["mean"] == 0.4 and one["low"] is None
    assert ev.mean_ci([])["mean"] is None


def test_retrieval_ranks_on_a_constructed_case():
    gallery = np.eye(4)  # identity centroids along the axes
    queries = [
        np.array([[1.0, 0.1, 0.0, 0.0]]),  # identity 0: its own centroid closest -> rank 0
        np.array([[0.9, 0.5, 0.0, 0.0]]),  # identity 1: identity 0 closer -> rank 1
        np.array([[0.9, 0.0, 0.2, 0.5]]),  # identity 2: 0 and 3 closer -> rank 2
        np.array([[0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.5]]),  # identity 3: ranks 0 and 1
    ]
    r = ev.retrieval_recall(queries, gallery, ks=(1, 2, 3), group_size=100)
    assert r["group_size"] == 4
    assert r["recall"]["1"] == pytest.approx((1 + 0 + 0 + 0.5) / 4)
    assert r["recall"]["2"] == pytest.approx((1 + 1 + 0 + 1) / 4)
    assert r["recall"]["3"] == pytest.approx(1.0)
    assert r["chance"]["1"] == pytest.approx(0.25)
    # ties count against the model: all centroids equal -> nothing is retrieved at rank 0
    flat = ev.retrieval_recall([np.ones((1, 2))] * 3, np.ones((3, 2)), ks=(1,))
    assert flat["recall"]["1"] == 0.0


def test_retrieval_groups_of_fixed_size_and_seed():
    groups = ev.retrieval_groups(250, 100, seed=7)
    assert len(groups) == 250
    for i, g in enumerate(groups):
        assert len(g) == 100 and g[0] == i and len(set(g.tolist())) == 100
    again = ev.retrieval_groups(250, 100, seed=7)
    assert all((a == b).all() for a, b in zip(groups, again))
    assert any((a != b).any() for a, b in zip(groups, ev.retrieval_groups(250, 100, seed=8)))
    assert [g.tolist() for g in ev.retrieval_groups(3, 100, 0)] == [[0, 1, 2]] * 3


def test_real_pair_cosines():
    real = [np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([[0.0, 1.0], [1.0, 1.0]]), np.array([[0.0, 1.0]])]
    same, different = ev.real_pair_cosines(real)
    assert same == pytest.approx([1.0, math.sqrt(0.5)])  # the one-face identity has no pair
    # identity 0 vs the three faces of the others: cos 0, sqrt(.5), 0 for each of its two faces
    assert different[0] == pytest.approx(math.sqrt(0.5) / 3)


def test_ridge_probe_recovers_a_linear_attribute():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = x @ np.array([1.0, -2.0, 0.0, 0.5, 0.0]) + 3.0
    w, b = ev.ridge_fit(x, y, lam=1e-6)
    assert np.allclose(w, [1.0, -2.0, 0.0, 0.5, 0.0], atol=1e-4) and b == pytest.approx(3.0, abs=1e-4)
    assert ev.pearson(x @ w + b, y) == pytest.approx(1.0)
    assert ev.pearson(np.ones(4), np.arange(4)) is None


def test_roc_auc_ranks_classes_and_ignores_the_threshold():
    positive = np.array([True, True, False, False])
    assert ev.roc_auc(np.array([3.0, 2.0, 1.0, 0.0]), positive) == 1.0
    assert ev.roc_auc(np.array([0.0, 1.0, 2.0, 3.0]), positive) == 0.0
    assert ev.roc_auc(np.ones(4), positive) == 0.5  # ties count half
    # every score shifted below a threshold of 0: accuracy of sign() falls to the negatives' share, AUC stays 1
    shifted = np.array([3.0, 2.0, 1.0, 0.0]) - 10
    assert np.mean(np.sign(shifted) == np.where(positive, 1, -1)) == 0.5 and ev.roc_auc(shifted, positive) == 1.0
    assert ev.roc_auc(np.arange(3.0), np.ones(3, bool)) is None  # one class: undefined


def test_arcface_torch_weights_are_loaded_by_key_count(tmp_path):
    from avpgan import models

    torch.manual_seed(0)
    ref = models.iresnet50().eval()
    path = tmp_path / "backbone.pth"
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, path)  # as saved from DDP
    emb = ev.load_embedder(str(path), None, "cpu")
    assert emb.info["name"] == "arcface_torch-iresnet50" and emb.info["input_size"] == 112 and emb.info["dim"] == 512
    faces = torch.rand(1, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        expected = ev.unit(ref(faces).double().numpy())  # float64: a random r50 gives huge outputs
    assert np.allclose(emb(faces), expected, atol=1e-5)

    bad = tmp_path / "partial.pth"
    torch.save({k: v for i, (k, v) in enumerate(ref.state_dict().items()) if i < 10}, bad)
    with pytest.raises(ev.EmbedderError, match="neither arcface_torch IResNet-50"):
        ev.load_embedder(str(bad), None, "cpu")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ev.EmbedderError, match="junk.pth: cannot read"):
        ev.load_embedder(str(junk), None, "cpu")


def test_dlib_embedder_when_installed():
    pytest.importorskip("dlib")
    pytest.importorskip("face_recognition_models")
    emb = ev.load_embedder("dlib", None, "cpu")
    faces = torch.rand(2, 3, 64, 64) * 2 - 1
    out = emb(torch.cat([faces, faces[:1]]))
    assert out.shape == (3, 128) and np.allclose(np.linalg.norm(out, axis=1), 1.0)
    assert np.allclose(out[0], out[2]) and not np.allclose(out[0], out[1])
    assert emb.info["name"] == "dlib-resnet-v1" and emb.info["input_size"] == 150


# ----------------------------------------------------------------------------------------------
# End to end.


@pytest.fixture(scope="module")
def results(run_dir, tiny_shards, synthvox_dir, tmp_path_factory) -> dict:
    from avpgan.cli import main

    out = tmp_path_factory.mktemp("eval") / "results.json"
    rc = main(["evaluate", str(run_dir), "--shards", str(tiny_shards), "--split", "test", "--seconds", "4", "8",
               "--attributes", str(synthvox_dir / "attributes.csv"), "--out", str(out)])
    assert rc == 0
    return json.loads(out.read_text())


def test_evaluate_writes_every_key(results):
    r = results
    assert r["split"] == "test" and r["seconds"] == [4.0, 8.0] and r["processes"] == 1
    assert r["embedder"]["source"] == "bundle" and r["embedder"]["input_size"] == 64
    assert r["confidence_interval"]["method"].startswith("Student t")
    assert r["identities"] == 2 and r["utterances"] == 8 and r["real_faces"] >= 2
    assert r["corrupt_samples"] == 0
    for key in ("same_identity_cosine", "different_identity_cosine"):
        assert -1 <= r["real_vs_real"][key]["mean"] <= 1
    assert set(r["results"]) == {"4s", "8s"}
    for s in ("4s", "8s"):
        assert set(r["results"][s]) == {"gan", "restored"}  # the bundle has a restoration model
        for variant in ("gan", "restored"):
            e = r["results"][s][variant]
            for key in ("cosine", "cosine_to_mean"):
                assert -1 <= e[key]["mean"] <= 1 and e[key]["n"] == 2 and e[key]["low"] <= e[key]["high"]
            assert set(e["retrieval"]["recall"]) == {"1", "5", "10"}
            assert e["retrieval"]["group_size"] == 2 and e["retrieval"]["recall"]["5"] == 1.0
            assert set(e["attributes"]) == {"gender", "gender_auc", "age", "size", "tone"}
            assert 0 <= e["attributes"]["gender"] <= 1
            d = e["distribution"]
            assert (d["n_fake"], d["n_real"], d["real_size"]) == (8, r["real_faces"], 64)  # tiny restorer: 64 px
            assert all(math.isfinite(d[k]) for k in ("fd_lite0", "kid_lite0", "kid_lite0_std")) and d["fd_lite0"] > 0
            assert set(e["attributes_pixels"]) == {"gender", "gender_auc", "age", "size", "tone"}
            pix = e["attributes_pixels"]
            assert all(math.isfinite(v) for k, v in pix.items() if k != "gender_auc")
            # the AUC needs both genders among the split's identities (null otherwise), as on its real faces
            auc, real_auc = pix["gender_auc"], r["attributes_pixels_real_reference"]["gender_auc"]
            assert (auc is None) == (real_auc is None) and (auc is None or 0 <= auc <= 1)
    assert set(r["attributes_real_reference"]) == {"gender", "gender_auc", "age", "size", "tone"}
    assert set(r["attributes_pixels_real_reference"]) == {"gender", "gender_auc", "age", "size", "tone"}
    assert r["attribute_probe"]["train_faces"] > 0
    ref = r["distribution_real_reference"]["64"]
    assert ref["n_split"] == r["real_faces"] and ref["n_train"] > 0 and math.isfinite(ref["fd_lite0"])
    assert r["distribution"]["comparable_with_inception_fid"] is False


def test_evaluate_logs_to_the_runs_mlflow_run(results, run_dir):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    metrics = client.get_run(run_id).data.metrics
    assert metrics["eval/cosine_8s"] == pytest.approx(results["results"]["8s"]["gan"]["cosine"]["mean"])
    assert "eval/cosine_4s_restored" in metrics and "eval/recall1_8s" in metrics
    assert [a.path for a in client.list_artifacts(run_id, "eval")] == ["eval/results.json"]
    # at the run's training step count (3 + 3 + 3), next to the training curves
    assert [m.step for m in client.get_metric_history(run_id, "eval/cosine_8s")] == [9]


def test_evaluate_without_embedder_says_what_to_do(run_dir, tiny_shards, capsys):
    from avpgan import bundle
    from avpgan.cli import main

    model = bundle.load(run_dir / "model.safetensors")
    model.embedder = None
    with pytest.raises(ev.EmbedderError, match="--embedder dlib"):
        ev.load_embedder("bundle", model, "cpu")
    assert main(["evaluate", str(run_dir / "model.safetensors"), "--shards", str(tiny_shards),
                 "--embedder", "/nonexistent.pth"]) == 1
    assert "not 'bundle', 'dlib' or an existing weights file" in capsys.readouterr().err


def test_broken_shard_is_skipped_and_counted(run_dir, tiny_shards, tmp_path):
    import os
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    victim = shards / "test-000000.tar"
    os.truncate(victim, victim.stat().st_size // 2)
    r = ev.evaluate(run_dir / "model.safetensors", shards, seconds=[2.0], out=tmp_path / "r.json", log=lambda s: None)
    assert r["corrupt_samples"] >= 1 and "test-000000.tar" in " ".join(r["read_errors"])
    assert 0 < r["utterances"] < 8 and r["results"]["2s"]["gan"]["cosine"]["mean"] is not None
    assert json.loads((tmp_path / "r.json").read_text())["corrupt_samples"] == r["corrupt_samples"]


@pytest.mark.slow
def test_two_processes_match_one(results, run_dir, tiny_shards, synthvox_dir, tmp_path):
    """Each rank embeds every other identity; rank 0 gathers: same numbers as one process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "results2.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch/cpu2.yaml"),
           "--num_processes", "2", "--main_process_port", str(port), "-m", "avpgan", "evaluate",
           str(run_dir / "model.safetensors"), "--shards", str(tiny_shards), "--seconds", "4", "8",
           "--attributes", str(synthvox_dir / "attributes.csv"), "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("cosine (eq. 15)") == 1  # only rank 0 prints the table
    two = json.loads(out.read_text())
    assert two["processes"] == 2
    assert (two["identities"], two["utterances"], two["real_faces"]) == (results["identities"], results["utterances"],
                                                                         results["real_faces"])
    for s in ("4s", "8s"):
        a, b = results["results"][s]["gan"], two["results"][s]["gan"]
        assert b["cosine"]["mean"] == pytest.approx(a["cosine"]["mean"], abs=1e-5)
        assert b["cosine_to_mean"]["mean"] == pytest.approx(a["cosine_to_mean"]["mean"], abs=1e-5)
        assert b["retrieval"] == a["retrieval"]
    for key in ("same_identity_cosine", "different_identity_cosine"):
        assert two["real_vs_real"][key]["mean"] == pytest.approx(results["real_vs_real"][key]["mean"], abs=1e-5)
