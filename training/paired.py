"""Both decoder branches teacher-forced in lock-step, as one stacked computation (``--paired-branches``).

Why: at the paper's batch size (<= 16 images) a training step is a long chain of small kernels, and
the two branches' chains are the same shapes: the L2R and R2L inputs of a batch have the same T steps and
read the same features. Stacking the two branches' weights on a leading axis of 2 runs each decoder
operation for both branches in one kernel (a batched matmul, one convolution) instead of two.
On a CPU the first version was 1.14x faster a step (benchmarks/results/train_branch_modes_cpu_2026-12-04.json);
on an H100 it was 4.5x slower (39 against 177 ms a step, CUDA graphs, abm-paper's batches:
benchmarks/results/train_branch_modes_h100_2026-12-06.json): a third fewer kernels, 4.3x their time. It ran
the coverage convolution as a grouped conv of one input channel per group (groups = 2), which PyTorch
treats as depthwise: in fp32 or bf16 it dispatches that to its own CudaDepthwise2d kernels, not to cuDNN,
and their input gradient runs all 512 x 121 weights of a channel through one thread per input cell: the
likely cause, read from PyTorch's dispatch and kernel source, not profiled. The convolution is now dense
(``_block_diagonal``), on cuDNN's ordinary path like the separate branches' conv: on the same H100 a step
takes 32.3 against 39.0 ms separate, 1.205x (benchmarks/results/train_branch_modes_h100_2026-12-06b.json),
and abm-paper's epochs went from 58.65 to 47.45 s. ``--branch-streams`` ran the two chains side by side on
two streams instead; that gave nothing (0.98x on the same H100 measurement; at batches of 24 on an H200,
tests/logs/2026-12-03_branch_streams_h200).

The math is ``DecoderBranch.teacher_forward``'s, run for two parameter sets at once; the GRU cells, the
masked mean of h_0 and the maxout are its own (shape-agnostic) ``_gru1`` / ``_gru2``, ``valid_mean`` and
``maxout_dropout``. Gradients reach each branch's own parameters through the
stacking, so the model, its state dict and the optimizer are unchanged. Layouts: per-branch vectors are
``[2, B, ...]`` (branch first, for ``bmm``); the attention maps are ``[B, 2, ...]`` (image first, so the
coverage convolution is one conv and the context one batched matmul over images).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from abm_rt.model.decoder import DecoderBranch

BRANCHES = 2


def _stacked_t(l2r: torch.nn.Linear, r2l: torch.nn.Linear) -> torch.Tensor:
    """The two branches' weights [out, in] as one [2, in, out] operand of ``bmm``."""
    return torch.stack([l2r.weight, r2l.weight]).transpose(1, 2)


def _linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Per-branch linear map: x [2, N, in] @ weight_t [2, in, out] (+ bias [2, out]) -> [2, N, out]."""
    if bias is None:
        return torch.bmm(x, weight_t)
    return torch.baddbmm(bias[:, None, :], x, weight_t)


def _linear_nd(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``_linear`` for x [2, ..., in] of any middle shape."""
    return _linear(x.reshape(BRANCHES, -1, x.shape[-1]), weight_t, bias).view(*x.shape[:-1], weight_t.shape[-1])


@dataclass
class PairedAttention:
    """The attention operands of both branches, built once per batch (``_prepare``)."""

    features: torch.Tensor     # F, shared           [B, D, H', W']
    mask: torch.Tensor         # valid cells         [B, 1, H', W'] bool
    ua_f: torch.Tensor         # U_a F + b_a         [B, 2, d, H', W']
    cov_weight: torch.Tensor   # folded kernels      [2d, 2, k, k] (block-diagonal)
    cov_bias: torch.Tensor     #                     [2d]
    wa_t: torch.Tensor         # W_a                 [2, n, d]
    v: torch.Tensor            # v                   [2, d]


def _block_diagonal(l2r_kernel: torch.Tensor, r2l_kernel: torch.Tensor) -> torch.Tensor:
    """The branches' folded coverage kernels [d, 1, k, k] as one dense kernel [2d, 2, k, k] with zero cross
    blocks: output channels [0, d) read input channel 0 (L2R's coverage), [d, 2d) channel 1 (R2L's).

    Why not ``groups=2`` on the [d, 1, k, k] kernels: a grouped conv with one input channel per group is
    depthwise to PyTorch, which runs it in fp32 or bf16 on its own slow CudaDepthwise2d kernels (module
    docstring). The dense conv costs twice the multiply-adds (2 x 121 per output, few) on cuDNN."""
    zero = torch.zeros_like(l2r_kernel)
    return torch.cat([torch.cat([l2r_kernel, zero], 1), torch.cat([zero, r2l_kernel], 1)])


def _prepare(l2r: DecoderBranch, r2l: DecoderBranch, features: torch.Tensor, mask: torch.Tensor) -> PairedAttention:
    """``DecoderBranch.prepare`` for both branches: one 1x1 conv gives both ``U_a F``."""
    a, b = l2r.attention, r2l.attention
    B, _, H, W = features.shape
    d = a.U_a.out_channels
    ua_f = F.conv2d(features, torch.cat([a.U_a.weight, b.U_a.weight]), torch.cat([a.U_a.bias, b.U_a.bias]))
    (wl, bl), (wr, br) = a.folded_coverage(), b.folded_coverage()
    return PairedAttention(features, mask.bool()[:, None], ua_f.view(B, BRANCHES, d, H, W), _block_diagonal(wl, wr),
                           torch.cat([bl, br]), _stacked_t(a.W_a, b.W_a), torch.cat([a.v.weight, b.v.weight]))


def _attend(att: PairedAttention, h_hat: torch.Tensor, coverage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``DecoderBranch.attend`` for both branches. h_hat [2, B, n], coverage [B, 2, H', W'].
    Returns (alpha [B, 2, H', W'], context [2, B, D])."""
    B, _, H, W = coverage.shape
    cov = F.conv2d(coverage, att.cov_weight, att.cov_bias,
                   padding=att.cov_weight.shape[-1] // 2).view(att.ua_f.shape)     # [B, 2, d, H, W]
    wa = torch.bmm(h_hat, att.wa_t).transpose(0, 1)                               # [B, 2, d]
    s = att.ua_f + cov + wa[..., None, None]
    energy = torch.einsum("bgdhw,gd->bghw", torch.tanh(s), att.v)                  # b_v cancels
    energy = energy.masked_fill(~att.mask, float("-inf"))
    alpha = torch.softmax(energy.flatten(2), 2).view_as(energy)                    # max-subtracted
    context = torch.einsum("bghw,bdhw->gbd", alpha, att.features)
    return alpha, context


def paired_teacher_forward(l2r: DecoderBranch, r2l: DecoderBranch, features: torch.Tensor, mask: torch.Tensor,
                           l2r_in: torch.Tensor, r2l_in: torch.Tensor, attention_fp32: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher-forced logits [B, T, K] of both branches: ``(l2r.teacher_forward(features, mask, l2r_in),
    r2l.teacher_forward(features, mask, r2l_in))`` (logits only), computed together.

    ``attention_fp32`` as in ``DecoderBranch.teacher_forward``: the attention and the coverage sum in fp32
    with autocast disabled, the GRUs and the output layer under the caller's autocast."""
    if l2r_in.shape != r2l_in.shape:
        raise ValueError(f"the two branches' inputs must have the same shape, got {tuple(l2r_in.shape)} "
                         f"and {tuple(r2l_in.shape)}")
    B, T = l2r_in.shape
    if attention_fp32:
        with torch.autocast(features.device.type, enabled=False):
            att = _prepare(l2r, r2l, features.float(), mask)
    else:
        att = _prepare(l2r, r2l, features, mask)

    # h_0 = tanh(W_init mean_valid(F)) for both branches: one mean, one matmul on the concatenated rows.
    w_init = torch.cat([l2r.W_init.weight, r2l.W_init.weight]), torch.cat([l2r.W_init.bias, r2l.W_init.bias])
    h = torch.tanh(F.linear(DecoderBranch.valid_mean(features, mask), *w_init))
    h = h.view(B, BRANCHES, -1).transpose(0, 1)                                    # [2, B, n]

    # One lookup in the two stacked tables (index_select: a capturable backward, see teacher_forward).
    K = l2r.embedding.num_embeddings
    tokens = torch.stack([l2r_in, r2l_in + K]).reshape(-1)
    emb = torch.cat([l2r.embedding.weight, r2l.embedding.weight]).index_select(0, tokens).view(BRANCHES, B, T, -1)
    gy_all = _linear_nd(emb, _stacked_t(l2r.W_y, r2l.W_y), torch.stack([l2r.W_y.bias, r2l.W_y.bias]))
    uh_t = _stacked_t(l2r.U_h, r2l.U_h)
    wc_t = _stacked_t(l2r.W_c, r2l.W_c)
    uh2_t, uh2_b = _stacked_t(l2r.U_h2, r2l.U_h2), torch.stack([l2r.U_h2.bias, r2l.U_h2.bias])

    coverage = features.new_zeros((B, BRANCHES, *features.shape[2:]), dtype=att.ua_f.dtype)
    hiddens, contexts = [], []
    for t in range(T):
        h_hat = DecoderBranch._gru1(gy_all[:, :, t], torch.bmm(h, uh_t), h)
        if attention_fp32:
            with torch.autocast(h_hat.device.type, enabled=False):
                alpha, context = _attend(att, h_hat.float(), coverage.float())
        else:
            alpha, context = _attend(att, h_hat, coverage)
        coverage = coverage + alpha
        h = DecoderBranch._gru2(torch.bmm(context, wc_t), _linear(h_hat, uh2_t, uh2_b), h_hat)
        hiddens.append(h)
        contexts.append(context)

    # Deep output for all steps of both branches (DecoderBranch.output_logits, stacked).
    def out_map(x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = getattr(l2r, name), getattr(r2l, name)
        return _linear_nd(x, _stacked_t(a, b), torch.stack([a.bias, b.bias]))

    o = out_map(torch.stack(contexts, 2), "W_oc") + out_map(torch.stack(hiddens, 2), "W_oh") + out_map(emb, "W_oy")
    logits = out_map(l2r.maxout_dropout(o), "W_o")                                 # [2, B, T, K]
    return logits[0], logits[1]
