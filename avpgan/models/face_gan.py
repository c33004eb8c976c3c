"""The face GAN: generator G (Fig. 4) and the discriminator/classifier pair D, C (Fig. 5).

Both follow Voice2Face layer for layer, so `spectral_norm=False, cbam=False` *is* the
Voice2Face baseline (same parameter count, same state-dict layout up to names), and the paper's
two additions are switches on top:

- spectral normalisation (torch's parametrization, one power iteration per training forward)
  on G's layers 2-5 and on every D conv except the first and last, as section 3.3 says;
- CBAM blocks after the activation of the layers named in `cbam_layers`.

Layers are numbered from 1 in the order data flows through them: in G, layer 1 is the
1x1 -> 4x4 transposed conv, layers 2..len(channels) the x2 upsamplers, the last one the 1x1
RGB projection; in D, layer 1 is the 1x1 conv, layers 2..len(channels) the stride-2 convs, the
last one the 4x4 -> 1x1 conv to the embedding. CBAM may follow any layer that has an activation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _sn

from avpgan.models.cbam import CBAM


def _attention(kind: str, enabled: bool, layers: Sequence[int], widths: Sequence[int], reduction: int) -> nn.ModuleDict:
    """CBAM blocks keyed by layer number; `widths[k-1]` is layer k's output width."""
    if not enabled:
        return nn.ModuleDict()
    for k in layers:
        if not 1 <= k <= len(widths):
            raise ValueError(f"{kind}: cbam_layers entry {k} is not a layer with an activation (valid: 1..{len(widths)})")
    return nn.ModuleDict({str(k): CBAM(widths[k - 1], reduction) for k in sorted(set(layers))})


def dcgan_init(modules: Sequence[nn.Module]) -> None:
    """Radford et al.'s init: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0.

    PyTorch's default (Kaiming-uniform with a = sqrt(5)) shrinks each transposed conv's output
    well below its input, so a 6-layer G without normalisation starts as an almost constant
    image whose colour is the last layer's bias; DCGAN's init keeps the signal alive.
    """
    for m in modules:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            w = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            nn.init.normal_(w, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """[B, embed_dim] (or Voice2Face's [B, embed_dim, 1, 1]) -> [B, 3, S, S], S = 4 * 2**(len(channels) - 1).

    The paper's G (and Voice2Face's): transposed convs + ReLU, no normalisation, an unbounded
    output clamped to [-1, 1] only when saved. Three DCGAN switches, off by default, make it
    learn in minutes on small budgets (docs/gan_recipe.md shows why each is needed there):
    `batch_norm` (BatchNorm2d before each hidden ReLU, so CBAM's ~0.25 gate scale at init does
    not compound through the layers), `tanh` (outputs bounded like the real faces) and
    `init="dcgan"` (see `dcgan_init`). `upsample="resize"` replaces each stride-2 transposed
    conv by a nearest-neighbour x2 resize and a 3x3 conv (Odena et al. 2016): a stride-2 4x4
    transposed conv gives the four pixels of each 2x2 cell different kernel taps, which a short
    run leaves as a checkerboard of coloured noise; a resize-conv cannot draw one.
    """

    def __init__(
        self,
        embed_dim: int = 64,
        channels: Sequence[int] = (1024, 512, 256, 128, 64),
        spectral_norm: bool = True,
        cbam: bool = True,
        cbam_layers: Sequence[int] = (2, 3, 4, 5),
        cbam_reduction: int = 16,
        batch_norm: bool = False,
        tanh: bool = False,
        init: str = "default",
        upsample: str = "transposed",
    ):
        super().__init__()
        if len(channels) < 1:
            raise ValueError("Generator: channels must name at least one layer width")
        if init not in ("default", "dcgan"):
            raise ValueError(f"Generator: init must be 'default' or 'dcgan', got '{init}'")
        if upsample not in ("transposed", "resize"):
            raise ValueError(f"Generator: upsample must be 'transposed' or 'resize', got '{upsample}'")
        self.embed_dim = embed_dim
        self.out_size = 4 * 2 ** (len(channels) - 1)
        self.tanh = tanh
        convs = [nn.ConvTranspose2d(embed_dim, channels[0], 4, 1, 0)]
        if upsample == "transposed":
            convs += [nn.ConvTranspose2d(a, b, 4, 2, 1) for a, b in zip(channels[:-1], channels[1:])]
        else:
            convs += [nn.Conv2d(a, b, 3, 1, 1) for a, b in zip(channels[:-1], channels[1:])]
        convs.append(nn.ConvTranspose2d(channels[-1], 3, 1, 1, 0))
        if spectral_norm:  # layers 2..len(channels): every upsampler, not the first or the RGB layer
            convs[1:-1] = [_sn(c) for c in convs[1:-1]]
        self.convs = nn.ModuleList(convs)
        self.resize = upsample == "resize"
        # One norm per hidden layer; an empty list keeps the paper's state-dict layout unchanged.
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in channels) if batch_norm else nn.ModuleList()
        self.attention = _attention("Generator", cbam, cbam_layers, channels, cbam_reduction)
        if init == "dcgan":  # the network's own layers; CBAM gates keep their init
            dcgan_init([*self.convs, *self.norms])

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        if embedding.dim() == 4 and embedding.shape[2:] == (1, 1):
            embedding = embedding.flatten(1)
        if embedding.dim() != 2 or embedding.shape[1] != self.embed_dim:
            raise ValueError(f"Generator: expected embeddings [B, {self.embed_dim}], got {tuple(embedding.shape)}")
        x = embedding[:, :, None, None]
        last = len(self.convs)
        for k, conv in enumerate(self.convs, start=1):
            if self.resize and 1 < k < last:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = conv(x)
            if k < last:
                if self.norms:
                    x = self.norms[k - 1](x)
                x = F.relu(x)
            if str(k) in self.attention:
                x = self.attention[str(k)](x)
        return torch.tanh(x) if self.tanh else x


class FaceDiscriminator(nn.Module):
    """Real/fake discriminator D and identity classifier C on ONE shared trunk.

    The trunk maps a [B, 3, S, S] face to an embed_dim vector; D = Linear(embed_dim -> 1) and
    C = Linear(embed_dim -> num_identities), both without bias. Sharing the trunk is Voice2Face's
    design (its FaceEmbedNet feeds both heads and is updated by both losses): C's identity task
    shapes the features D judges with, and the pair costs one trunk forward per image instead
    of two. forward(x) -> (real/fake logit [B], identity logits [B, num_identities]).
    """

    def __init__(
        self,
        num_identities: int,
        channels: Sequence[int] = (32, 64, 128, 256, 512),
        spectral_norm: bool = True,
        cbam: bool = True,
        cbam_layers: Sequence[int] = (2, 3, 4, 5),
        cbam_reduction: int = 16,
        embed_dim: int = 64,
        init: str = "default",
    ):
        super().__init__()
        if len(channels) < 1:
            raise ValueError("FaceDiscriminator: channels must name at least one layer width")
        if init not in ("default", "dcgan"):
            raise ValueError(f"FaceDiscriminator: init must be 'default' or 'dcgan', got '{init}'")
        if num_identities < 1:
            raise ValueError(f"FaceDiscriminator: num_identities must be >= 1, got {num_identities}")
        self.in_size = 4 * 2 ** (len(channels) - 1)
        convs = [nn.Conv2d(3, channels[0], 1, 1, 0)]
        convs += [nn.Conv2d(a, b, 4, 2, 1) for a, b in zip(channels[:-1], channels[1:])]
        convs.append(nn.Conv2d(channels[-1], embed_dim, 4, 1, 0))
        if spectral_norm:  # every conv except the first and the last
            convs[1:-1] = [_sn(c) for c in convs[1:-1]]
        self.trunk = nn.ModuleList(convs)
        self.attention = _attention("FaceDiscriminator", cbam, cbam_layers, channels, cbam_reduction)
        self.real_fake = nn.Linear(embed_dim, 1, bias=False)
        self.classifier = nn.Linear(embed_dim, num_identities, bias=False)
        if init == "dcgan":
            dcgan_init([*self.trunk, self.real_fake, self.classifier])

    def features(self, face: torch.Tensor) -> torch.Tensor:
        """The shared trunk: [B, 3, S, S] -> [B, embed_dim]."""
        if face.dim() != 4 or face.shape[1:] != (3, self.in_size, self.in_size):
            raise ValueError(
                f"FaceDiscriminator: expected faces [B, 3, {self.in_size}, {self.in_size}] "
                f"(this trunk's size; resize the images), got {tuple(face.shape)}"
            )
        x = face
        last = len(self.trunk)
        for k, conv in enumerate(self.trunk, start=1):
            x = conv(x)
            if k < last:
                x = F.leaky_relu(x, 0.2)
            if str(k) in self.attention:
                x = self.attention[str(k)](x)
        return x.flatten(1)

    def forward(self, face: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(face)
        return self.real_fake(h).squeeze(1), self.classifier(h)
