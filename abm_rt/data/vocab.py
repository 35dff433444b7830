"""The 113-token ABM vocabulary: ids <-> tokens <-> LaTeX strings."""
from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

SOS_ID = 0
EOS_ID = 1


class Vocab:
    """An ordered token list; a token's id is its line number in ``vocab.txt``.

    ABM's dictionary has ``sos`` = 0, ``eos`` = 1, 110 LaTeX symbols and ``<eol>`` = 112
    (spec 4.1). ``sos``/``eos``/``<eol>`` are control tokens and never part of LaTeX output.
    """

    CONTROL = ("sos", "eos", "<eol>")

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        if len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary has duplicate tokens")
        if len(tokens) < 2 or tokens[SOS_ID] != "sos" or tokens[EOS_ID] != "eos":
            raise ValueError("vocabulary must start with 'sos' (id 0) and 'eos' (id 1)")
        self.tokens: list[str] = tokens
        self.index: dict[str, int] = {t: i for i, t in enumerate(tokens)}

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        """Read a ``vocab.txt`` (one token per line) or a CROHME ``dictionary.txt`` (TOKEN<TAB>ID)."""
        lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
        if lines and "\t" in lines[0]:
            pairs = [ln.split("\t") for ln in lines]
            pairs.sort(key=lambda p: int(p[1]))
            if [int(p[1]) for p in pairs] != list(range(len(pairs))):
                raise ValueError(f"{path}: dictionary ids are not 0..{len(pairs) - 1}")
            return cls([p[0] for p in pairs])
        return cls(lines)

    @classmethod
    def default(cls) -> "Vocab":
        """The vocabulary shipped with the package (ABM's dictionary, spec 4.1)."""
        text = resources.files("abm_rt.data").joinpath("vocab.txt").read_text(encoding="utf-8")
        return cls([ln for ln in text.splitlines() if ln.strip()])

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.tokens == other.tokens

    def sha256(self) -> str:
        """Hash of the token list, recorded in engine directories to catch mismatched vocabularies."""
        return hashlib.sha256("\n".join(self.tokens).encode("utf-8")).hexdigest()

    def to_text(self) -> str:
        """``vocab.txt`` contents: one token per line."""
        return "\n".join(self.tokens) + "\n"

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Token strings -> ids. Raises KeyError naming the first unknown token."""
        ids = []
        for tok in tokens:
            if tok not in self.index:
                raise KeyError(f"token {tok!r} is not in the vocabulary")
            ids.append(self.index[tok])
        return ids

    def kept_positions(self, ids: Iterable[int]) -> list[int]:
        """Positions in ``ids`` that ``decode`` keeps: before the first ``eos``, control tokens left out.
        (Per-step outputs such as attention maps are indexed with them to stay one per kept token.)"""
        out = []
        for k, i in enumerate(ids):
            i = int(i)
            if i == EOS_ID:
                break
            if self.tokens[i] not in self.CONTROL:
                out.append(k)
        return out

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Ids -> token strings, stopping at the first ``eos`` and dropping control tokens."""
        ids = [int(i) for i in ids]
        return [self.tokens[ids[k]] for k in self.kept_positions(ids)]

    def to_latex(self, ids: Iterable[int]) -> str:
        """Ids -> a LaTeX string: tokens joined by single spaces, as in CROHME captions."""
        return " ".join(self.decode(ids))

    def from_latex(self, latex: str) -> list[int]:
        """A space-separated token string (CROHME caption form) -> ids."""
        return self.encode(latex.split())
