"""Shared fixtures: a small model configuration, random-weight models and random ink images."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:          # `pytest` run without `python -m` still imports abm_rt
    sys.path.insert(0, str(REPO))

from abm_rt.model import ModelConfig, scaled_random_model  # noqa: E402

SMALL_CFG = ModelConfig(growth=8, block_depth=2, hidden=32, embed=32, attn=32)


def random_ink_image(height: int, width: int, gen: torch.Generator, strokes: int = 6) -> torch.Tensor:
    """A [1, 1, H, W] binary image in {0, 1}: white horizontal/vertical strokes on black."""
    x = torch.zeros(1, 1, height, width)
    for _ in range(strokes):
        r = int(torch.randint(0, height, (1,), generator=gen))
        c = int(torch.randint(0, width, (1,), generator=gen))
        x[0, 0, r:r + 3, c:c + int(torch.randint(5, 40, (1,), generator=gen))] = 1.0
        x[0, 0, r:r + int(torch.randint(5, 30, (1,), generator=gen)), c:c + 3] = 1.0
    return x


@pytest.fixture(scope="session")
def small_cfg() -> ModelConfig:
    """A tiny ABM (D = 40, n = m = d = 32) that keeps decode tests fast on 2 CPU cores."""
    return SMALL_CFG


@pytest.fixture(scope="session")
def small_model(small_cfg):
    """A random-weight small inference model (seed 0) in eval mode."""
    return scaled_random_model(small_cfg, seed=0)


@pytest.fixture
def ink_image():
    """Factory: ink_image(h, w, seed) -> a random binary [1, 1, h, w] image."""
    def make(height: int, width: int, seed: int = 0) -> torch.Tensor:
        return random_ink_image(height, width, torch.Generator().manual_seed(seed))
    return make
