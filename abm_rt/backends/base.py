"""The encoder backend interface: padded images in, features and the feature mask out."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class EncoderBackend(ABC):
    """Runs ABM's encoder on a padded batch.

    ``name`` identifies the backend in ``Recognizer.info()`` ("pytorch", "onnxruntime", "tensorrt").
    """

    name: str = "?"

    @abstractmethod
    def encode(self, images: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a padded batch.

        Args:
            images: [B, 1, H, W] float32 in [0, 1], white ink on black, image at the top-left.
            pixel_mask: [B, H, W] bool, True on real pixels.
        Returns:
            (features [B, D, ceil(H/16), ceil(W/16)] float32, mask [B, H', W'] bool), on the backend's
            device (the decoder's).
        """

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What this backend runs (name, device, files, providers...), for ``Recognizer.info()``."""
