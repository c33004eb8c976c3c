"""A Projected-GAN discriminator (Sauer et al. 2021) for experiments/gan_recipe.py: D's real/fake
heads (and C) read frozen EfficientNet-Lite0 features of the faces at four scales instead of
learning their own trunk from scratch. Optionally conditioned on the voice (projection term)."""
import torch, torch.nn as nn, torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm as sn
from avpgan.models.perceptual import load_lite0

MEAN, STD = 127.0 / 255.0, 128.0 / 255.0  # the converted TF-Lite weights' input scaling
TAPS = {2: 24, 4: 40, 10: 112, 15: 320}  # block index -> width (strides 4, 8, 16, 32)


class ProjD(nn.Module):
    def __init__(self, ids, size=64, width=64, cond_dim=0, deep=False):
        super().__init__()
        self.net = load_lite0().eval().requires_grad_(False)
        self.size = size
        if deep:  # each head downsamples its tap to 4 x 4 (or 2 x 2) and judges it whole, as Projected GAN's heads do
            sides = [size // 4, size // 8, size // 16, size // 32]
            def head(c, side):
                layers, c_in = [sn(nn.Conv2d(c, width, 3, 1, 1)), nn.LeakyReLU(0.2)], width
                while side > 4:
                    layers += [sn(nn.Conv2d(width, width, 4, 2, 1)), nn.LeakyReLU(0.2)]; side //= 2
                return nn.Sequential(*layers[:-1]), side
            built = [head(c, sd) for c, sd in zip(TAPS.values(), sides)]
            self.convs = nn.ModuleList(b[0] for b in built)
            self.outs = nn.ModuleList(sn(nn.Conv2d(width, 1, b[1])) for b in built)
        else:
            self.convs = nn.ModuleList(sn(nn.Conv2d(c, width, 3, 1, 1)) for c in TAPS.values())
            self.outs = nn.ModuleList(sn(nn.Conv2d(width, 1, 1)) for _ in TAPS)
        self.proj = nn.ModuleList(sn(nn.Linear(cond_dim, width, bias=False)) for _ in TAPS) if cond_dim else None
        self.classifier = nn.Linear(112 + 320, ids, bias=False)

    def train(self, mode=True):
        super().train(mode); self.net.eval(); return self

    def taps(self, x):
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = ((x + 1) * 0.5 - MEAN) / STD
        n = self.net
        x = n._swish(n._bn0(n._conv_stem(x)))
        out, last = [], max(TAPS)
        for i, b in enumerate(n._blocks):
            x = b(x)
            if i in TAPS: out.append(x)
            if i == last: break
        return out

    def features(self, x):
        f = self.taps(x)
        return torch.cat([f[-2].mean((2, 3)), f[-1].mean((2, 3))], 1)

    def forward(self, x, e=None):
        f = self.taps(x)
        logit = 0
        for k, t in enumerate(f):
            h = F.leaky_relu(self.convs[k](t), 0.2)
            logit = logit + self.outs[k](h).mean((1, 2, 3))
            if self.proj is not None and e is not None:
                logit = logit + (self.proj[k](e) * h.mean((2, 3))).sum(1)
        return logit, self.classifier(torch.cat([f[-2].mean((2, 3)), f[-1].mean((2, 3))], 1))
