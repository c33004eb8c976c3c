"""Differentiable augmentation of everything the discriminator sees (Zhao et al. 2020, DiffAugment).

Why: with a few hundred training faces, D (and C, which shares its trunk) memorises them within
a few hundred steps; from then on its gradient tells G nothing about faces, only about the
memorised pixels, and G answers with high-frequency noise. Augmenting real AND generated faces
with the same random, differentiable transforms before D keeps D from memorising, while G's
gradient still flows through the transform. Because the fakes are augmented too, D never learns
that augmented images are real, so G is not pushed to draw shifted or cut-out faces (unlike
augmenting only the real data).

Each op draws its parameters per image. Values are in the faces' [-1, 1] range.

    color        brightness +-0.25, saturation x[0, 2], contrast x[0.5, 1.5]
    translation  shift by up to 1/8 of the side, zero-filled
    cutout       one zero square of half the side at a random place
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

OPS = ("color", "translation", "cutout")


def _uniform(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) * (hi - lo) + lo


def color(x: torch.Tensor) -> torch.Tensor:
    x = x + _uniform(x, -0.5, 0.5)  # brightness: +-0.25 of [0, 1] is +-0.5 of [-1, 1]
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * _uniform(x, 0.0, 2.0) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _uniform(x, 0.5, 1.5) + mean


def translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    b, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sy, sy + 1, (b, 1, 1), device=x.device)
    dx = torch.randint(-sx, sx + 1, (b, 1, 1), device=x.device)
    rows = (torch.arange(h, device=x.device)[None, :, None] + dy).clamp(-1, h)  # -1 and h: the zero pad
    cols = (torch.arange(w, device=x.device)[None, None, :] + dx).clamp(-1, w)
    padded = F.pad(x, (1, 1, 1, 1))
    index = ((rows + 1) * (w + 2) + (cols + 1)).flatten(1)  # [B, H*W] into the padded image
    out = padded.flatten(2).gather(2, index[:, None, :].expand(-1, x.shape[1], -1))
    return out.view_as(x)


def cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = ((ys - cy).abs() < ch // 2 + ch % 2) & ((xs - cx).abs() < cw // 2 + cw % 2)
    return x * (~inside)[:, None].to(x.dtype)


_FUNCTIONS = {"color": color, "translation": translation, "cutout": cutout}


def diff_augment(x: torch.Tensor, policy: Sequence[str]) -> torch.Tensor:
    """`x` [B, 3, H, W] with each op of `policy` applied in order; the identity for an empty policy."""
    for op in policy:
        if op not in _FUNCTIONS:
            raise ValueError(f"diff_augment: unknown op '{op}'; valid: {list(OPS)}")
        x = _FUNCTIONS[op](x)
    return x
