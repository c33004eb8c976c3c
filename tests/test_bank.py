"""The GAN stage's embedding bank: deterministic, resumable build; refusal of a stale bank; the
stateless sampler; and a GAN step on the bank equal to one on the audio it was cut from."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from safetensors.torch import load_file, save_file

from avpgan import config as config_mod
from avpgan import models
from avpgan.audio import crop_or_tile
from avpgan.data import bank
from avpgan.data.shards import decode_sample, load_manifest
from avpgan.data.stream import make_stream
from avpgan.features import LogMel
from avpgan.train.stages import write_weights
from conftest import tiny_config

CROPS = 2  # K: enough to tell crops apart, cheap to embed


def voice_run(shards: Path, run_dir: Path, *overrides: str) -> tuple[config_mod.Config, Path]:
    """A run directory holding a (randomly initialised, seeded) voice encoder, as the voice stage leaves it."""
    cfg = tiny_config(shards, run_dir, f"data.bank.crops={CROPS}", "data.bank.batch_size=3", *overrides)
    weights = run_dir / "voice" / "model.safetensors"
    if not weights.exists():
        torch.manual_seed(0)
        write_weights(models.build_voice_encoder(cfg.model.voice), weights)
    return cfg, weights


@pytest.fixture(scope="module")
def built(tiny_shards, tmp_path_factory) -> tuple[config_mod.Config, Path, Path]:
    run_dir = tmp_path_factory.mktemp("bank")
    cfg, weights = voice_run(tiny_shards, run_dir)
    bank.prepare(cfg, run_dir, weights, progress=False)
    return cfg, weights, bank.bank_file(run_dir, "train")


def test_build_holds_every_utterance_and_its_crops(tiny_shards, built):
    cfg, weights, path = built
    b = bank.load(cfg, "train", path, weights)
    info = load_manifest(tiny_shards)["splits"]["train"]
    assert b.embedding.shape == (info["samples"], CROPS, cfg.model.voice.embed_dim) and b.embedding.dtype == torch.float32
    assert torch.allclose(b.embedding.norm(dim=-1), torch.ones(()), atol=1e-5)
    assert b.face.shape == (info["samples"], 64, 64, 3) and b.face.dtype == torch.uint8
    assert b.label.dtype == torch.int64 and set(b.label.tolist()) <= set(info["labels"].values())
    # Sample 0 crop 1: the encoder on the crop that (seed, 0, 1) cuts from the first shard's first sample.
    first = decode_sample(next(iter(wds.DataPipeline(
        wds.SimpleShardList([str(tiny_shards / info["shards"][0]["file"])]), wds.tarfile_to_samples()))))
    clip = crop_or_tile(first["audio"], int(cfg.data.crop_seconds * cfg.data.sample_rate),
                        np.random.default_rng([cfg.train.seed, 0, 1]))
    encoder = models.build_voice_encoder(cfg.model.voice)
    encoder.load_state_dict(load_file(str(weights)))
    with torch.no_grad():
        e = models.voice_embedding(encoder.eval()(LogMel(cfg.features)(torch.from_numpy(clip[None].copy()))))
    assert torch.allclose(b.embedding[0, 1], e[0], atol=1e-5)
    assert not torch.equal(b.embedding[0, 0], b.embedding[0, 1])
    assert torch.equal(b.face[0], torch.from_numpy(np.array(first["face"])))
    assert int(b.label[0]) == first["meta"]["label"]
    assert bank.bank_file(path.parent.parent, "val").is_file()
    assert not (path.parent / "train.parts").exists()  # parts go once assembled


def test_build_is_deterministic_and_resumes_from_its_parts(tiny_shards, built, tmp_path, monkeypatch):
    cfg, weights, reference = built
    run_dir = tmp_path / "run"
    cfg, _ = voice_run(tiny_shards, run_dir, f"train.voice_weights={weights}")
    out = bank.bank_file(run_dir, "train")
    real, embedded = bank._embed_shard, []

    def killed_after_two(cfg_, url, *args):
        if len(embedded) == 2:
            raise RuntimeError("killed")
        embedded.append(url)
        return real(cfg_, url, *args)

    monkeypatch.setattr(bank, "_embed_shard", killed_after_two)
    with pytest.raises(RuntimeError, match="killed"):
        bank.build(cfg, "train", weights, out, progress=False)
    parts = sorted((run_dir / "bank" / "train.parts").glob("*.safetensors"))
    assert len(parts) == 2 and not out.exists()
    parts[0].unlink()  # lost too: rebuilt like the shards never embedded

    embedded.clear()
    monkeypatch.setattr(bank, "_embed_shard", lambda cfg_, url, *args: embedded.append(url) or real(cfg_, url, *args))
    bank.build(cfg, "train", weights, out, progress=False)
    n_shards = len(load_manifest(tiny_shards)["splits"]["train"]["shards"])
    assert len(embedded) == n_shards - 1  # the surviving part was not embedded again
    assert out.read_bytes() == reference.read_bytes()


def test_a_stale_bank_is_refused_with_the_field_and_the_fix(tiny_shards, built, tmp_path):
    cfg, weights, path = built
    changed = load_file(str(weights))
    name = sorted(changed)[0]
    changed[name] = changed[name].clone()
    changed[name].view(-1)[0] += 1e-3
    other = tmp_path / "other_encoder.safetensors"
    save_file(changed, str(other))
    with pytest.raises(bank.BankError) as e:
        bank.load(cfg, "train", path, other)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "encoder_sha256" in msg and "avpgan bank build" in msg and "delete" in msg
    assert "\n" not in msg

    shorter = config_mod.load(None, [f"data.shards={tiny_shards}", f"data.crop_seconds={cfg.data.crop_seconds}", f"data.bank.crops={CROPS}",
                                     "data.bank.seconds=1.0", f"model.voice.channels={cfg.model.voice.channels}"])
    with pytest.raises(bank.BankError, match=rf"crop_seconds={cfg.data.crop_seconds}, this run has crop_seconds=1\.0"):
        bank.load(shorter, "train", path, weights)
    # Training refuses as well (it never rebuilds behind the user's back) ...
    with pytest.raises(bank.BankError, match="crop_seconds"):
        bank.prepare(shorter, path.parent.parent, weights, progress=False)


def test_bank_build_command_rebuilds_a_stale_bank(tiny_shards, tmp_path, capsys):
    from avpgan.cli import main

    run_dir = tmp_path / "run"
    cfg, weights = voice_run(tiny_shards, run_dir)
    args = ["bank", "build", "--config", "configs/tiny.yaml", f"data.shards={tiny_shards}", f"train.run_dir={run_dir}",
            f"data.bank.crops={CROPS}"]
    assert main(args) == 0
    assert main(args + ["data.bank.seconds=1.0"]) == 0
    assert "rebuilding" in capsys.readouterr().out
    assert bank.read_meta(bank.bank_file(run_dir, "train"))["crop_seconds"] == 1.0
    assert main(["bank", "build", "--config", "configs/tiny.yaml", f"train.run_dir={tmp_path / 'none'}",
                 f"data.shards={tiny_shards}"]) == 1
    assert "voice encoder weights not found" in capsys.readouterr().err


def test_bank_config_is_validated():
    with pytest.raises(config_mod.ConfigError, match="data.bank.crops"):
        config_mod.load(None, ["data.bank.crops=0"])
    with pytest.raises(config_mod.ConfigError, match="unknown key 'data.bank.crop'"):
        config_mod.load(None, ["data.bank.crop=3"])


def test_sampler_is_a_function_of_seed_world_rank_step(built):
    cfg, weights, path = built
    b = bank.load(cfg, "train", path, weights)

    def sampler(rank: int = 0, world: int = 2, seed: int = 3, start: int = 0) -> bank.BankSampler:
        return bank.BankSampler(b, 16, seed=seed, rank=rank, world_size=world, start_step=start)

    def same(x: dict, y: dict) -> bool:
        return all(torch.equal(x[k], y[k]) for k in ("embedding", "face", "label"))

    x = sampler().batch(5)
    assert x["embedding"].shape == (16, cfg.model.voice.embed_dim) and x["face"].shape == (16, 3, 64, 64)
    assert x["face"].dtype == torch.float32 and -1 <= float(x["face"].min()) and float(x["face"].max()) <= 1
    assert x["label"].dtype == torch.int64
    assert same(x, sampler().batch(5))
    assert not same(x, sampler(rank=1).batch(5))
    assert not same(x, sampler(world=1).batch(5))
    assert not same(x, sampler(seed=4).batch(5))
    assert not same(x, sampler().batch(6))

    first = sampler()
    straight = list(islice(first, 4))
    position = bank.BankPosition.from_state_dict(first.position.state_dict())
    straight += list(islice(first, 2))
    assert position.step == 4 and set(straight[0]) == {"embedding", "face", "label"}
    assert all(same(s, r) for s, r in zip(straight[4:], islice(sampler(start=position.step), 2)))

    # The voice is one crop of an utterance of that identity; the face one of that identity's faces.
    flipped = 0
    for batch in straight:
        for emb, face, label in zip(batch["embedding"], batch["face"], batch["label"]):
            rows = (b.label == label).nonzero()[:, 0]
            assert (b.embedding[rows] == emb).all(-1).any()
            own = b.faces(rows)
            straight_match = (own == face).flatten(1).all(1).any()
            flip_match = (own.flip(3) == face).flatten(1).all(1).any()
            assert straight_match or flip_match
            flipped += int(flip_match and not straight_match)
    assert 0 < flipped < 6 * 16


def test_gan_step_on_the_bank_equals_the_step_on_its_audio(tiny_shards, tmp_path):
    """Same states, same torch seed, same crops: one step from the audio (F_e in the step) and one
    from the embeddings the bank stores for those crops leave G and D equal."""
    from avpgan.train.loop import make_accelerator, seed_everything
    from avpgan.train.stages import GanStage

    cfg, weights = voice_run(tiny_shards, tmp_path / "run")
    accelerator = make_accelerator(cfg)
    batch = next(make_stream(cfg.data, "train", 4, workers=0, seed=1))
    audio_batch = {k: batch[k] for k in ("audio", "face", "label")}
    bank_batch = {"embedding": bank._Embedder(cfg, weights, torch.device("cpu"))(list(batch["audio"].numpy())),
                  "face": batch["face"], "label": batch["label"]}

    nearby = dict(bank_batch, embedding=torch.nn.functional.normalize(
        bank_batch["embedding"] + 0.01 * torch.randn(bank_batch["embedding"].shape, generator=torch.Generator().manual_seed(0))))

    def after_one_step(b: dict) -> dict:
        seed_everything(11)
        stage = GanStage(cfg, accelerator, tmp_path / "run")
        initial = {k: v.clone() for k, v in accelerator.unwrap_model(stage.g).state_dict().items()}
        torch.manual_seed(12)
        metrics, finite = stage.step(b, 0)
        assert finite
        nets = {net: accelerator.unwrap_model(getattr(stage, net)).state_dict() for net in ("g", "d")}
        assert any(not torch.equal(initial[k], v) for k, v in nets["g"].items())  # the step did update G
        return nets | {"ema": stage.ema.module.state_dict()}

    def mean_diff(x: dict, y: dict) -> float:
        diffs = torch.cat([(x[n][k].double() - y[n][k].double()).abs().flatten() for n in x for k in x[n]])
        return float(diffs.mean())

    on_audio = after_one_step(audio_batch)
    same, off = mean_diff(on_audio, after_one_step(bank_batch)), mean_diff(on_audio, after_one_step(nearby))
    print(f"mean |difference| after one step: same crops {same:.3g}, voice 1% off {off:.3g}")
    # Adam's first step is about lr * sign(grad), so a gradient element near zero can flip sign on
    # float rounding between the two embedding paths (~1e-9) and move by 2 lr; a mean over all
    # weights stays far below what a genuinely different voice does.
    assert same < off / 100
