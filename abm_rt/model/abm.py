"""The ABM model: a shared DenseNet encoder with an L2R and (for training) an R2L decoder branch."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig
from .decoder import DecoderBranch
from .encoder import DenseEncoder, feature_mask


class ABM(nn.Module):
    """Encoder + L2R branch, and the R2L branch when ``bidirectional`` (the training model).

    The inference model is ``ABM(cfg, bidirectional=False)``; its state dict is the training model's
    without the ``r2l.`` keys, so an engine is made by dropping them.
    """

    def __init__(self, cfg: ModelConfig = ModelConfig(), bidirectional: bool = False):
        super().__init__()
        self.cfg = cfg
        self.encoder = DenseEncoder(cfg)
        self.l2r = DecoderBranch(cfg)
        self.r2l = DecoderBranch(cfg) if bidirectional else None

    def encode(self, images: torch.Tensor, pixel_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, 1, H, W] (+ pixel mask [B, H, W]) -> features [B, D, H', W'] and mask [B, H', W']."""
        features = self.encoder(images)
        if pixel_mask is None:
            mask = torch.ones(features.shape[0], *features.shape[2:], dtype=torch.bool, device=features.device)
        else:
            mask = feature_mask(pixel_mask.bool(), self.cfg)
            assert mask.shape[1:] == features.shape[2:], (mask.shape, features.shape)
        return features, mask

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder + L2R weights (and BN buffers): what an engine directory stores."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("r2l.")}


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters (BN running statistics are buffers, not parameters)."""
    return sum(p.numel() for p in module.parameters())


def _kaiming_uniform_(w: torch.Tensor) -> None:
    # Bound sqrt(6 / fan_in): PyTorch's kaiming_uniform_ with its default gain sqrt(2) (spec 4.5).
    nn.init.kaiming_uniform_(w, a=0, mode="fan_in", nonlinearity="relu")


def _xavier_uniform_chunks_(w: torch.Tensor, chunks: int) -> None:
    # Merged gate matrices hold `chunks` spec matrices; each gets Xavier with its own fan-out.
    for part in w.data.chunk(chunks, 0):
        nn.init.xavier_uniform_(part)


def initialize(model: ABM) -> None:
    """Initialization of spec 4.5: Kaiming-uniform for every conv/linear weight and zero biases,
    N(0, 1) embeddings and unit BN; R2L's initial-state layer and GRU/attention block get Xavier."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            _kaiming_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 1.0)
    if model.r2l is not None:
        b = model.r2l
        for lin, chunks in ((b.W_init, 1), (b.W_y, 3), (b.U_h, 3), (b.W_c, 3), (b.U_h2, 3)):
            _xavier_uniform_chunks_(lin.weight, chunks)
        att = b.attention
        for layer in (att.U_a, att.W_a, att.Q_l, att.Q_s, att.U_l, att.U_s, att.v):
            nn.init.xavier_uniform_(layer.weight)


def scaled_random_model(cfg: ModelConfig = ModelConfig(), seed: int = 0, bidirectional: bool = False,
                        eos_bias: float = 0.0) -> ABM:
    """A random-weight model in eval mode for tests and benchmarks (spec 4.5 init, fixed seed).

    ``eos_bias`` is added to the eos logit bias so random models finish hypotheses at a realistic rate.
    """
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model = ABM(cfg, bidirectional=bidirectional)
        initialize(model)
        # Random BN statistics, so the folded/exported forms are tested on non-trivial affine maps.
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        with torch.no_grad():
            model.l2r.W_o.bias[1] += eos_bias
            # Kaiming-scale random decoders saturate; shrink the attention energies so softmax is soft.
            model.l2r.attention.v.weight.mul_(1.0 / math.sqrt(cfg.attn))
    return model.eval()
