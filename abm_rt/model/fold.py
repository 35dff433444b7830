"""Inference forms of the encoder: BatchNorm folded into the conv before it, dropout gone.

One implementation, shared by the ONNX export (``export/onnx_export.py``) and the PyTorch CUDA/CPU
backend (``abm_rt/backends/torch_backend.py``), so every runtime runs the same algebra (spec 2.2).
"""
from __future__ import annotations

import copy

from torch import nn

from .encoder import DenseEncoder

# (conv, BN) attribute pairs of the encoder's units: Bottleneck (conv1/bn1, conv2/bn2), Transition (conv/bn).
_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv", "bn"))


def fold_batchnorm(encoder: DenseEncoder) -> DenseEncoder:
    """A copy of ``encoder`` (eval mode) with every BatchNorm folded into the conv that precedes it.

    Spec 2.1: every BN directly follows a bias-free conv, so ``BN(conv(x)) = conv'(x)`` exactly with
    ``w' = w * g / sqrt(var + eps)`` and ``b' = beta - mean * g / sqrt(var + eps)`` (eval mode: the
    running statistics). The folded BNs become ``nn.Identity``; dropout is removed too (the units'
    functional dropout rates are set to 0 and any ``nn.Dropout`` becomes ``nn.Identity``), which
    changes nothing in eval mode. The input encoder is not modified.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(encoder).eval()
    for module in list(folded.modules()):
        for conv_name, bn_name in _PAIRS:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
        if isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.0
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Dropout):
                setattr(module, name, nn.Identity())
    left = [name for name, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if left:
        raise RuntimeError(f"BatchNorm layers not preceded by a conv could not be folded: {left[:3]}")
    return folded.eval()


def has_batchnorm_or_dropout(module: nn.Module) -> list[str]:
    """Names of the BatchNorm / Dropout modules left in ``module`` (empty when fully folded)."""
    kinds = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    return [name for name, m in module.named_modules() if isinstance(m, kinds)]
