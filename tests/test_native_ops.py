"""The native decode step (abm_rt._C via abm_rt.decode.native) against the PyTorch reference.

The oracle is ``DecoderBranch`` itself (``step`` for the state and scores, ``attend`` for the context), run
in float64 so the measured error is the kernel's alone. Every test draws fresh random inputs from a seed
printed in its assertion messages (set ABM_TEST_SEED to replay one). Outputs and scratch are NaN-poisoned
before each call, so an element a kernel fails to write fails the comparison.

Error metric: max|native - reference| / max|reference| per output. Bounds: FP32 1e-5; FP16 weights or
features 2e-3; INT8 weights 2e-2 on log_probs (the errors are printed: ``pytest -s``).
Each test body runs on "cpu" and, when torch and abm_rt._C both see a GPU, on "cuda".
"""
from __future__ import annotations

import contextlib
import copy
import os
import random

import pytest
import torch

from abm_rt.decode import native
from abm_rt.model import DecoderBranch, ModelConfig

if not native.is_available("cpu"):
    pytest.skip("abm_rt._C is not built (pip install . with a C++17 compiler)", allow_module_level=True)

_C = native.load_extension()
CUDA_OK = torch.cuda.is_available() and native.is_available("cuda")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA_OK, reason="needs a GPU visible to torch and a CUDA build of abm_rt._C"))]

# Small: dims off every vector width (d=40, n=24, m/2=10, D=40) and a 5x5 folded kernel. Full: ABM's own.
SMALL = ModelConfig(growth=8, block_depth=2, hidden=24, embed=20, attn=40, cov_large=5, cov_small=3)
FULL = ModelConfig()
CFGS = {"small": SMALL, "full": FULL}

TOL = {("fp32", "fp32"): 1e-5}
for _wd in ("fp32", "fp16"):
    for _fd in ("fp32", "fp16"):
        TOL.setdefault((_wd, _fd), 2e-3)
INT8_LOGP_TOL, INT8_OTHER_TOL = 2e-2, 5e-2


def new_seed() -> int:
    return int(os.environ.get("ABM_TEST_SEED", random.SystemRandom().randrange(2**31)))


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def stream_of(device: str) -> int:
    return torch.cuda.current_stream().cuda_stream if device == "cuda" else 0


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one OpenMP thread (torch and _C share libgomp, so torch's setting governs both).

    On a shared 2-core CI box, oversubscribed fork/join costs a timeslice per parallel region; the
    parallel paths are covered by test_threads_agree, which runs them explicitly.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_BRANCHES: dict = {}


def branch_for(name: str) -> tuple[DecoderBranch, DecoderBranch, int]:
    """(fp32 branch, float64 copy, seed) — random weights drawn once per module run and config."""
    if name not in _BRANCHES:
        seed = new_seed()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            branch = DecoderBranch(CFGS[name]).eval()
            with torch.no_grad():   # non-trivial biases everywhere, embeddings of unit scale
                for p in branch.parameters():
                    if p.dim() == 1:
                        p.uniform_(-0.3, 0.3)
        _BRANCHES[name] = (branch, copy.deepcopy(branch).double().eval(), seed)
    return _BRANCHES[name]


def make_inputs(cfg: ModelConfig, B: int, H: int, W: int, beams: int, gen: torch.Generator) -> dict:
    """A padded batch: B images with different valid extents (image 0 fills the grid), N = B x beams rows."""
    hv = torch.randint(1, H + 1, (B,), generator=gen)
    wv = torch.randint(1, W + 1, (B,), generator=gen)
    hv[0], wv[0] = H, W
    mask = (torch.arange(H)[None, :, None] < hv[:, None, None]) & (torch.arange(W)[None, None, :] < wv[:, None, None])
    feats = torch.randn(B, cfg.feature_dim, H, W, generator=gen)
    feats = torch.where(mask[:, None], feats, 50 * torch.randn(feats.shape, generator=gen))  # padding: junk
    rows = torch.arange(B).repeat_interleave(beams)
    N = rows.numel()
    coverage = 2 * torch.rand(N, H, W, generator=gen) * mask[rows]
    coverage = coverage * (torch.rand(N, H, W, generator=gen) > 0.2)   # some exact zeros inside, too
    return dict(feats=feats, mask=mask, rows=rows, coverage=coverage,
                prev=torch.randint(0, cfg.vocab_size, (N,), generator=gen),
                hidden=torch.tanh(torch.randn(N, cfg.hidden, generator=gen)))


@torch.no_grad()
def reference(b64: DecoderBranch, x: dict) -> dict:
    """DecoderBranch.step in float64; the context is read from the step's own call to attend."""
    cache = b64.prepare(x["feats"].double(), x["mask"]).index_select(x["rows"])
    seen = []
    attend = b64.attend
    b64.attend = lambda *a: seen.append(attend(*a)) or seen[-1]   # instance attribute shadows the method
    try:
        out = b64.step(cache, x["prev"], x["hidden"].double(), x["coverage"].double())
    finally:
        del b64.attend
    return dict(log_probs=torch.log_softmax(out.logits, -1), hidden=out.hidden, alpha=out.alpha,
                coverage=out.coverage, context=seen[0][1])


def run_native(dec: native.NativeDecoder, x: dict, device: str) -> dict:
    feats = dec.prepare(x["feats"].to(device), x["mask"].to(device))
    out = dec.step(feats, x["prev"].to(device), x["hidden"].to(device), x["coverage"].to(device),
                   x["rows"].to(device))
    sync(device)
    return {k: getattr(out, k).cpu() for k in ("log_probs", "hidden", "alpha", "coverage", "context")}


def check_step(got: dict, ref: dict, x: dict, tol: dict, tag: str) -> dict:
    errs = {k: rel_err(got[k], ref[k]) for k in ref}
    print(f"{tag}: " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    for k, v in got.items():
        assert not torch.isnan(v).any(), f"{tag}: NaN in {k} (element not written)"
    invalid = ~x["mask"][x["rows"]]
    assert (got["alpha"][invalid] == 0).all(), f"{tag}: alpha not exactly 0 outside the valid extent"
    assert torch.equal(got["coverage"][invalid], x["coverage"][invalid]), f"{tag}: coverage changed outside"
    for k, v in errs.items():
        assert v <= tol[k], f"{tag}: {k} relative error {v:.3e} > {tol[k]:.1e}"
    return errs


# ---- the whole step -------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("grid", [(6, 16), (5, 13)])
@pytest.mark.parametrize("size", ["small", "full"])
def test_step_fp32(size, grid, beams, device):
    branch, b64, wseed = branch_for(size)
    seed = new_seed()
    x = make_inputs(branch.cfg, 3, *grid, beams, torch.Generator().manual_seed(seed))
    dec = native.NativeDecoder(branch, device, poison=True)
    tag = f"[{size} {grid} beams={beams} {device} fp32 seed={seed} weights_seed={wseed}]"
    check_step(run_native(dec, x, device), reference(b64, x), x, dict.fromkeys(
        ("log_probs", "hidden", "alpha", "coverage", "context"), 1e-5), tag)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", [("fp16", "fp32"), ("fp32", "fp16"), ("fp16", "fp16"),
                                    ("int8", "fp32"), ("int8", "fp16")], ids=lambda d: f"{d[0]}-{d[1]}")
@pytest.mark.parametrize("size", ["small", "full"])
def test_step_low_precision(size, dtypes, device):
    branch, b64, wseed = branch_for(size)
    seed = new_seed()
    x = make_inputs(branch.cfg, 3, 5, 13, 3, torch.Generator().manual_seed(seed))
    wd, fd = dtypes
    dec = native.NativeDecoder(branch, device, weight_dtype=wd, feat_dtype=fd, poison=True)
    keys = ("log_probs", "hidden", "alpha", "coverage", "context")
    if wd == "int8":
        tol = dict.fromkeys(keys, INT8_OTHER_TOL) | {"log_probs": INT8_LOGP_TOL}
    else:
        tol = dict.fromkeys(keys, TOL[dtypes])
    tag = f"[{size} {device} weights={wd} feats={fd} seed={seed} weights_seed={wseed}]"
    check_step(run_native(dec, x, device), reference(b64, x), x, tol, tag)


@pytest.mark.parametrize("path", ["tiled", "few-rows", "split-energy", "small-batch"])
@pytest.mark.parametrize("device", DEVICES)
def test_steps_chain(device, path):
    """Four steps fed back into each other (the state, coverage and argmax tokens), full size, FP32."""
    with kernel_path(path, device):
        _check_steps_chain(device)


def _check_steps_chain(device):
    branch, b64, wseed = branch_for("full")
    seed = new_seed()
    gen = torch.Generator().manual_seed(seed)
    x = make_inputs(branch.cfg, 2, 6, 16, 2, gen)
    x["coverage"].zero_()
    dec = native.NativeDecoder(branch, device, poison=True)
    feats = dec.prepare(x["feats"].to(device), x["mask"].to(device))
    rows = x["rows"].to(device)
    prev, hidden, coverage = x["prev"].to(device), x["hidden"].to(device), x["coverage"].to(device)
    with torch.no_grad():
        cache = b64.prepare(x["feats"].double(), x["mask"]).index_select(x["rows"])
        r_prev, r_hidden, r_cov = x["prev"], x["hidden"].double(), x["coverage"].double()
        for t in range(4):
            out = dec.step(feats, prev, hidden, coverage, rows)
            ref = b64.step(cache, r_prev, r_hidden, r_cov)
            sync(device)
            tag = f"[chain step {t} {device} seed={seed} weights_seed={wseed}]"
            assert rel_err(out.log_probs, torch.log_softmax(ref.logits, -1)) <= 1e-5, tag
            assert rel_err(out.hidden, ref.hidden) <= 1e-5, tag
            assert rel_err(out.coverage, ref.coverage) <= 1e-5, tag
            # Follow the reference's tokens so both sides stay on one path even on near-ties.
            r_prev = ref.logits.argmax(-1)
            prev, hidden, coverage = r_prev.to(device), out.hidden, out.coverage
            r_hidden, r_cov = ref.hidden, ref.coverage


def test_threads_agree():
    """1 thread and 2+ threads give bitwise the same step (each output element has one owner thread)."""
    branch, b64, wseed = branch_for("full")
    seed = new_seed()
    x = make_inputs(branch.cfg, 3, 6, 16, 4, torch.Generator().manual_seed(seed))
    dec = native.NativeDecoder(branch, "cpu", poison=True)
    one = run_native(dec, x, "cpu")
    torch.set_num_threads(max(2, os.cpu_count() or 2))
    many = run_native(dec, x, "cpu")
    for k in one:
        assert torch.equal(one[k], many[k]), f"[threads seed={seed} weights_seed={wseed}] {k} differs"
    check_step(many, reference(b64, x), x, dict.fromkeys(one, 1e-5), f"[threads seed={seed}]")


# ---- the ops one by one ---------------------------------------------------------------------------
def kernel_path(path: str, device: str):
    """The CUDA kernels under test, each path set explicitly (the defaults are "small-batch"): "tiled" (no
    small-batch kernel), "few-rows" (linear, one warp per output, N <= 32), "split-energy" (the coverage energy
    in channel slices), "small-batch" (both). The CPU twin has one path: "tiled" stands for it."""
    if device != "cuda":
        if path != "tiled":
            pytest.skip(f"the {path} kernels are CUDA's")
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(native.few_rows_linear(32 if path in ("few-rows", "small-batch") else 0))
    stack.enter_context(native.split_energy(16 if path in ("split-energy", "small-batch") else 1))
    return stack


@pytest.mark.parametrize("path", ["tiled", "few-rows"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("shape", [(768, 684, 9), (113, 128, 5), (13, 37, 1), (70, 300, 16), (70, 300, 17),
                                   (70, 300, 32), (70, 300, 33)], ids=lambda s: "x".join(map(str, s)))
def test_linear(shape, dtype, device, path):
    """y = x W^T * scale + bias (+ y) against float64 with the kernel's own (dequantized) weights; N = 33 on the
    few-rows path checks that it hands larger N back to the tiled kernel."""
    with kernel_path(path, device):
        _check_linear(shape, dtype, device)


def _check_linear(shape, dtype, device):
    out, inp, N = shape
    seed = new_seed()
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen) / inp ** 0.5
    for bias, accumulate in ((None, False), (torch.randn(out, generator=gen), False), (None, True),
                             (torch.randn(out, generator=gen), True)):
        packed = native.pack_linear(w, bias, dtype, device)
        x = torch.randn(N, inp, generator=gen)
        y0 = torch.randn(N, out, generator=gen) if accumulate else torch.full((N, out), float("nan"))
        y = y0.clone().to(device)
        _C.linear(packed.lin, x.to(device).data_ptr(), y.data_ptr(), N, accumulate, device, stream_of(device))
        sync(device)
        ref = x.double() @ packed.dequantized().cpu().T
        if bias is not None:
            ref = ref + bias.double()
        if accumulate:
            ref = ref + y0.double()
        tag = f"[linear {shape} {dtype} bias={bias is not None} acc={accumulate} {device} seed={seed}]"
        assert not torch.isnan(y).any(), f"{tag}: NaN (not written)"
        err = rel_err(y, ref)
        assert err <= 1e-5, f"{tag}: relative error {err:.3e}"


@pytest.mark.parametrize("device", DEVICES)
def test_linear_fp16_values_exact(device):
    """Every FP16 weight value (subnormals, signed zeros, the largest) reaches the kernel exactly."""
    seed = new_seed()
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 0x7c00, (64, 64), generator=gen, dtype=torch.int32)      # finite magnitudes
    bits[0, :32] = torch.arange(32, dtype=torch.int32)                                # smallest subnormals
    bits[1, :4] = torch.tensor([0x03ff, 0x0400, 0x7bff, 0x3c00], dtype=torch.int32)  # edges, 1.0
    bits |= torch.randint(0, 2, bits.shape, generator=gen, dtype=torch.int32) << 15  # random signs
    w16 = bits.to(torch.int16).view(torch.float16)
    packed = native.pack_linear(w16.float(), None, "fp16", device)
    assert torch.equal(packed.weight.cpu().view(torch.int16), w16.view(torch.int16))
    y = torch.full((64, 64), float("nan"), device=device)
    eye = torch.eye(64, device=device)                                                # y[r, o] = w[o, r]
    _C.linear(packed.lin, eye.data_ptr(), y.data_ptr(), 64, False, device, stream_of(device))
    sync(device)
    assert torch.equal(y.cpu(), w16.float().T), f"[fp16 values {device} seed={seed}]"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("feat_dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("grid", [(6, 16), (5, 13)])
@pytest.mark.parametrize("size", ["small", "full"])
@pytest.mark.parametrize("path", ["tiled", "split-energy"])
def test_coverage_attention(size, grid, feat_dtype, device, path):
    """coverage_attention alone against DecoderBranch.attend (float64), wa = W_a h_hat given; "split-energy"
    runs the energy as channel slices (6 rows: 16 slices at full size, 2 at d = 40)."""
    with kernel_path(path, device):
        _check_coverage_attention(size, grid, feat_dtype, device)


def _check_coverage_attention(size, grid, feat_dtype, device):
    branch, b64, wseed = branch_for(size)
    seed = new_seed()
    x = make_inputs(branch.cfg, 3, *grid, 2, torch.Generator().manual_seed(seed))
    h_hat = x["hidden"].double()
    with torch.no_grad():
        cache = b64.prepare(x["feats"].double(), x["mask"]).index_select(x["rows"])
        ref_alpha, ref_context = b64.attend(cache, h_hat, x["coverage"].double())
        wa = b64.attention.W_a(h_hat).float()
    dec = native.NativeDecoder(branch, device, feat_dtype=feat_dtype, poison=True)
    feats = dec.prepare(x["feats"].to(device), x["mask"].to(device))
    alpha, context, cov_out = dec.attend(feats, wa.to(device), x["coverage"].to(device), x["rows"].to(device))
    sync(device)
    got = {"alpha": alpha.cpu(), "context": context.cpu(), "coverage": cov_out.cpu()}
    ref = {"alpha": ref_alpha, "context": ref_context, "coverage": x["coverage"].double() + ref_alpha}
    tol = 1e-5 if feat_dtype == "fp32" else 2e-3
    tag = f"[attention {size} {grid} {feat_dtype} {device} seed={seed} weights_seed={wseed}]"
    check_step(got, ref, x, dict.fromkeys(ref, tol), tag)


# ---- argument checks -----------------------------------------------------------------------------
def _valid_call():
    """A small decoder, prepared features and a StepTensors filled by a real step's allocation path."""
    branch, _, _ = branch_for("small")
    x = make_inputs(branch.cfg, 2, 4, 5, 2, torch.Generator().manual_seed(new_seed()))
    dec = native.NativeDecoder(branch, "cpu")
    return dec, dec.prepare(x["feats"], x["mask"]), x


def test_validate_names_the_field():
    dec, feats, x = _valid_call()
    t, _keep = dec._tensors(feats, x["rows"].numel(), x["rows"], x["coverage"])
    with pytest.raises(ValueError, match="must not be null"):
        _C.validate(dec.weights, t)                        # scratch, hidden, outputs all unset
    dec.weights.W_o = _C.LinearWeights()
    with pytest.raises(ValueError, match="W_o"):
        _C.validate(dec.weights, t)
    w = _C.DecoderWeights()
    with pytest.raises(ValueError, match="positive"):
        _C.decode_step(w, _C.StepTensors(), "cpu")
    with pytest.raises(ValueError, match="device"):
        _C.decode_step(dec.weights, t, "tpu")
    lin = native.pack_linear(torch.randn(3, 4), None, "int8").lin
    lin.scale = 0
    with pytest.raises(ValueError, match="scale"):
        _C.linear(lin, 1, 1, 1, False, "cpu")


def test_host_values_checked_on_cpu():
    dec, feats, x = _valid_call()
    bad = x["prev"].clone()
    bad[0] = dec.K
    with pytest.raises(ValueError, match="prev_token"):
        dec.step(feats, bad, x["hidden"], x["coverage"], x["rows"])
    with pytest.raises(ValueError, match="row_image"):
        dec.step(feats, x["prev"], x["hidden"], x["coverage"], x["rows"] + 5)
    with pytest.raises(ValueError, match="hidden"):
        dec.step(feats, x["prev"], x["hidden"][:, :-1], x["coverage"], x["rows"])
    mask = x["mask"].clone()
    mask[0, 0, 0] = False                                  # not a top-left rectangle
    with pytest.raises(ValueError, match="rectangle"):
        dec.prepare(x["feats"], mask)


@pytest.mark.skipif(_C.built_with_cuda(), reason="only a CPU-only build has the CUDA stubs")
def test_cpu_only_build_says_so():
    packed = native.pack_linear(torch.randn(3, 4), None, "fp32")
    x, y = torch.randn(2, 4), torch.empty(2, 3)
    with pytest.raises(RuntimeError, match="built without CUDA"):
        _C.linear(packed.lin, x.data_ptr(), y.data_ptr(), 2, False, "cuda")
    assert not _C.cuda_available()


@pytest.mark.skipif(not _C.built_with_cuda(), reason="a CPU-only build has no CUDA energy to split")
def test_energy_split_count_and_switch():
    """On (up to 16 slices) by default: slices double while the grid is short of ~2 waves of blocks, bounded by
    the limit and by the channel chunks; split_energy(1) turns it off and puts the limit back (no GPU needed)."""
    assert _C.energy_max_splits() == 16
    assert [_C.energy_splits(N, 144, 512) for N in (10, 30, 100, 2560)] == [16, 8, 2, 1]
    assert _C.energy_splits(10, 144, 40) == 2              # d = 40: two 32-channel chunks
    with native.split_energy(4):
        assert _C.energy_splits(10, 144, 512) == 4
    with native.split_energy(1):
        assert _C.energy_splits(10, 144, 512) == 1
    with native.tiled_kernels():
        assert _C.energy_splits(10, 144, 512) == 1 and _C.linear_rows_max_n() == 0
    assert _C.energy_max_splits() == 16
    for bad in (0, 17):
        with pytest.raises(ValueError, match="energy_max_splits"):
            _C.set_energy_max_splits(bad)


def test_cpu_step_ignores_energy_splits():
    """The CPU twin sizes nothing by energy_splits (it is CUDA's): its StepTensors say 1."""
    dec, feats, x = _valid_call()
    t, _ = dec._tensors(feats, x["prev"].shape[0], x["rows"], x["coverage"])
    assert t.energy_splits == 1


@pytest.mark.skipif(not _C.built_with_cuda(), reason="a CPU-only build has no CUDA linear to switch")
def test_few_rows_switch_is_bounded_and_restored():
    """The few-rows threshold is 32 by default, takes 0..32 (0: off), and few_rows_linear puts it back (no GPU
    needed)."""
    assert _C.linear_rows_max_n() == 32
    with native.few_rows_linear(16):
        assert _C.linear_rows_max_n() == 16
    with native.few_rows_linear(0):
        assert _C.linear_rows_max_n() == 0
    assert _C.linear_rows_max_n() == 32
    for bad in (-1, 33):
        with pytest.raises(ValueError, match="linear_rows_max_n"):
            _C.set_linear_rows_max_n(bad)
    assert _C.linear_rows_max_n() == 32
