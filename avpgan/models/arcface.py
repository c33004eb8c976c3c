"""ArcFace face embedder: an IResNet backbone and the additive angular margin loss.

The backbone keeps the module names and tensor shapes of the public `arcface_torch`
IResNet (insightface, recognition/arcface_torch/backbones/iresnet.py) at `width=64,
embed_dim=512, input_size=112`, so its published r50/r100 weights load with `strict=True`
and the identity metric can be the paper's own embedder rather than one trained here.
Images in [-1, 1] RGB are what those weights expect ((x / 255 - 0.5) / 0.5); any other input
size is resized (bilinear) to `input_size` inside forward.

The other knobs exist for the small embedder trained here on the train identities: `width`
scales every stage, `input_size` sets the flattened map the fc reads (7x7 at 112, 4x4 at 64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class IBasicBlock(nn.Module):
    """BN -> conv -> BN -> PReLU -> conv(stride) -> BN, plus the (projected) input.

    The pre-activation ordering and the stride on the *second* conv are arcface_torch's; they
    decide where the downsampling happens and so the checkpoint's meaning, not just its keys.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


def _after_stride2(size: int) -> int:
    """Output size of a 3x3/pad 1 (or 1x1/pad 0) conv with stride 2: ceil(size / 2)."""
    return (size - 1) // 2 + 1


class IResNet(nn.Module):
    """[B, 3, H, W] in [-1, 1] -> [B, embed_dim] embedding (not normalised; ArcFace normalises).

    `layers`: blocks per stage (r50: 3, 4, 14, 3). Every stage halves the map, so the fc reads
    8 * width channels at ceil(input_size / 16) squared positions.
    """

    def __init__(
        self,
        layers: Sequence[int],
        width: int = 64,
        embed_dim: int = 512,
        input_size: int = 112,
        dropout: float = 0.0,
    ):
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"IResNet: layers must be 4 positive block counts, got {list(layers)}")
        if input_size < 16:
            raise ValueError(f"IResNet: input_size must be >= 16 (four stride-2 stages), got {input_size}")
        self.input_size = input_size
        self.embed_dim = embed_dim
        self.conv1 = _conv3x3(3, width)
        self.bn1 = nn.BatchNorm2d(width, eps=1e-5)
        self.prelu = nn.PReLU(width)
        cin, side = width, input_size
        for i, blocks in enumerate(layers):
            cout = width * 2**i
            stage = [IBasicBlock(cin, cout, stride=2)] + [IBasicBlock(cout, cout) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            cin, side = cout, _after_stride2(side)
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(cin * side * side, embed_dim)
        # arcface_torch fixes this BatchNorm's scale at 1 (only the shift and statistics learn):
        # the embedding's scale is left to the statistics, which keeps the margin loss stable.
        self.features = nn.BatchNorm1d(embed_dim, eps=1e-5)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"IResNet: expected images [B, 3, H, W], got {tuple(x.shape)}")
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.input_size)
        # A channels-last view (e.g. a permuted HWC batch) crashed this network's CPU backward
        # with heap corruption on torch 2.13; a contiguous copy costs little.
        x = self.prelu(self.bn1(self.conv1(x.contiguous())))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def iresnet18(**kw) -> IResNet:
    return IResNet((2, 2, 2, 2), **kw)


def iresnet34(**kw) -> IResNet:
    return IResNet((3, 4, 6, 3), **kw)


def iresnet50(**kw) -> IResNet:
    return IResNet((3, 4, 14, 3), **kw)


def iresnet100(**kw) -> IResNet:
    return IResNet((3, 13, 30, 3), **kw)


ARCHS = {"iresnet18": iresnet18, "iresnet34": iresnet34, "iresnet50": iresnet50, "iresnet100": iresnet100}


class ArcMarginLoss(nn.Module):
    """Additive angular margin softmax (ArcFace): CE over s * cos(theta_y + m) vs s * cos(theta_j).

    cos(theta + m) stops decreasing once theta + m passes pi, which would reward pushing a sample
    further from its class; past that threshold (theta > pi - m) the target logit becomes
    cos(theta) - m * sin(m) instead, a linear continuation (insightface's "th"/"mm"). With
    `easy_margin` the margin is applied only where cos(theta) > 0. Everything runs in float32:
    s = 64 times a bf16 cosine would carry ~0.25 of rounding error into the logits.
    """

    def __init__(self, embed_dim: int, num_classes: int, s: float = 64.0, m: float = 0.5, easy_margin: bool = False):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"ArcMarginLoss: need at least 2 classes, got {num_classes}")
        self.s, self.m, self.easy_margin = float(s), float(m), easy_margin
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.normal_(self.weight, 0.0, 0.01)
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.th = math.cos(math.pi - m)
        self.mm = math.sin(math.pi - m) * m

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[B, num_classes] scaled logits, the margin applied at each row's label."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.weight.shape[1]:
            raise ValueError(f"ArcMarginLoss: expected embeddings [B, {self.weight.shape[1]}], got {tuple(embeddings.shape)}")
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cos = F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float())).clamp(-1.0, 1.0)
            target = cos.gather(1, labels[:, None])
            sin = (1.0 - target * target).clamp_min(0.0).sqrt()
            phi = target * self.cos_m - sin * self.sin_m
            if self.easy_margin:
                phi = torch.where(target > 0, phi, target)
            else:
                phi = torch.where(target > self.th, phi, target - self.mm)
            return cos.scatter(1, labels[:, None], phi) * self.s

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.logits(embeddings, labels)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return F.cross_entropy(logits, labels)
