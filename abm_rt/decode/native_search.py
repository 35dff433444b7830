"""Batched beam search on the native ops (``abm_rt._C``): the decode step and the beam bookkeeping run
as C++ (CPU) or CUDA kernels, with no host synchronisation inside the loop except the "all done?"
check every ``check_every`` steps. Same rules and results as ``batched.beam_search`` (the oracle),
and the same back-tracking (``backtrack``).
"""
from __future__ import annotations

import torch

from ..data.vocab import EOS_ID, SOS_ID
from .backtrack import SearchHistory, backtrack
from .native import NativeDecoder
from .types import DecodedSequence, default_max_len


@torch.no_grad()
def native_beam_search(decoder: NativeDecoder, features: torch.Tensor, mask: torch.Tensor, beam_size: int = 10,
                       max_len: int | None = None, return_attention: bool = False, check_every: int = 4,
                       sos: int = SOS_ID, eos: int = EOS_ID) -> list[DecodedSequence]:
    """Beam search for a padded batch (see ``batched.beam_search`` for the arguments)."""
    dev = decoder.device
    max_len = default_max_len() if max_len is None else max_len
    B, k = features.shape[0], beam_size
    if not 1 <= k <= 64:
        raise ValueError(f"beam_size must be in 1..64 for the native search, got {k}")
    mask = mask.to(dev).bool()
    feats = decoder.prepare(features.to(dev), mask)
    N, H, W = B * k, feats.H, feats.W
    i32 = dict(dtype=torch.int32, device=dev)
    row_image = torch.arange(B, **i32).repeat_interleave(k)
    hidden = decoder.initial_state(features.to(dev), mask).index_select(0, row_image.long()).contiguous()
    coverage = torch.zeros(N, H * W, dtype=torch.float32, device=dev)
    prev = torch.full((N,), sos, **i32)
    score = torch.full((B, k), float("inf"), device=dev)
    score[:, 0] = 0.0                                       # one live hypothesis: empty, score 0
    dead = torch.zeros(B, **i32)
    done = torch.zeros(B, dtype=torch.uint8, device=dev)
    fin_score = torch.full((B, k), float("inf"), device=dev)
    fin_step = torch.zeros(B, k, **i32)
    fin_cand = torch.zeros(B, k, **i32)
    words = torch.zeros(max_len, B, k, **i32)
    parents = torch.zeros(max_len, B, k, **i32)
    sources = torch.full((max_len, B, k), -1, **i32)
    parent_rows = torch.zeros(N, **i32)
    all_done = torch.zeros(1, **i32)
    alphas = []

    st = decoder.beam_state()
    st.B, st.k, st.V, st.eos = B, k, decoder.K, eos
    st.score, st.dead, st.done = score.data_ptr(), dead.data_ptr(), done.data_ptr()
    st.fin_score, st.fin_step, st.fin_cand = fin_score.data_ptr(), fin_step.data_ptr(), fin_cand.data_ptr()
    st.parent_rows, st.all_done = parent_rows.data_ptr(), all_done.data_ptr()
    steps = 0
    for t in range(max_len):
        out = decoder.step(feats, prev, hidden, coverage, row_image)
        next_prev = torch.empty(N, **i32)
        st.step, st.log_probs, st.prev_token = t, out.log_probs.data_ptr(), next_prev.data_ptr()
        st.words, st.parents, st.sources = words[t].data_ptr(), parents[t].data_ptr(), sources[t].data_ptr()
        decoder.beam_select(st)
        hidden = decoder.gather_rows(out.hidden, parent_rows)
        coverage = decoder.gather_rows(out.coverage.view(N, H * W), parent_rows)
        prev = next_prev
        if return_attention:
            alphas.append(out.alpha.view(B, k, H, W))
        steps = t + 1
        if (t + 1) % check_every == 0 and int(all_done.item()):
            break

    history = SearchHistory(
        words=words[:steps].cpu().numpy(), parents=parents[:steps].cpu().numpy(),
        sources=sources[:steps].cpu().numpy(), fin_score=fin_score.cpu().numpy(), fin_step=fin_step.cpu().numpy(),
        fin_cand=fin_cand.cpu().numpy(), dead=dead.cpu().numpy(), score=score.cpu().numpy(), steps=steps,
        valid=mask.cpu().numpy(), alphas=torch.stack(alphas).cpu().numpy() if return_attention else None)
    return backtrack(history)
