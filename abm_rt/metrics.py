"""Expression-level metrics of spec 5.4: ExpRate, <=1, <=2 (token edit distance) and WER.

Unlike the paper's script, the denominator is every item of the set: an item with no prediction
(an error, or a truncated decode) counts as wrong, never silently dropped.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance between token sequences (substitution, insertion, deletion cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


@dataclass
class Scores:
    """Aggregate metrics in percent (WER too), with the counts they come from."""

    exprate: float
    le1: float
    le2: float
    wer: float
    total: int
    correct: int
    failed: int          # items with no usable prediction (error or truncated), counted as wrong

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)


def score_predictions(predictions: Sequence[Sequence[str] | None], references: Sequence[Sequence[str]]) -> Scores:
    """Score one prediction per reference. ``None`` marks an item that failed (error or truncated):
    it counts as a miss at distance ``len(reference)`` (as if nothing was predicted)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(references)
    dists, failed, ref_tokens = [], 0, 0
    for pred, ref in zip(predictions, references):
        ref_tokens += len(ref)
        if pred is None:
            failed += 1
            dists.append(None)
            continue
        dists.append(edit_distance(list(pred), list(ref)))
    total_dist = sum(d if d is not None else len(r) for d, r in zip(dists, references))

    def rate(limit: int) -> float:
        return 100.0 * sum(1 for d in dists if d is not None and d <= limit) / n if n else 0.0

    return Scores(exprate=rate(0), le1=rate(1), le2=rate(2),
                  wer=100.0 * total_dist / ref_tokens if ref_tokens else 0.0,
                  total=n, correct=sum(1 for d in dists if d == 0), failed=failed)
