"""CBAM (Woo et al. 2018) as the paper writes it in eq. (2)-(5).

Channel attention first, then spatial attention, each a sigmoid gate multiplied into the
features. Two deliberate choices where the reference code and the paper's equations differ:

- the spatial gate is sigmoid(conv7x7([avg_c(F); max_c(F)])) with no BatchNorm and no bias,
  because eq. (4) has neither (the reference implementation adds a BatchNorm after the conv);
- the channel gate's MLP keeps the reference's biases on W0 and W1; the hidden width is
  max(1, C // r) so that narrow layers in small test configs still get a gate.
"""

from __future__ import annotations

import torch
from torch import nn


class CBAM(nn.Module):
    def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 7):
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"CBAM: channels ({channels}) and reduction ({reduction}) must be >= 1")
        if spatial_kernel % 2 != 1:
            raise ValueError(f"CBAM: spatial_kernel must be odd to keep the map size, got {spatial_kernel}")
        hidden = max(1, channels // reduction)
        # One MLP shared by the avg- and max-pooled vectors (eq. 2): W0 (C -> C/r), ReLU, W1 (C/r -> C).
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))
        # f^{7x7} of eq. (4): 2 maps (channel-mean, channel-max) -> 1 gate map.
        self.spatial = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2, bias=False)

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        """M_C(F), eq. (2): [B, C, 1, 1]."""
        avg = self.mlp(x.mean(dim=(2, 3)))
        mx = self.mlp(x.amax(dim=(2, 3)))
        return torch.sigmoid(avg + mx)[:, :, None, None]

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """M_S(F), eq. (4): [B, 1, H, W]."""
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.spatial(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channel_gate(x) * x  # F' (eq. 3)
        return self.spatial_gate(x) * x  # F'' (eq. 5)

