"""A running average of the trainable weights, for validation and the saved engine: exponential (EMA, updated
every step) or uniform (updated once an epoch from some epoch on: stochastic weight averaging).

Why: late in a run the weights still wander around a minimum from step to step (Adadelta with a
shrinking but non-zero lr); their running average sits nearer its centre and usually decodes better than
any single step. The average is updated after every optimizer step, eagerly and outside any CUDA graph
(one fused ``_foreach_lerp_`` over all parameters: a few kernels, no host synchronisation). The graphs
keep the raw weights' storage; ``applied()`` copies the average in and the raw weights back, never
swapping tensors, so captured pointers stay valid. BatchNorm statistics are not averaged: the model's
current running statistics are used with the averaged weights.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


class WeightAverage:
    """EMA of ``params`` with decay ``min(decay, (1 + n) / (10 + n))`` at the n-th update (a warm-up, so
    that the first updates are not dominated by the starting point); with ``decay=None`` the plain mean of
    the weights at every update (the n-th update weighs 1 / (n + 1))."""

    def __init__(self, params: list[torch.Tensor], decay: float | None):
        if decay is not None and not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.params = [p for p in params if p.requires_grad]
        self.decay = decay
        self.average = [p.detach().clone() for p in self.params]
        self.updates = 0

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if self.decay is None:
            return self.updates / (self.updates + 1)
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """average <- decay * average + (1 - decay) * weights."""
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - self.current_decay())
        self.updates += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; on exit its own weights come back."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            torch._foreach_copy_([p.detach() for p in self.params], self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in self.params], saved)
