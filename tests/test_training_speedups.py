"""Trainer speed/diagnostic options (all default off except the sharpness log):

- ``attention_fp32``: the attention part of ``teacher_forward`` in fp32 with autocast disabled;
- ``compile_step``: one decoder time step through ``torch.compile`` (losses and every parameter
  gradient must match the eager path; no recompilation for a new batch shape);
- ``log_attention_sharpness``: mean max attention weight vs the uniform baseline.

The inductor test compiles on CPU (~15-20 s cold, a few seconds with a warm inductor cache); it runs by
default and is skipped when ABM_RT_FAST_TESTS=1. The cheaper ``aot_eager`` test checks the same calling
convention, the fullgraph trace and the autograd partition without inductor's code generation.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from abm_rt.model import ABM, ModelConfig, initialize
from abm_rt.model.decoder import DecoderBranch
from training.losses import teacher_tensors
from training.packed import PackedBatch
from training.trainer import TrainConfig, attention_sharpness, batch_loss

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these tiny shapes gain nothing from two, and on a shared 2-core machine
    a second spinning thread makes every small op orders of magnitude slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CFG = ModelConfig(growth=8, block_depth=2, hidden=32, embed=32, attn=32)
MODEL_OVERRIDES = {"growth": 8, "block_depth": 2, "hidden": 32, "embed": 32, "attn": 32}


def _batch(B: int, H: int, W: int, seed: int) -> PackedBatch:
    """A random padded batch: images of random size <= (H, W), random labels, as pack_split makes them."""
    g = torch.Generator().manual_seed(seed)
    heights = torch.randint(H // 2, H + 1, (B,), generator=g)
    widths = torch.randint(W // 2, W + 1, (B,), generator=g)
    heights[0], widths[-1] = H, W                       # the canvas is exactly (H, W)
    images = torch.zeros(B, 1, H, W, dtype=torch.uint8)
    for i in range(B):
        images[i, 0, :heights[i], :widths[i]] = (torch.rand(int(heights[i]), int(widths[i]), generator=g) > 0.8) * 255
    labels = [torch.randint(2, CFG.vocab_size - 1, (int(n),), generator=g).tolist()
              for n in torch.randint(1, 7, (B,), generator=g)]
    tt = teacher_tensors(labels)
    return PackedBatch(images=images, heights=heights, widths=widths, lengths=tt["lengths"],
                       l2r_in=tt["l2r_in"], l2r_tgt=tt["l2r_tgt"], r2l_in=tt["r2l_in"], r2l_tgt=tt["r2l_tgt"],
                       names=[f"s{i}" for i in range(B)], tokens=[[] for _ in range(B)])


def _model(seed: int = 3) -> ABM:
    torch.manual_seed(seed)
    model = ABM(CFG, bidirectional=True)
    initialize(model)
    with torch.no_grad():   # softer attention than the raw init, so alpha is not one-hot everywhere
        for br in (model.l2r, model.r2l):
            br.attention.v.weight.mul_(0.2)
    return model.train()


def _loss_and_grads(model: ABM, b: PackedBatch, **cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)                                 # same dropout masks in every run
    loss, parts = batch_loss(model, b, TrainConfig(precision="fp32", **cfg), "cpu")
    loss.backward()
    return parts.detach().clone(), {k: p.grad.detach().clone() for k, p in model.named_parameters()
                                    if p.grad is not None}


def _compare(ref, got, tol: float) -> float:
    """Worst relative error (max abs diff / max abs) over losses and every parameter gradient."""
    (ref_parts, ref_g), (got_parts, got_g) = ref, got
    assert set(ref_g) == set(got_g)
    worst = float((ref_parts - got_parts).abs().max() / ref_parts.abs().max())
    for k in ref_g:
        scale = ref_g[k].abs().max().clamp(min=1e-12)
        err = float((ref_g[k] - got_g[k]).abs().max() / scale)
        assert err <= tol, (k, err)
        worst = max(worst, err)
    assert worst <= tol
    return worst


# ---- options ---------------------------------------------------------------------------------------

def test_train_config_defaults_and_cli():
    """The speed options default off, the sharpness log on; the optimizer defaults to the runs' recipe
    (Adadelta, lr 1.0, clip 100: spec 4.4-4.5); every field is a CLI flag with its own help text."""
    cfg = TrainConfig()
    assert (cfg.attention_fp32, cfg.compile_step, cfg.log_attention_sharpness) == (False, False, True)
    assert (cfg.optimizer, cfg.lr, cfg.clip, cfg.max_batch) == ("adadelta", 1.0, 100.0, 96)
    from dataclasses import fields
    assert all(f.metadata.get("help") for f in fields(TrainConfig))
    from training.__main__ import build_parser
    args = build_parser().parse_args(["--attention-fp32", "true", "--compile-step", "true",
                                      "--log-attention-sharpness", "false", "--optimizer", "adadelta"])
    assert (args.attention_fp32, args.compile_step, args.log_attention_sharpness) == (True, True, False)
    assert args.optimizer == "adadelta"


# ---- attention sharpness ---------------------------------------------------------------------------

def test_attention_sharpness_hand_made():
    """Uniform attention gives max = uniform; one-hot gives 1; steps after n_b + 1 do not count."""
    B, T, H, W = 2, 4, 3, 5
    mask = torch.ones(B, H, W, dtype=torch.bool)
    mask[1, :, 3:] = False                               # 9 valid cells in sample 1, 15 in sample 0
    lengths = torch.tensor([3, 1])                       # valid steps: 4 and 2
    alpha = mask[:, None].float().expand(B, T, H, W) / mask.flatten(1).sum(1).float()[:, None, None, None]
    att_max, uniform = attention_sharpness(alpha, mask, lengths)
    expect = (4 / 15 + 2 / 9) / 6
    assert att_max == pytest.approx(expect, rel=1e-6) and uniform == pytest.approx(expect, rel=1e-6)
    one_hot = torch.zeros(B, T, H, W)
    one_hot[:, :, 0, 0] = 1.0
    one_hot[1, 2:] = alpha[1, 2:]                        # padded steps of sample 1: ignored
    att_max, uniform = attention_sharpness(one_hot, mask, lengths)
    assert att_max == pytest.approx(1.0) and uniform == pytest.approx(expect, rel=1e-6)


# ---- attention in fp32 -----------------------------------------------------------------------------

def test_attention_fp32_without_autocast_changes_nothing():
    """In fp32 the option is the same computation: losses and gradients agree to rounding."""
    model, b = _model(), _batch(3, 48, 80, seed=1)
    ref = _loss_and_grads(model, b)
    got = _loss_and_grads(model, b, attention_fp32=True)
    assert _compare(ref, got, 1e-6) <= 1e-6


def test_attention_fp32_under_bf16_autocast():
    """Under bf16 autocast, attention_fp32 returns fp32 attention (the default path bf16), closer to the
    fp32 reference than the bf16 attention is, and the GRU/output matmuls stay in bf16 (logits bf16)."""
    model, b = _model().eval(), _batch(3, 48, 80, seed=2)
    x, pmask = b.inputs()
    with torch.no_grad():
        feats, fmask = model.encode(x, pmask)
        _, ref = model.l2r.teacher_forward(feats, fmask, b.l2r_in, return_alpha=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z16, a16 = model.l2r.teacher_forward(feats, fmask, b.l2r_in, return_alpha=True)
            z32, a32 = model.l2r.teacher_forward(feats, fmask, b.l2r_in, return_alpha=True, attention_fp32=True)
    assert a16.dtype == torch.bfloat16 and a32.dtype == torch.float32
    assert z16.dtype == torch.bfloat16 and z32.dtype == torch.bfloat16
    err16, err32 = float((a16.float() - ref).abs().max()), float((a32 - ref).abs().max())
    print(f"\nbf16 autocast, attention max abs error vs fp32: bf16 attention {err16:.2e}, fp32 attention {err32:.2e}")
    assert err32 < err16
    assert torch.allclose(a32.sum((2, 3)), torch.ones(()), atol=1e-5)   # fp32 softmax sums to 1


# ---- compiled step ---------------------------------------------------------------------------------

def _compile_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters
    return {"graphs": counters["stats"]["unique_graphs"], "aot": counters["aot_autograd"]["total"]}


def _run_compiled_vs_eager(monkeypatch, backend: str | None, tol: float) -> tuple[dict[str, int], float, float]:
    """Losses and all gradients, compile_step vs eager, for two batch shapes (B, H', W', T all differ).
    Returns (compiles counted, worst relative error, seconds)."""
    torch._dynamo.reset()
    if backend is not None:    # a cheaper backend in place of inductor, built the same way
        real = torch.compile

        def compile_with(fn, **kw):
            kw.pop("options", None)
            return real(fn, backend=backend, **kw)
        monkeypatch.setattr(torch, "compile", compile_with)
    model = _model()
    before = _compile_counts()
    worst, t0 = 0.0, time.time()
    for b in (_batch(3, 48, 80, seed=1), _batch(5, 64, 112, seed=4)):
        ref = _loss_and_grads(model, b)
        got = _loss_and_grads(model, b, compile_step=True)
        worst = max(worst, _compare(ref, got, tol))
    secs = time.time() - t0
    after = _compile_counts()
    counts = {k: after[k] - before[k] for k in after}
    # Built once per branch, cached on the module (not a global); one compiled graph serves both.
    assert model.l2r.__dict__["_tf_step_compiled"] is not model.r2l.__dict__["_tf_step_compiled"]
    assert model.l2r._compiled_tf_step() is model.l2r.__dict__["_tf_step_compiled"]
    return counts, worst, secs


def test_compiled_step_matches_eager_aot_eager(monkeypatch):
    """The compiled step's tracing (fullgraph, dynamic shapes, the module passed as an argument) and its
    autograd partition, without inductor: same losses and gradients, one graph for both shapes and
    both branches."""
    counts, worst, secs = _run_compiled_vs_eager(monkeypatch, "aot_eager", 1e-5)
    print(f"\naot_eager: {counts} in {secs:.1f} s, worst rel err {worst:.2e}")
    assert counts["graphs"] <= 2 and counts["aot"] <= 2


@pytest.mark.skipif(os.environ.get("ABM_RT_FAST_TESTS") == "1", reason="inductor compile on CPU (~20 s)")
def test_compiled_step_matches_eager_inductor(monkeypatch):
    """torch.compile (inductor, dynamic=True): losses and every parameter gradient of the bidirectional
    model equal the eager path (rel err <= 1e-4), and the second batch shape does not recompile."""
    counts, worst, secs = _run_compiled_vs_eager(monkeypatch, None, 1e-4)
    print(f"\ninductor: {counts} in {secs:.1f} s, worst rel err {worst:.2e}")
    assert counts["graphs"] <= 2 and counts["aot"] <= 2


def test_deepcopy_of_branch_uses_its_own_parameters():
    """The cached compiled function is the unbound step, so a deep copy (which shares the attribute)
    runs with the copy's parameters. Checked with the eager backend (cheap)."""
    import copy
    torch._dynamo.reset()
    br = DecoderBranch(CFG).eval()
    br.__dict__["_tf_step_compiled"] = torch.compile(DecoderBranch._tf_step, backend="eager", dynamic=True,
                                                     fullgraph=True)
    twin = copy.deepcopy(br)
    with torch.no_grad():
        twin.U_h.weight.mul_(-1.0)
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(2, CFG.feature_dim, 3, 5, generator=g)
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    inputs = torch.randint(0, CFG.vocab_size, (2, 4), generator=g)
    with torch.no_grad():
        for m in (br, twin):
            ref, _ = m.teacher_forward(feats, mask, inputs)
            got, _ = m.teacher_forward(feats, mask, inputs, compile_step=True)
            assert torch.allclose(ref, got, atol=1e-5)
