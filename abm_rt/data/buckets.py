"""Grouping images of similar size into batches, and padding a batch with its masks (spec 1.3, 1.5)."""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


def geometric_grid(start: int, stop: int, ratio: float, multiple: int) -> list[int]:
    """start, then each value ``ratio`` times the last rounded up to ``multiple``, until >= stop."""
    grid = [start]
    while grid[-1] < stop:
        grid.append(-(-int(grid[-1] * ratio) // multiple) * multiple)
    return grid


def round_up_on_grid(value: int, grid: Sequence[int], multiple: int) -> int:
    """The smallest grid value >= ``value``; past the grid, ``value`` rounded up to ``multiple``."""
    i = bisect.bisect_left(grid, value)
    return grid[i] if i < len(grid) else -(-value // multiple) * multiple


@dataclass(frozen=True)
class CanvasGrid:
    """The canvas sizes our trainer pads its batches to (heights x1.5 from 64, widths x1.5 from 128).

    The CNN sees the padding (only the attention is masked), so a model trained on these canvases reads
    best on them: ``pad_batch(..., grid=CanvasGrid())`` pads an inference batch the same way."""

    heights: tuple = tuple(geometric_grid(64, 512, 1.5, 16))
    widths: tuple = tuple(geometric_grid(128, 2048, 1.5, 32))

    def canvas(self, h: int, w: int) -> tuple[int, int]:
        """The smallest canvas (H, W) of the grid that holds an h x w image (past the grid: 16 / 32 multiples)."""
        return round_up_on_grid(h, self.heights, 16), round_up_on_grid(w, self.widths, 32)


def paper_batches(sizes: Sequence[tuple[int, int]], batch_size: int = 16, batch_pixels: int = 320_000,
                  max_image_pixels: int | None = None) -> tuple[list[list[int]], list[int]]:
    """The paper's ``dataIterator`` grouping (spec 1.5), exactly.

    Sort by area (stable), walk in order, and close the batch when ``area * (count + 1) >
    batch_pixels`` or ``count == batch_size``. Returns (batches of indices, dropped indices): images
    whose area exceeds ``max_image_pixels`` are dropped, as the paper does (the caller reports them).
    """
    order = sorted(range(len(sizes)), key=lambda i: sizes[i][0] * sizes[i][1])
    batches: list[list[int]] = []
    dropped: list[int] = []
    cur: list[int] = []
    for i in order:
        area = sizes[i][0] * sizes[i][1]
        if max_image_pixels is not None and area > max_image_pixels:
            dropped.append(i)
            continue
        if cur and (area * (len(cur) + 1) > batch_pixels or len(cur) == batch_size):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches, dropped


def size_batches(sizes: Sequence[tuple[int, int]], max_batch_size: int, max_batch_pixels: int,
                 height_step: int = 32) -> list[list[int]]:
    """Batches that waste little padding: sort by (height band, width), then fill greedily while the
    *padded* batch (max H x max W x count) stays within ``max_batch_pixels``. Never drops an image: one
    larger than the budget gets a batch of its own. Used for inference and by our trainer.
    """
    order = sorted(range(len(sizes)), key=lambda i: (-(-sizes[i][0] // height_step), sizes[i][1], sizes[i][0]))
    batches: list[list[int]] = []
    cur: list[int] = []
    mh = mw = 0
    for i in order:
        h, w = sizes[i]
        nh, nw = max(mh, h), max(mw, w)
        if cur and (len(cur) == max_batch_size or nh * nw * (len(cur) + 1) > max_batch_pixels):
            batches.append(cur)
            cur, nh, nw = [], h, w
        cur.append(i)
        mh, mw = nh, nw
    if cur:
        batches.append(cur)
    return batches


def pad_batch(images: Sequence[np.ndarray], multiple: int = 1, grid: CanvasGrid | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [H, W] float images (values in [0, 1]) at the top-left of a zero canvas.

    Returns (x [B, 1, Hmax, Wmax] float32, pixel mask [B, Hmax, Wmax] bool). ``multiple`` rounds the
    canvas up (e.g. to 16, the encoder stride) so few distinct shapes reach the convolution tuner;
    ``grid`` instead takes the grid's smallest canvas that holds the batch (the trainer's canvases).
    """
    hmax = max(im.shape[0] for im in images)
    wmax = max(im.shape[1] for im in images)
    if grid is not None:
        hmax, wmax = grid.canvas(hmax, wmax)
    else:
        hmax, wmax = -(-hmax // multiple) * multiple, -(-wmax // multiple) * multiple
    x = np.zeros((len(images), 1, hmax, wmax), np.float32)
    m = np.zeros((len(images), hmax, wmax), bool)
    for i, im in enumerate(images):
        x[i, 0, :im.shape[0], :im.shape[1]] = im
        m[i, :im.shape[0], :im.shape[1]] = True
    return torch.from_numpy(x), torch.from_numpy(m)
