"""Bidirectional rescoring: the R2L branch re-scores the L2R beam's finished hypotheses.

ABM trains an R2L decoder beside the L2R one (spec 4.3) and the paper throws it away at inference.
Here it earns its keep: every hypothesis the L2R beam search finished is scored once more by the R2L
branch, teacher-forced on the reversed tokens (input ``eos, y_n .. y_1``, target ``y_n .. y_1, sos``,
spec 4.2), and each image keeps the hypothesis with the lowest

    (score_L2R + weight * score_R2L) / (n + 1)

where both scores are raw sums of -log p over the n + 1 predicted tokens. ``weight = 0`` gives back the
L2R search's own choice (spec 5.1.4). The cost is one teacher-forced R2L pass over at most k
hypotheses per image: about one more beam search's worth of decode steps, without the top-k.

With an R2L beam search's results as well (``rescore_with_r2l(..., r2l_seqs=...)``, the Recognizer's
``rescore="both"``), the candidates are the union of both beams' finished hypotheses, those of the R2L beam
scored by the L2R branch: a bidirectional search, as BTTR's, for a second beam search's cost.

The pass runs through the same step as the search: the native decoder's ``step`` (C++ or CUDA) when one
is given, else ``DecoderBranch.step`` in PyTorch.
"""
from __future__ import annotations

import torch

from ..model.decoder import DecoderBranch, FeatureCache
from ..model.teacher import teacher_tensors
from .types import Candidate, DecodedSequence


@torch.no_grad()
def teacher_forced_scores(branch: DecoderBranch, features: torch.Tensor, mask: torch.Tensor,
                          row_image: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
                          steps: torch.Tensor, native=None) -> torch.Tensor:
    """Raw -log p sums [R] of ``targets`` under teacher forcing, one row per (image, token sequence).

    Args:
        branch: the decoder branch to score with (PyTorch weights; used for h_0 and, without
            ``native``, for every step).
        features, mask: the encoded batch [B, D, H', W'] and its valid cells [B, H', W'].
        row_image: [R] the image of each row.
        inputs, targets: [R, T] token ids; steps: [R] (a CPU tensor: the loop bounds are read from it)
            how many leading steps of each row count.
        native: a ``NativeDecoder`` of the same branch, to run the steps through ``abm_rt._C``.
    """
    R, T = inputs.shape
    # Rows sorted longest first: at step t the rows still scoring are a prefix, and only that prefix runs,
    # so the work is the sum of the lengths, not R times the longest (a batch's candidates differ a lot).
    order = torch.argsort(steps, descending=True, stable=True)
    steps_sorted = steps[order]
    active = [int((steps_sorted > t).sum()) for t in range(T)]      # host side: steps is a CPU tensor
    inputs, targets, row_image = inputs[order], targets[order], row_image[order]
    if native is not None:
        dev = native.device
        feats = native.prepare(features, mask)
        rows = row_image.to(dev)
        hidden = native.initial_state(features, mask).index_select(0, rows)
        coverage = torch.zeros(R, feats.H * feats.W, device=dev)

        def step(n: int, prev: torch.Tensor, h: torch.Tensor, cov: torch.Tensor):
            out = native.step(feats, prev, h, cov, rows[:n])
            return out.log_probs, out.hidden, out.coverage
    else:
        dev = features.device
        rows = row_image.to(dev)
        cache = branch.prepare(features, mask).index_select(rows)
        hidden = branch.initial_state(features, mask).index_select(0, rows)
        coverage = torch.zeros(R, *features.shape[2:], dtype=cache.ua_f.dtype, device=dev)

        def step(n: int, prev: torch.Tensor, h: torch.Tensor, cov: torch.Tensor):
            part = FeatureCache(cache.features[:n], cache.mask[:n], cache.ua_f[:n], cache.cov_weight, cache.cov_bias)
            out = branch.step(part, prev, h, cov)
            return torch.log_softmax(out.logits.float(), -1), out.hidden, out.coverage
    inputs, targets = inputs.to(dev), targets.to(dev)
    total = torch.zeros(R, device=dev)
    for t, n in enumerate(active):
        if n == 0:
            break
        log_probs, hidden, coverage = step(n, inputs[:n, t], hidden[:n], coverage[:n])
        total[:n] -= log_probs.float().gather(1, targets[:n, t:t + 1])[:, 0]
    result = torch.empty_like(total)
    result[order.to(dev)] = total
    return result.cpu()


def candidate_r2l_scores(seqs: list[DecodedSequence], r2l: DecoderBranch, features: torch.Tensor,
                         mask: torch.Tensor, native=None) -> list[tuple[int, Candidate, float]]:
    """(image, candidate, R2L raw score) for every finished candidate of ``seqs``, in one batched pass."""
    rows = [(b, c) for b, s in enumerate(seqs) for c in s.candidates]
    if not rows:
        return []
    inputs, targets, steps = teacher_tensors([c.tokens for _, c in rows])
    row_image = torch.tensor([b for b, _ in rows], dtype=torch.long)
    scores = teacher_forced_scores(r2l, features, mask, row_image, inputs, targets, steps, native).tolist()
    return [(b, c, score) for (b, c), score in zip(rows, scores)]


def combined_score(candidate: Candidate, r2l_score: float, weight: float) -> float:
    """What rescoring minimises: (L2R + weight * R2L raw -log p) / (n + 1)."""
    return (candidate.score + weight * r2l_score) / (len(candidate.tokens) + 1)


def r2l_search_candidates(r2l_seqs: list[DecodedSequence], l2r: DecoderBranch, features: torch.Tensor,
                          mask: torch.Tensor, native=None, skip: list[set] | None = None
                          ) -> list[tuple[int, Candidate, float]]:
    """(image, candidate, R2L raw score) for every finished hypothesis of an R2L beam search, in one batched pass.

    The R2L search runs from eos to sos (spec 4.2), so its token lists read right to left: each candidate
    comes back in reading order (attention maps too), with ``score`` its L2R teacher-forced raw score and the
    search's own score as the R2L one. ``skip[b]`` holds token tuples of image b to leave out (those the L2R
    beam already found: the same sequence has the same two scores).
    """
    rows = [(b, list(c.tokens[::-1]), c) for b, s in enumerate(r2l_seqs) for c in s.candidates
            if skip is None or tuple(c.tokens[::-1]) not in skip[b]]
    if not rows:
        return []
    inputs, targets, steps = teacher_tensors([t for _, t, _ in rows], reverse=False)
    row_image = torch.tensor([b for b, _, _ in rows], dtype=torch.long)
    scores = teacher_forced_scores(l2r, features, mask, row_image, inputs, targets, steps, native).tolist()
    return [(b, Candidate(t, score, None if c.attention is None else c.attention[::-1].copy()), c.score)
            for (b, t, c), score in zip(rows, scores)]


def rescore_with_r2l(seqs: list[DecodedSequence], r2l: DecoderBranch, features: torch.Tensor,
                     mask: torch.Tensor, weight: float = 1.0, native=None, r2l_seqs: list[DecodedSequence] | None = None,
                     l2r: DecoderBranch | None = None, native_l2r=None) -> list[DecodedSequence]:
    """Re-choose each image's hypothesis among its finished candidates by the L2R + R2L score.

    Args:
        seqs: the L2R search's results for the batch, with ``candidates`` (``keep_candidates=True``).
        r2l: the R2L branch; native: its ``NativeDecoder`` (optional, see ``teacher_forced_scores``).
        features, mask: the batch the search decoded.
        weight: the R2L score's weight (0 keeps the L2R choice when ``r2l_seqs`` is not given).
        r2l_seqs: an R2L beam search's results on the same batch, with candidates: their hypotheses join
            the L2R beam's (a bidirectional search; ``r2l_search_candidates``), scored by ``l2r`` (the L2R
            branch; ``native_l2r`` its ``NativeDecoder``, optional) under teacher forcing.
    Returns:
        ``seqs`` with each image's chosen hypothesis replaced (tokens, ``score`` = its L2R raw score,
        ``normalized_score`` = the combined score / (1 + weight), a per-token average over both
        branches). Images without finished candidates (truncated) are left as they are. The attention
        maps, when the search returned them, are the chosen candidate's.
    """
    if weight == 0 and r2l_seqs is None:
        return seqs
    scored = candidate_r2l_scores(seqs, r2l, features, mask, native)
    if r2l_seqs is not None:
        if l2r is None:
            raise ValueError("rescoring an R2L search's hypotheses needs the L2R branch (l2r)")
        skip = [{tuple(c.tokens) for c in s.candidates} for s in seqs]
        scored += r2l_search_candidates(r2l_seqs, l2r, features, mask, native_l2r, skip)
    best: dict[int, tuple[float, Candidate]] = {}
    for b, c, r2l_score in scored:
        value = combined_score(c, r2l_score, weight)
        if b not in best or value < best[b][0]:
            best[b] = (value, c)
    for b, (value, c) in best.items():
        s = seqs[b]
        s.tokens, s.score, s.truncated = list(c.tokens), c.score, False
        s.normalized_score = value / (1.0 + weight)
        if c.attention is not None:
            s.attention = c.attention
    return seqs
