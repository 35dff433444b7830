"""Whole training steps (forward, backward, clipping, optimizer) replayed from CUDA graphs.

Why: the decoder's time loop launches ~100 small kernels per step and direction, so an eager training
step is bound by the CPU launching them (0.28-0.45 s per batch on an H100,
``tests/logs/2026-11-26_train_profile_h100``). A CUDA graph replays the same kernels with no Python
and no launch overhead. One graph per batch shape (B, H, W, T): ``pack_fixed_shapes`` keeps their
number near a hundred. All graphs share one memory pool; that is safe because they run one at a time
on one stream and keep nothing alive between replays (gradients, optimizer state, the learning rate
and the loss sums are tensors allocated outside the graphs and updated in place).

What capture needs from the step, and gets here: no host synchronisation (the losses and the KL
pairing are sync-free), gradients that exist before capture (zeroed in place, never set to None),
an optimizer built with ``capturable=True`` and a tensor learning rate, autocast without its weight
cache, and dropout from the graph-safe default generator (each replay draws new masks).
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from .packed import PackedBatch

# The detached loss parts a step adds up: ce_l2r, ce_r2l, kl (L2R/R2L) and kd (towards the teachers).
LOSS_PARTS = 4

LossFn = Callable[[PackedBatch, bool], tuple[torch.Tensor, torch.Tensor]]


# The tensors of a PackedBatch that a graph reads (its names and tokens stay on the host).
BATCH_TENSORS = ("images", "heights", "widths", "lengths", "l2r_in", "l2r_tgt", "r2l_in", "r2l_tgt")
SOFT_TENSORS = ("l2r_soft", "r2l_soft")      # only when the run distils from teachers


def batch_tensor_names(b: PackedBatch) -> tuple[str, ...]:
    """The tensors of ``b`` a graph reads: ``BATCH_TENSORS`` and the soft targets it carries."""
    return BATCH_TENSORS + tuple(n for n in SOFT_TENSORS if getattr(b, n) is not None)


def optimizer_step(params: list[torch.Tensor], optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                   b: PackedBatch, clip: float, sums: torch.Tensor, autocast_cache: bool = True) -> None:
    """One training step, eager or under capture: zero the gradients in place, loss, backward, clip the
    global norm, optimizer step, and add the detached loss parts to ``sums`` (no host synchronisation)."""
    optimizer.zero_grad(set_to_none=False)
    loss, parts = loss_fn(b, autocast_cache)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    optimizer.step()
    sums += parts


def shape_key(b: PackedBatch) -> tuple[int, ...]:
    """The shape a graph is specialised to: (B, H, W, T)."""
    B, _, H, W = b.images.shape
    return (B, H, W, b.l2r_in.shape[1])


class GraphedTrainStep:
    """Runs ``loss -> backward -> clip -> optimizer.step`` for a batch, from a CUDA graph per shape.

    The first batch of each shape runs eagerly (a real training step, on a side stream as capture
    requires for warm-up) and is then captured; later batches of that shape are copied into the
    graph's static input tensors and replayed. The optimizer must be capturable with a tensor lr, which
    the caller fills in place before each step. ``sums`` accumulates the detached loss parts on the device.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, clip: float):
        self.params = [p for p in model.parameters() if p.requires_grad]
        device = self.params[0].device
        if device.type != "cuda":
            raise ValueError(f"CUDA graph training needs the model on a CUDA device, not {device}")
        self.opt, self.loss_fn, self.clip = optimizer, loss_fn, clip
        for p in self.params:               # gradients live outside every graph, zeroed in place
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.sums = torch.zeros(LOSS_PARTS, device=device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, PackedBatch]] = {}
        self.capture_seconds = 0.0

    def _body(self, b: PackedBatch) -> None:
        # autocast's cast-weight cache cannot be captured
        optimizer_step(self.params, self.opt, self.loss_fn, b, self.clip, self.sums, autocast_cache=False)

    def step(self, b: PackedBatch) -> bool:
        """One training step on ``b``. Returns True when it replayed a graph, False when it ran eagerly
        to warm up and capture a new shape."""
        key = shape_key(b)
        entry = self.graphs.get(key)
        if entry is not None:
            graph, static = entry
            for name in batch_tensor_names(b):
                getattr(static, name).copy_(getattr(b, name))
            graph.replay()
            return True
        t0 = time.time()
        static = PackedBatch(**{name: getattr(b, name).clone() for name in batch_tensor_names(b)},
                             names=[], tokens=[])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._body(static)                        # the warm-up is this batch's real step
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._body(static)                        # recorded, not run
        self.graphs[key] = (graph, static)
        torch.cuda.synchronize()
        self.capture_seconds += time.time() - t0
        return False

    def reset_sums(self) -> None:
        """Zero the loss accumulators (start of an epoch)."""
        self.sums.zero_()
