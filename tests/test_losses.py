"""training/losses.py against explicit Python loops: per-sample CE (spec 4.3), teacher-forcing tensors
(spec 4.2) and the distillation KL with the aligned pairing and the paper's pairing (spec 4.3, 7.1)."""
from __future__ import annotations

import math

import pytest
import torch

from training.losses import distillation_kl, paper_pairs, sequence_ce, teacher_tensors

TEMP = 4.0


def _random_logits(B, T, K, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, K, generator=g) * 3).to(dtype)


def _kl_pair(zl: torch.Tensor, zr: torch.Tensor, temp: float = TEMP) -> float:
    """KL(softmax(zl/temp) || softmax(zr/temp)) for one row, in float64, by the definition."""
    q = [math.exp(v / temp) for v in zl.double().tolist()]
    r = [math.exp(v / temp) for v in zr.double().tolist()]
    sq, sr = sum(q), sum(r)
    return sum((a / sq) * (math.log(a / sq) - math.log(b / sr)) for a, b in zip(q, r))


# ---- cross-entropy ---------------------------------------------------------------------------------

def _hand_sequence_ce(logits, targets, lengths, eps: float = 0.0) -> float:
    """Spec 4.3 by hand: mean over samples of (1 / (n_b + 1)) sum_{t <= n_b} of the step loss
    (1 - eps) (-log p_label) + eps * mean over the K classes of -log p_k (eps = 0: plain CE)."""
    B, _, K = logits.shape
    total = 0.0
    for b in range(B):
        n = int(lengths[b])
        s = 0.0
        for t in range(n + 1):
            row = logits[b, t].double().tolist()
            lse = math.log(sum(math.exp(v) for v in row))
            nll = [lse - v for v in row]
            s += (1 - eps) * nll[int(targets[b, t])] + eps * sum(nll) / K
        total += s / (n + 1)
    return total / B


def test_sequence_ce_equals_hand_loop():
    """sequence_ce = mean over samples of (1 / (n_b + 1)) sum_{t <= n_b} -log p_t(target_t); steps after
    n_b (padding) do not count (spec 4.3)."""
    B, T, K = 4, 7, 11
    logits = _random_logits(B, T, K, seed=0)
    g = torch.Generator().manual_seed(1)
    targets = torch.randint(0, K, (B, T), generator=g)
    lengths = torch.tensor([6, 2, 0, 4])
    got = float(sequence_ce(logits, targets, lengths))
    assert got == pytest.approx(_hand_sequence_ce(logits, targets, lengths), rel=1e-5)
    # Garbage after n_b + 1 steps changes nothing.
    noisy = logits.clone()
    for b in range(B):
        noisy[b, int(lengths[b]) + 1:] = 1e3 * torch.randn_like(noisy[b, int(lengths[b]) + 1:])
    assert float(sequence_ce(noisy, targets, lengths)) == pytest.approx(got, rel=1e-6)


def test_sequence_ce_label_smoothing_equals_hand_loop():
    """With eps: each step's loss is (1 - eps) (-log p_label) + eps * mean over the K classes of -log p_k,
    averaged like the plain CE; eps = 0 is the plain CE."""
    B, T, K, eps = 3, 6, 9, 0.1
    logits = _random_logits(B, T, K, seed=4)
    targets = torch.randint(0, K, (B, T), generator=torch.Generator().manual_seed(5))
    lengths = torch.tensor([5, 1, 3])
    want = _hand_sequence_ce(logits, targets, lengths, eps)
    assert float(sequence_ce(logits, targets, lengths, eps)) == pytest.approx(want, rel=1e-5)
    assert float(sequence_ce(logits, targets, lengths, 0.0)) == float(sequence_ce(logits, targets, lengths))


# ---- teacher-forcing tensors -----------------------------------------------------------------------

def test_teacher_tensors_hand_made():
    """Layouts of spec 4.2 on [[5, 6, 7], [8], []]: L2R in sos,y / target y,eos (padding 0 / 1); R2L in
    eos,reversed y / target reversed y,sos (padding 1 / 0); T = max n + 1."""
    tt = teacher_tensors([[5, 6, 7], [8], []])
    assert tt["lengths"].tolist() == [3, 1, 0]
    assert tt["l2r_in"].tolist() == [[0, 5, 6, 7], [0, 8, 0, 0], [0, 0, 0, 0]]
    assert tt["l2r_tgt"].tolist() == [[5, 6, 7, 1], [8, 1, 1, 1], [1, 1, 1, 1]]
    assert tt["r2l_in"].tolist() == [[1, 7, 6, 5], [1, 8, 1, 1], [1, 1, 1, 1]]
    assert tt["r2l_tgt"].tolist() == [[7, 6, 5, 0], [8, 0, 0, 0], [0, 0, 0, 0]]
    for v in tt.values():
        assert v.dtype == torch.long


def test_teacher_tensors_general():
    """On random labels: each branch's target is its input shifted by one, ending with the end token at
    step n_b; R2L is L2R with the label reversed and sos/eos swapped."""
    g = torch.Generator().manual_seed(2)
    labels = [torch.randint(2, 112, (int(n),), generator=g).tolist() for n in torch.randint(1, 12, (6,), generator=g)]
    tt = teacher_tensors(labels)
    T = max(map(len, labels)) + 1
    assert tt["l2r_in"].shape == (6, T)
    for b, y in enumerate(labels):
        n = len(y)
        assert tt["l2r_in"][b, :n + 1].tolist() == [0] + y
        assert tt["l2r_tgt"][b, :n + 1].tolist() == y + [1]
        assert tt["r2l_in"][b, :n + 1].tolist() == [1] + y[::-1]
        assert tt["r2l_tgt"][b, :n + 1].tolist() == y[::-1] + [0]
        assert tt["l2r_in"][b, 1:].tolist()[:n] == tt["l2r_tgt"][b, :n].tolist()


# ---- distillation -----------------------------------------------------------------------------------

LENGTHS = [5, 2, 7, 1, 4]


def test_distillation_aligned_equals_loop():
    """'aligned' pairs L2R step t with R2L step n_b - 1 - t of the same sample, t < n_b, and averages
    KL(softmax(zl/4) || softmax(zr/4)) over N = sum n_b rows; both rows predict the same target token."""
    lengths = torch.tensor(LENGTHS)
    B, T, K = len(LENGTHS), max(LENGTHS) + 1, 13
    zl, zr = _random_logits(B, T, K, seed=3), _random_logits(B, T, K, seed=4)
    got = float(distillation_kl(zl, zr, lengths, pairing="aligned"))
    rows = []
    for b in range(B):
        n = LENGTHS[b]
        for t in range(n):
            rows.append(_kl_pair(zl[b, t], zr[b, n - 1 - t]))
    assert len(rows) == sum(LENGTHS)
    assert got == pytest.approx(sum(rows) / len(rows), rel=1e-5)
    # The pairs really share the target token (spec 7.1's fix).
    g = torch.Generator().manual_seed(5)
    tt = teacher_tensors([torch.randint(2, 112, (n,), generator=g).tolist() for n in LENGTHS])
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            assert tt["l2r_tgt"][b, t] == tt["r2l_tgt"][b, n - 1 - t]


def _paper_rows(lengths, T):
    """Spec 4.3's rule as a plain loop: L2R rows t = 1..T-1 then b (t <= n_b); R2L rows s = T-1 down to 1
    then b (s <= n_b)."""
    l2r = [(b, t) for t in range(1, T) for b in range(len(lengths)) if t <= lengths[b]]
    r2l = [(b, s) for s in range(T - 1, 0, -1) for b in range(len(lengths)) if s <= lengths[b]]
    return l2r, r2l


def test_distillation_paper_equals_loop():
    """'paper' pairs the i-th kept L2R row (t = 1..T-1, then b, t <= n_b) with the i-th kept R2L row
    (s = T-1..1, then b, s <= n_b), mean KL over N = sum n_b rows; paper_pairs lists the same rows."""
    lengths = torch.tensor(LENGTHS)
    B, T, K = len(LENGTHS), max(LENGTHS) + 1, 13
    zl, zr = _random_logits(B, T, K, seed=6), _random_logits(B, T, K, seed=7)
    l2r, r2l = _paper_rows(LENGTHS, T)
    assert len(l2r) == len(r2l) == sum(LENGTHS)
    expected = sum(_kl_pair(zl[lb, lt], zr[rb, rt]) for (lb, lt), (rb, rt) in zip(l2r, r2l)) / len(l2r)
    assert float(distillation_kl(zl, zr, lengths, pairing="paper")) == pytest.approx(expected, rel=1e-5)
    lb, lt, rb, rt, valid = paper_pairs(lengths, T)
    assert valid.shape == (B * T,) and int(valid.sum()) == len(l2r)
    assert bool(valid[: len(l2r)].all())                      # the pairs first, then padding
    assert list(zip(lb[valid].tolist(), lt[valid].tolist())) == l2r
    assert list(zip(rb[valid].tolist(), rt[valid].tolist())) == r2l
    # Mixed lengths pair rows of different samples (the bug of spec 7.1).
    assert any(a[0] != b[0] for a, b in zip(l2r, r2l))


def test_paper_pairing_equal_lengths():
    """With equal lengths n the paper pairs L2R step t with R2L step n + 1 - t of the same sample (spec 4.3)."""
    n, B = 4, 3
    lb, lt, rb, rt, valid = paper_pairs(torch.tensor([n] * B), n + 1)
    lb, lt, rb, rt = lb[valid], lt[valid], rb[valid], rt[valid]
    assert torch.equal(lb, rb)
    assert torch.equal(lt + rt, torch.full_like(lt, n + 1))


def test_distillation_gradients_and_zero():
    """Gradients reach both branches (nothing is detached); aligned KL is 0 when R2L's logits are L2R's
    reversed per sample; an unknown pairing is a ValueError."""
    lengths = torch.tensor(LENGTHS)
    B, T, K = len(LENGTHS), max(LENGTHS) + 1, 9
    zl = _random_logits(B, T, K, seed=8).requires_grad_()
    zr = _random_logits(B, T, K, seed=9).requires_grad_()
    for pairing in ("aligned", "paper"):
        zl.grad = zr.grad = None
        distillation_kl(zl, zr, lengths, pairing=pairing).backward()
        assert float(zl.grad.abs().sum()) > 0 and float(zr.grad.abs().sum()) > 0
    mirror = torch.zeros(B, T, K)
    with torch.no_grad():
        for b, n in enumerate(LENGTHS):
            mirror[b, :n] = zl[b, :n].flip(0)
    assert float(distillation_kl(zl.detach(), mirror, lengths)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        distillation_kl(zl, zr, lengths, pairing="bogus")


# ---- distillation towards teacher targets ------------------------------------------------------------

def test_soft_target_kl_equals_loop_and_vanishes_on_its_own_targets():
    """soft_target_kl = mean over samples of (1 / (n_b + 1)) sum_{t <= n_b} KL(p_t || softmax(z_t / T));
    padded steps do not count; it is 0 when the targets are the student's own softened distribution, and
    its gradient reaches the logits only."""
    from training.losses import soft_target_kl

    B, T, K, temp = 3, 6, 9, 2.0
    logits = _random_logits(B, T, K, seed=5).requires_grad_(True)
    teacher = _random_logits(B, T, K, seed=6)
    soft = torch.softmax(teacher / temp, -1)
    lengths = torch.tensor([5, 1, 3])
    got = soft_target_kl(logits, soft, lengths, temp)
    want = 0.0
    for b in range(B):
        n = int(lengths[b]) + 1
        want += sum(_kl_pair(teacher[b, t], logits[b, t].detach(), temp) for t in range(n)) / n
    assert float(got.detach()) == pytest.approx(want / B, rel=1e-5)
    got.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert (logits.grad[1, 2:] == 0).all()                                   # padding gets no gradient
    own = torch.softmax(logits.detach() / temp, -1)
    assert float(soft_target_kl(logits.detach(), own, lengths, temp)) == pytest.approx(0.0, abs=1e-6)
    peaked = torch.zeros(B, T, K)
    peaked[..., 0] = 1.0                                                     # zeros in p: xlogy, not NaN
    assert torch.isfinite(soft_target_kl(logits.detach(), peaked, lengths, temp))
