"""GFPGAN's synthetic degradation: clean faces -> (low-quality input, target) training pairs.

    y = flip(clean)
    x = resize_back(JPEG_q(noise_sigma(downsample_r(y * k_sigma))))
    x = colour_jitter(x) with p=0.3;  x, y = grey(x), grey(y) with p=0.01;  x = round(x to 8 bits)

GFPGAN states its ranges for 512 px faces. Ranges that are measured in pixels scale with the
image here, so the same *relative* blur hits a 128 px face:
- blur kernel: 41 px at 512 -> the odd size nearest 41 * S / 512 (11 at 128, 5 at 64), >= 3;
- blur sigma: 0.1-10 px at 512 -> (0.1-10) * S / 512 (0.025-2.5 at 128);
- downsampling factor 0.8-8 is already relative; the small side is clamped to >= 8 px.
Noise sigma (0-20 on the 0-255 scale), JPEG quality 60-100, jitter shift 20/255, the
probabilities and the flip do not depend on size.

Everything runs on the faces' device: blur and noise are batched torch (per-image kernels as one
grouped conv2d); resizing and JPEG go image by image since each image gets its own size and
quality. Only JPEG leaves the device (through PIL on the CPU, one small image each way). Every
random draw, the noise included, comes from one CPU `torch.Generator` and is moved to the
device, so a seed gives the same draws on any device, and on the CPU the same pairs as ever.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass
class DegradeParams:
    """GFPGAN v1's ranges (stated for 512 px); pixel-sized ones are rescaled to the image."""

    blur_kernel_512: int = 41
    blur_sigma_512: tuple[float, float] = (0.1, 10.0)
    aniso_prob: float = 0.5  # GFPGAN: kernel list ['iso', 'aniso'], probabilities [0.5, 0.5]
    downsample: tuple[float, float] = (0.8, 8.0)
    min_size: int = 8
    noise_255: tuple[float, float] = (0.0, 20.0)
    jpeg_quality: tuple[int, int] = (60, 100)
    jitter_prob: float = 0.3
    jitter_shift_255: float = 20.0
    grey_prob: float = 0.01
    grey_target: bool = True  # GFPGAN's gt_gray: a grey input asks for a grey output
    flip_prob: float = 0.5


def blur_kernel_size(size: int, p: DegradeParams = DegradeParams()) -> int:
    """Odd kernel size proportional to GFPGAN's 41 px at 512, at least 3 and below `size`."""
    k = 2 * round((p.blur_kernel_512 * size / 512 - 1) / 2) + 1
    return int(min(max(k, 3), size - 1 if size % 2 == 0 else size))


def gaussian_kernels(sigma_x: torch.Tensor, sigma_y: torch.Tensor, theta: torch.Tensor, k: int) -> torch.Tensor:
    """[N] sigmas and rotations -> [N, k, k] normalised (an)isotropic Gaussian kernels.

    The covariance is R diag(sx^2, sy^2) R^T; sigma_x == sigma_y gives the isotropic kernel.
    """
    r = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    c, s = torch.cos(theta.double())[:, None, None], torch.sin(theta.double())[:, None, None]
    u = c * xx + s * yy  # coordinates in the kernel's own axes
    v = -s * xx + c * yy
    sx, sy = sigma_x.double()[:, None, None], sigma_y.double()[:, None, None]
    kern = torch.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))
    return (kern / kern.sum(dim=(1, 2), keepdim=True)).float()


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    """One [3, H, W] image in [-1, 1] through a PIL JPEG encode/decode at `quality`."""
    arr = ((img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as decoded:
        out = np.asarray(decoded.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(out.copy()).permute(2, 0, 1).to(img.device) / 127.5 - 1


def _grey(x: torch.Tensor) -> torch.Tensor:
    y = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    return y.expand(-1, 3, -1, -1).contiguous()


def degrade(
    clean: torch.Tensor,
    generator: torch.Generator | None = None,
    out_size: int | None = None,
    params: DegradeParams = DegradeParams(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 3, S, S] clean faces in [-1, 1] -> (low-quality [B, 3, out, out], target [B, 3, S, S]).

    The target is the clean batch after the shared flip (and greying, when drawn). `out_size`
    defaults to S; the Restorer takes 64 px inputs while its targets may be 128 px.
    """
    if clean.dim() != 4 or clean.shape[1] != 3 or clean.shape[2] != clean.shape[3]:
        raise ValueError(f"degrade: expected square images [B, 3, S, S], got {tuple(clean.shape)}")
    p = params
    g = generator
    if g is None:  # fresh OS entropy, leaving torch's global stream alone
        g = torch.Generator()
        g.seed()
    b, _, size, _ = clean.shape
    out_size = out_size or size
    dev = clean.device
    clean = clean.float()

    # Per-image draws, all up front and in a fixed order (the stream of `g` decides every pair).
    flip = torch.rand(b, generator=g) < p.flip_prob
    scale = size / 512
    lo, hi = p.blur_sigma_512[0] * scale, p.blur_sigma_512[1] * scale
    aniso = torch.rand(b, generator=g) < p.aniso_prob
    sigma_x = _uniform(b, lo, hi, g)
    sigma_y = torch.where(aniso, _uniform(b, lo, hi, g), sigma_x)
    theta = torch.where(aniso, _uniform(b, -math.pi, math.pi, g), torch.zeros(b, dtype=torch.float64))
    factor = _uniform(b, *p.downsample, g)
    noise_sigma = _uniform(b, *p.noise_255, g) / 127.5  # 0-255 scale -> the [-1, 1] scale
    quality = torch.randint(p.jpeg_quality[0], p.jpeg_quality[1] + 1, (b,), generator=g)
    jitter = torch.rand(b, generator=g) < p.jitter_prob
    shift = (_uniform(b * 3, -p.jitter_shift_255, p.jitter_shift_255, g).view(b, 3) / 127.5).float()
    grey = torch.rand(b, generator=g) < p.grey_prob

    target = torch.where(flip.to(dev)[:, None, None, None], clean.flip(-1), clean)

    # Blur: every image its own kernel, one grouped convolution for the batch.
    k = blur_kernel_size(size, p)
    kern = gaussian_kernels(sigma_x, sigma_y, theta, k).to(dev)
    x = F.pad(target.reshape(1, b * 3, size, size), [k // 2] * 4, mode="reflect")
    x = F.conv2d(x, kern.repeat_interleave(3, dim=0)[:, None], groups=b * 3).view(b, 3, size, size)

    # Downsample, noise, JPEG, resize back: sizes and qualities differ per image.
    outs = []
    for i in range(b):
        small = max(p.min_size, int(size / float(factor[i])))
        xi = F.interpolate(x[i : i + 1], size=(small, small), mode="bilinear", align_corners=False)
        noise = torch.randn(xi.shape, generator=g).to(dev)
        xi = (xi + noise * float(noise_sigma[i])).clamp(-1, 1)
        xi = _jpeg(xi[0], int(quality[i]))[None]
        outs.append(F.interpolate(xi, size=(out_size, out_size), mode="bilinear", align_corners=False))
    lq = torch.cat(outs)

    lq = torch.where(jitter.to(dev)[:, None, None, None], lq + shift.to(dev)[:, :, None, None], lq).clamp(-1, 1)
    greyed = grey.to(dev)[:, None, None, None]
    lq = torch.where(greyed, _grey(lq), lq)
    if p.grey_target:
        target = torch.where(greyed, _grey(target), target)
    lq = ((lq + 1) * 127.5).round() / 127.5 - 1  # 8-bit values, as a decoded image would be
    return lq, target
