"""Batched beam search: many images x k beams in one tensor, on any torch device.

Rows are laid out image-major: row ``b * k + s`` is beam slot ``s`` of image ``b``. Each image keeps
spec 5.1's shrinking beam: it selects ``k - finished_b`` candidates per step from its live slots.
Per step we record, for every image, the chosen candidates (word, parent slot) and which candidate
each new live slot came from; the winning hypothesis is rebuilt by walking these back-pointers once
at the end, so no token lists are copied inside the loop.
"""
from __future__ import annotations

import torch

from ..data.vocab import EOS_ID, SOS_ID
from ..model.decoder import DecoderBranch
from .backtrack import SearchHistory, backtrack
from .types import DecodedSequence, default_max_len


@torch.no_grad()
def beam_search(branch: DecoderBranch, features: torch.Tensor, mask: torch.Tensor, beam_size: int = 10,
                max_len: int | None = None, return_attention: bool = False, check_every: int = 1,
                sos: int = SOS_ID, eos: int = EOS_ID, keep_candidates: bool = False) -> list[DecodedSequence]:
    """Beam search for a padded batch.

    Args:
        branch: the decoder branch (L2R for inference).
        features: encoder output [B, D, H', W'] (padded cells may hold anything finite).
        mask: valid feature cells [B, H', W'] (bool); attention and the initial mean use only these.
        beam_size: k.
        max_len: maximum decode steps; if no hypothesis of an image finished by then, its best live
            hypothesis is returned with ``truncated=True``.
        return_attention: also return each chosen hypothesis's attention maps (cropped to valid cells).
        check_every: test for "all images finished" every this many steps (each test is a host sync).
        keep_candidates: also return every finished hypothesis (``DecodedSequence.candidates``).
    Returns:
        One ``DecodedSequence`` per image, in batch order.
    """
    max_len = default_max_len() if max_len is None else max_len
    B, k, dev = features.shape[0], beam_size, features.device
    mask = mask.bool()
    cache = branch.prepare(features, mask)
    h0 = branch.initial_state(features, mask)
    rows = torch.arange(B, device=dev).repeat_interleave(k)
    cache = cache.index_select(rows)
    hidden = h0.index_select(0, rows)
    coverage = torch.zeros(B * k, *features.shape[2:], dtype=cache.ua_f.dtype, device=dev)
    prev = torch.full((B * k,), sos, dtype=torch.long, device=dev)
    inf = torch.tensor(float("inf"), device=dev)
    score = torch.full((B, k), float("inf"), device=dev)
    score[:, 0] = 0.0                                    # one live hypothesis: empty, score 0
    dead = torch.zeros(B, dtype=torch.long, device=dev)  # finished count per image
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    rank = torch.arange(k, device=dev).expand(B, k)
    batch_base = (torch.arange(B, device=dev) * k)[:, None]
    fin_score = torch.full((B, k), float("inf"), device=dev)
    fin_step = torch.zeros((B, k), dtype=torch.long, device=dev)
    fin_cand = torch.zeros((B, k), dtype=torch.long, device=dev)
    words, parents, sources, alphas = [], [], [], []

    steps = 0
    for t in range(max_len):
        out = branch.step(cache, prev, hidden, coverage)
        logp = torch.log_softmax(out.logits.float(), -1)
        V = logp.shape[1]
        cost = (score[:, :, None] - logp.view(B, k, V)).view(B, k * V)   # raw -log p sums (spec 5.1.2)
        top_cost, top_idx = cost.topk(k, dim=1, largest=False, sorted=True)
        parent, word = top_idx // V, top_idx % V
        valid = (rank < (k - dead)[:, None]) & ~done[:, None] & torch.isfinite(top_cost)
        is_eos = valid & (word == eos)
        is_live = valid & ~is_eos

        # Finished: append in rank order to the image's finished list.
        fin_pos = torch.where(is_eos, dead[:, None] + is_eos.cumsum(1) - 1, k)   # k = a dump column
        pad_col = lambda x: torch.cat([x, x[:, :1]], 1)
        fs, fst, fc = pad_col(fin_score), pad_col(fin_step), pad_col(fin_cand)
        fs.scatter_(1, fin_pos, top_cost)
        fst.scatter_(1, fin_pos, torch.full_like(fin_pos, t))
        fc.scatter_(1, fin_pos, rank.clone())
        fin_score, fin_step, fin_cand = fs[:, :k], fst[:, :k], fc[:, :k]
        dead = dead + is_eos.sum(1)

        # Live: new slot s of image b <- candidate new_src[b, s].
        slot = torch.where(is_live, is_live.cumsum(1) - 1, k)
        new_src = torch.full((B, k + 1), -1, dtype=torch.long, device=dev)
        new_src.scatter_(1, slot, rank.clone())
        new_src = new_src[:, :k]
        has_src = new_src >= 0
        src = new_src.clamp(min=0)
        score = torch.where(has_src, top_cost.gather(1, src), inf)
        parent_rows = (batch_base + parent.gather(1, src)).view(-1)
        hidden = out.hidden.index_select(0, parent_rows)
        coverage = out.coverage.index_select(0, parent_rows)
        prev = word.gather(1, src).view(-1)

        words.append(word)
        parents.append(parent)
        sources.append(new_src)
        if return_attention:
            alphas.append(out.alpha.view(B, k, *out.alpha.shape[1:]))
        done = done | (dead >= k) | ~has_src.any(1)
        steps = t + 1
        if (t + 1) % check_every == 0 and bool(done.all()):
            break

    # One transfer to the host, then rebuild each winner from the back-pointers.
    history = SearchHistory(
        words=torch.stack(words).cpu().numpy(), parents=torch.stack(parents).cpu().numpy(),
        sources=torch.stack(sources).cpu().numpy(), fin_score=fin_score.cpu().numpy(),
        fin_step=fin_step.cpu().numpy(), fin_cand=fin_cand.cpu().numpy(), dead=dead.cpu().numpy(),
        score=score.cpu().numpy(), steps=steps, valid=mask.cpu().numpy(),
        alphas=torch.stack(alphas).float().cpu().numpy() if return_attention else None)
    return backtrack(history, keep_candidates)
