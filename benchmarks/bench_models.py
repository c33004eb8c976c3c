"""Parameter counts and time per batch for every network of the pipeline.

For each network: parameters, forward time (no grad, eval mode: what generation and
evaluation pay) and forward + backward time (train mode: what a training step pays for that
network), median over `--repeats` timed batches after one warm-up batch. The GAN's networks are
shown next to their Voice2Face configuration (spectral_norm=False, cbam=False), the baseline
the paper compares with, so the cost of the paper's additions reads off one line.

    python benchmarks/bench_models.py                     # CPU, batch 64, 8 s voice crops
    python benchmarks/bench_models.py --device cuda --repeats 20
    python benchmarks/bench_models.py --only "voice,generator,D + C"   # the GAN's rows only

To add a network, append an `Entry` in `entries()`: a name, a zero-argument constructor and a
function batch -> input tensors (on CPU; they are moved to the device here).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from avpgan import config as config_mod
from avpgan.models import FaceDiscriminator, Generator, VoiceEncoder


@dataclass
class Entry:
    name: str
    make: Callable[[], nn.Module]
    inputs: Callable[[int], tuple[torch.Tensor, ...]]
    baseline: str | None = None  # the row this one is compared with


def entries(cfg: config_mod.Config, frames: int, num_ids: int) -> list[Entry]:
    m = cfg.model
    g, d = m.generator, m.discriminator
    voice = lambda b: (torch.randn(b, m.voice.mel_bins, frames),)  # noqa: E731
    emb = lambda b: (torch.nn.functional.normalize(torch.randn(b, g.embed_dim), dim=1),)  # noqa: E731
    face = lambda b: (torch.rand(b, 3, 64, 64) * 2 - 1,)  # noqa: E731
    rows = [
        Entry(f"voice encoder (T={frames})", lambda: VoiceEncoder(m.voice.mel_bins, m.voice.embed_dim, m.voice.channels), voice),
        Entry("generator, Voice2Face", lambda: Generator(g.embed_dim, g.channels, spectral_norm=False, cbam=False), emb),
        Entry(
            "generator, AVP-GAN",
            lambda: Generator(g.embed_dim, g.channels, g.spectral_norm, g.cbam, g.cbam_layers, g.cbam_reduction),
            emb,
            baseline="generator, Voice2Face",
        ),
        Entry(
            f"D + C, Voice2Face ({num_ids} ids)",
            lambda: FaceDiscriminator(num_ids, d.channels, spectral_norm=False, cbam=False, embed_dim=d.embed_dim),
            face,
        ),
        Entry(
            f"D + C, AVP-GAN ({num_ids} ids)",
            lambda: FaceDiscriminator(num_ids, d.channels, d.spectral_norm, d.cbam, d.cbam_layers, d.cbam_reduction, d.embed_dim),
            face,
            baseline=f"D + C, Voice2Face ({num_ids} ids)",
        ),
    ]
    return rows + _restoration_entries(cfg)


def _restoration_entries(cfg: config_mod.Config) -> list[Entry]:
    """The face embedder and the restoration networks, from the same config."""
    rows: list[Entry] = []
    e, r = cfg.model.embedder, cfg.model.restorer
    try:
        from avpgan.models import arcface

        factory = getattr(arcface, e.arch)
        rows.append(Entry(
            f"face embedder {e.arch} w{e.width} ({e.input_size} px)",
            lambda: factory(width=e.width, embed_dim=e.embed_dim, input_size=e.input_size),
            lambda b: (torch.rand(b, 3, e.input_size, e.input_size) * 2 - 1,),
        ))
    except (ImportError, AttributeError) as err:
        print(f"(face embedder left out: {err})")
    try:
        from avpgan.models import face_prior, restore

        rows += [
            Entry(
                f"restorer (64 -> {r.out_size} px)",
                lambda: restore.Restorer(r.out_size, r.unet_channels, r.prior_channels, r.style_dim),
                lambda b: (torch.rand(b, 3, 64, 64) * 2 - 1,),
            ),
            Entry(
                f"StyleGAN2 prior ({r.out_size} px)",
                lambda: face_prior.StyleGAN2Prior(r.out_size, r.prior_channels, r.style_dim),
                lambda b: (torch.randn(b, r.style_dim),),
            ),
            Entry(
                f"restoration D ({r.out_size} px)",
                lambda: face_prior.StyleDiscriminator(r.out_size, r.prior_channels),
                lambda b: (torch.rand(b, 3, r.out_size, r.out_size) * 2 - 1,),
            ),
        ]
    except (ImportError, AttributeError) as err:
        print(f"(restoration networks left out: {err})")
    return rows


def _scalar(out) -> torch.Tensor:
    """Sum of the means of every float tensor in the output, so backward reaches every head."""
    if isinstance(out, torch.Tensor):
        return out.float().mean()
    if isinstance(out, dict):
        out = list(out.values())
    return sum(_scalar(o) for o in out if isinstance(o, (torch.Tensor, tuple, list, dict)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_entry(entry: Entry, batch: int, repeats: int, device: torch.device) -> tuple[int, float, float]:
    """(parameters, forward seconds, forward+backward seconds) per batch."""
    net = entry.make().to(device)
    params = sum(p.numel() for p in net.parameters())

    def forward_only():
        net.eval()
        with torch.no_grad():
            net(*xs)

    def forward_backward():
        net.train()
        net.zero_grad(set_to_none=True)
        _scalar(net(*xs)).backward()

    results = []
    for fn in (forward_only, forward_backward):
        times = []
        for i in range(repeats + 1):
            xs = [x.to(device) for x in entry.inputs(batch)]
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i:  # the first batch warms caches and allocators
                times.append(time.perf_counter() - t0)
        results.append(statistics.median(times))
    return params, results[0], results[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="experiment YAML (default: the paper's settings)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--frames", type=int, default=800, help="voice crop in log-mel frames (100 per second)")
    p.add_argument("--identities", type=int, default=924, help="classifier width (the paper's train split)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--only", default="", help="comma-separated texts: run only rows whose name contains one")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = config_mod.load(args.config)
    torch.manual_seed(0)

    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    rows = [e for e in entries(cfg, args.frames, args.identities) if not wanted or any(w in e.name for w in wanted)]
    print(f"device {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}, "
          f"batch {args.batch}, median of {args.repeats}")
    head = f"{'network':42s} {'params':>12s} {'fwd ms':>9s} {'fwd+bwd ms':>11s}  {'vs baseline (params, fwd+bwd)':s}"
    print(head)
    print("-" * len(head))
    done: dict[str, tuple[int, float, float]] = {}
    for e in rows:
        params, fwd, fwdbwd = time_entry(e, args.batch, args.repeats, device)
        done[e.name] = (params, fwd, fwdbwd)
        versus = ""
        if e.baseline in done:
            bp, _, bt = done[e.baseline]
            versus = f"{params - bp:+,d} params, x{fwdbwd / bt:.2f} time"
        print(f"{e.name:42s} {params:12,d} {fwd * 1e3:9.1f} {fwdbwd * 1e3:11.1f}  {versus}", flush=True)


if __name__ == "__main__":
    main()
