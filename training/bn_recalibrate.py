"""Recompute a model's BatchNorm running statistics for the weights it holds now, as inference runs it.

    python -m training.bn_recalibrate ENGINE --out DIR [--data ../shared/data/crohme] [--images 1600]

Why: the running statistics a trained ABM carries were gathered in training mode, and do not quite
describe what its encoder computes at inference, for two reasons:
- averaged weights (the trainer's EMA, a soup of engines) were never run with the statistics they are
  given: those are the raw weights' (EMA) or an average of other models' statistics (soup);
- in every dense layer of the encoder dropout (0.2) comes before a BatchNorm, so in training that BN
  normalises activations whose variance dropout has raised; at inference dropout is off ("variance shift").
One pass over training images with the model in eval mode (dropout off) and every BN accumulating a plain
average of its batch statistics (momentum None) gives the statistics of inference. Only the encoder has
BatchNorm, so only the encoder runs. The buffers are updated in place (never replaced), so CUDA graphs that
captured them stay valid.

Measured on CROHME 2014 (benchmarks/results/bn_recalibrate_2014_cpu_2026-12-06.json): it lifted a run's raw
weights at epoch 60 by 2.5 points (p = 0.03), through dropout being off (with ``--dropout`` nothing changed), but
the same run's raw weights two epochs later by only 0.5 (p = 0.68), and not its EMA weights or abm-soup, bundled then
(-0.2 and -1.1, neither significant): no reliable gain. Check an engine before and after with ``abm-rt eval``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .packed import PackedBatch

_BN = nn.modules.batchnorm._BatchNorm


def batchnorm_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The running statistics of every BatchNorm of ``model`` (mean, var, count), in module order."""
    out = []
    for m in model.modules():
        if isinstance(m, _BN) and m.track_running_stats:
            out += [m.running_mean, m.running_var, m.num_batches_tracked]
    return out


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[PackedBatch], dropout: bool = False) -> int:
    """Replace the BN running statistics of ``model`` by their average over ``batches`` (dropout off, or on
    as in training with ``dropout=True``).

    Each batch counts once (PyTorch's cumulative average with ``momentum=None``), as a BN layer sees it:
    padded canvases included, as in training. The model's mode and the layers' momenta are restored.

    Returns:
        the number of images that ran.
    Raises:
        ValueError: ``batches`` is empty (the statistics would be reset to their initial values).
    """
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    was_training = model.training
    momenta = [m.momentum for m in bns]
    model.train(dropout)
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    images = 0
    try:
        for b in batches:
            x, pixel_mask = b.inputs()
            model.encode(x, pixel_mask)
            images += int(b.images.shape[0])
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.train(was_training)
    if images == 0:
        raise ValueError("no batches to recalibrate BatchNorm with")
    return images


def recalibrate_engine(engine: str | Path, out: str | Path, data: str | Path, images: int = 1600,
                       max_batch: int = 16, batch_pixels: int = 480000, dropout: bool = False) -> Path:
    """Write a copy of the engine directory ``engine`` to ``out`` with BN statistics recomputed on the
    first ``images`` training images of ``data`` (a CROHME folder with ``train/``), on the CPU.

    Batches are bucketed by size as the trainer's are (``max_batch`` images, ``batch_pixels`` padded
    pixels at most). The provenance records the source and how the statistics were made."""
    from abm_rt.data.crohme import read_split
    from abm_rt.engine_dir import load_engine, save_engine

    from .packed import pack_split

    src = load_engine(engine)
    samples = read_split(Path(data) / "train", limit=images)
    batches = pack_split(samples, src.vocab, torch.device("cpu"), max_batch, batch_pixels)
    t0 = time.time()
    torch.manual_seed(0)                           # the dropout masks, when dropout is on
    n = recalibrate_batchnorm(src.model, batches, dropout)
    provenance = dict(src.config.get("provenance", {}))
    provenance["bn_recalibrated"] = {"by": "training.bn_recalibrate", "source": str(src.path), "images": n,
                                     "batches": len(batches), "max_batch": max_batch,
                                     "batch_pixels": batch_pixels, "dropout": dropout,
                                     "seconds": round(time.time() - t0, 1)}
    return save_engine(out, src.model, src.vocab, provenance=provenance, with_r2l=src.has_r2l)


def main(argv: list[str] | None = None) -> None:
    """Command line."""
    p = argparse.ArgumentParser(prog="python -m training.bn_recalibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engine", help="the engine directory to start from")
    p.add_argument("--out", required=True, help="the engine directory to write")
    p.add_argument("--data", default="../shared/data/crohme", help="CROHME folder with train/")
    p.add_argument("--images", type=int, default=1600, help="training images to run (the first N captions)")
    p.add_argument("--max-batch", type=int, default=16, help="images per batch at most")
    p.add_argument("--batch-pixels", type=int, default=480000, help="padded pixels per batch at most")
    p.add_argument("--dropout", action="store_true", help="keep dropout on, as in training (to tell its effect "
                   "on the statistics from that of averaging over many batches)")
    a = p.parse_args(argv)
    print(recalibrate_engine(a.engine, a.out, a.data, a.images, a.max_batch, a.batch_pixels, a.dropout))


if __name__ == "__main__":
    main()
