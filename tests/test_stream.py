"""The shard stream: batch format, determinism, exact restart, disjoint ranks in real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import islice

import numpy as np
import torch

from avpgan.data.shards import load_manifest
from avpgan.data.stream import StreamPosition, make_stream
from conftest import ROOT, subprocess_env, tiny_config


def take(stream, n):
    """n batches, each with the keys of its samples."""
    return [(batch, stream.origin.keys) for batch in islice(stream, n)]


def same(a, b):
    (x, x_keys), (y, y_keys) = a, b
    return all(torch.equal(x[k], y[k]) for k in ("audio", "face", "label")) and x_keys == y_keys


def test_batch_format(tiny_shards, tmp_path):
    cfg = tiny_config(tiny_shards, tmp_path)
    stream = make_stream(cfg.data, "train", 4, workers=0, restore_face=True)
    b = next(stream)
    assert set(b) == {"audio", "face", "label", "restore_face"}  # tensors only; bookkeeping is in stream.origin
    assert len(stream.origin.keys) == 4 and stream.origin.worker == 0 and stream.skipped == 0
    assert b["audio"].dtype == torch.int16 and b["audio"].shape == (4, int(cfg.data.crop_seconds * 16000))
    assert b["face"].shape == (4, 3, 64, 64) and b["face"].dtype == torch.float32
    assert b["restore_face"].shape == (4, 3, 128, 128)
    assert -1.0 <= float(b["face"].min()) and float(b["face"].max()) <= 1.0
    assert b["label"].dtype == torch.int64
    n_train = len(load_manifest(tiny_shards)["splits"]["train"]["identities"])
    assert int(b["label"].max()) < n_train


def test_deterministic_and_seed_dependent(tiny_shards, tmp_path):
    cfg = tiny_config(tiny_shards, tmp_path)
    a = take(make_stream(cfg.data, "train", 3, workers=0, seed=5), 6)
    b = take(make_stream(cfg.data, "train", 3, workers=0, seed=5), 6)
    c = take(make_stream(cfg.data, "train", 3, workers=0, seed=6), 6)
    assert len(a) == len(b) == len(c) == 6  # an infinite stream: never short
    assert all(same(x, y) for x, y in zip(a, b, strict=True))
    assert not all(same(x, y) for x, y in zip(a, c, strict=True))


def _restart_matches(cfg, workers: int, cut: int, total: int):
    stream = make_stream(cfg.data, "train", 5, workers=workers, seed=1)
    straight = take(stream, cut)
    saved = json.loads(json.dumps(stream.position.state_dict()))  # as a checkpoint would keep it
    straight += take(stream, total - cut)  # the loader has prefetched past the cut: that must not count
    resumed = take(make_stream(cfg.data, "train", 5, workers=workers, seed=1,
                               position=StreamPosition.from_state_dict(saved)), total - cut)
    assert len(straight) == total and len(resumed) == total - cut  # a short stream would pass the zip vacuously
    assert all(same(x, y) for x, y in zip(straight[cut:], resumed, strict=True))


def test_restart_exact_in_process_across_epochs(tiny_shards, tmp_path):
    # 48 train samples, batches of 5: the cut and the tail cross epoch boundaries
    _restart_matches(tiny_config(tiny_shards, tmp_path), workers=0, cut=11, total=22)


def test_restart_exact_with_two_loader_workers(tiny_shards, tmp_path):
    _restart_matches(tiny_config(tiny_shards, tmp_path), workers=2, cut=7, total=14)


RANK_SCRIPT = """
import json, sys
from avpgan import config
from avpgan.data.stream import make_stream
cfg = config.load(sys.argv[1], [f"data.shards={sys.argv[2]}"])
rank = int(sys.argv[3])
stream = make_stream(cfg.data, "train", 1, rank=rank, world_size=2, workers=2, seed=3)
keys, batches = [], 0
for b in stream:
    batches += 1
    if stream.origin.epoch == 0:
        keys += stream.origin.keys
    if batches == 60:
        break
print(json.dumps({"keys": keys, "batches": batches}))
"""


def test_two_processes_read_disjoint_samples(tiny_shards):
    procs = [
        subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(ROOT / "configs/tiny.yaml"), str(tiny_shards), str(r)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
        for r in (0, 1)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    k0, k1 = set(outs[0]["keys"]), set(outs[1]["keys"])
    assert k0 and k1 and not (k0 & k1)
    total = load_manifest(tiny_shards)["splits"]["train"]["samples"]
    assert len(k0 | k1) == total  # one epoch over both ranks covers the split exactly once
    assert outs[0]["batches"] == outs[1]["batches"] == 60
