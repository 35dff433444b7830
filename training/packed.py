"""A data split decoded once and kept on the training device as fixed, padded batches."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from abm_rt.data.buckets import CanvasGrid, round_up_on_grid, size_batches
from abm_rt.data.crohme import Sample
from abm_rt.data.vocab import Vocab

from .augment import pixel_mask
from .losses import teacher_tensors


@dataclass
class PackedBatch:
    """One batch: uint8 images padded to multiples of (mh, mw), sizes for the mask, teacher tensors."""

    images: torch.Tensor        # [B, 1, H, W] uint8, white ink on black, top-left aligned
    heights: torch.Tensor       # [B]
    widths: torch.Tensor        # [B]
    lengths: torch.Tensor       # [B] symbols per label
    l2r_in: torch.Tensor
    l2r_tgt: torch.Tensor
    r2l_in: torch.Tensor
    r2l_tgt: torch.Tensor
    names: list[str]
    tokens: list[list[str]]
    # distillation targets (training.distill): teacher probabilities [B, T, K], bf16; None without teachers
    l2r_soft: torch.Tensor | None = None
    r2l_soft: torch.Tensor | None = None

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images as float in [0, 1], pixel mask [B, H, W]) computed on the device."""
        _, _, H, W = self.images.shape
        return self.images.float().div_(255.0), pixel_mask(self.heights, self.widths, H, W)


def _upload(group: list[Sample], vocab: Vocab, device: torch.device, H: int, W: int,
            steps: int | None = None) -> PackedBatch:
    """One batch of ``group`` on a zero canvas of H x W (top-left aligned), uploaded to ``device``."""
    img = np.zeros((len(group), 1, H, W), np.uint8)
    for j, s in enumerate(group):
        img[j, 0, :s.image.shape[0], :s.image.shape[1]] = s.image
    tt = teacher_tensors([vocab.encode(s.tokens) for s in group], steps=steps)
    return PackedBatch(
        images=torch.from_numpy(img).to(device),
        heights=torch.tensor([s.image.shape[0] for s in group], device=device),
        widths=torch.tensor([s.image.shape[1] for s in group], device=device),
        lengths=tt["lengths"].to(device), l2r_in=tt["l2r_in"].to(device), l2r_tgt=tt["l2r_tgt"].to(device),
        r2l_in=tt["r2l_in"].to(device), r2l_tgt=tt["r2l_tgt"].to(device),
        names=[s.name for s in group], tokens=[s.tokens for s in group])


def pack_split(samples: list[Sample], vocab: Vocab, device: torch.device, max_batch: int,
               max_batch_pixels: int, multiple: tuple[int, int] = (16, 16)) -> list[PackedBatch]:
    """Bucket ``samples`` by size (``size_batches``) and upload every batch once."""
    sizes = [s.image.shape for s in samples]
    out = []
    mh, mw = multiple
    for idx in size_batches(sizes, max_batch, max_batch_pixels):
        group = [samples[i] for i in idx]
        H = -(-max(s.image.shape[0] for s in group) // mh) * mh
        W = -(-max(s.image.shape[1] for s in group) // mw) * mw
        out.append(_upload(group, vocab, device, H, W))
    return out


@dataclass(frozen=True)
class ShapeGrid(CanvasGrid):
    """The few batch shapes of graph training: abm_rt's ``CanvasGrid`` (canvas heights and widths, which
    inference can pad to as well) and step counts."""

    steps: tuple = (8, 16, 24, 32, 48, 64, 96, 128)


def fixed_shape_groups(samples: list[Sample], max_batch: int, max_batch_pixels: int,
                       grid: ShapeGrid = ShapeGrid()) -> list[tuple[int, int, list[int]]]:
    """The grouping of ``pack_fixed_shapes`` without the upload: (canvas H, canvas W, sample indices) per batch.

    Images go to the canvas (H, W) of the grid that holds them; every batch of a canvas has the same
    B = max_batch_pixels // (H W) (at most ``max_batch``, and at most the canvas's image count); within a
    canvas, images are sorted by label length so that a batch's T (rounded up on the step grid) wastes
    few steps. The last batch of a canvas is filled up to B with the canvas's shortest-label images
    again, so every image is used once per epoch and a few of them twice.
    """
    canvases: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(samples):
        canvases.setdefault(grid.canvas(*s.image.shape), []).append(i)
    out = []
    for (H, W), idx in sorted(canvases.items()):
        B = min(len(idx), max(1, min(max_batch, max_batch_pixels // (H * W))))
        idx.sort(key=lambda i: (len(samples[i].tokens), i))
        for k in range(0, len(idx), B):
            chunk = idx[k:k + B]
            out.append((H, W, chunk + idx[:B - len(chunk)]))
    return out


def pack_fixed_shapes(samples: list[Sample], vocab: Vocab, device: torch.device, max_batch: int,
                      max_batch_pixels: int, grid: ShapeGrid = ShapeGrid()) -> list[PackedBatch]:
    """Batches with few distinct shapes (B, H, W, T), so each shape can be captured once as a CUDA graph:
    the groups of ``fixed_shape_groups``, each with its step count T rounded up on the grid's steps."""
    out = []
    for H, W, chunk in fixed_shape_groups(samples, max_batch, max_batch_pixels, grid):
        group = [samples[i] for i in chunk]
        steps = round_up_on_grid(max(len(s.tokens) for s in group) + 1, list(grid.steps), 16)
        out.append(_upload(group, vocab, device, H, W, steps))
    return out
