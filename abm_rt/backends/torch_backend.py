"""The PyTorch encoder: the reference model itself, on CPU or CUDA."""
from __future__ import annotations

from typing import Any

import torch

from ..model import ABM
from .base import EncoderBackend


class TorchEncoder(EncoderBackend):
    """``model.encode`` on ``device`` (the model is moved there)."""

    name = "pytorch"

    def __init__(self, model: ABM, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode(images.to(self.device, torch.float32), pixel_mask.to(self.device))

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": str(self.device), "torch": torch.__version__,
                "threads": torch.get_num_threads() if self.device.type == "cpu" else None}
