"""One GAN training step: avpgan's `GanStage.step` against Voice2Face's loop as published.

Voice2Face, the baseline users compare with, is written out plainly below (`Voice2FaceStep`): its
networks at their published sizes and the body of its training loop, fed the precomputed log-mel
its loader reads. Next to it, avpgan's real `GanStage.step` (built from configs/voice2face.yaml
and configs/avpgan.yaml) on its two paths:

    audio  the batch's int16 audio -> log-mel -> frozen voice encoder F_e -> G, D/C
    bank   embeddings precomputed once (avpgan/data/bank.py): no log-mel, no F_e; batches drawn
           by the real `BankSampler` from a bank in device memory

Every variant gets the same batch (the bank holds the batch's own voices and faces). Throughput:
the variants run in turn, `--steps` steps each, `--repeats` times (interleaved, so background load
falls on all of them alike), median per variant; the ratio to the reference is the median of
the ratios within each round. Where the time goes: one more step per variant
with `avpgan.train.phases.PhaseTimer`, which drains the device at each phase's edges (features,
encoder, G, D/C, optimizer; "other" is the rest: batch copy or bank draw, losses' glue).

    python benchmarks/bench_step.py                              # CPU, 1 thread, batch 16, 8 s crops
    python benchmarks/bench_step.py --device cuda --batch 128 --precision bf16
    python benchmarks/bench_step.py --device cuda --batch 2048 --precision tf32 --compile

Precision: fp32 (TF32 off), tf32 (TF32 matmul/conv; PyTorch's defaults leave cuDNN convs in TF32,
so Voice2Face "as published" ran its convs so on an H100), bf16 (autocast, for both sides).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from avpgan import config as config_mod
from avpgan import models
from avpgan.data import bank
from avpgan.features import LogMel
from avpgan.train.loop import cpu_has_bf16
from avpgan.train.phases import PhaseTimer, record
from avpgan.train.stages import GanStage, write_weights

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("features", "encoder", "D/C", "G", "optimizer")


# ----------------------------------------------------------------------------------------------
# Voice2Face as published: nn.Sequential networks, four Adams, the loop body of its GAN training.


def voice2face_networks(num_identities: int) -> dict[str, nn.Module]:
    """Its VoiceEmbedNet, Generator, FaceEmbedNet and the two linear heads, at the published sizes
    (2,670,720 / 12,191,875 / 3,310,720 parameters + 64 + 64 x N)."""
    voice = [64, 256, 384, 576, 864]
    e_layers: list[nn.Module] = []
    for a, b in zip(voice[:-1], voice[1:]):
        e_layers += [nn.Conv1d(a, b, 3, 2, 1, bias=False), nn.BatchNorm1d(b, affine=True), nn.ReLU(inplace=True)]
    e_layers.append(nn.Conv1d(864, 64, 3, 2, 1, bias=True))
    g_ch = [1024, 512, 256, 128, 64]
    g_layers: list[nn.Module] = [nn.ConvTranspose2d(64, g_ch[0], 4, 1, 0, bias=True), nn.ReLU(inplace=True)]
    for a, b in zip(g_ch[:-1], g_ch[1:]):
        g_layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=True), nn.ReLU(inplace=True)]
    g_layers.append(nn.ConvTranspose2d(g_ch[-1], 3, 1, 1, 0, bias=True))
    f_ch = [32, 64, 128, 256, 512]
    f_layers: list[nn.Module] = [nn.Conv2d(3, f_ch[0], 1, 1, 0, bias=True), nn.LeakyReLU(0.2, inplace=True)]
    for a, b in zip(f_ch[:-1], f_ch[1:]):
        f_layers += [nn.Conv2d(a, b, 4, 2, 1, bias=True), nn.LeakyReLU(0.2, inplace=True)]
    f_layers.append(nn.Conv2d(f_ch[-1], 64, 4, 1, 0, bias=True))
    return {"e": nn.Sequential(*e_layers), "g": nn.Sequential(*g_layers), "f": nn.Sequential(*f_layers),
            "d": nn.Linear(64, 1, bias=False), "c": nn.Linear(64, num_identities, bias=False)}


class Voice2FaceStep:
    """Voice2Face's training step, line for line: frozen e_net on the log-mel; normalise, 0.05 noise,
    normalise; G; D and C (separate trunk passes for D's and C's heads) updated on real and fake
    faces; then G against the updated D and C; the five losses read with `.item()` for its meters."""

    def __init__(self, num_identities: int, batch: int, device: torch.device, precision: str):
        nets = voice2face_networks(num_identities)
        for net in nets.values():
            net.to(device)
        self.e, self.g, self.f, self.d, self.c = (nets[k] for k in "egfdc")
        self.e.eval().requires_grad_(False)
        adam = lambda net: torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.5, 0.999))  # noqa: E731
        self.opt_g, self.opt_f, self.opt_d, self.opt_c = adam(self.g), adam(self.f), adam(self.d), adam(self.c)
        self.real_label = torch.full((batch, 1), 1.0, device=device)
        self.fake_label = torch.full((batch, 1), 0.0, device=device)
        self.device, self.batch = device, batch
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
        self.phase: Callable = record
        self.meters: list[float] = []

    def nets(self) -> list[nn.Module]:
        return [self.e, self.g, self.f, self.d, self.c]

    def step(self, host: dict[str, torch.Tensor]) -> None:
        voice = host["mel"].to(self.device, non_blocking=True)
        face = host["face"].to(self.device, non_blocking=True)
        face_label = voice_label = host["label"].to(self.device, non_blocking=True)
        noise = (0.05 * torch.randn(self.batch, 64, 1, 1)).to(self.device, non_blocking=True)
        bce, p = F.binary_cross_entropy, self.phase
        # Its loop has no autocast; under bf16 the forwards run in it and the losses (which autocast
        # refuses for BCE) in float32 outside, as avpgan's losses are.
        with p("encoder"), self.autocast():
            embeddings = self.e(voice)
            embeddings = F.avg_pool1d(embeddings, embeddings.size()[2], stride=1).view(self.batch, -1, 1, 1)
        with p("G"):
            embeddings = F.normalize(embeddings.float())
            embeddings = embeddings + noise
            embeddings = F.normalize(embeddings)
            with self.autocast():
                fake = self.g(embeddings)
        with p("D/C"):
            for opt in (self.opt_f, self.opt_d, self.opt_c):
                opt.zero_grad()
            with self.autocast():
                real_score_out = self.d(self.f(face).flatten(1))
                fake_score_out = self.d(self.f(fake.detach()).flatten(1))
                real_label_out = self.c(self.f(face).flatten(1))
            d_real_loss = bce(torch.sigmoid(real_score_out.float()), self.real_label)
            d_fake_loss = bce(torch.sigmoid(fake_score_out.float()), self.fake_label)
            c_real_loss = F.nll_loss(F.log_softmax(real_label_out.float(), 1), face_label)
            (d_real_loss + d_fake_loss + c_real_loss).backward()
        with p("optimizer"):
            self.opt_f.step()
            self.opt_d.step()
            self.opt_c.step()
        with p("G"):
            self.opt_g.zero_grad()
            with self.autocast():
                fake_score_out = self.d(self.f(fake).flatten(1))
                fake_label_out = self.c(self.f(fake).flatten(1))
            gd_fake_loss = bce(torch.sigmoid(fake_score_out.float()), self.real_label)
            gc_fake_loss = F.nll_loss(F.log_softmax(fake_label_out.float(), 1), voice_label)
            (gd_fake_loss + gc_fake_loss).backward()
        with p("optimizer"):
            self.opt_g.step()
        self.meters = [t.item() for t in (d_real_loss, d_fake_loss, c_real_loss, gd_fake_loss, gc_fake_loss)]


# ----------------------------------------------------------------------------------------------
# avpgan's step: the real GanStage, over a throw-away run directory.


def make_gan_stage(config: str, path: str, accelerator: Accelerator, identities: int, workdir: Path) -> GanStage:
    """`GanStage` of `configs/<config>.yaml` on `path` ("audio" | "bank"), with a random voice
    encoder and a manifest that only names `identities` train identities (C's width)."""
    run_dir = workdir / f"{config}-{path}"
    shards = workdir / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    names = [f"id{i:05d}" for i in range(identities)]
    split = {"shards": [], "samples": 0, "identities": names, "labels": {n: i for i, n in enumerate(names)}}
    (shards / "manifest.json").write_text(json.dumps({"splits": {"train": split}}))
    cfg = config_mod.load(ROOT / "configs" / f"{config}.yaml", [
        f"data.shards={shards}", f"train.run_dir={run_dir}", "tracking.enabled=false",
        f"data.bank.enabled={'true' if path == 'bank' else 'false'}",
        f"train.mixed_precision={accelerator.mixed_precision}",
    ])
    write_weights(models.build_voice_encoder(cfg.model.voice), run_dir / "voice" / "model.safetensors")
    return GanStage(cfg, accelerator, run_dir)


def bank_of(stage: GanStage, host: dict[str, torch.Tensor]) -> bank.Bank:
    """A bank in device memory holding the batch's own utterances (one crop each) and faces."""
    dev = stage.accelerator.device
    audio = host["audio"].to(dev)
    with torch.no_grad():
        emb = models.voice_embedding(stage.encoder(stage.logmel(audio)))
    face = ((host["face"] * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)).permute(0, 2, 3, 1)
    return bank.Bank(Path("(in memory)"), emb[:, None].contiguous(), host["label"].to(dev), face.contiguous().to(dev), {})


@dataclass
class Variant:
    name: str
    step: Callable[[], None]
    set_phase: Callable[[Callable], None]
    modules: Callable[[], list[nn.Module]]


def gan_variant(name: str, stage: GanStage, path: str, host: dict[str, torch.Tensor]) -> Variant:
    """The loop's work for one step on `path`: the batch to the device (audio) or drawn from the
    bank (on the device already), then `GanStage.step`."""
    dev = stage.accelerator.device
    if path == "bank":
        sampler = bank.BankSampler(bank_of(stage, host), host["face"].shape[0], seed=0)

        def next_batch() -> dict:
            return {k: v for k, v in next(sampler).items() if torch.is_tensor(v)}
    else:
        def next_batch() -> dict:
            return {k: host[k].to(dev, non_blocking=True) for k in ("audio", "face", "label")}

    counter = iter(range(10**9))

    def step() -> None:
        stage.step(next_batch(), next(counter))

    def set_phase(phase: Callable) -> None:
        stage.phase = phase

    def modules() -> list[nn.Module]:
        return [stage.accelerator.unwrap_model(stage.g), stage.accelerator.unwrap_model(stage.d), stage.ema.module]

    return Variant(name, step, set_phase, modules)


# ----------------------------------------------------------------------------------------------
# Measuring.


def make_batch(batch: int, seconds: float, identities: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One batch on the host (pinned for a GPU), in the forms the loaders yield: int16 audio for
    avpgan's audio path, its log-mel (Voice2Face's features) for the reference, faces in [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    audio = (torch.randn(batch, int(seconds * 16000), generator=g) * 3000).clamp(-32768, 32767).to(torch.int16)
    host = {"audio": audio, "mel": LogMel()(audio),
            "face": torch.rand(batch, 3, 64, 64, generator=g) * 2 - 1,
            "label": torch.randint(0, identities, (batch,), generator=g)}
    if device.type == "cuda":
        host = {k: v.pin_memory() for k, v in host.items()}
    return host


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_channels_last(modules: list[nn.Module], host: dict[str, torch.Tensor]) -> None:
    for m in modules:
        m.to(memory_format=torch.channels_last)
    host["face"] = host["face"].contiguous(memory_format=torch.channels_last)


def set_precision(precision: str) -> str:
    """TF32 switches for `precision`; returns accelerate's mixed_precision for it."""
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    return "bf16" if precision == "bf16" else "no"


def measure(variants: list[Variant], device: torch.device, steps: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per step, `repeats` samples per variant, the variants taking turns."""
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                v.step()
            sync(device)
            times[v.name].append((time.perf_counter() - t0) / steps)
    return times


def phase_shares(v: Variant, device: torch.device, steps: int) -> dict[str, float]:
    """Seconds per step in each phase over `steps` timed steps, "other" being the rest."""
    timer = PhaseTimer(device)
    v.set_phase(timer)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        v.step()
    sync(device)
    total = (time.perf_counter() - t0) / steps
    v.set_phase(record)
    out = {k: timer.seconds.get(k, 0.0) / steps for k in PHASES}
    out["other"] = max(total - sum(out.values()), 0.0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seconds", type=float, default=8.0, help="voice crop length (8 s: 798 log-mel frames)")
    p.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="fp32")
    p.add_argument("--ref-precision", choices=("fp32", "tf32", "bf16"), default=None,
                   help="the reference's precision when it differs from avpgan's (default: --precision); "
                        "Voice2Face as published has no autocast: fp32 on CPU, tf32 convs on a GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile every network (module.compile())")
    p.add_argument("--channels-last", action="store_true", help="G, D and the faces in channels_last")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--identities", type=int, default=924, help="C's width (the paper's train identities)")
    p.add_argument("--steps", type=int, default=2, help="steps per timed run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant, interleaved")
    p.add_argument("--phase-steps", type=int, default=1, help="steps of the per-phase timing run")
    p.add_argument("--only", default="", help="comma-separated texts: run only variants whose name contains one "
                                              "(the reference always runs)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = p.parse_args()
    ref_precision = args.ref_precision or args.precision
    tf32 = "tf32" if "tf32" in (args.precision, ref_precision) else "fp32"  # the TF32 switches are global
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=set_precision(args.precision))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        set_precision(tf32)  # after Accelerator, which leaves the switches alone but be sure
    torch.manual_seed(0)
    host = make_batch(args.batch, args.seconds, args.identities, device)

    ref = Voice2FaceStep(args.identities, args.batch, device, ref_precision)
    variants = [Variant("Voice2Face reference (log-mel in)", lambda: ref.step(host),
                        lambda ph: setattr(ref, "phase", ph), ref.nets)]
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    with tempfile.TemporaryDirectory(prefix="bench_step-") as tmp:
        for config in ("voice2face", "avpgan"):
            for path in ("audio", "bank"):
                name = f"{config}.yaml, {path}"
                if wanted and not any(w in name for w in wanted):
                    continue
                stage = make_gan_stage(config, path, accelerator, args.identities, Path(tmp))
                variants.append(gan_variant(name, stage, path, host))
        if args.channels_last:
            to_channels_last([m for v in variants for m in v.modules()], host)
        if args.compile:
            for v in variants:
                for m in v.modules():
                    m.compile()
        for v in variants:  # warm-up: allocator, cuDNN autotuning, compilation
            for _ in range(3 if args.compile else 1):
                v.step()
        sync(device)
        times = measure(variants, device, args.steps, args.repeats)
        shares = {v.name: phase_shares(v, device, args.phase_steps) for v in variants}

    if device.type == "cpu":  # bf16 only pays on a CPU with bf16 instructions (AVX512-BF16, AMX)
        native = "native bf16" if cpu_has_bf16() else "no native bf16"
        threads = f", {torch.get_num_threads()} CPU thread(s) ({torch.backends.cpu.get_cpu_capability()}, {native})"
    else:
        threads = f" ({torch.cuda.get_device_name(device)})"
    frames = LogMel().num_frames(int(args.seconds * 16000))
    print(f"device {device}{threads}, torch {torch.__version__}, batch {args.batch}, {args.seconds:g} s crops "
          f"({frames} frames), {args.precision}{f' (reference {ref_precision})' if ref_precision != args.precision else ''}"
          f"{', compile' if args.compile else ''}"
          f"{', channels_last' if args.channels_last else ''}, {args.identities} identities; "
          f"median of {args.repeats} interleaved runs of {args.steps} steps; vs ref: median of the per-round ratios")
    head = (f"{'step':34s} {'faces/s':>9s} {'ms/step':>9s} {'vs ref':>7s}  "
            + " ".join(f"{k:>9s}" for k in (*PHASES, "other")) + "   (share of a phase-timed step)")
    print(head)
    print("-" * len(head))
    ref_runs = times[variants[0].name]
    rows = []
    for v in variants:
        sec = statistics.median(times[v.name])
        # Against the reference run of the same round: a load that comes and goes hits both alike.
        ratio = statistics.median(r / t for r, t in zip(ref_runs, times[v.name]))
        share = shares[v.name]
        total = sum(share.values())
        cells = " ".join(f"{100 * share[k] / total:8.0f}%" if share[k] > 0 else f"{'-':>9s}" for k in (*PHASES, "other"))
        print(f"{v.name:34s} {args.batch / sec:9.1f} {1000 * sec:9.1f} {ratio:6.2f}x  {cells}", flush=True)
        rows.append({"step": v.name, "faces_per_s": args.batch / sec, "ms_per_step": 1000 * sec, "vs_reference": ratio,
                     "runs_ms": [1000 * t for t in times[v.name]], "phase_ms": {k: 1000 * s for k, s in share.items()}})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__,
                                         "device": str(device), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
