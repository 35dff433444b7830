"""Teacher-forcing inputs and targets of a decoder branch (spec 4.2), for training and for rescoring."""
from __future__ import annotations

from typing import Sequence

import torch

from ..data.vocab import EOS_ID, SOS_ID


def teacher_tensors(token_lists: Sequence[Sequence[int]], reverse: bool = True, sos: int = SOS_ID,
                    eos: int = EOS_ID, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decoder inputs and targets for each token list: (inputs [R, T], targets [R, T], steps [R] = n + 1).

    ``reverse`` (R2L): input ``eos, y_n .. y_1``, target ``y_n .. y_1, sos``; otherwise (L2R) input
    ``sos, y_1 .. y_n``, target ``y_1 .. y_n, eos``. T is the longest n + 1, or ``pad_to`` when given (fixed
    shapes for CUDA graphs). Padding after a sequence (inputs: the start token, targets: the end token) is
    masked by ``steps``."""
    start, end = (eos, sos) if reverse else (sos, eos)
    R = len(token_lists)
    steps = torch.tensor([len(t) + 1 for t in token_lists], dtype=torch.long)
    T = int(steps.max()) if R else 1
    if pad_to is not None:
        if pad_to < T:
            raise ValueError(f"steps={pad_to} is fewer than the longest label needs ({T})")
        T = pad_to
    inputs = torch.full((R, T), start, dtype=torch.long)
    targets = torch.full((R, T), end, dtype=torch.long)
    for r, toks in enumerate(token_lists):
        if toks:
            seq = torch.tensor(list(toks)[::-1] if reverse else list(toks), dtype=torch.long)
            inputs[r, 1:len(toks) + 1] = seq
            targets[r, :len(toks)] = seq
    return inputs, targets, steps
