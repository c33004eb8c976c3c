"""Named regions of a training step, so a benchmark can say where the step's time goes.

A stage wraps the parts of its step in `with self.phase("G"):` and the like. In training, a
region is a `torch.profiler.record_function` range: it costs a few microseconds, never waits for
the device, and labels the step in a torch.profiler or Nsight trace. `benchmarks/bench_step.py`
swaps in a `PhaseTimer`, which waits for the device at each region's edges and adds up wall time
per name. That is a measuring run only: those waits are exactly what a training step must avoid.

Names used by the GAN step (and by the Voice2Face reference in the benchmark):

    features   log-mel of the batch's audio (audio path only)
    encoder    the frozen voice encoder F_e (audio path only)
    G          G's forward, and G's update: D's forward on the fakes and the backward through D into G
    D/C        D and C's forward on real and generated faces, their losses and backward
    optimizer  the finite-gradient check, the Adam steps and the EMA of G
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
from typing import Iterator

import torch

Phase = Callable[[str], AbstractContextManager]


def record(name: str) -> AbstractContextManager:
    """The default region: a profiler range, nothing else."""
    return torch.profiler.record_function(name)


class PhaseTimer:
    """Wall time per region name, the device drained at each edge so the time lands where it is spent."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def _drain(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._drain()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._drain()
            self.seconds[name] += time.perf_counter() - t0
