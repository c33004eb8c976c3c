"""Import Voice2Face's published weights (`voice_embedding.pth`, `generator.pth`) as safetensors.

Voice2Face saves `net.state_dict()` of an nn.Sequential called `model`, so its keys are
positions: `model.0.weight` (conv), `model.1.running_mean` (batch norm), ... Our modules name
their layers instead (`convs.0.weight`, `norms.0.running_mean`, `proj.weight`), so the mapping
is positional and checked: every source key must be used, every target key filled, and the
result must load strictly into the module rebuilt from the shapes. The converted file records
the constructor arguments in its metadata, so `load_converted` can rebuild the module without a
config. Only the no-spectral-norm, no-CBAM Generator matches Voice2Face's generator.
See docs/voice2face_weights.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from avpgan import atomic
from avpgan.models.face_gan import Generator
from avpgan.models.voice import VoiceEncoder

_KEY = re.compile(r"^model\.(\d+)\.(\w+)$")
_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class ConversionError(ValueError):
    """The source is not a Voice2Face state dict of the expected kind; the message says why."""


def _by_layer(state_dict: dict[str, torch.Tensor], what: str) -> dict[int, dict[str, torch.Tensor]]:
    """{'model.3.weight': t} -> {3: {'weight': t}}; a DataParallel 'module.' prefix is dropped."""
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        m = _KEY.match(key.removeprefix("module."))
        if m is None or not isinstance(value, torch.Tensor):
            raise ConversionError(f"{what}: unexpected entry '{key}' (expected model.<index>.<param> tensors)")
        layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if not layers:
        raise ConversionError(f"{what}: empty state dict")
    return layers


def _expect(layer: dict[str, torch.Tensor], names: tuple[str, ...], where: str) -> None:
    if set(layer) != set(names):
        raise ConversionError(f"{where}: has {sorted(layer)}, expected {sorted(names)}")


def convert_voice2face_voice(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Voice2Face VoiceEmbedNet state dict -> (VoiceEncoder state dict, VoiceEncoder kwargs).

    Layout: blocks of (Conv1d no bias, BatchNorm1d, ReLU) at indices 3i, 3i+1, 3i+2, then the
    output Conv1d with bias at 3n.
    """
    layers = _by_layer(state_dict, "voice encoder")
    n = sum("running_mean" in p for p in layers.values())
    expected = {3 * i for i in range(n)} | {3 * i + 1 for i in range(n)} | {3 * n}
    if n < 1 or set(layers) != expected:
        raise ConversionError(
            f"voice encoder: layer indices {sorted(layers)} do not match Voice2Face's VoiceEmbedNet "
            f"({n} conv/batch-norm blocks would use {sorted(expected)})"
        )
    out: dict[str, torch.Tensor] = {}
    for i in range(n):
        conv, bn = layers[3 * i], layers[3 * i + 1]
        _expect(conv, ("weight",), f"voice encoder: model.{3 * i} (Conv1d without bias)")
        bn = dict(bn)
        # State dicts from before PyTorch 0.4.1 lack the counter; it only matters for momentum=None.
        bn.setdefault("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        _expect(bn, _BN_KEYS, f"voice encoder: model.{3 * i + 1} (BatchNorm1d)")
        out[f"convs.{i}.weight"] = conv["weight"]
        for name in _BN_KEYS:
            out[f"norms.{i}.{name}"] = bn[name]
    proj = layers[3 * n]
    _expect(proj, ("weight", "bias"), f"voice encoder: model.{3 * n} (output Conv1d)")
    out["proj.weight"], out["proj.bias"] = proj["weight"], proj["bias"]
    kwargs = {
        "mel_bins": int(layers[0]["weight"].shape[1]),
        "embed_dim": int(proj["weight"].shape[0]),
        "channels": [int(layers[3 * i]["weight"].shape[0]) for i in range(n)],
    }
    return out, kwargs


def convert_voice2face_generator(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Voice2Face Generator state dict -> (Generator state dict, Generator kwargs).

    Layout: ConvTranspose2d with bias at even indices 0, 2, ..., ReLUs (no parameters) between.
    The target is Generator(spectral_norm=False, cbam=False).
    """
    layers = _by_layer(state_dict, "generator")
    count = len(layers)
    if count < 2 or set(layers) != {2 * i for i in range(count)}:
        raise ConversionError(f"generator: layer indices {sorted(layers)} are not Voice2Face's 0, 2, 4, ...")
    out: dict[str, torch.Tensor] = {}
    for i in range(count):
        layer = layers[2 * i]
        _expect(layer, ("weight", "bias"), f"generator: model.{2 * i} (ConvTranspose2d)")
        out[f"convs.{i}.weight"], out[f"convs.{i}.bias"] = layer["weight"], layer["bias"]
    kwargs = {
        "embed_dim": int(layers[0]["weight"].shape[0]),
        "channels": [int(layers[2 * i]["weight"].shape[1]) for i in range(count - 1)],
        "spectral_norm": False,
        "cbam": False,
    }
    return out, kwargs


_KINDS = {
    "voice": (convert_voice2face_voice, VoiceEncoder),
    "generator": (convert_voice2face_generator, Generator),
}


def _detect(state_dict: dict[str, torch.Tensor]) -> str:
    """Voice encoder checkpoints hold batch-norm statistics; the generator has none."""
    return "voice" if any(k.endswith("running_mean") for k in state_dict) else "generator"


def _build(kind: str, kwargs: dict) -> nn.Module:
    cls = _KINDS[kind][1]
    return cls(**kwargs)


def convert_file(src: str | Path, dst: str | Path, kind: str = "auto") -> str:
    """Convert one Voice2Face .pth file to safetensors at `dst`; returns the kind converted.

    The output loads strictly into the rebuilt module before it is written, and is written to a
    temporary name and renamed, so `dst` is either complete or absent.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ConversionError(f"{src}: file not found")
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip or unsupported-type errors all mean the same here
        raise ConversionError(f"{src}: not a readable PyTorch state dict ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConversionError(f"{src}: expected a state dict, found {type(state).__name__}")
    if kind == "auto":
        kind = _detect(state)
    if kind not in _KINDS:
        raise ConversionError(f"{src}: unknown kind '{kind}' (voice | generator | auto)")
    try:
        tensors, kwargs = _KINDS[kind][0](state)
        module = _build(kind, kwargs)
        module.load_state_dict(tensors, strict=True)
    except (ConversionError, RuntimeError) as e:
        raise ConversionError(f"{src}: {e}") from None
    metadata = {"format": f"avpgan.{type(module).__name__}", "kwargs": json.dumps(kwargs), "source": src.name}
    with atomic.replacing(dst) as tmp:
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return kind


def load_converted(path: str | Path) -> nn.Module:
    """Rebuild the module a `convert_file` output describes and load its weights (eval mode)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # missing file, truncated header, not safetensors at all
        raise ConversionError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    kind = {"avpgan.VoiceEncoder": "voice", "avpgan.Generator": "generator"}.get(meta.get("format", ""))
    if kind is None or "kwargs" not in meta:
        raise ConversionError(f"{path}: not written by avpgan.models.convert (metadata {meta})")
    module = _build(kind, json.loads(meta["kwargs"]))
    module.load_state_dict(tensors, strict=True)
    return module.eval()
