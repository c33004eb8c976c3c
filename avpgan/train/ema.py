"""Exponential moving average of a network's weights (the generator used for samples and export).

The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so that a short run's EMA
follows training instead of staying near the initial weights (with 0.999 the average needs ~1000
updates to forget its start). Parameters are averaged; buffers (batch-norm statistics, spectral-norm power-iteration vectors)
are copied, because an average of power-iteration vectors is not a power-iteration vector.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))  # checkpointed with the weights

    @torch.no_grad()
    def update(self, model: nn.Module, only_if: torch.Tensor | None = None) -> None:
        """Move toward `model`; where the bool tensor `only_if` is false, change nothing (not even the
        update count). The decay is computed on the device from `num_updates`, so an update never
        makes the host wait for the step that produced `model`."""
        n = self.num_updates.double()
        weight = 1.0 - torch.clamp((1 + n) / (10 + n), max=self.decay)  # float64, as a Python float was
        take = torch.ones((), dtype=torch.bool, device=n.device) if only_if is None else only_if.to(n.device)
        weight = torch.where(take, weight, 0.0).float()
        self.num_updates += take.long()
        for ema_p, p in zip(self.module.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), weight)
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(torch.where(take, b, ema_b))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
