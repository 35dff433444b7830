"""Attention maps as pictures: the input image with each emitted token's attention laid over it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .data.images import ImageOptions, load_image
from .result import Result


def attention_strip(pixels: np.ndarray, attention: np.ndarray, tokens: list[str], stride: int = 16,
                    max_rows: int = 64) -> Image.Image:
    """One row per token: the image in gray with that token's attention in red, the token on the left.

    pixels: [H, W] in [0, 1] (white ink on black); attention: [T, H', W'] over the feature grid, each
    cell covering ``stride`` x ``stride`` pixels.
    """
    h, w = pixels.shape
    label_w = 110
    rows = min(len(tokens), max_rows)
    canvas = Image.new("RGB", (label_w + w, max(1, rows) * (h + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    gray = (255 - pixels * 180).astype(np.uint8)              # dark ink on a light background
    for t in range(rows):
        a = np.kron(attention[t], np.ones((stride, stride), np.float32))[:h, :w]
        a = a / a.max() if a.max() > 0 else a
        rgb = np.stack([gray, gray, gray], -1).astype(np.float32)
        rgb[..., 0] = rgb[..., 0] * (1 - a) + 255 * a          # attention as red
        rgb[..., 1] *= 1 - 0.7 * a
        rgb[..., 2] *= 1 - 0.7 * a
        y = t * (h + 4)
        canvas.paste(Image.fromarray(rgb.clip(0, 255).astype(np.uint8)), (label_w, y))
        draw.text((4, y + h // 2 - 6), tokens[t], fill=(0, 0, 0))
    return canvas


def save_attention_png(out: str | Path, source: Any, result: Result, options: ImageOptions = ImageOptions()) -> Path:
    """Write ``result``'s attention maps over ``source`` (any item ``predict`` accepts) as a PNG."""
    if result.attention is None:
        raise ValueError("the result has no attention maps: call predict(..., return_attention=True)")
    pixels = load_image(source, options).pixels
    strip = attention_strip(pixels, result.attention, result.tokens)
    out = Path(out)
    strip.save(out)
    return out
