"""A data split decoded once and kept on the training device as fixed, padded batches."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from abm_rt.data.buckets import size_batches
from abm_rt.data.crohme import Sample
from abm_rt.data.vocab import Vocab

from .losses import teacher_tensors


@dataclass
class PackedBatch:
    """One batch: uint8 images padded to multiples of (mh, mw), sizes for the mask, teacher tensors."""

    images: torch.Tensor        # [B, 1, H, W] uint8, white ink on black, top-left aligned
    heights: torch.Tensor       # [B]
    widths: torch.Tensor        # [B]
    lengths: torch.Tensor       # [B] symbols per label
    l2r_in: torch.Tensor
    l2r_tgt: torch.Tensor
    r2l_in: torch.Tensor
    r2l_tgt: torch.Tensor
    names: list[str]
    tokens: list[list[str]]

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images as float in [0, 1], pixel mask [B, H, W]) computed on the device."""
        _, _, H, W = self.images.shape
        rows = torch.arange(H, device=self.images.device)[None, :] < self.heights[:, None]
        cols = torch.arange(W, device=self.images.device)[None, :] < self.widths[:, None]
        return self.images.float().div_(255.0), rows[:, :, None] & cols[:, None, :]


def pack_split(samples: list[Sample], vocab: Vocab, device: torch.device, max_batch: int,
               max_batch_pixels: int, multiple: tuple[int, int] = (16, 16)) -> list[PackedBatch]:
    """Bucket ``samples`` by size (``size_batches``) and upload every batch once."""
    sizes = [s.image.shape for s in samples]
    out = []
    for idx in size_batches(sizes, max_batch, max_batch_pixels):
        group = [samples[i] for i in idx]
        mh, mw = multiple
        H = -(-max(s.image.shape[0] for s in group) // mh) * mh
        W = -(-max(s.image.shape[1] for s in group) // mw) * mw
        img = np.zeros((len(group), 1, H, W), np.uint8)
        for j, s in enumerate(group):
            img[j, 0, :s.image.shape[0], :s.image.shape[1]] = s.image
        tt = teacher_tensors([vocab.encode(s.tokens) for s in group])
        out.append(PackedBatch(
            images=torch.from_numpy(img).to(device),
            heights=torch.tensor([s.image.shape[0] for s in group], device=device),
            widths=torch.tensor([s.image.shape[1] for s in group], device=device),
            lengths=tt["lengths"].to(device), l2r_in=tt["l2r_in"].to(device), l2r_tgt=tt["l2r_tgt"].to(device),
            r2l_in=tt["r2l_in"].to(device), r2l_tgt=tt["r2l_tgt"].to(device),
            names=[s.name for s in group], tokens=[s.tokens for s in group]))
    return out
