"""The PyTorch reference ABM: parameter counts (spec 6), encoder shapes (spec 2.3, 1.3), the folded
runtime step against the literal spec step (spec 3.3 / 3.6), and teacher forcing against stepping."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from abm_rt.model import (ABM, DenseEncoder, ModelConfig, count_parameters, feature_mask, feature_size,
                          scaled_random_model)
from abm_rt.model.encoder import Transition

from conftest import SMALL_CFG


# ---- spec 6: parameter counts ---------------------------------------------------------------------

def test_parameter_counts_match_spec():
    """Encoder 2,979,288; one branch 2,724,850; inference model 5,704,138; training model 8,428,988 (spec 6)."""
    inference = ABM()
    training = ABM(bidirectional=True)
    assert count_parameters(inference.encoder) == 2_979_288
    assert count_parameters(inference.l2r) == 2_724_850
    assert count_parameters(training.r2l) == 2_724_850
    assert count_parameters(inference) == 5_704_138
    assert count_parameters(training) == 8_428_988


def test_feature_dim_and_block_channels():
    """ABM's default dims: dense blocks 48->432, 216->600, 300->684, so D = 684 and stride 16 (spec 2.1)."""
    cfg = ModelConfig()
    assert cfg.block_channels == [(48, 432), (216, 600), (300, 684)]
    assert cfg.feature_dim == 684
    assert cfg.downsample == 16


def test_same_weights_layout_ignores_training_only_fields():
    """Dropout changes training, not a parameter's shape: configs that differ only there share weights;
    any dimension makes them differ, and so do the parameter shapes of the two models."""
    base = ModelConfig()
    assert base.same_weights_layout(ModelConfig(dropout=0.3))
    assert not base.same_weights_layout(ModelConfig(hidden=128))
    small = {"growth": 8, "block_depth": 2, "hidden": 32, "embed": 32, "attn": 32}
    shapes = [{k: v.shape for k, v in ABM(ModelConfig(**small, dropout=p)).state_dict().items()} for p in (0.2, 0.5)]
    assert shapes[0] == shapes[1]


# ---- spec 2.3 / 1.3: encoder output grid ---------------------------------------------------------

ODD_SIZES = [(94, 256), (97, 251), (33, 17), (17, 33), (16, 16), (15, 16), (1, 1), (2, 3), (31, 49), (65, 129)]


def _ceil16(x: int) -> int:
    return -(-x // 16)


@pytest.mark.parametrize("hw", ODD_SIZES)
def test_encoder_output_shape_odd_sizes(hw):
    """The encoder output grid for H x W equals feature_size() = (ceil(H/16), ceil(W/16)) and the
    feature mask of an all-valid pixel mask of that size (spec 2.3, 1.3)."""
    h, w = hw
    model = scaled_random_model(SMALL_CFG, seed=1)
    with torch.no_grad():
        feats, mask = model.encode(torch.rand(1, 1, h, w), torch.ones(1, h, w, dtype=torch.bool))
    assert feats.shape == (1, SMALL_CFG.feature_dim, _ceil16(h), _ceil16(w))
    assert tuple(feats.shape[2:]) == feature_size(h, w, SMALL_CFG) == feature_size(h, w)
    assert tuple(feature_mask(torch.ones(1, h, w, dtype=torch.bool), SMALL_CFG).shape[1:]) == feature_size(h, w)
    assert mask.shape == (1, *feats.shape[2:]) and bool(mask.all())
    assert bool((feats >= 0).all()), "every encoder output comes from a ReLU or a max-pool of one (spec 2.1)"


def test_full_encoder_shape_94x256():
    """The full-size encoder maps 1x1x94x256 to 1x684x6x16 (spec 6.4)."""
    enc = DenseEncoder().eval()
    with torch.no_grad():
        out = enc(torch.rand(1, 1, 94, 256))
    assert out.shape == (1, 684, 6, 16)


def test_feature_mask_of_padded_batch():
    """In a padded batch, each image's feature-mask valid block is feature_size() of its own size, at the
    top-left, and the encoder's grid equals feature_size() of the padded canvas (spec 1.3)."""
    sizes = [(94, 256), (97, 251), (33, 17), (16, 16)]
    hmax, wmax = max(h for h, _ in sizes), max(w for _, w in sizes)
    pmask = torch.zeros(len(sizes), hmax, wmax, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        pmask[i, :h, :w] = True
    model = scaled_random_model(SMALL_CFG, seed=2)
    with torch.no_grad():
        feats, fmask = model.encode(torch.rand(len(sizes), 1, hmax, wmax) * pmask[:, None], pmask)
    assert tuple(feats.shape[2:]) == feature_size(hmax, wmax) == tuple(fmask.shape[1:])
    for i, (h, w) in enumerate(sizes):
        hv, wv = feature_size(h, w)
        expected = torch.zeros_like(fmask[i])
        expected[:hv, :wv] = True
        assert torch.equal(fmask[i], expected), (h, w)


def test_transition_avg_pool_partial_windows():
    """The transition's ceil-mode average pool divides a partial edge window by the number of cells
    inside the image (spec 2.2), checked against a hand loop on a 5x7 map."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 5, 7)
    pooled = F.avg_pool2d(x, 2, ceil_mode=True)      # the call Transition.forward makes
    assert pooled.shape == (1, 3, 3, 4)
    for i in range(3):
        for j in range(4):
            win = x[0, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
            assert torch.allclose(pooled[0, :, i, j], win.mean((1, 2)), atol=1e-6)
    # The layer itself: with identity conv/BN, its output is the pool of relu(x).
    tr = Transition(3, 3, 0.0).eval()
    with torch.no_grad():
        tr.conv.weight.copy_(torch.eye(3)[:, :, None, None])
        tr.bn.running_mean.zero_()
        tr.bn.running_var.fill_(1.0 - tr.bn.eps)
        out = tr(x)
    assert torch.allclose(out, pooled, atol=1e-6)


# ---- spec 3.3 vs 3.6: folded step against the literal step ---------------------------------------

def _step_inputs(cfg: ModelConfig, dtype: torch.dtype, seed: int, n: int = 5, hw=(6, 16)):
    g = torch.Generator().manual_seed(seed)
    H, W = hw
    feats = (torch.rand(n, cfg.feature_dim, H, W, generator=g) * 2).to(dtype)          # F >= 0
    hidden = (torch.rand(n, cfg.hidden, generator=g) * 2 - 1).to(dtype)
    coverage = (torch.rand(n, H, W, generator=g) * 2).to(dtype)
    prev = torch.randint(0, cfg.vocab_size, (n,), generator=g)
    mask = torch.ones(n, H, W, dtype=torch.bool)
    mask[1, 4:, :] = False                                # padded rows (image at the top-left)
    mask[2, :, 9:] = False                                # padded columns
    mask[3, 2:, 5:] = False
    mask[4] = torch.rand(H, W, generator=g) < 0.6         # scattered invalid cells
    mask[4, 0, 0] = True
    return feats, mask, prev, hidden, coverage


def _max_err(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


@pytest.mark.parametrize("cfg_name", ["small", "full"])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_folded_step_matches_plain_step(cfg_name, dtype, bound):
    """DecoderBranch.step with prepare() (U_a F cached, coverage convs folded, max-subtracted softmax)
    equals step_plain (spec 3.3 literally) on logits, hidden, alpha and coverage, on random weights,
    features, states and masks with invalid cells; float32 within 1e-4, float64 within 1e-10."""
    cfg = SMALL_CFG if cfg_name == "small" else ModelConfig()
    model = scaled_random_model(cfg, seed=3)
    model = model.double() if dtype == torch.float64 else model
    branch = model.l2r
    feats, mask, prev, hidden, coverage = _step_inputs(cfg, dtype, seed=4)
    with torch.no_grad():
        fast = branch.step(branch.prepare(feats, mask), prev, hidden, coverage)
        plain = branch.step_plain(feats, mask, prev, hidden, coverage)
    errs = {name: _max_err(getattr(fast, name), getattr(plain, name))
            for name in ("logits", "hidden", "alpha", "coverage")}
    print(f"\nfolded vs plain ({cfg_name}, {dtype}): max abs error " +
          ", ".join(f"{k} {v:.3e}" for k, v in errs.items()))
    assert max(errs.values()) < bound, errs
    # A non-trivial comparison: the attention is not uniform and the logits are not tiny.
    assert float(fast.alpha.max()) > 1.5 / mask[0].sum()
    assert float(fast.logits.abs().max()) > 0.1
    for out in (fast, plain):
        sums = (out.alpha * mask).sum((1, 2))
        assert torch.allclose(sums, torch.ones_like(sums), atol=10 * bound if dtype == torch.float64 else 1e-5)
        assert bool((out.alpha[~mask] == 0).all()), "masked cells must get exactly zero attention"
        assert bool((out.alpha >= 0).all())
        assert torch.equal(out.coverage, coverage + out.alpha)


def test_folded_coverage_kernel_equals_two_convs():
    """The folded 11x11 kernel (spec 3.6) applied to a coverage map equals U_l(Q_l * b) + b_l + U_s(Q_s * b) + b_s."""
    model = scaled_random_model(SMALL_CFG, seed=5).double()
    att = model.l2r.attention
    beta = torch.rand(3, 1, 7, 9, dtype=torch.float64)
    with torch.no_grad():
        w, b = att.folded_coverage()
        folded = F.conv2d(beta, w, b, padding=w.shape[-1] // 2).permute(0, 2, 3, 1)
        two = att.U_l(att.Q_l(beta).permute(0, 2, 3, 1)) + att.U_s(att.Q_s(beta).permute(0, 2, 3, 1))
    assert _max_err(folded, two) < 1e-10


def test_initial_state_is_masked_mean():
    """initial_state uses the mean over valid cells only: padding garbage does not change h_0 (spec 3.2)."""
    model = scaled_random_model(SMALL_CFG, seed=6).double()
    br = model.l2r
    g = torch.Generator().manual_seed(0)
    f = torch.rand(1, SMALL_CFG.feature_dim, 3, 5, generator=g, dtype=torch.float64)
    padded = torch.rand(1, SMALL_CFG.feature_dim, 6, 8, generator=g, dtype=torch.float64) * 100
    padded[:, :, :3, :5] = f
    mask = torch.zeros(1, 6, 8, dtype=torch.bool)
    mask[:, :3, :5] = True
    with torch.no_grad():
        a = br.initial_state(f, torch.ones(1, 3, 5, dtype=torch.bool))
        b = br.initial_state(padded, mask)
        c = torch.tanh(br.W_init(f.mean((2, 3))))
    assert _max_err(a, b) < 1e-12 and _max_err(a, c) < 1e-12


# ---- teacher forcing against stepping --------------------------------------------------------------

def test_teacher_forward_equals_sequential_steps():
    """teacher_forward's logits (and attention) at step t equal running step() t times with the same
    input tokens, starting from initial_state and zero coverage, with a partly-invalid feature mask."""
    cfg = SMALL_CFG
    model = scaled_random_model(cfg, seed=7)
    br = model.l2r
    g = torch.Generator().manual_seed(1)
    B, T, H, W = 3, 9, 4, 7
    feats = torch.rand(B, cfg.feature_dim, H, W, generator=g) * 2
    mask = torch.ones(B, H, W, dtype=torch.bool)
    mask[1, 3:, :] = False
    mask[2, :, 4:] = False
    inputs = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    with torch.no_grad():
        logits, alphas = br.teacher_forward(feats, mask, inputs, return_alpha=True)
        cache = br.prepare(feats, mask)
        h = br.initial_state(feats, mask)
        cov = torch.zeros(B, H, W)
        worst = 0.0
        for t in range(T):
            out = br.step(cache, inputs[:, t], h, cov)
            worst = max(worst, _max_err(out.logits, logits[:, t]), _max_err(out.alpha, alphas[:, t]))
            h, cov = out.hidden, out.coverage
    assert logits.shape == (B, T, cfg.vocab_size) and alphas.shape == (B, T, H, W)
    print(f"\nteacher_forward vs step loop: max abs error {worst:.3e}")
    assert worst < 1e-5
