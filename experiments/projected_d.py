"""A Projected-GAN discriminator (Sauer et al. 2021) for experiments/gan_recipe.py: D's real/fake
heads (and C) read frozen EfficientNet-Lite0 features of the faces at four scales instead of
learning their own trunk from scratch. Optionally conditioned on the voice (projection term)."""
import torch, torch.nn as nn, torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm as sn
from avpgan.models.perceptual import PerceptualNet

TAPS = {2: 24, 4: 40, 10: 112, 15: 320}  # block index -> width (strides 4, 8, 16, 32)


class ProjD(nn.Module):
    def __init__(self, ids, size=64, width=64, cond_dim=0, deep=False, mbstd=False):
        super().__init__()
        self.mbstd = mbstd  # StyleGAN's minibatch standard deviation: a feature that a collapsed G cannot match
        # frozen, always in eval mode, input scaled as the TF-Lite weights expect
        self.lite0 = PerceptualNet(input_size=size, layer_weights=(1.0,) * len(TAPS), taps=TAPS)
        if deep:  # each head downsamples its tap to 4 x 4 (or 2 x 2) and judges it whole, as Projected GAN's heads do
            sides = [size // 4, size // 8, size // 16, size // 32]
            def head(c, side):
                layers = [sn(nn.Conv2d(c, width, 3, 1, 1)), nn.LeakyReLU(0.2)]
                while side > 4:
                    layers += [sn(nn.Conv2d(width, width, 4, 2, 1)), nn.LeakyReLU(0.2)]; side //= 2
                return nn.Sequential(*layers[:-1]), side
            built = [head(c, sd) for c, sd in zip(TAPS.values(), sides)]
            self.convs = nn.ModuleList(b[0] for b in built)
            self.outs = nn.ModuleList(sn(nn.Conv2d(width + int(mbstd), 1, b[1])) for b in built)
        else:
            self.convs = nn.ModuleList(sn(nn.Conv2d(c, width, 3, 1, 1)) for c in TAPS.values())
            self.outs = nn.ModuleList(sn(nn.Conv2d(width + int(mbstd), 1, 1)) for _ in TAPS)
        self.proj = nn.ModuleList(sn(nn.Linear(cond_dim, width, bias=False)) for _ in TAPS) if cond_dim else None
        self.classifier = nn.Linear(112 + 320, ids, bias=False)

    @staticmethod
    def pooled(f):  # what C reads: the two deepest taps, averaged over space
        return torch.cat([f[-2].mean((2, 3)), f[-1].mean((2, 3))], 1)

    @staticmethod
    def with_batch_std(h, group=4):
        """One more channel: the spread of h across each group of `group` consecutive faces (real and
        fake batches are concatenated, so a group never mixes them)."""
        n, c, hh, ww = h.shape
        s = h.view(n // group, group, c, hh, ww).std(1).mean((1, 2, 3))  # one figure per group
        return torch.cat([h, s.repeat_interleave(group)[:, None, None, None].expand(n, 1, hh, ww)], 1)

    def features(self, x):
        return self.pooled(self.lite0(x))

    def forward(self, x, e=None):
        f = self.lite0(x)
        logit = 0
        for k, t in enumerate(f):
            h = F.leaky_relu(self.convs[k](t), 0.2)
            logit = logit + self.outs[k](self.with_batch_std(h) if self.mbstd else h).mean((1, 2, 3))
            if self.proj is not None and e is not None:
                logit = logit + (self.proj[k](e) * h.mean((2, 3))).sum(1)
        return logit, self.classifier(self.pooled(f))
