"""The encoder backend interface: padded images in, features and the feature mask out."""
from __future__ import annotations

import importlib
import importlib.util
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


def module_available(name: str) -> bool:
    """True when the optional package ``name`` can be imported (checked without importing it)."""
    return importlib.util.find_spec(name) is not None


def require_module(name: str, install_hint: str):
    """Import the optional package ``name``, or raise ImportError with ``install_hint``."""
    if not module_available(name):
        raise ImportError(install_hint)
    return importlib.import_module(name)
