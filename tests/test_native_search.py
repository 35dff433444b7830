"""Native beam search (C++/CUDA step and bookkeeping) against the PyTorch batched search (the oracle)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from abm_rt.decode import beam_search
from abm_rt.model import ModelConfig, scaled_random_model

native = pytest.importorskip("abm_rt.decode.native")
if not native.is_available("cpu"):
    pytest.skip("abm_rt._C is not built", allow_module_level=True)
from abm_rt.decode.native_search import native_beam_search  # noqa: E402

SMALL = ModelConfig(growth=8, block_depth=2, hidden=32, embed=32, attn=32)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not native.is_available("cuda"), reason="needs a GPU visible to torch and a CUDA build of abm_rt._C"))]


def _batch(seed: int, B: int = 4):
    g = torch.Generator().manual_seed(seed)
    H, W = 5, 11
    f = torch.rand(B, SMALL.feature_dim, H, W, generator=g)
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    mask[0] = True                                     # one image fills the grid
    for b in range(1, B):
        mask[b, :int(torch.randint(1, H + 1, (1,), generator=g)), :int(torch.randint(1, W + 1, (1,), generator=g))] = True
    return f, mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("eos_bias", [4.0, 8.0])
def test_same_results_as_batched_search(device, k, eos_bias):
    """Tokens, truncation and scores equal the PyTorch batched search, for finished and truncated decodes."""
    seed = int(np.random.default_rng().integers(1 << 30))
    model = scaled_random_model(SMALL, seed=seed % 97, eos_bias=eos_bias)
    f, mask = _batch(seed)
    ref = beam_search(model.l2r, f, mask, k, max_len=25)
    dec = native.NativeDecoder(model.l2r, device, poison=True)
    got = native_beam_search(dec, f.to(device), mask, k, max_len=25, check_every=3)
    for b, (r, g) in enumerate(zip(ref, got)):
        tag = f"[seed {seed} image {b} k {k} {device}]"
        assert g.tokens == r.tokens and g.truncated == r.truncated, tag
        assert g.score == pytest.approx(r.score, rel=1e-4, abs=1e-4), tag
        assert g.normalized_score == pytest.approx(r.normalized_score, rel=1e-4, abs=1e-4), tag


def test_finishes_and_attention():
    """With a strong end bias every image finishes; attention maps match the batched search's."""
    model = scaled_random_model(SMALL, seed=5, eos_bias=8.0)
    f, mask = _batch(11)
    ref = beam_search(model.l2r, f, mask, 5, max_len=25, return_attention=True)
    got = native_beam_search(native.NativeDecoder(model.l2r, "cpu"), f, mask, 5, max_len=25, return_attention=True)
    assert any(not r.truncated for r in ref)
    for r, g in zip(ref, got):
        assert g.tokens == r.tokens
        assert g.attention.shape == r.attention.shape
        np.testing.assert_allclose(g.attention, r.attention, atol=1e-5)
