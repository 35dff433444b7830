"""Geometric augmentation (training/augment.py): the rescale, aspect, slant and rotation maps, the fit cap,
the mask, and a training epoch that uses them (CPU)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.augment import pixel_mask, random_affine
from training.trainer import TrainConfig, Trainer

from test_trainer import TINY, _samples, _write_split


def _canvas(sizes: list[tuple[int, int]], H: int, W: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solid ink blocks of the given sizes, top-left on zero canvases of H x W."""
    x = torch.zeros(len(sizes), 1, H, W)
    for i, (h, w) in enumerate(sizes):
        x[i, 0, :h, :w] = 1.0
    hs = torch.tensor([h for h, _ in sizes])
    ws = torch.tensor([w for _, w in sizes])
    return x, hs, ws


def test_unit_scale_is_identity():
    torch.manual_seed(0)
    x, hs, ws = _canvas([(10, 30), (20, 7)], 32, 64)
    x[0, 0, 3:5, 4:9] = 0.0                                      # some structure inside the block
    out, mask = random_affine(x, hs, ws, (1.0, 1.0))
    assert torch.equal(out, x)
    assert torch.equal(mask, pixel_mask(hs, ws, 32, 64))


@pytest.mark.parametrize("scale", [0.5, 0.75, 1.5])
def test_fixed_scale_scales_the_ink_block_and_the_mask(scale):
    """A solid h x w block becomes (about) a (s h) x (s w) block at the top-left; the mask covers
    ceil(s h) x ceil(s w); nothing outside the mask is inked; the result is binary."""
    x, hs, ws = _canvas([(16, 40), (24, 12)], 64, 96)
    out, mask = random_affine(x, hs, ws, (scale, scale))
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    for i in range(2):
        h, w = int(hs[i]), int(ws[i])
        rows = out[i, 0].amax(1).nonzero().flatten()
        cols = out[i, 0].amax(0).nonzero().flatten()
        assert rows.min() == 0 and cols.min() == 0
        assert abs(int(rows.max()) + 1 - scale * h) <= 1 and abs(int(cols.max()) + 1 - scale * w) <= 1
        assert mask[i].sum(0).amax() == int(np.ceil(scale * h)) and mask[i].sum(1).amax() == int(np.ceil(scale * w))
        assert not (out[i, 0].bool() & ~mask[i]).any()


def test_scale_is_capped_to_fit_the_canvas():
    """An image that already spans half its canvas's width can grow at most 2x, whatever is asked."""
    x, hs, ws = _canvas([(8, 48)], 64, 96)
    out, mask = random_affine(x, hs, ws, (4.0, 4.0))
    cols = out[0, 0].amax(0).nonzero().flatten()
    assert int(cols.max()) == 95                                   # 48 * 2 = 96 columns: the canvas's width
    assert int(mask[0].sum(0).amax()) == 16 and int(mask[0].sum(1).amax()) == 96


def test_factors_differ_per_image_and_stay_in_range():
    torch.manual_seed(1)
    sizes = [(20, 20)] * 64
    x, hs, ws = _canvas(sizes, 64, 64)
    _, mask = random_affine(x, hs, ws, (0.7, 1.4))
    heights = mask.any(2).sum(1).float()
    assert heights.min() >= np.floor(0.7 * 20) and heights.max() <= np.ceil(1.4 * 20)
    assert len(heights.unique()) > 5                                # each image draws its own factor


@pytest.mark.parametrize("kind", ["aspect", "shear", "rotate", "all"])
def test_area_keeping_maps_keep_the_ink_inside_a_box_at_the_top_left(kind):
    """Aspect, slant and rotation keep area: a solid block keeps (about) its ink count; its ink starts at
    the canvas's top-left (row 0 and column 0 inked), stays inside the mask, and the mask is the ink's
    bounding box (within a pixel)."""
    torch.manual_seed(2)
    opts = {"aspect": dict(aspect=1.5), "shear": dict(shear=0.4), "rotate": dict(rotate_deg=20.0),
            "all": dict(aspect=1.3, shear=0.3, rotate_deg=10.0)}[kind]
    x, hs, ws = _canvas([(20, 40)] * 16, 96, 128)
    out, mask = random_affine(x, hs, ws, (1.0, 1.0), **opts)
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    for i in range(16):
        ink = out[i, 0].bool()
        assert abs(int(ink.sum()) - 800) <= 0.1 * 800, int(ink.sum())
        assert ink[0].any() or ink[1].any()
        assert ink[:, 0].any() or ink[:, 1].any()
        assert not (ink & ~mask[i]).any()
        rows, cols = ink.any(1).nonzero().flatten(), ink.any(0).nonzero().flatten()
        assert int(mask[i].any(1).sum()) - (int(rows.max()) + 1) in (0, 1, 2)
        assert int(mask[i].any(0).sum()) - (int(cols.max()) + 1) in (0, 1, 2)


def test_maps_differ_per_image_and_rotation_tilts_a_line():
    """A horizontal line, rotated by up to 10 degrees, spans up to 60 sin(10) ~ 10 rows, and the angles
    differ per image."""
    torch.manual_seed(3)
    x, hs, ws = _canvas([(1, 60)] * 32, 64, 96)
    out, _ = random_affine(x, hs, ws, (1.0, 1.0), rotate_deg=10.0)
    spans = torch.tensor([int(out[i, 0].any(1).sum()) for i in range(32)])
    assert spans.max() <= 13 and spans.max() >= 6
    assert len(spans.unique()) > 4


def test_a_map_that_would_leave_the_canvas_is_shrunk_to_fit():
    """A block nearly as wide as its canvas, slanted and rotated, is shrunk: its box fits the canvas."""
    torch.manual_seed(4)
    x, hs, ws = _canvas([(30, 120)] * 8, 40, 128)
    out, mask = random_affine(x, hs, ws, (1.2, 1.2), shear=0.5, rotate_deg=15.0)
    for i in range(8):
        ink = out[i, 0].bool()
        assert ink.any() and not (ink & ~mask[i]).any()
        # the box reaches one side of the canvas: it was shrunk just enough
        assert int(mask[i].any(1).sum()) >= 39 or int(mask[i].any(0).sum()) >= 127


def test_training_epoch_with_scale_augmentation(tmp_path):
    data = tmp_path / "crohme"
    _write_split(data / "train", _samples(8, seed=3, max_h=100, max_w=200))
    _write_split(data / "2014", _samples(2, seed=4, max_h=100, max_w=200))
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=1, max_batch=4, batch_pixels=200_000,
                      cuda_graphs=True, val_every=1, val_beam=2, device="cpu", model=TINY,
                      scale_min=0.7, scale_max=1.4, aspect_max=1.2, shear_max=0.2, rotate_deg=3.0)
    Trainer(cfg).run()
    rec = [json.loads(ln) for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()][-1]
    assert rec["epoch"] == 1 and np.isfinite([rec["ce_l2r"], rec["ce_r2l"], rec["kl"], rec["val_ce"]]).all()
