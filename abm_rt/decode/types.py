"""What a beam search returns, and the choice rules shared by the oracle and the batched search."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Longest caption in CROHME train (96 tokens) and 2014 (204 tokens), plus a margin of about 25 %.
DEFAULT_MAX_LEN = 256


def default_max_len() -> int:
    """Default maximum number of decode steps (tokens, eos included)."""
    return DEFAULT_MAX_LEN


def length_normalized(score: float, num_symbols: int) -> float:
    """Final ranking of spec 5.1: raw -log p sum over (symbols + 1), the +1 being the end token.

    A truncated hypothesis (no end token) is ranked by the same formula, as if it ended next step.
    """
    return score / (num_symbols + 1)


@dataclass
class Candidate:
    """One finished hypothesis of a beam search, kept for rescoring."""

    tokens: list[int]             # symbol ids, without sos/eos
    score: float                  # raw sum of -log p of the searching branch, eos included
    attention: np.ndarray | None = None   # [len(tokens), H', W'], when the search kept attention


@dataclass
class DecodedSequence:
    """The chosen hypothesis for one image."""

    tokens: list[int]             # symbol ids, without sos/eos
    score: float                  # raw sum of -log p over the emitted tokens (eos included if finished)
    normalized_score: float       # score / (len(tokens) + 1), the quantity the final choice minimises
    truncated: bool               # True when no hypothesis finished within max_len
    attention: np.ndarray | None = None   # [len(tokens), H', W'] attention per emitted symbol, on request
    candidates: list[Candidate] = field(default_factory=list)   # every finished hypothesis, on request
