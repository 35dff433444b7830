"""PyTorch ABM -> ONNX: the encoder, and the decoder's per-image preparation and per-step graphs.

The exported graphs are the runtime forms of spec 3.6, so every backend runs the same algebra:

- ``encoder.onnx``: images [B, 1, H, W] -> features [B, D, ceil(H/16), ceil(W/16)]; BatchNorm folded
  into the convolution before it (spec 2.2), dropout gone (eval mode).
- ``decoder_prepare.onnx``: features, mask -> h0 = tanh(W_init mean_valid(F)) and ua_f = U_a F + b_a.
- ``decoder_step.onnx``: one step of ``DecoderBranch.step`` (folded coverage conv, max-subtracted masked
  softmax) followed by log_softmax.

We use the TorchScript-based exporter (``dynamo=False``): it needs neither onnxscript nor a
torch.export trace, and it keeps ``dynamic_axes``. It is deprecated upstream but still present in
torch 2.13; when it goes, ``_export`` is the one place to change.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from abm_rt.model import ABM, DecoderBranch, DenseEncoder
from abm_rt.model.decoder import FeatureCache
from abm_rt.model.fold import fold_batchnorm  # the one BN-folding implementation, shared with TorchEncoder

DEFAULT_OPSET = 17

ENCODER_INPUTS = ["images"]
ENCODER_OUTPUTS = ["features"]
PREPARE_INPUTS = ["features", "mask"]
PREPARE_OUTPUTS = ["h0", "ua_f"]
STEP_INPUTS = ["prev_token", "hidden", "coverage", "features", "ua_f", "mask"]
STEP_OUTPUTS = ["log_probs", "hidden_out", "alpha", "coverage_out"]


# ---- graph wrappers -----------------------------------------------------------------------------
class _EncoderGraph(nn.Module):
    """images [B, 1, H, W] -> features [B, D, H', W'] with BN folded."""

    def __init__(self, encoder: DenseEncoder):
        super().__init__()
        self.encoder = fold_batchnorm(encoder)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)


class _PrepareGraph(nn.Module):
    """features [N, D, H', W'], mask [N, H', W'] (bool) -> h0 [N, n], ua_f [N, d, H', W']."""

    def __init__(self, branch: DecoderBranch):
        super().__init__()
        self.branch = branch

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h0 = self.branch.initial_state(features, mask)
        ua_f = self.branch.attention.U_a(features)
        return h0, ua_f


class _StepGraph(nn.Module):
    """One ``DecoderBranch.step`` with the cached per-image tensors as inputs, then log_softmax."""

    def __init__(self, branch: DecoderBranch):
        super().__init__()
        self.branch = branch
        weight, bias = branch.attention.folded_coverage()
        # Constants of the graph: the folded coverage conv (spec 3.6), computed once here.
        self.register_buffer("cov_weight", weight.detach().clone())
        self.register_buffer("cov_bias", bias.detach().clone())

    def forward(self, prev_token, hidden, coverage, features, ua_f, mask):
        cache = FeatureCache(features, mask, ua_f, self.cov_weight, self.cov_bias)
        out = self.branch.step(cache, prev_token, hidden, coverage)
        return torch.log_softmax(out.logits, -1), out.hidden, out.alpha, out.coverage


# ---- export -------------------------------------------------------------------------------------
def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic_axes: dict[str, dict[int, str]], opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(module, args, str(path), dynamo=False, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, opset_version=opset,
                          do_constant_folding=True)


def _fix_average_pools(model) -> int:
    """Make ceil-mode AveragePools divide partial windows by the cells inside the image (spec 2.2).

    PyTorch's ``avg_pool2d(ceil_mode=True)`` with padding 0 divides a window that overhangs the
    bottom/right edge by the number of cells inside; the exporter copies PyTorch's default
    ``count_include_pad=1``. ONNX Runtime happens to clip the overhang either way, but other
    runtimes (e.g. TensorRT) treat the overhang as padding, so we set ``count_include_pad=0``, which
    says exactly what the model computes. Returns the number of nodes changed.
    """
    from onnx import helper

    changed = 0
    for node in model.graph.node:
        if node.op_type != "AveragePool":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if any(attrs.get("pads", [0])):
            raise RuntimeError(f"AveragePool {node.name} has explicit padding {attrs['pads']}; the encoder has none")
        if attrs.get("count_include_pad", 0) != 0:
            for a in node.attribute:
                if a.name == "count_include_pad":
                    a.i = 0
            changed += 1
    return changed


def _finish(path: Path, producer_note: str) -> Path:
    """Post-process, check and save an exported file in place."""
    import onnx

    model = onnx.load(str(path))
    _fix_average_pools(model)
    model.doc_string = producer_note
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def export_encoder(model: ABM | DenseEncoder, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Export the encoder: ``images`` float32 [batch, 1, height, width] -> ``features`` [batch, D, H', W'].

    Batch, height and width are dynamic; H' = ceil(height / 16), W' = ceil(width / 16).
    """
    encoder = model.encoder if isinstance(model, ABM) else model
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = _EncoderGraph(encoder).eval()
    example = torch.rand(1, 1, 47, 97)          # odd sizes: the trace must not bake in even shapes
    _export(graph, (example,), path, ENCODER_INPUTS, ENCODER_OUTPUTS,
            {"images": {0: "batch", 2: "height", 3: "width"},
             "features": {0: "batch", 2: "feat_height", 3: "feat_width"}}, opset)
    return _finish(path, "abm_rt encoder (DenseNet-B, BN folded)")


def _decoder_example(branch: DecoderBranch, n: int = 2, h: int = 3, w: int = 5):
    cfg = branch.cfg
    g = torch.Generator().manual_seed(0)
    features = torch.rand(n, cfg.feature_dim, h, w, generator=g)
    mask = torch.ones(n, h, w, dtype=torch.bool)
    mask[1, :, -1] = False
    return cfg, features, mask


def export_decoder_prepare(branch: DecoderBranch, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Export the per-image decoder preparation: ``features`` [N, D, H', W'], ``mask`` bool [N, H', W']
    -> ``h0`` [N, n], ``ua_f`` [N, d, H', W'] (U_a F + b_a, cached for every step)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _, features, mask = _decoder_example(branch)
    grid = {0: "N", 2: "feat_height", 3: "feat_width"}
    _export(_PrepareGraph(branch).eval(), (features, mask), path, PREPARE_INPUTS, PREPARE_OUTPUTS,
            {"features": grid, "mask": {0: "N", 1: "feat_height", 2: "feat_width"}, "h0": {0: "N"},
             "ua_f": grid}, opset)
    return _finish(path, "abm_rt decoder preparation (h0, U_a F + b_a)")


def export_decoder_step(branch: DecoderBranch, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Export one decode step (``DecoderBranch.step`` + log_softmax).

    Inputs: ``prev_token`` int64 [N], ``hidden`` [N, n], ``coverage`` [N, H', W'], ``features``
    [N, D, H', W'], ``ua_f`` [N, d, H', W'], ``mask`` bool [N, H', W'].
    Outputs: ``log_probs`` [N, K], ``hidden_out`` [N, n], ``alpha`` [N, H', W'], ``coverage_out``
    [N, H', W']. N, H' and W' are dynamic.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = _StepGraph(branch).eval()
    cfg, features, mask = _decoder_example(branch)
    n, _, h, w = features.shape
    with torch.no_grad():
        ua_f = branch.attention.U_a(features)
    args = (torch.zeros(n, dtype=torch.long), torch.zeros(n, cfg.hidden), torch.zeros(n, h, w),
            features, ua_f, mask)
    grid3 = {0: "N", 1: "feat_height", 2: "feat_width"}
    grid4 = {0: "N", 2: "feat_height", 3: "feat_width"}
    _export(graph, args, path, STEP_INPUTS, STEP_OUTPUTS,
            {"prev_token": {0: "N"}, "hidden": {0: "N"}, "coverage": grid3, "features": grid4,
             "ua_f": grid4, "mask": grid3, "log_probs": {0: "N"}, "hidden_out": {0: "N"},
             "alpha": grid3, "coverage_out": grid3}, opset)
    return _finish(path, "abm_rt decoder step (runtime form, spec 3.6) + log_softmax")
