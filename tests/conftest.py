"""Shared fixtures: one small SynthVox set and its shards, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from avpgan import config as config_mod

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def synthvox_dir(tmp_path_factory) -> Path:
    from avpgan.data import synthvox

    out = tmp_path_factory.mktemp("synthvox")
    synthvox.generate(out=out, identities=16, utterances_per_id=4, faces_per_id=2, seed=0, workers=2)
    return out


@pytest.fixture(scope="session")
def tiny_shards(synthvox_dir, tmp_path_factory) -> Path:
    """16 identities x 4 utterances, 4 samples per shard: enough shards for 2 ranks x 2 workers."""
    from avpgan.data import shards_build

    out = tmp_path_factory.mktemp("shards")
    cfg = config_mod.load(ROOT / "configs" / "tiny.yaml")
    shards_build.build(
        voxceleb=synthvox_dir / "voxceleb1" / "wav", vggface=synthvox_dir / "vggface",
        meta=synthvox_dir / "vox1_meta.csv", out=out, data=cfg.data, samples_per_shard=4, workers=2,
    )
    return out


def tiny_config(shards_dir: Path, run_dir: Path, *overrides: str) -> config_mod.Config:
    return config_mod.load(
        ROOT / "configs" / "tiny.yaml",
        [f"data.shards={shards_dir}", f"train.run_dir={run_dir}", "tracking.enabled=false", *overrides],
    )


def subprocess_env() -> dict:
    """Child processes: one torch thread each (2 cores), the package importable from the tree."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return env
