"""What the README promises about one GAN step (Algorithm 1), checked on the tiny config in-process:
G's update leaves D and C alone, the voice encoder F_e stays frozen (weights and batch-norm
statistics), and the EMA generator moves only after a finite G update."""

from __future__ import annotations

import pytest
import torch

from avpgan import models
from avpgan.train.loop import make_accelerator
from avpgan.train.stages import GanStage, write_weights
from conftest import tiny_config

BATCH = 4


@pytest.fixture()
def make_stage(tiny_shards, tmp_path):
    """`make_stage(*overrides)`: a GanStage of the tiny config over a random (saved) voice encoder."""

    def make(*overrides: str) -> GanStage:
        cfg = tiny_config(tiny_shards, tmp_path, *overrides)
        torch.manual_seed(0)
        write_weights(models.build_voice_encoder(cfg.model.voice), tmp_path / "voice" / "model.safetensors")
        return GanStage(cfg, make_accelerator(cfg), tmp_path)

    return make


def batch(stage: GanStage, voices: str = "embedding") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = {"face": torch.rand(BATCH, 3, 64, 64, generator=g) * 2 - 1,
           "label": torch.randint(0, stage.num_identities, (BATCH,), generator=g)}
    if voices == "embedding":  # the bank's path
        out["embedding"] = torch.randn(BATCH, stage.cfg.model.voice.embed_dim, generator=g)
    else:  # the audio path: F_e runs inside the step
        samples = int(stage.cfg.data.crop_seconds * stage.cfg.data.sample_rate)
        out["audio"] = torch.randint(-3000, 3000, (BATCH, samples), generator=g, dtype=torch.int16)
    return out


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module, parameters_only: bool = False) -> set[str]:
    now = dict(module.named_parameters()) if parameters_only else module.state_dict()
    return {k for k, v in now.items() if not torch.equal(before[k], v)}


def test_g_update_leaves_d_unchanged(make_stage):
    stage = make_stage()
    d, g = stage.accelerator.unwrap_model(stage.d), stage.accelerator.unwrap_model(stage.g)
    d_start, g_start = snapshot(d), snapshot(g)
    after_d_update: dict[str, torch.Tensor] = {}
    d_step = stage.opt_d.step

    def record(*args, **kwargs):  # D's own update, then what D is at that moment
        out = d_step(*args, **kwargs)
        after_d_update.update(snapshot(d))
        return out

    stage.opt_d.step = record
    metrics, finite = stage.step(batch(stage), step=0)
    assert finite and all(torch.isfinite(v) for v in metrics.values())
    assert after_d_update, "D was not updated"
    assert changed(d_start, d), "D's update changed nothing"
    # Parameters only: G's forward through D (train mode) advances spectral norm's power-iteration
    # vectors, as in any SN-GAN; they are buffers that estimate the norm, not weights D learns.
    assert not changed(after_d_update, d, parameters_only=True), "G's update changed D"
    assert changed(g_start, g), "G was not updated"
    assert all(p.grad is None for p in d.parameters())  # G's backward left no gradient in D for the next step


@pytest.mark.parametrize("voices", ["embedding", "audio"])
def test_voice_encoder_stays_frozen(make_stage, voices):
    stage = make_stage(*(["data.bank.enabled=false"] if voices == "audio" else []))
    encoder_start = snapshot(stage.encoder)  # weights and batch-norm running statistics
    for step in range(2):
        _, finite = stage.step(batch(stage, voices), step)
        assert finite
    assert not changed(encoder_start, stage.encoder)
    assert not stage.encoder.training and not any(p.requires_grad or p.grad is not None
                                                  for p in stage.encoder.parameters())
    assert not any(p is q for p in stage.encoder.parameters() for group in stage.opt_g.param_groups
                   for q in group["params"])


def test_ema_moves_only_after_a_finite_g_step(make_stage):
    stage = make_stage()
    ema_start = snapshot(stage.ema)
    _, finite = stage.step(batch(stage), step=0)
    assert finite and int(stage.ema.num_updates) == 1 and changed(ema_start, stage.ema)

    ema_after_one = snapshot(stage.ema)
    g_after_one = snapshot(stage.accelerator.unwrap_model(stage.g))
    bad = batch(stage)
    bad["embedding"] = torch.full_like(bad["embedding"], float("nan"))  # G's loss and gradients: NaN
    metrics, finite = stage.step(bad, step=1)
    assert not finite and not torch.isfinite(metrics["loss_g"])
    assert not changed(ema_after_one, stage.ema), "the EMA moved after a skipped G update"
    g = stage.accelerator.unwrap_model(stage.g)
    assert all(torch.equal(g_after_one[k], v) for k, v in g.named_parameters())  # G's update was skipped


def test_grads_finite_flags_nan_and_inf_and_leaves_gradients_as_they_are():
    from avpgan.train.stages import grads_finite

    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in net.parameters()]
    assert bool(grads_finite(net.parameters()))
    assert all(torch.equal(p.grad, b) for p, b in zip(net.parameters(), before))  # checked, not scaled
    for bad in (float("nan"), float("inf"), -float("inf")):
        net[1].bias.grad[0] = bad
        assert not bool(grads_finite(net.parameters()))
    net[1].bias.grad = None  # a parameter without a gradient is not a reason to skip
    assert bool(grads_finite(net.parameters()))
    assert bool(grads_finite([]))
