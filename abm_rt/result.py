"""What ``Recognizer.predict`` returns for each input item."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Result:
    """The recognition of one input item.

    ``error`` is None on success; otherwise it says why this item has no recognition (the other
    items of the batch are unaffected) and ``latex`` is empty.
    """

    index: int                       # position of the item in the predict() call
    latex: str = ""                  # tokens joined by single spaces (CROHME caption form)
    tokens: list[str] = field(default_factory=list)
    score: float = float("nan")      # mean log-probability per token, end token included (<= 0; higher is better)
    truncated: bool = False          # no hypothesis ended within max_len: the best unfinished one is returned
    error: str | None = None
    notes: list[str] = field(default_factory=list)   # e.g. "inverted (bright background)", "downscaled ..."
    attention: np.ndarray | None = None               # [len(tokens), H', W'] on request

    @property
    def ok(self) -> bool:
        """True when the item was recognized (it may still be truncated)."""
        return self.error is None

    def to_dict(self, with_attention: bool = False) -> dict[str, Any]:
        """A JSON-ready dict; attention maps are included (as nested lists) only when asked."""
        d: dict[str, Any] = {"index": self.index, "latex": self.latex, "tokens": self.tokens,
                             "score": None if np.isnan(self.score) else round(float(self.score), 6),
                             "truncated": self.truncated, "error": self.error, "notes": self.notes}
        if with_attention and self.attention is not None:
            d["attention"] = np.round(self.attention, 5).tolist()
        return d
