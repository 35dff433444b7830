"""Training losses of spec 4.3: per-branch cross-entropy and the L2R/R2L distillation KL."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from abm_rt.model.teacher import teacher_tensors as branch_teacher_tensors


def sequence_ce(logits: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor,
                label_smoothing: float = 0.0) -> torch.Tensor:
    """CE averaged within each sample over its n_b + 1 steps, then over the batch (spec 4.3).

    logits [B, T, K], targets [B, T], lengths [B] = n_b (symbols; the +1 is the end token).
    ``label_smoothing`` eps: each step's target is (1 - eps) on the label plus eps / K on every class
    (not in the paper; a regulariser against the memorisation every run shows).
    """
    B, T, K = logits.shape
    nll = F.cross_entropy(logits.float().reshape(B * T, K), targets.reshape(B * T), reduction="none",
                          label_smoothing=label_smoothing).view(B, T)
    steps = lengths + 1
    valid = torch.arange(T, device=logits.device)[None, :] < steps[:, None]
    return ((nll * valid).sum(1) / steps).mean()


def soft_target_kl(logits: torch.Tensor, soft: torch.Tensor, lengths: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """KL(soft || softmax(logits / T)) per step, averaged like ``sequence_ce``: within each sample over its
    n_b + 1 steps, then over the batch. ``soft`` [B, T, K] are teacher probabilities at the same
    temperature (``training.distill``); gradients reach ``logits`` only."""
    B, T, K = logits.shape
    logq = torch.log_softmax(logits.float() / temperature, -1)
    p = soft.float()
    rows = (torch.xlogy(p, p) - p * logq).sum(-1)                                       # [B, T]
    steps = lengths + 1
    valid = torch.arange(T, device=logits.device)[None, :] < steps[:, None]
    return ((rows * valid).sum(1) / steps).mean()


def _kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per row, KL(softmax(p/T) || softmax(q/T)), rows paired by position."""
    logq = torch.log_softmax(p_logits.float() / temperature, -1)
    logr = torch.log_softmax(q_logits.float() / temperature, -1)
    return (logq.exp() * (logq - logr)).sum(-1)


def paper_pairs(lengths: torch.Tensor, T: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper code's pairing (spec 4.3), kept to compare: L2R rows (t = 1..T-1, then b) with
    t <= n_b, against R2L rows (s = T-1 down to 1, then b) with s <= n_b, i-th with i-th.

    Returns (l2r_b, l2r_t, r2l_b, r2l_t, valid), each of T*B entries: the first N = sum n_b are the pairs in
    order, the rest padding (``valid`` False, indices 0). Fixed sizes and a cumsum/scatter instead of
    ``nonzero``, so that no host synchronisation breaks a CUDA graph capture of the training step."""
    B = lengths.shape[0]
    n = T * B
    steps = torch.arange(T, device=lengths.device)[:, None].expand(T, B)             # [T, B] time-major
    keep = (steps >= 1) & (steps <= lengths[None, :])

    def kept_in_order(k: torch.Tensor) -> torch.Tensor:
        """Flat indices of the True entries of k (time-major), in order, then zeros."""
        flat = k.reshape(n)
        slot = torch.where(flat, flat.long().cumsum(0) - 1, n)                     # dropped rows -> spare slot
        order = torch.zeros(n + 1, dtype=torch.long, device=k.device)
        return order.scatter_(0, slot, torch.arange(n, device=k.device))[:n]

    lf = kept_in_order(keep)                                                          # t ascending, then b
    rf = kept_in_order(keep.flip(0))                                                  # s = T-1 .. 0, then b
    valid = torch.arange(n, device=lengths.device) < keep.sum()
    return lf % B, lf // B, rf % B, T - 1 - rf // B, valid


def distillation_kl(l2r_logits: torch.Tensor, r2l_logits: torch.Tensor, lengths: torch.Tensor,
                    pairing: str = "aligned", temperature: float = 4.0) -> torch.Tensor:
    """KL(softmax(z_L2R / T) || softmax(z_R2L / T)) averaged over paired rows; gradients reach both.

    ``aligned`` (our default, spec 7.1's fix): rows that predict the same target token of the same
    sample. L2R step t predicts y_{t+1}; R2L step n-1-t predicts y_{t+1}; t < n_b (end tokens left
    out), N = sum n_b rows. Done with a gather and a mask, so no host synchronisation.
    ``paper``: the official code's pairing (see ``paper_pairs``), kept to compare; also sync-free.
    """
    B, T, K = l2r_logits.shape
    if pairing == "aligned":
        t = torch.arange(T, device=lengths.device)[None, :]
        valid = t < lengths[:, None]                                            # [B, T]
        r_idx = (lengths[:, None] - 1 - t).clamp(min=0)
        r2l = r2l_logits.gather(1, r_idx[..., None].expand(B, T, K))
        rows = _kl_rows(l2r_logits, r2l, temperature)
        return (rows * valid).sum() / valid.sum().clamp(min=1)
    if pairing == "paper":
        lb, lt, rb, rt, valid = paper_pairs(lengths, T)
        rows = _kl_rows(l2r_logits[lb, lt], r2l_logits[rb, rt], temperature)
        return (rows * valid).sum() / valid.sum().clamp(min=1)
    raise ValueError(f"pairing must be 'aligned' or 'paper', got {pairing!r}")


def teacher_tensors(token_ids: list[list[int]], sos: int = 0, eos: int = 1, steps: int | None = None
                    ) -> dict[str, torch.Tensor]:
    """Decoder inputs/targets of spec 4.2 for both directions (``abm_rt.model.teacher``), padded to
    T = max n + 1 steps, or to ``steps`` when given (fixed shapes for CUDA graphs; the extra steps are
    masked out of every loss)."""
    l2r_in, l2r_tgt, n1 = branch_teacher_tensors(token_ids, reverse=False, sos=sos, eos=eos, pad_to=steps)
    r2l_in, r2l_tgt, _ = branch_teacher_tensors(token_ids, reverse=True, sos=sos, eos=eos, pad_to=steps)
    return {"lengths": n1 - 1, "l2r_in": l2r_in, "l2r_tgt": l2r_tgt, "r2l_in": r2l_in, "r2l_tgt": r2l_tgt}
