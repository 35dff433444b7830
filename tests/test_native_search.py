"""Native beam search (C++/CUDA step and bookkeeping) against the PyTorch batched search (the oracle)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from abm_rt.data.vocab import EOS_ID, SOS_ID
from abm_rt.decode import beam_search
from abm_rt.model import ModelConfig, scaled_random_model

native = pytest.importorskip("abm_rt.decode.native")
if not native.is_available("cpu"):
    pytest.skip("abm_rt._C is not built", allow_module_level=True)
from abm_rt.decode.native_search import SearchGraphs, _SearchState, native_beam_search  # noqa: E402

SMALL = ModelConfig(growth=8, block_depth=2, hidden=32, embed=32, attn=32)
NEEDS_CUDA = pytest.mark.skipif(not native.is_available("cuda"),
                                reason="needs a GPU visible to torch and a CUDA build of abm_rt._C")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]


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
    _check_same_as_batched(device, k, eos_bias)


@NEEDS_CUDA
@pytest.mark.parametrize("B, k", [(1, 10), (2, 3), (4, 10)])
@pytest.mark.parametrize("eos_bias", [4.0, 8.0])
def test_small_batch_kernels_same_results_as_batched_search(B, k, eos_bias):
    """The same with the CUDA small-batch kernels (few-rows linear, split energy; the defaults, set explicitly
    here): N = B k <= 32 uses the few-rows linear from the start; at B 4 x k 10 the search starts on the tiled
    one (N 40) and moves over as compaction shrinks the batch, and the energy's slice count changes with N."""
    with native.few_rows_linear(32), native.split_energy(16):
        _check_same_as_batched("cuda", k, eos_bias, B)


@NEEDS_CUDA
@pytest.mark.parametrize("B, k", [(1, 10), (2, 3), (4, 10)])
def test_tiled_kernels_same_results_as_batched_search(B, k):
    """The same with the small-batch kernels off (``native.tiled_kernels``): the tiled kernels at every N."""
    with native.tiled_kernels():
        _check_same_as_batched("cuda", k, 4.0, B)


def _check_same_as_batched(device: str, k: int, eos_bias: float, B: int = 4) -> None:
    seed = int(np.random.default_rng().integers(1 << 30))
    model = scaled_random_model(SMALL, seed=seed % 97, eos_bias=eos_bias)
    f, mask = _batch(seed, B)
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


# ---- compaction: finished images leave the working batch ------------------------------------------------

def _mixed_batch(seed: int, B: int):
    """Images of several sizes (padded together) and a model whose expressions end at different steps."""
    g = torch.Generator().manual_seed(seed)
    H, W = 6, 13
    f = torch.rand(B, SMALL.feature_dim, H, W, generator=g)
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    for b in range(B):
        mask[b, :int(torch.randint(1, H + 1, (1,), generator=g)), :int(torch.randint(1, W + 1, (1,), generator=g))] = True
    return f, mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("check_every", [1, 3])
@pytest.mark.parametrize("eos_bias, seed", [(5.0, 3), (5.0, 0), (4.0, 2)])
def test_compaction_gives_the_full_batch_results(device, k, check_every, eos_bias, seed, monkeypatch):
    """Dropping finished images from the working batch changes no token, score or attention map, and
    it does happen. The seeds are fixed: with them the batch's images end at different steps (some
    run into max_len), which random small models do not guarantee."""
    model = scaled_random_model(SMALL, seed=seed, eos_bias=eos_bias)
    f, mask = _mixed_batch(seed, 9)
    dec = native.NativeDecoder(model.l2r, device, poison=True)
    args = dict(beam_size=k, max_len=30, check_every=check_every, return_attention=True)
    full = native_beam_search(dec, f.to(device), mask, compact=False, **args)
    made = []
    real_subset = _SearchState.subset
    monkeypatch.setattr(_SearchState, "subset", lambda self, images, t0: made.append(images.numel())
                        or real_subset(self, images, t0))
    got = native_beam_search(dec, f.to(device), mask, compact=True, **args)
    assert made, f"[seed {seed}] no compaction happened"
    for b, (w, g) in enumerate(zip(full, got)):
        tag = f"[seed {seed} image {b} k {k} check_every {check_every} compactions {made}]"
        assert g.tokens == w.tokens and g.truncated == w.truncated, tag
        assert g.score == pytest.approx(w.score, rel=1e-6, abs=1e-6), tag
        np.testing.assert_allclose(g.attention, w.attention, atol=1e-6, err_msg=tag)


# ---- the step counter of beam_select (BeamState.step_ptr), which the CUDA graph path relies on ----------

def _cpu_states(k: int, T: int, B: int = 3, count: bool = False):
    """A CPU decoder (for V and BeamState) and a search state of T steps; with count, its BeamState
    reads t from the state's step counter and writes whole histories."""
    dec = native.NativeDecoder(scaled_random_model(SMALL, seed=1).l2r, "cpu")
    s = _SearchState.allocate(torch.zeros(B * k, 1), SOS_ID, B, k, 1, T)
    st = s.beam_state(dec, EOS_ID)
    if count:
        st.step_ptr, st.max_steps = s.step.data_ptr(), T
        st.words, st.parents, st.sources = s.words.data_ptr(), s.parents.data_ptr(), s.sources.data_ptr()
    return dec, s, st


def _log_probs(gen: torch.Generator, N: int, V: int) -> torch.Tensor:
    x = torch.randn(N, V, generator=gen) * 3
    x[:, EOS_ID] += 4.0 * torch.rand(N, generator=gen)   # some rows end, at different steps
    return torch.log_softmax(x, -1).contiguous()


def _tensors(s) -> dict:
    return {name: t.clone() for name, t in vars(s).items() if isinstance(t, torch.Tensor) and name != "h0"}


@pytest.mark.parametrize("k", [1, 3, 10])
def test_beam_select_step_counter_same_as_explicit_step(k):
    """t from step_ptr and history rows at t * B * k give the same search as explicit step and row pointers."""
    T = 8
    dec, explicit, st_e = _cpu_states(k, T)
    _, counted, st_c = _cpu_states(k, T, count=True)
    gen = torch.Generator().manual_seed(k)
    for t in range(T):
        lp = _log_probs(gen, explicit.prev.numel(), dec.K)
        st_e.step = t
        st_e.words, st_e.parents = explicit.words[t].data_ptr(), explicit.parents[t].data_ptr()
        st_e.sources = explicit.sources[t].data_ptr()
        for st in (st_e, st_c):
            st.log_probs = lp.data_ptr()
            dec.beam_select(st)
        assert int(counted.step) == t + 1
        assert torch.equal(explicit.prev, counted.prev) and torch.equal(explicit.parent_rows, counted.parent_rows)
    assert int(explicit.dead.sum()) > 0, "the test should finish some hypotheses"
    got, want = _tensors(counted), _tensors(explicit)
    assert int(got.pop("step")) == T and int(want.pop("step")) == 0
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("t", [4, 9, -1])
def test_beam_select_outside_max_steps_changes_nothing(t):
    """A call at t outside [0, max_steps) only computes all_done and advances the counter."""
    dec, s, st = _cpu_states(3, 4, count=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):                                   # a non-trivial state first
        lp = _log_probs(gen, s.prev.numel(), dec.K)
        st.log_probs = lp.data_ptr()
        dec.beam_select(st)
    s.step.fill_(t)
    s.done.fill_(1)
    s.all_done.fill_(0)
    before = _tensors(s)
    lp = _log_probs(gen, s.prev.numel(), dec.K)
    st.log_probs = lp.data_ptr()
    dec.beam_select(st)
    after = _tensors(s)
    assert int(after.pop("step")) == t + 1 and int(before.pop("step")) == t
    assert int(after.pop("all_done")) == 1 and int(before.pop("all_done")) == 0   # computed from done
    for name in before:
        assert torch.equal(after[name], before[name]), name


def test_beam_select_step_counter_needs_all_done():
    dec, s, st = _cpu_states(2, 3, count=True)
    lp = _log_probs(torch.Generator().manual_seed(0), s.prev.numel(), dec.K)
    st.log_probs, st.all_done = lp.data_ptr(), 0
    with pytest.raises(ValueError, match="all_done"):
        dec.beam_select(st)


# ---- the CUDA graph search ---------------------------------------------------------------------------------

@NEEDS_CUDA
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("check_every", [1, 4])
@pytest.mark.parametrize("eos_bias", [4.0, 8.0])
def test_cuda_graph_same_as_eager(B, k, check_every, eos_bias):
    """Replaying check_every steps from a CUDA graph gives the eager loop's tokens and scores."""
    seed = int(np.random.default_rng().integers(1 << 30))
    model = scaled_random_model(SMALL, seed=seed % 97, eos_bias=eos_bias)
    f, mask = _batch(seed, B)                          # images of different sizes padded together
    dec = native.NativeDecoder(model.l2r, "cuda", poison=True)
    args = dict(beam_size=k, max_len=25, check_every=check_every)
    want = native_beam_search(dec, f.cuda(), mask, **args)
    got = native_beam_search(dec, f.cuda(), mask, cuda_graph=True, **args)
    for b, (w, g) in enumerate(zip(want, got)):
        tag = f"[seed {seed} image {b} B {B} k {k} check_every {check_every}]"
        assert g.tokens == w.tokens and g.truncated == w.truncated, tag
        assert g.score == pytest.approx(w.score, rel=1e-4, abs=1e-4), tag
        assert g.normalized_score == pytest.approx(w.normalized_score, rel=1e-4, abs=1e-4), tag


@NEEDS_CUDA
@pytest.mark.parametrize("k", [1, 10])
def test_kept_graphs_are_reused_with_new_inputs(k):
    """A kept captured search, replayed for a new batch of the same shape, gives that batch's eager results;
    a new shape is captured anew; the least recently used search leaves first."""
    seed = int(np.random.default_rng().integers(1 << 30))
    model = scaled_random_model(SMALL, seed=seed % 97, eos_bias=5.0)
    dec = native.NativeDecoder(model.l2r, "cuda", poison=True)
    graphs = SearchGraphs(capacity=2)
    args = dict(beam_size=k, max_len=25, check_every=4)
    batches = [_batch(seed + i, 3) for i in range(3)] + [_batch(seed + 9, 2)]   # the last: another shape
    for i, (f, mask) in enumerate(batches):
        want = native_beam_search(dec, f.cuda(), mask, **args)
        got = native_beam_search(dec, f.cuda(), mask, cuda_graph=True, graphs=graphs, **args)
        for b, (w, g) in enumerate(zip(want, got)):
            tag = f"[seed {seed} batch {i} image {b} k {k}]"
            assert g.tokens == w.tokens and g.truncated == w.truncated, tag
            assert g.score == pytest.approx(w.score, rel=1e-4, abs=1e-4), tag
    info = graphs.info()
    assert (info["kept"], info["captures"], info["reuses"]) == (2, 2, 2) and info["mib"] > 0


def test_search_graphs_keeps_the_most_recently_used():
    """SearchGraphs is an LRU bounded by a count and by bytes, counting captures and reuses."""
    g = SearchGraphs(capacity=2)
    g.put("a", "A", 10)
    g.put("b", "B", 10)
    assert g.get("a") == "A"                           # a is now the most recently used
    g.put("c", "C", 10)                                # b leaves
    assert g.get("b") is None and g.get("a") == "A" and g.get("c") == "C"
    info = g.info()
    assert len(g) == 2 and g.nbytes == 20 and (info["captures"], info["reuses"]) == (3, 3)
    small = SearchGraphs(capacity=10, max_bytes=25)
    for key in "abc":
        small.put(key, key.upper(), 10)                # the third would make 30 bytes: a leaves
    assert small.get("a") is None and len(small) == 2 and small.nbytes == 20
    small.put("huge", "H", 100)                        # over the budget alone: kept, everything else leaves
    assert len(small) == 1 and small.get("huge") == "H"
    with pytest.raises(ValueError, match="capacity"):
        SearchGraphs(capacity=0)


def test_search_graphs_pad_to_the_bucket():
    """Grids are rounded up to the bucket's multiples with zero features and masked-out cells."""
    g = SearchGraphs(bucket=(2, 8))
    f, mask = _batch(1, 2)                             # 5 x 11 grids
    pf, pm = g.pad(f, mask)
    assert pf.shape[-2:] == (6, 16) and pm.shape[-2:] == (6, 16)
    assert torch.equal(pf[..., :5, :11], f) and pf[..., 5:, :].abs().sum() == 0 and pf[..., 11:].abs().sum() == 0
    assert torch.equal(pm[:, :5, :11], mask) and not pm[:, 5:].any() and not pm[:, :, 11:].any()
    same_f, same_m = g.pad(pf, pm)
    assert same_f is pf and same_m is pm               # already on the bucket: untouched


def test_padded_grid_gives_the_same_search():
    """The native search on a bucket-padded batch gives the unpadded batch's tokens (the padding is masked),
    which is what lets kept graphs serve other grid sizes."""
    model = scaled_random_model(SMALL, seed=11, eos_bias=5.0)
    dec = native.NativeDecoder(model.l2r, "cpu")
    f, mask = _batch(5, 3)
    pf, pm = SearchGraphs(bucket=(2, 8)).pad(f, mask)
    want = native_beam_search(dec, f, mask, 3, max_len=25)
    got = native_beam_search(dec, pf, pm, 3, max_len=25)
    for w, g in zip(want, got):
        assert g.tokens == w.tokens and g.score == pytest.approx(w.score, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_graph_refuses_cpu_and_attention(device):
    """cuda_graph=True needs a CUDA decoder and no attention maps (they are not kept per step)."""
    model = scaled_random_model(SMALL, seed=3)
    f, mask = _batch(0, 2)
    dec = native.NativeDecoder(model.l2r, device)
    with pytest.raises(ValueError, match="cuda_graph"):
        native_beam_search(dec, f.to(device), mask, 3, max_len=5, cuda_graph=True, return_attention=True)
    if device == "cpu":
        with pytest.raises(ValueError, match="cuda_graph"):
            native_beam_search(dec, f, mask, 3, max_len=5, cuda_graph=True)
