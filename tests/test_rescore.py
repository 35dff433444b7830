"""Bidirectional rescoring (abm_rt.decode.rescore): kept candidates, teacher-forced scores against the
training forward, the re-choice rule, engines that carry the R2L branch, and the Recognizer option."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from abm_rt import Recognizer
from abm_rt.data.buckets import pad_batch
from abm_rt.data.vocab import EOS_ID, SOS_ID, Vocab
from abm_rt.decode import beam_search
from abm_rt.decode import native
from abm_rt.decode.rescore import teacher_tensors, rescore_with_r2l, teacher_forced_scores
from abm_rt.engine_dir import R2L_FILE, EngineError, load_engine, save_engine
from abm_rt.model import scaled_random_model

from conftest import SMALL_CFG, random_ink_image

SIZES = [(94, 256), (40, 100), (64, 200), (17, 90)]
K = 5
needs_native = pytest.mark.skipif(not native.is_available("cpu"), reason="abm_rt._C is not built")


@pytest.fixture(scope="module")
def model():
    """A small random bidirectional model whose L2R beams finish within a few steps."""
    return scaled_random_model(SMALL_CFG, seed=4, bidirectional=True, eos_bias=3.0)


@pytest.fixture(scope="module")
def batch(model):
    """A padded batch of random ink images, encoded: (features, mask)."""
    g = torch.Generator().manual_seed(7)
    imgs = [random_ink_image(h, w, g) for h, w in SIZES]
    H, W = max(h for h, _ in SIZES), max(w for _, w in SIZES)
    x = torch.zeros(len(SIZES), 1, H, W)
    pm = torch.zeros(len(SIZES), H, W, dtype=torch.bool)
    for i, im in enumerate(imgs):
        x[i, :, :im.shape[2], :im.shape[3]] = im[0]
        pm[i, :im.shape[2], :im.shape[3]] = True
    with torch.no_grad():
        return model.encode(x, pm)


def _training_forward_scores(branch, features, mask, rows, inputs, targets, steps):
    """The oracle: raw -log p sums from ``teacher_forward``, the training code path."""
    with torch.no_grad():
        logits, _ = branch.teacher_forward(features.index_select(0, rows), mask.index_select(0, rows), inputs)
    logp = torch.log_softmax(logits.float(), -1).gather(2, targets[..., None])[..., 0]
    return -(logp * (torch.arange(inputs.shape[1])[None] < steps[:, None])).sum(1)


def test_candidates_are_the_finished_hypotheses(model, batch):
    """keep_candidates returns every finished hypothesis (at most k), the winner among them, and each
    candidate's search score equals its teacher-forced L2R score; the winner is unchanged."""
    features, mask = batch
    plain = beam_search(model.l2r, features, mask, K, max_len=30)
    seqs = beam_search(model.l2r, features, mask, K, max_len=30, keep_candidates=True)
    rows, tokens, scores = [], [], []
    for b, (s, p) in enumerate(zip(seqs, plain)):
        assert (s.tokens, s.score) == (p.tokens, p.score)
        assert 1 <= len(s.candidates) <= K and not s.truncated
        assert s.tokens in [c.tokens for c in s.candidates]
        for c in s.candidates:
            rows.append(b), tokens.append(c.tokens), scores.append(c.score)
    assert len(rows) > len(SIZES), "every image finished one hypothesis only: the test would be trivial"
    inputs, targets, steps = teacher_tensors(tokens, reverse=False)
    oracle = _training_forward_scores(model.l2r, features, mask, torch.tensor(rows), inputs, targets, steps)
    np.testing.assert_allclose(scores, oracle.numpy(), rtol=1e-4, atol=1e-4)


def test_teacher_tensors():
    """R2L inputs are eos, y_n..y_1 then eos padding; targets y_n..y_1, sos then sos padding (spec 4.2);
    L2R ones sos, y_1..y_n / y_1..y_n, eos."""
    inputs, targets, steps = teacher_tensors([[5, 6, 7], [], [9]])
    assert steps.tolist() == [4, 1, 2]
    assert inputs.tolist() == [[EOS_ID, 7, 6, 5], [EOS_ID] * 4, [EOS_ID, 9, EOS_ID, EOS_ID]]
    assert targets.tolist() == [[7, 6, 5, SOS_ID], [SOS_ID] * 4, [9, SOS_ID, SOS_ID, SOS_ID]]
    inputs, targets, steps = teacher_tensors([[5, 6, 7], [9]], reverse=False)
    assert steps.tolist() == [4, 2]
    assert inputs.tolist() == [[SOS_ID, 5, 6, 7], [SOS_ID, 9, SOS_ID, SOS_ID]]
    assert targets.tolist() == [[5, 6, 7, EOS_ID], [9, EOS_ID, EOS_ID, EOS_ID]]


needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and native.is_available("cuda")),
                                reason="needs a GPU visible to torch and a CUDA build of abm_rt._C")


@pytest.mark.parametrize("use_native", [False, pytest.param("cpu", marks=needs_native),
                                        pytest.param("cuda", marks=needs_cuda)])
def test_r2l_scores_equal_the_training_forward(model, batch, use_native):
    """teacher_forced_scores (decode step: PyTorch, the C++ kernels or the CUDA ones, on fresh random
    inputs) equals the training forward in FP32 on the CPU."""
    features, mask = batch
    g = torch.Generator().manual_seed(1)
    token_lists = [torch.randint(2, 113, (int(n),), generator=g).tolist() for n in (3, 0, 7, 5, 1, 9)]
    rows = torch.tensor([0, 1, 2, 3, 2, 0])
    inputs, targets, steps = teacher_tensors(token_lists)
    dec = native.NativeDecoder(model.r2l, use_native, poison=True) if use_native else None
    got = teacher_forced_scores(model.r2l, features, mask, rows, inputs, targets, steps, native=dec)
    oracle = _training_forward_scores(model.r2l, features, mask, rows, inputs, targets, steps)
    assert torch.isfinite(got).all() and (got > 0).all()
    torch.testing.assert_close(got, oracle, rtol=1e-4, atol=1e-4)


def test_rescore_picks_the_best_combined_score(model, batch):
    """Weight 0 keeps the L2R choice; weight 1 picks argmin (L2R + R2L) / (n + 1) among the candidates,
    and the reported normalized score is that value over (1 + weight)."""
    features, mask = batch
    seqs = beam_search(model.l2r, features, mask, K, max_len=30, keep_candidates=True)
    before = [list(s.tokens) for s in seqs]
    same = rescore_with_r2l(seqs, model.r2l, features, mask, weight=0.0)
    assert [s.tokens for s in same] == before
    seqs = beam_search(model.l2r, features, mask, K, max_len=30, keep_candidates=True)
    expected = []
    for b, s in enumerate(seqs):
        inputs, targets, steps = teacher_tensors([c.tokens for c in s.candidates])
        rows = torch.full((len(s.candidates),), b)
        r2l = _training_forward_scores(model.r2l, features, mask, rows, inputs, targets, steps).tolist()
        combined = [(c.score + r) / (len(c.tokens) + 1) for c, r in zip(s.candidates, r2l)]
        i = int(np.argmin(combined))
        expected.append((s.candidates[i].tokens, s.candidates[i].score, combined[i] / 2))
    got = rescore_with_r2l(seqs, model.r2l, features, mask, weight=1.0)
    for s, (tokens, score, norm) in zip(got, expected):
        assert s.tokens == tokens and math.isclose(s.score, score, rel_tol=1e-6)
        assert math.isclose(s.normalized_score, norm, rel_tol=1e-4, abs_tol=1e-5)


@needs_native
def test_native_search_keeps_the_same_candidates(model, batch):
    """The native search's candidates are the PyTorch search's (tokens, and scores to 1e-4)."""
    from abm_rt.decode.native_search import native_beam_search

    features, mask = batch
    ref = beam_search(model.l2r, features, mask, K, max_len=30, keep_candidates=True)
    got = native_beam_search(native.NativeDecoder(model.l2r, "cpu"), features, mask, K, max_len=30,
                             check_every=1, keep_candidates=True)
    for a, b in zip(got, ref):
        assert [c.tokens for c in a.candidates] == [c.tokens for c in b.candidates]
        np.testing.assert_allclose([c.score for c in a.candidates], [c.score for c in b.candidates],
                                   rtol=1e-4, atol=1e-4)


def test_engine_carries_the_r2l_branch(tmp_path, model):
    """save_engine(with_r2l=True) writes r2l.safetensors and lists it; load_engine rebuilds both branches
    exactly; saving without it removes a stale file; a bad or missing branch file is an EngineError."""
    path = save_engine(tmp_path / "e", model, Vocab.default(), with_r2l=True)
    eng = load_engine(path)
    assert eng.has_r2l and eng.config["files"]["r2l"] == R2L_FILE
    for k, v in model.state_dict().items():
        assert torch.equal(eng.model.state_dict()[k], v), k
    save_engine(path, model, Vocab.default())
    assert not (path / R2L_FILE).exists() and not load_engine(path).has_r2l
    save_engine(path, model, Vocab.default(), with_r2l=True)
    (path / R2L_FILE).unlink()
    with pytest.raises(EngineError, match="r2l.safetensors is missing"):
        load_engine(path)
    from safetensors.torch import save_file
    save_file({"l2r.W_o.bias": torch.zeros(113)}, str(path / R2L_FILE))
    with pytest.raises(EngineError, match="outside the R2L branch"):
        load_engine(path)
    with pytest.raises(ValueError, match="bidirectional"):
        save_engine(tmp_path / "f", scaled_random_model(SMALL_CFG), Vocab.default(), with_r2l=True)


def test_recognizer_rescore_option(tmp_path, model):
    """auto is the bidirectional search ("both") for an engine with R2L and off without; r2l or both without
    the branch is an error; "r2l" results are those of rescore_with_r2l on the same batch; attention follows
    the choice."""
    with_r2l = save_engine(tmp_path / "a", model, Vocab.default(), with_r2l=True)
    without = save_engine(tmp_path / "b", model, Vocab.default())
    opts = dict(device="cpu", beam_size=K, max_len=30, decoder="pytorch")
    assert Recognizer(with_r2l, **opts).info()["rescore"] == "both (weight 1)"
    assert Recognizer(without, **opts).info()["rescore"].startswith("none")
    for needs_r2l in ("r2l", "both"):
        with pytest.raises(ValueError, match="R2L branch"):
            Recognizer(without, rescore=needs_r2l, **opts)
    with pytest.raises(ValueError, match="rescore must be"):
        Recognizer(with_r2l, rescore="yes", **opts)
    g = torch.Generator().manual_seed(3)
    images = [random_ink_image(h, w, g)[0, 0].numpy() for h, w in SIZES]
    plain = Recognizer(with_r2l, rescore="none", **opts).predict(images)
    rescored = Recognizer(with_r2l, rescore="r2l", **opts).predict(images, return_attention=True)
    assert all(r.ok for r in plain + rescored)
    rec = Recognizer(with_r2l, rescore="none", **opts)
    x, pm = pad_batch(images, multiple=16)          # the Recognizer's one batch of these four images
    f, m = rec.encoder.encode(x, pm)
    seqs = beam_search(model.l2r, f, m, K, max_len=30, keep_candidates=True, return_attention=True)
    ref = rescore_with_r2l(seqs, model.r2l, f, m)
    for s, r in zip(ref, rescored):
        assert rec.vocab.decode(s.tokens) == r.tokens
        assert math.isclose(-s.normalized_score, r.score, rel_tol=1e-5)
        assert s.attention.shape[0] == len(s.tokens)       # the Result keeps the maps of the tokens it keeps
        assert np.array_equal(s.attention[rec.vocab.kept_positions(s.tokens)], r.attention)
    assert [r.tokens for r in plain] == [rec.vocab.decode(s.tokens) for s in
                                         beam_search(model.l2r, f, m, K, max_len=30)]
    assert any(a.tokens != b.tokens for a, b in zip(plain, rescored)), "rescoring changed nothing: a trivial test"


def test_r2l_beam_search_scores_are_teacher_forced_r2l_scores(model, batch):
    """The R2L branch searched from eos to sos (as tools/eval_rescore_weights.py --r2l-beam does) gives
    hypotheses whose search scores equal the R2L teacher-forced scores of their reading-order tokens."""
    features, mask = batch
    r2l = copy.deepcopy(model.r2l)
    with torch.no_grad():
        r2l.W_o.bias[SOS_ID] += 3.0          # the R2L end token, so that random hypotheses finish
    seqs = beam_search(r2l, features, mask, K, max_len=30, keep_candidates=True, sos=EOS_ID, eos=SOS_ID)
    rows = [(b, c) for b, s in enumerate(seqs) for c in s.candidates]
    assert len(rows) > len(SIZES)
    inputs, targets, steps = teacher_tensors([c.tokens[::-1] for _, c in rows])
    got = teacher_forced_scores(r2l, features, mask, torch.tensor([b for b, _ in rows]), inputs, targets, steps)
    np.testing.assert_allclose(got.numpy(), [c.score for _, c in rows], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def both_model(model):
    """The small model with its R2L end token (sos) favoured too, so that both beams finish hypotheses."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        # +6: of the shifts tried (0, 1, ..., 6 and 8), the smallest at which the R2L beam adds better ones
        m.r2l.W_o.bias[SOS_ID] += 6.0
    return m


def test_rescore_over_both_beams_picks_the_best_of_the_union(both_model, batch):
    """With an R2L search's results, each image keeps argmin (L2R + R2L) / (n + 1) over the union of both
    beams' finished hypotheses, every score from the training forward; never worse than the L2R beam's
    candidates alone, and the R2L beam's hypotheses come back in reading order."""
    model = both_model
    features, mask = batch
    l2r = beam_search(model.l2r, features, mask, K, max_len=30, keep_candidates=True)
    r2l = beam_search(model.r2l, features, mask, K, max_len=30, keep_candidates=True, sos=EOS_ID, eos=SOS_ID)
    expected, only_l2r = [], []
    for b in range(len(SIZES)):
        union = {tuple(c.tokens) for c in l2r[b].candidates} | {tuple(c.tokens[::-1]) for c in r2l[b].candidates}
        union = [list(t) for t in sorted(union)]
        rows = torch.full((len(union),), b)
        fwd = _training_forward_scores(model.l2r, features, mask, rows, *teacher_tensors(union, reverse=False))
        bwd = _training_forward_scores(model.r2l, features, mask, rows, *teacher_tensors(union))
        combined = {tuple(t): (float(f + r) / (len(t) + 1), float(f)) for t, f, r in zip(union, fwd, bwd)}
        expected.append(min(combined.values()))
        only_l2r.append(min(combined[tuple(c.tokens)][0] for c in l2r[b].candidates))
    assert all(e[0] <= o + 1e-6 for e, o in zip(expected, only_l2r))
    assert any(e[0] < o - 1e-6 for e, o in zip(expected, only_l2r)), "the R2L beam added nothing: a trivial test"
    got = rescore_with_r2l(l2r, model.r2l, features, mask, r2l_seqs=r2l, l2r=model.l2r)
    for s, (value, l2r_score) in zip(got, expected):
        assert math.isclose(2 * s.normalized_score, value, rel_tol=1e-4, abs_tol=1e-5)
        assert math.isclose(s.score, l2r_score, rel_tol=1e-4, abs_tol=1e-4)    # the L2R raw score, either beam
    with pytest.raises(ValueError, match="L2R branch"):
        rescore_with_r2l(l2r, model.r2l, features, mask, r2l_seqs=r2l)


def test_recognizer_rescore_both(tmp_path, both_model):
    """rescore="both": the results of rescore_with_r2l over both beams on the Recognizer's batch, attention
    maps of the chosen (reading-order) tokens; the native decoder gives the PyTorch one's results."""
    path = save_engine(tmp_path / "a", both_model, Vocab.default(), with_r2l=True)
    opts = dict(device="cpu", beam_size=K, max_len=30)
    g = torch.Generator().manual_seed(5)
    images = [random_ink_image(h, w, g)[0, 0].numpy() for h, w in SIZES]
    rec = Recognizer(path, rescore="both", decoder="pytorch", **opts)
    assert rec.info()["rescore"] == "both (weight 1)"
    got = rec.predict(images, return_attention=True)
    x, pm = pad_batch(images, multiple=16)
    f, m = rec.encoder.encode(x, pm)
    with torch.no_grad():
        l2r = beam_search(both_model.l2r, f, m, K, max_len=30, keep_candidates=True, return_attention=True)
        r2l = beam_search(both_model.r2l, f, m, K, max_len=30, keep_candidates=True, return_attention=True,
                          sos=EOS_ID, eos=SOS_ID)
    ref = rescore_with_r2l(l2r, both_model.r2l, f, m, r2l_seqs=r2l, l2r=both_model.l2r)
    for s, r in zip(ref, got):
        assert r.ok and rec.vocab.decode(s.tokens) == r.tokens
        assert math.isclose(-s.normalized_score, r.score, rel_tol=1e-5)
        assert s.attention.shape[0] == len(s.tokens)
        assert np.array_equal(s.attention[rec.vocab.kept_positions(s.tokens)], r.attention)
    if native.is_available("cpu"):
        nat = Recognizer(path, rescore="both", decoder="native", **opts).predict(images)
        assert [r.tokens for r in nat] == [r.tokens for r in got]
        np.testing.assert_allclose([r.score for r in nat], [r.score for r in got], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="R2L branch"):
        Recognizer(save_engine(tmp_path / "b", both_model, Vocab.default()), rescore="both", **opts)
