"""One ABM decoder branch (spec 3): GRU-1, multi-scale coverage attention (AAM), GRU-2, maxout output.

Two implementations of the step live here on purpose:
- ``step``: the runtime form (spec 3.6): ``U_a F`` cached once per image, the two coverage convs and
  their linear maps folded into one conv, and a max-subtracted masked softmax;
- ``step_plain``: the equations of spec 3.3 written out literally, kept only as the test oracle.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


@dataclass
class FeatureCache:
    """Per-image tensors that do not change across decode steps. Rows are images (or image x beam)."""

    features: torch.Tensor      # F            [N, D, H', W']
    mask: torch.Tensor          # valid cells  [N, H', W'] bool
    ua_f: torch.Tensor          # U_a F + b_a  [N, d, H', W']
    cov_weight: torch.Tensor    # folded coverage kernel [d, 1, k, k]
    cov_bias: torch.Tensor      # b_l + b_s    [d]

    def index_select(self, rows: torch.Tensor) -> "FeatureCache":
        """The cache for a subset / repetition of rows (e.g. expanding images to image x beam)."""
        return FeatureCache(
            self.features.index_select(0, rows), self.mask.index_select(0, rows),
            self.ua_f.index_select(0, rows), self.cov_weight, self.cov_bias,
        )


@dataclass
class StepOutput:
    """What one decode step returns."""

    logits: torch.Tensor   # [N, K]
    hidden: torch.Tensor   # h_t, GRU-2 output [N, n]
    alpha: torch.Tensor    # attention [N, H', W']
    coverage: torch.Tensor # beta_{t+1} = beta_t + alpha_t [N, H', W']


class CoverageAttention(nn.Module):
    """AAM parameters (spec 3.1): U_a, W_a, Q_l, Q_s, U_l, U_s, v."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, D, n = cfg.attn, cfg.feature_dim, cfg.hidden
        self.U_a = nn.Conv2d(D, d, 1)
        self.W_a = nn.Linear(n, d, bias=False)
        self.Q_l = nn.Conv2d(1, d, cfg.cov_large, padding=cfg.cov_large // 2, bias=False)
        self.Q_s = nn.Conv2d(1, d, cfg.cov_small, padding=cfg.cov_small // 2, bias=False)
        self.U_l = nn.Linear(d, d)
        self.U_s = nn.Linear(d, d)
        self.v = nn.Linear(d, 1)

    def folded_coverage(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One k_l x k_l conv equal to ``U_l(Q_l * b) + b_l + U_s(Q_s * b) + b_s`` (spec 3.6; exact)."""
        d, k = self.Q_l.out_channels, self.Q_l.kernel_size[0]
        pad = (k - self.Q_s.kernel_size[0]) // 2
        q_l = self.Q_l.weight.reshape(d, k * k)
        q_s = F.pad(self.Q_s.weight, (pad, pad, pad, pad)).reshape(d, k * k)
        weight = self.U_l.weight @ q_l + self.U_s.weight @ q_s
        return weight.reshape(d, 1, k, k), self.U_l.bias + self.U_s.bias


def _compile_config() -> contextlib.ExitStack:
    """Config for each call of the compiled teacher-forcing step (the settings this torch has):

    - ``recompute_views``: the autograd partition saves the coverage map, not its unsqueezed view, for
      the convolution backward (torch 2.13's inductor cannot order a saved view's symbolic strides and
      fails with "cannot determine truth value of Relational: 1 < s..");
    - no duck shaping: a batch where two sizes happen to be equal (B == H', H' == W') would otherwise
      compile a graph with that equality baked in, and the next batch would recompile.
    """
    stack = contextlib.ExitStack()
    from torch._functorch import config as functorch_config
    from torch.fx.experimental import _config as fx_config
    for cfg, key, value in ((functorch_config, "recompute_views", True), (fx_config, "use_duck_shape", False)):
        if hasattr(cfg, key):
            stack.enter_context(cfg.patch(**{key: value}))
    return stack


class DecoderBranch(nn.Module):
    """One branch (L2R or R2L): W_init, embedding, GRU-1, AAM, GRU-2 and the deep output layer.

    The three gate matrices of each GRU input are stored as one [3n, in] Linear (order z, r, h):
    the same parameters as spec 3.1, one matmul instead of three.
    """

    def __init__(self, cfg: ModelConfig = ModelConfig()):
        super().__init__()
        D, n, m, K = cfg.feature_dim, cfg.hidden, cfg.embed, cfg.vocab_size
        self.cfg = cfg
        self.W_init = nn.Linear(D, n)
        self.embedding = nn.Embedding(K, m)
        self.W_y = nn.Linear(m, 3 * n)               # W_yz, W_yr, W_yh (+ biases)
        self.U_h = nn.Linear(n, 3 * n, bias=False)   # U_hz, U_hr, U_hh
        self.attention = CoverageAttention(cfg)
        self.W_c = nn.Linear(D, 3 * n, bias=False)   # W_cz, W_cr, W_ch
        self.U_h2 = nn.Linear(n, 3 * n)              # U_hz2, U_hr2, U_hh2 (+ biases)
        self.W_oc = nn.Linear(D, m)
        self.W_oh = nn.Linear(n, m)
        self.W_oy = nn.Linear(m, m)
        self.W_o = nn.Linear(m // 2, K)

    # ---- per image ------------------------------------------------------------------------------
    @staticmethod
    def valid_mean(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """mean_valid(F): features [N, D, H, W] averaged over the valid cells of mask [N, H, W] -> [N, D]."""
        m = mask.to(features.dtype).unsqueeze(1)
        return (features * m).sum((2, 3)) / m.sum((2, 3))

    def initial_state(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h_0 = tanh(W_init mean_valid(F)) (spec 3.2). features [N, D, H, W], mask [N, H, W] -> [N, n]."""
        return torch.tanh(self.W_init(self.valid_mean(features, mask)))

    def prepare(self, features: torch.Tensor, mask: torch.Tensor) -> FeatureCache:
        """Everything a step needs that does not depend on t: ``U_a F + b_a`` and the folded kernel."""
        weight, bias = self.attention.folded_coverage()
        return FeatureCache(features, mask.bool(), self.attention.U_a(features), weight, bias)

    # ---- the parts of a step --------------------------------------------------------------------
    @staticmethod
    def _gru1(gy: torch.Tensor, gh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """GRU-1 from the input part gy = W_y e + b and the recurrent part gh = U_h h (no bias)."""
        yz, yr, yh = gy.chunk(3, -1)
        hz, hr, hh = gh.chunk(3, -1)
        z = torch.sigmoid(hz + yz)
        r = torch.sigmoid(hr + yr)
        cand = torch.tanh(r * hh + yh)  # reset gate applied after U_hh (spec 3.3)
        return z * h + (1 - z) * cand

    @staticmethod
    def _gru2(gc: torch.Tensor, gu: torch.Tensor, h_hat: torch.Tensor) -> torch.Tensor:
        """GRU-2 from gc = W_c c (no bias) and gu = U_h2 h_hat + b (bias inside the reset product)."""
        cz, cr, ch = gc.chunk(3, -1)
        uz, ur, uh = gu.chunk(3, -1)
        z = torch.sigmoid(cz + uz)
        r = torch.sigmoid(cr + ur)
        cand = torch.tanh(ch + r * uh)
        return z * h_hat + (1 - z) * cand

    def attend(self, cache: FeatureCache, h_hat: torch.Tensor, coverage: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Folded coverage attention. Returns (alpha [N, H, W], context [N, D])."""
        att = self.attention
        cov = F.conv2d(coverage.unsqueeze(1), cache.cov_weight, cache.cov_bias,
                       padding=cache.cov_weight.shape[-1] // 2)                     # [N, d, H, W]
        s = cache.ua_f + cov + att.W_a(h_hat)[:, :, None, None]
        energy = torch.einsum("ndhw,d->nhw", torch.tanh(s), att.v.weight[0])    # b_v cancels
        energy = energy.masked_fill(~cache.mask, float("-inf"))
        alpha = torch.softmax(energy.flatten(1), 1).view_as(energy)                # max-subtracted
        context = torch.einsum("nhw,ndhw->nd", alpha, cache.features)
        return alpha, context

    def output_logits(self, context: torch.Tensor, hidden: torch.Tensor, oy: torch.Tensor) -> torch.Tensor:
        """Deep output: W_oc c + W_oh h + W_oy e, pairwise maxout, dropout, W_o. Any leading shape."""
        return self.W_o(self.maxout_dropout(self.W_oc(context) + self.W_oh(hidden) + oy))

    def maxout_dropout(self, o: torch.Tensor) -> torch.Tensor:
        """Pairwise maxout of adjacent units over the last axis (halving it), then dropout when training."""
        return F.dropout(o.unflatten(-1, (-1, 2)).amax(-1), self.cfg.dropout, self.training)

    # ---- one step (runtime form) ----------------------------------------------------------------
    def step(self, cache: FeatureCache, prev_token: torch.Tensor, hidden: torch.Tensor,
             coverage: torch.Tensor) -> StepOutput:
        """One decode step (spec 3.3) in the runtime form of spec 3.6."""
        e = self.embedding(prev_token)
        h_hat = self._gru1(self.W_y(e), self.U_h(hidden), hidden)
        alpha, context = self.attend(cache, h_hat, coverage)
        h = self._gru2(self.W_c(context), self.U_h2(h_hat), h_hat)
        logits = self.output_logits(context, h, self.W_oy(e))
        return StepOutput(logits, h, alpha, coverage + alpha)

    # ---- one step, literally as spec 3.3 (test oracle) ------------------------------------------
    def step_plain(self, features: torch.Tensor, mask: torch.Tensor, prev_token: torch.Tensor,
                   hidden: torch.Tensor, coverage: torch.Tensor) -> StepOutput:
        """Spec 3.3 without any of the runtime's algebra: two coverage convs, b_v, raw exp softmax."""
        att = self.attention
        e = self.embedding(prev_token)
        n = self.cfg.hidden
        Wy, by = self.W_y.weight, self.W_y.bias
        Uh = self.U_h.weight
        z1 = torch.sigmoid(e @ Wy[:n].T + by[:n] + hidden @ Uh[:n].T)
        r1 = torch.sigmoid(e @ Wy[n:2 * n].T + by[n:2 * n] + hidden @ Uh[n:2 * n].T)
        c1 = torch.tanh(r1 * (hidden @ Uh[2 * n:].T) + e @ Wy[2 * n:].T + by[2 * n:])
        h_hat = z1 * hidden + (1 - z1) * c1

        beta = coverage.unsqueeze(1)
        cl = att.Q_l(beta).permute(0, 2, 3, 1)                        # [N, H, W, d]
        cs = att.Q_s(beta).permute(0, 2, 3, 1)
        ua = att.U_a(features).permute(0, 2, 3, 1)
        s = ua + att.W_a(h_hat)[:, None, None, :] + att.U_l(cl) + att.U_s(cs)
        energy = att.v(torch.tanh(s))[..., 0]                         # [N, H, W], b_v included
        num = torch.exp(energy) * mask.to(energy.dtype)
        alpha = num / num.sum((1, 2), keepdim=True)
        context = torch.einsum("nhw,ndhw->nd", alpha, features)

        Wc, Uh2, bu = self.W_c.weight, self.U_h2.weight, self.U_h2.bias
        z2 = torch.sigmoid(context @ Wc[:n].T + h_hat @ Uh2[:n].T + bu[:n])
        r2 = torch.sigmoid(context @ Wc[n:2 * n].T + h_hat @ Uh2[n:2 * n].T + bu[n:2 * n])
        c2 = torch.tanh(context @ Wc[2 * n:].T + r2 * (h_hat @ Uh2[2 * n:].T + bu[2 * n:]))
        h = z2 * h_hat + (1 - z2) * c2

        o = self.W_oc(context) + self.W_oh(h) + self.W_oy(e)
        o = torch.maximum(o[:, 0::2], o[:, 1::2])
        logits = self.W_o(o)
        return StepOutput(logits, h, alpha, coverage + alpha)

    # ---- teacher forcing (training) -------------------------------------------------------------
    def _tf_step(self, cache: FeatureCache, gy_t: torch.Tensor, h: torch.Tensor, coverage: torch.Tensor,
                 attention_fp32: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One teacher-forced recurrence step: GRU-1, attention, coverage update, GRU-2.

        A pure function of its tensors and the module's parameters (no dropout, no RNG), so it can be
        compiled as a unit (``_compiled_tf_step``). ``gy_t`` is ``W_y e_t + b`` for this step.
        With ``attention_fp32`` the attention (``attend``: coverage conv, energies, softmax, context)
        runs with autocast disabled on fp32 inputs; ``cache`` must then hold fp32 tensors.
        Returns (h_t, context, alpha, coverage + alpha).
        """
        h_hat = self._gru1(gy_t, self.U_h(h), h)
        if attention_fp32:
            with torch.autocast(h_hat.device.type, enabled=False):
                alpha, context = self.attend(cache, h_hat.float(), coverage.float())
        else:
            alpha, context = self.attend(cache, h_hat, coverage)
        coverage = coverage + alpha
        h = self._gru2(self.W_c(context), self.U_h2(h_hat), h_hat)
        return h, context, alpha, coverage

    def _compiled_tf_step(self):
        """``_tf_step`` through ``torch.compile`` (inductor, dynamic shapes), built once per branch.

        The unbound function is compiled and the module passed as an argument, so a deep copy of the
        branch (which shares this attribute) still runs its own parameters; dynamo's cache lives on the
        function's code, so both branches share the compiled graphs (parameters are graph inputs).
        ``force_layout_optimization`` keeps inductor's convolution-backward lowering off the path that
        specialises the coverage map's H' and W' (torch 2.13 ``guard_int_seq`` on its strides), which
        would recompile for every new batch shape.
        """
        fn = self.__dict__.get("_tf_step_compiled")
        if fn is None:
            fn = torch.compile(DecoderBranch._tf_step, dynamic=True, fullgraph=True,
                               options={"force_layout_optimization": True})
            self.__dict__["_tf_step_compiled"] = fn
        return fn

    def teacher_forward(self, features: torch.Tensor, mask: torch.Tensor, inputs: torch.Tensor,
                        return_alpha: bool = False, attention_fp32: bool = False,
                        compile_step: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced logits [B, T, K] for input tokens [B, T] (spec 4.2).

        The time mask of spec 3.4 is not applied: padded steps come after every valid step of their
        sample and are masked out of every loss, so freezing the state there changes nothing.
        Embedding-side matmuls (W_y e, W_oy e) and the output layer run once for all steps; only the
        recurrence runs in the loop.

        ``attention_fp32``: the attention part (``U_a F``, the folded coverage kernel, coverage conv,
        energies, softmax, context) and the coverage sum run in fp32 with autocast disabled; the GRUs
        and the output layer stay under the caller's autocast. Without autocast it changes nothing.
        ``compile_step``: each time step runs ``_tf_step`` compiled with ``torch.compile`` (the
        Python loop over t stays), so inductor fuses the step's pointwise ops forward and backward.
        """
        if attention_fp32:
            with torch.autocast(features.device.type, enabled=False):
                cache = self.prepare(features.float(), mask)
        else:
            cache = self.prepare(features, mask)
        h = self.initial_state(features, cache.mask)
        # index_select, not nn.Embedding's forward: the same lookup, but its backward is an index_add with
        # no host synchronisation, which CUDA-graph capture of the training step requires; nn.Embedding's
        # CUDA backward sorts the indices, and we do not rely on that path being capturable.
        emb = self.embedding.weight.index_select(0, inputs.reshape(-1)).view(*inputs.shape, -1)   # [B, T, m]
        gy_all = self.W_y(emb)                             # [B, T, 3n]
        coverage = features.new_zeros(mask.shape, dtype=cache.ua_f.dtype)
        compiled = self._compiled_tf_step() if compile_step else None
        gy_steps = gy_all.transpose(0, 1).contiguous() if compile_step else gy_all.unbind(1)
        hiddens, contexts, alphas = [], [], []
        for t in range(inputs.shape[1]):
            if compiled is None or t == 0:
                # Step 0 runs eagerly: its zero coverage does not require grad, and a compiled call
                # with it would be a second graph (dynamo guards on requires_grad).
                h, context, alpha, coverage = self._tf_step(cache, gy_steps[t], h, coverage, attention_fp32)
            else:
                with _compile_config():
                    h, context, alpha, coverage = compiled(self, cache, gy_steps[t], h, coverage, attention_fp32)
            hiddens.append(h)
            contexts.append(context)
            if return_alpha:
                alphas.append(alpha)
        logits = self.output_logits(torch.stack(contexts, 1), torch.stack(hiddens, 1), self.W_oy(emb))
        return logits, (torch.stack(alphas, 1) if return_alpha else None)
