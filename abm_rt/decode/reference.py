"""The one-image beam search of spec 5.1, written straight from the text: the test oracle.

Deliberately plain: Python lists of hypotheses, one image, no padding, the literal decoder step
(``DecoderBranch.step_plain``). The batched search must agree with it token for token.
Differences from the paper's code, both decided by the project: at ``max_len`` the best live
hypothesis is returned with ``truncated=True`` when nothing finished (the paper returns nothing),
and the default maximum length comes from the data (``default_max_len``) instead of 1000.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.decoder import DecoderBranch
from ..data.vocab import EOS_ID, SOS_ID
from .types import DecodedSequence, default_max_len, length_normalized


@dataclass
class _Hyp:
    tokens: list[int]
    score: float
    hidden: torch.Tensor | None = None
    coverage: torch.Tensor | None = None
    alphas: list[torch.Tensor] = field(default_factory=list)


@torch.no_grad()
def reference_beam_search(branch: DecoderBranch, features: torch.Tensor, beam_size: int = 10,
                          max_len: int | None = None, plain_step: bool = True,
                          sos: int = SOS_ID, eos: int = EOS_ID) -> DecodedSequence:
    """Beam search for one unpadded image. ``features``: [1, D, H', W'] (or [D, H', W'])."""
    if features.dim() == 3:
        features = features.unsqueeze(0)
    max_len = default_max_len() if max_len is None else max_len
    k = beam_size
    mask = torch.ones(1, *features.shape[2:], dtype=torch.bool, device=features.device)
    h0 = branch.initial_state(features, mask)[0]
    cache = branch.prepare(features, mask)
    live = [_Hyp([], 0.0, h0, torch.zeros(features.shape[2:], device=features.device))]
    finished: list[_Hyp] = []
    for _ in range(max_len):
        n = len(live)
        prev = torch.tensor([h.tokens[-1] if h.tokens else sos for h in live], device=features.device)
        hidden = torch.stack([h.hidden for h in live])
        coverage = torch.stack([h.coverage for h in live])
        if plain_step:
            out = branch.step_plain(features.expand(n, -1, -1, -1), mask.expand(n, -1, -1), prev, hidden, coverage)
        else:
            out = branch.step(cache.index_select(torch.zeros(n, dtype=torch.long, device=features.device)),
                              prev, hidden, coverage)
        logp = torch.log_softmax(out.logits.float(), -1)
        scores = torch.tensor([h.score for h in live], dtype=torch.float32, device=features.device)
        cost = (scores[:, None] - logp).flatten()        # raw sums of -log p, float32 (spec 5.1.2)
        vocab = logp.shape[1]
        chosen = torch.topk(cost, k - len(finished), largest=False, sorted=True).indices.tolist()
        new_live = []
        for idx in chosen:
            parent, word = divmod(idx, vocab)
            src = live[parent]
            hyp = _Hyp(src.tokens + [word], float(cost[idx]), out.hidden[parent], out.coverage[parent],
                       src.alphas + [out.alpha[parent]])
            (finished if word == eos else new_live).append(hyp)
        live = new_live
        if not live or len(finished) >= k:
            break
    truncated = not finished
    pool = finished if finished else live
    # Finished tokens end with eos: symbols = len - 1. Live tokens have no eos: symbols = len.
    def norm(h: _Hyp) -> float:
        symbols = len(h.tokens) - 1 if not truncated else len(h.tokens)
        return length_normalized(h.score, symbols)
    best = min(pool, key=norm)   # min keeps the first of equal values, like the batched search
    symbols = best.tokens[:-1] if not truncated else best.tokens
    attention = (torch.stack(best.alphas[:len(symbols)]).cpu().numpy() if symbols
                 else torch.zeros(0, *features.shape[2:]).numpy())
    return DecodedSequence(symbols, best.score, norm(best), truncated, attention)
