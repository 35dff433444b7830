"""Beam search over ABM's L2R decoder: a literal one-image oracle and the batched runtime search."""
from .batched import beam_search
from .reference import reference_beam_search
from .types import DecodedSequence, default_max_len

__all__ = ["beam_search", "reference_beam_search", "DecodedSequence", "default_max_len"]
