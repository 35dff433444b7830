"""DenseNet-B encoder of ABM (spec 2): conv -> BN -> ReLU -> Dropout units, ceil-mode pooling."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class Bottleneck(nn.Module):
    """1x1 conv to 4*growth, 3x3 conv to growth; the new channels are appended to the input."""

    def __init__(self, in_channels: int, growth: int, factor: int, dropout: float):
        super().__init__()
        inner = factor * growth
        self.conv1 = nn.Conv2d(in_channels, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, growth, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(growth)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.dropout(F.relu(self.bn1(self.conv1(x))), self.dropout, self.training)
        out = F.dropout(F.relu(self.bn2(self.conv2(out))), self.dropout, self.training)
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    """1x1 conv halving the channels, then a 2x2 average pool in ceil mode."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.dropout(F.relu(self.bn(self.conv(x))), self.dropout, self.training)
        # Padding is 0, so PyTorch divides a partial (ceil) window by the cells inside the image,
        # which is what ONNX AveragePool(ceil_mode=1, count_include_pad=0) does (spec 2.2).
        return F.avg_pool2d(out, 2, ceil_mode=True)


class DenseEncoder(nn.Module):
    """Image [B, 1, H, W] in [0, 1] (white ink on black) -> features [B, D, ceil(H/16), ceil(W/16)]."""

    def __init__(self, cfg: ModelConfig = ModelConfig()):
        super().__init__()
        self.stem = nn.Conv2d(1, cfg.stem_channels, 7, stride=2, padding=3, bias=False)
        stages: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(cfg.block_channels):
            layers = [
                Bottleneck(c_in + j * cfg.growth, cfg.growth, cfg.bottleneck_factor, cfg.dropout)
                for j in range(cfg.block_depth)
            ]
            stages.append(nn.Sequential(*layers))
            if i < cfg.num_blocks - 1:
                stages.append(Transition(c_out, int(c_out * cfg.reduction), cfg.dropout))
        self.stages = nn.Sequential(*stages)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The stem has no BN and no dropout (spec 2.1 table).
        x = F.max_pool2d(F.relu(self.stem(images)), 2, ceil_mode=True)
        return self.stages(x)


def feature_mask(pixel_mask: torch.Tensor, cfg: ModelConfig = ModelConfig()) -> torch.Tensor:
    """Pixel mask [B, H, W] -> feature mask [B, H', W']: every 2nd row and column, once per stage (spec 1.3)."""
    m = pixel_mask
    for _ in range(cfg.downsample.bit_length() - 1):
        m = m[:, ::2, ::2]
    return m
