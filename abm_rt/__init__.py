"""abm_rt: an inference runtime for ABM, the handwritten mathematical expression recognizer (AAAI 2022).

    import abm_rt
    rec = abm_rt.Recognizer()                 # the bundled default engine, or Recognizer("path/to/engine")
    results = rec.predict(["a.png", "b.png"])  # one Result per image: latex, tokens, score, ...

Heavy modules load on first use, so ``import abm_rt.data`` (the trainer's) stays light.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .version import __version__

if TYPE_CHECKING:
    from .recognizer import Recognizer
    from .result import Result

__all__ = ["Recognizer", "Result", "__version__"]


def __getattr__(name: str):
    if name == "Recognizer":
        from .recognizer import Recognizer
        return Recognizer
    if name == "Result":
        from .result import Result
        return Result
    raise AttributeError(f"module 'abm_rt' has no attribute {name!r}")
