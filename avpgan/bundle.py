"""The single-file inference bundle: `avpgan export RUN --out model.safetensors`.

One safetensors file (no pickle: loading it cannot run code) holding the voice encoder, the
EMA generator, the restoration model and the face embedder when the run trained them, with
the resolved config in the file's metadata, so `generate` and `evaluate` need nothing else.
Tensor names are prefixed by the network: `voice.`, `generator.`, `restorer.`, `embedder.`.

The header also carries `sha256`, a digest of the format, config, parts and every tensor (name,
dtype, shape, bytes). `load` recomputes it before building anything: a flipped byte anywhere in
the tensors or the embedded config is a one-line error instead of a silently different model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from avpgan import atomic
from avpgan import config as config_mod
from avpgan import models
from avpgan.config import Config

FORMAT = "avpgan-bundle-1"
PARTS = {"voice": "voice", "generator": "gan", "restorer": "restore", "embedder": "embedder"}  # part -> stage


def collect(run_dir: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A run's stage outputs as a bundle in memory: the header (format, config, parts) and the
    prefixed tensors, exactly what `export` writes."""
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: not a training run directory (no config.yaml)")
    tensors: dict[str, torch.Tensor] = {}
    parts: list[str] = []
    for part, stage in PARTS.items():
        f = run_dir / stage / "model.safetensors"
        if not f.is_file():
            continue
        for k, v in load_file(str(f)).items():
            tensors[f"{part}.{k}"] = v
        parts.append(part)
    for needed in ("voice", "generator"):
        if needed not in parts:
            raise FileNotFoundError(f"{run_dir / PARTS[needed] / 'model.safetensors'}: the run has no trained "
                                    f"'{PARTS[needed]}' stage; a bundle needs at least voice and gan")
    return {"format": FORMAT, "config": cfg_file.read_text(), "parts": ",".join(parts)}, tensors


def export(run_dir: Path, out: Path) -> dict[str, int]:
    """Collect the run's stage outputs into one file; returns tensors per part."""
    header, tensors = collect(run_dir)
    with atomic.replacing(out) as tmp:
        save_file(tensors, str(tmp), metadata={**header, "sha256": digest(header, tensors)})
    return {part: sum(1 for k in tensors if k.startswith(part + ".")) for part in header["parts"].split(",")}


def digest(header: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of what a bundle means: its format, config and parts, and every tensor by name,
    dtype, shape and bytes (independent of the file's layout, so it is checked on what was loaded)."""
    h = hashlib.sha256()
    h.update(json.dumps([header.get(k, "") for k in ("format", "config", "parts")]).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@dataclass
class Bundle:
    cfg: Config
    voice: nn.Module
    generator: nn.Module
    restorer: nn.Module | None
    embedder: nn.Module | None

    def to(self, device) -> "Bundle":
        for name in ("voice", "generator", "restorer", "embedder"):
            m = getattr(self, name)
            if m is not None:
                setattr(self, name, m.to(device))
        return self


def load(path: Path, device: str | torch.device = "cpu") -> Bundle:
    """Rebuild every network in the bundle from its own config; eval mode, no gradients."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model bundle not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an avpgan bundle (format {meta.get('format')!r}); make one with `avpgan export`")
    if "sha256" not in meta:
        raise ValueError(f"{path}: bundle has no checksum (exported by an older avpgan), so it cannot be verified; "
                         f"export it again with `avpgan export RUN --out {path}`")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # a damaged header or a data section cut short
        raise ValueError(f"{path}: damaged safetensors file ({e})".splitlines()[0]) from None
    if digest(meta, tensors) != meta["sha256"]:
        raise ValueError(f"{path}: contents do not match the bundle's SHA-256 (corrupted or modified); "
                         f"export it again with `avpgan export`")
    return build(meta, tensors, f"{path} (embedded config)", device)


def from_run(run_dir: Path, device: str | torch.device = "cpu") -> Bundle:
    """A run directory's networks as its exported bundle would give them, without writing one
    (nothing to verify: the tensors come straight from the stage files)."""
    header, tensors = collect(run_dir)
    return build(header, tensors, str(Path(run_dir) / "config.yaml"), device)


def build(header: dict[str, str], tensors: dict[str, torch.Tensor], where: str,
          device: str | torch.device = "cpu") -> Bundle:
    """Every network of a bundle's header and tensors, from its own config (`where` names the
    config in errors); eval mode, no gradients."""
    cfg = config_mod.from_yaml_text(header["config"], where)

    def part(name: str, build: Callable[[], nn.Module]) -> nn.Module | None:
        """The part's network with its weights, or None (nothing built) when the bundle lacks it."""
        sd = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        if not sd:
            return None
        module = build()
        module.load_state_dict(sd)
        return module.eval().requires_grad_(False)

    m = cfg.model
    return Bundle(
        cfg=cfg,
        voice=part("voice", lambda: models.build_voice_encoder(m.voice)),
        generator=part("generator", lambda: models.build_generator(m.generator)),
        restorer=part("restorer", lambda: models.build_restorer(m.restorer)),
        embedder=part("embedder", lambda: models.build_embedder(m.embedder)),
    ).to(device)
