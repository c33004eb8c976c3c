"""The GAN stage's steps never make the host wait for the device between log steps.

A read of a device value on the host (`.item()`, `bool(t)`, `float(t)`, `.tolist()`) stalls the
host until the device has finished everything queued so far, so the next step cannot be queued
behind the current one. The loop reads metrics and finite-gradient flags once per log interval;
this test runs the real loop (`avpgan.train.loop.train`, gan stage, bank and audio paths) with
those tensor methods wrapped by counters, and asserts that only the log steps read anything.
On CPU every tensor counts (there a read costs nothing, but the same code runs on a GPU); with a
CUDA device present, torch's own sync detector checks the step itself.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from avpgan import models
from avpgan.train import loop
from avpgan.train.stages import GanStage, write_weights
from conftest import tiny_config

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
STEPS, LOG_EVERY = 9, 3


@pytest.fixture()
def reads(monkeypatch) -> Counter:
    """Host reads of tensor values, counted per GAN step (the index of the step last started;
    None before the first)."""
    counts: Counter = Counter()
    current: list[int | None] = [None]

    def counted(name: str):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            counts[current[0]] += 1
            return original(self, *args, **kwargs)

        return wrapper

    step = GanStage.step

    def tracked_step(self, batch, at):
        current[0] = at
        return step(self, batch, at)

    monkeypatch.setattr(GanStage, "step", tracked_step)
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    return counts


@pytest.mark.parametrize("voices", ["bank", "audio"])
def test_no_host_read_between_log_steps(tiny_shards, tmp_path, reads, voices):
    cfg = tiny_config(tiny_shards, tmp_path, "train.stages=[gan]", f"train.gan.steps={STEPS}",
                      f"train.log_every={LOG_EVERY}", "train.checkpoint_every=1000", "train.sample_every=1000",
                      "train.gan.batch_size=4", *(["data.bank.enabled=false"] if voices == "audio" else []))
    torch.manual_seed(0)
    write_weights(models.build_voice_encoder(cfg.model.voice), tmp_path / "voice" / "model.safetensors")
    loop.train(cfg)

    assert (tmp_path / "gan" / "model.safetensors").exists()
    log_steps = {s for s in range(STEPS) if (s + 1) % LOG_EVERY == 0}  # the loop logs after these
    assert all(reads[s] > 0 for s in log_steps), f"the counters saw no log read: {dict(reads)}"
    per_step = {s: reads[s] for s in range(STEPS) if s not in log_steps}
    assert per_step == dict.fromkeys(per_step, 0), f"host reads in steps between log steps: {per_step}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's sync detector needs a CUDA device")
def test_gan_step_does_not_synchronize_cuda(tiny_shards, tmp_path):
    """On CUDA, torch itself flags any step that waits for the device (after two warm-up steps,
    which may autotune kernels)."""
    cfg = tiny_config(tiny_shards, tmp_path, "train.gan.batch_size=4")
    torch.manual_seed(0)
    write_weights(models.build_voice_encoder(cfg.model.voice), tmp_path / "voice" / "model.safetensors")
    stage = GanStage(cfg, loop.make_accelerator(cfg), tmp_path)
    dev = stage.accelerator.device
    batch = {"face": torch.rand(4, 3, 64, 64, device=dev) * 2 - 1,
             "label": torch.randint(0, stage.num_identities, (4,), device=dev),
             "embedding": torch.nn.functional.normalize(torch.randn(4, cfg.model.voice.embed_dim, device=dev), dim=1)}
    for step in range(2):
        stage.step(batch, step)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2, 5):
            _, finite = stage.step(batch, step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(finite)
