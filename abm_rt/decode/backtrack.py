"""The end of a batched beam search, shared by the PyTorch search and the native (C++/CUDA) one:
choose each image's winner (spec 5.1.4) and rebuild its tokens from the per-step back-pointers."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .types import Candidate, DecodedSequence, length_normalized


@dataclass
class SearchHistory:
    """Everything a batched search records, on the host. T steps, B images, k slots."""

    words: np.ndarray       # [T, B, k] candidate word by rank
    parents: np.ndarray     # [T, B, k] candidate parent slot by rank
    sources: np.ndarray     # [T, B, k] rank that fed each new live slot, -1 if none
    fin_score: np.ndarray   # [B, k] finished hypotheses' raw scores, in finishing order
    fin_step: np.ndarray    # [B, k] step at which each finished
    fin_cand: np.ndarray    # [B, k] its rank at that step
    dead: np.ndarray        # [B] finished count
    score: np.ndarray       # [B, k] live slots' raw scores after the last step (+inf: empty)
    steps: int              # steps run
    valid: np.ndarray       # [B, H', W'] feature mask (images top-left)
    alphas: np.ndarray | None = None   # [T, B, k, H', W'] attention of each row, when asked


def backtrack(h: SearchHistory, keep_candidates: bool = False) -> list[DecodedSequence]:
    """One DecodedSequence per image: the finished hypothesis with the lowest score / (symbols + 1),
    or, when none finished, the best live one marked truncated.

    ``keep_candidates``: also rebuild every finished hypothesis of each image (up to k, in finishing
    order) into ``DecodedSequence.candidates``, for rescoring (``decode.rescore``)."""
    results = []
    for b in range(h.dead.shape[0]):
        if h.dead[b] > 0:
            n = int(h.dead[b])
            norms = [length_normalized(float(h.fin_score[b, i]), int(h.fin_step[b, i])) for i in range(n)]
            i = int(np.argmin(norms))            # first of equal values, like min()
            t_end, cand, truncated = int(h.fin_step[b, i]), int(h.fin_cand[b, i]), False
            raw, norm = float(h.fin_score[b, i]), norms[i]
        else:
            t_end = h.steps - 1
            live = [s for s in range(h.score.shape[1]) if np.isfinite(h.score[b, s])]
            norms = [length_normalized(float(h.score[b, s]), h.steps) for s in live]
            s = live[int(np.argmin(norms))]
            cand, truncated = int(h.sources[t_end, b, s]), True
            raw, norm = float(h.score[b, s]), min(norms)
        tokens, att_rows = _walk_back(h, b, t_end, cand, truncated)
        seq = DecodedSequence(tokens, raw, norm, truncated, _attention(h, b, att_rows))
        if keep_candidates:
            for j in range(int(h.dead[b])):
                toks, rows = _walk_back(h, b, int(h.fin_step[b, j]), int(h.fin_cand[b, j]), False)
                seq.candidates.append(Candidate(toks, float(h.fin_score[b, j]), _attention(h, b, rows)))
        results.append(seq)
    return results


def _attention(h: SearchHistory, b: int, att_rows: list[tuple[int, int]]) -> np.ndarray | None:
    """[tokens, H', W'] attention of image ``b`` at the given (step, slot) rows, cropped to its valid
    cells; None when the search kept no attention."""
    if h.alphas is None:
        return None
    hv, wv = valid_extent(h.valid[b])
    return (np.stack([h.alphas[t, b, p, :hv, :wv] for t, p in att_rows]) if att_rows
            else np.zeros((0, hv, wv), np.float32))


def _walk_back(h: SearchHistory, b: int, t_end: int, cand: int, truncated: bool
               ) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokens of the hypothesis that is candidate ``cand`` of image ``b`` at step ``t_end``, and the
    (step, parent slot) row of each token's attention; a finished one loses its end token."""
    tokens, att_rows = [], []
    t, c = t_end, cand
    while t >= 0:
        p = int(h.parents[t, b, c])
        tokens.append(int(h.words[t, b, c]))
        att_rows.append((t, p))
        if t > 0:
            c = int(h.sources[t - 1, b, p])
        t -= 1
    tokens.reverse()
    att_rows.reverse()
    if not truncated:                            # drop the end token and its attention
        tokens, att_rows = tokens[:-1], att_rows[:-1]
    return tokens, att_rows


def valid_extent(valid: np.ndarray) -> tuple[int, int]:
    """(rows, cols) of the top-left valid block of a feature mask (images sit at the top-left)."""
    return int(valid.any(1).sum()), int(valid.any(0).sum())
