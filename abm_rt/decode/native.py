"""Decode steps through the native extension ``abm_rt._C`` (the C++ twin, or the CUDA twin when built with nvcc).

``NativeDecoder`` packs one ``DecoderBranch``'s weights once (spec 3.6 runtime form):

- ``gy_table = E W_y^T + b_y`` [K, 3n] and ``oy_table = E W_oy^T + b_oy + b_oc + b_oh`` [K, m], so the
  embedding-side matmuls become row lookups by the previous token;
- the folded 11x11 coverage kernel ``U_l Q_l + U_s pad(Q_s)`` and its bias ``b_l + b_s``;
- the seven step linears in FP32, FP16 or INT8 (symmetric per-output-channel: ``scale = max|w_row| / 127``,
  ``w_q = round(w / scale)``).

The packed tables and biases are always computed in float64 and stored in FP32. ``prepare`` turns a
padded feature batch into the per-image tensors (``F`` as [B, L, D] and ``U_a F + b_a`` as [B, L, d],
in the feature dtype) once per batch; ``step`` then runs one decode step for N = images x beams rows.

The extension is imported lazily: importing this module never fails, ``is_available`` says whether a
device can be used, and ``NativeDecoder`` raises ImportError with a hint when ``_C`` is not built.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..model.decoder import DecoderBranch

WEIGHT_DTYPES = ("fp32", "fp16", "int8")
FEAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def load_extension():
    """Import and return ``abm_rt._C``; raises ImportError saying how to build it."""
    try:
        from .. import _C  # noqa: PLC0415 (lazy on purpose: optional compiled dependency)
    except ImportError as e:
        raise ImportError(
            "abm_rt._C (the native decode step) is not built or failed to load: reinstall abm_rt with a C++17 "
            "compiler available (`pip install .`, or `python setup.py build_ext --inplace` in a checkout) and "
            f"ABM_RT_NO_EXTENSION unset. Original error: {e}"
        ) from e
    return _C


def is_available(device: torch.device | str = "cpu") -> bool:
    """Whether ``abm_rt._C`` is importable and can run on ``device`` ('cpu', or 'cuda' with a CUDA build and a GPU)."""
    try:
        _C = load_extension()
    except ImportError:
        return False
    dev = torch.device(device)
    if dev.type == "cpu":
        return True
    if dev.type == "cuda":
        return bool(_C.built_with_cuda() and _C.cuda_available() and torch.cuda.is_available())
    return False


@contextlib.contextmanager
def _process_switch(name: str, value: int) -> Iterator[None]:
    """Set the extension's process-wide switch ``name`` (``set_<name>`` / ``<name>``) in a block, then restore it."""
    _C = load_extension()
    old = getattr(_C, name)()
    getattr(_C, f"set_{name}")(value)
    try:
        yield
    finally:
        getattr(_C, f"set_{name}")(old)


def few_rows_linear(max_n: int = 32) -> contextlib.AbstractContextManager[None]:
    """Within the block, the CUDA linears of N <= ``max_n`` rows take the one-warp-per-output kernel.

    That kernel (``linear_rows_kernel``, for batch 1-3 x beam 10) is on by default for N <= 32; ``max_n`` 0 turns
    it off (the tiled kernel for every N), as ``tiled_kernels`` does. Process-wide, restored on exit.
    Raises RuntimeError in a CPU-only build, ValueError outside 0..32."""
    return _process_switch("linear_rows_max_n", max_n)


def split_energy(max_splits: int = 16) -> contextlib.AbstractContextManager[None]:
    """Within the block, the CUDA coverage energy may run as up to ``max_splits`` channel slices, each its own
    blocks, when rows x position tiles are too few blocks to fill the GPU (batch 1 x beam 10: 20 blocks on a
    132-SM H200); softmax_context adds the slices' partial sums in order, so results stay deterministic.

    On by default (16); ``max_splits`` 1 turns it off. Process-wide, restored on exit. Raises RuntimeError in a
    CPU-only build, ValueError outside 1..16."""
    return _process_switch("energy_max_splits", max_splits)


@contextlib.contextmanager
def tiled_kernels() -> Iterator[None]:
    """Within the block, the CUDA step runs without its small-batch kernels (no few-rows linear, no energy
    split): the tiled kernels for every batch, as before those were validated. For tests and benchmarks that
    compare both paths. Process-wide, restored on exit; RuntimeError in a CPU-only build."""
    with few_rows_linear(0), split_energy(1):
        yield


def _resolve_device(device: torch.device | str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a cpu or cuda device, got {dev}")
    return dev


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


@dataclass
class PackedLinear:
    """One linear in kernel form: ``lin`` (an ``_C.LinearWeights``) points into the tensors held here."""

    lin: object                    # _C.LinearWeights
    weight: torch.Tensor           # [out, in] float32, float16 or int8 (as stored)
    scale: torch.Tensor | None     # [out] float32, INT8 only
    bias: torch.Tensor | None      # [out] float32

    def dequantized(self) -> torch.Tensor:
        """The weights the kernel actually multiplies by, as float64 [out, in] (for references)."""
        w = self.weight.double()
        return w * self.scale.double()[:, None] if self.scale is not None else w


def pack_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: str,
                device: torch.device | str = "cpu") -> PackedLinear:
    """Pack a [out, in] weight (and optional bias) for ``_C``.

    Args:
        weight: float weights [out, in].
        bias: [out] or None (kept FP32 whatever the weight dtype).
        dtype: 'fp32', 'fp16' or 'int8' (symmetric per output channel).
        device: where the packed tensors live.
    """
    _C = load_extension()
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight dtype must be one of {WEIGHT_DTYPES}, got {dtype!r}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out, in], got shape {tuple(weight.shape)}")
    w = weight.detach().to(device=device, dtype=torch.float32)
    scale = None
    if dtype == "fp32":
        stored, kind = w.contiguous(), _C.DType.F32
    elif dtype == "fp16":
        stored, kind = w.half().contiguous(), _C.DType.F16
    else:
        scale = (w.abs().amax(1) / 127.0).contiguous()                              # [out]
        q = torch.round(w / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None])
        stored, kind = q.clamp_(-127, 127).to(torch.int8).contiguous(), _C.DType.I8
    b = None if bias is None else bias.detach().to(device=device, dtype=torch.float32).contiguous()
    lin = _C.LinearWeights()
    lin.w, lin.scale, lin.bias = stored.data_ptr(), _ptr(scale), _ptr(b)
    lin.out, lin.in_ = w.shape
    lin.type = kind
    return PackedLinear(lin, stored, scale, b)


@dataclass
class NativeFeatures:
    """Per-batch tensors of ``NativeDecoder.prepare``: computed once, read by every step."""

    feats: torch.Tensor  # F            [B, L, D] feature dtype
    uaf: torch.Tensor    # U_a F + b_a  [B, L, d] feature dtype
    hv: torch.Tensor     # [B] int32 valid grid rows (images sit top-left)
    wv: torch.Tensor     # [B] int32 valid grid columns
    H: int
    W: int

    @property
    def B(self) -> int:
        """Number of images."""
        return self.feats.shape[0]

    def subset(self, images: torch.Tensor) -> NativeFeatures:
        """The tensors of ``images`` alone (int64 indices on the feature device), in that order."""
        return NativeFeatures(self.feats.index_select(0, images), self.uaf.index_select(0, images),
                              self.hv.index_select(0, images), self.wv.index_select(0, images), self.H, self.W)


@dataclass
class NativeStepOutput:
    """One step's outputs (FP32): the next state, the attention and the token scores."""

    log_probs: torch.Tensor  # [N, K]
    hidden: torch.Tensor     # h_t [N, n]
    alpha: torch.Tensor      # [N, H, W], exactly 0 outside each image's valid extent
    coverage: torch.Tensor   # beta_{t+1} [N, H, W]
    context: torch.Tensor    # [N, D]


class NativeDecoder:
    """One decoder branch packed for ``_C.decode_step`` on one device.

    Args:
        branch: the PyTorch branch (weights are read once, at construction).
        device: 'cpu' or a CUDA device (needs a CUDA build of ``_C``).
        weight_dtype: 'fp32', 'fp16' or 'int8' for the seven step linears.
        feat_dtype: 'fp32' or 'fp16' for F, U_a F and the folded coverage kernel.
        poison: fill every output and scratch buffer with NaN before each call (tests: an element the
            kernel fails to write shows up as NaN).

    Thread safety: the packed weights are read-only, so several threads may call ``step`` on one decoder
    (each call allocates its own outputs and scratch); on CUDA each call runs on the caller's current stream.
    """

    def __init__(self, branch: DecoderBranch, device: torch.device | str = "cpu", weight_dtype: str = "fp32",
                 feat_dtype: str = "fp32", poison: bool = False):
        self._C = _C = load_extension()
        self.device = _resolve_device(device)
        if self.device.type == "cuda" and not _C.built_with_cuda():
            raise RuntimeError("abm_rt._C was built without CUDA; use device='cpu' or rebuild with nvcc")
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
        if feat_dtype not in FEAT_DTYPES:
            raise ValueError(f"feat_dtype must be one of {tuple(FEAT_DTYPES)}, got {feat_dtype!r}")
        self.weight_dtype, self.feat_dtype = weight_dtype, feat_dtype
        self.feat_torch_dtype = FEAT_DTYPES[feat_dtype]
        self.poison = poison
        cfg = branch.cfg
        self.K, self.m, self.n, self.d, self.D = cfg.vocab_size, cfg.embed, cfg.hidden, cfg.attn, cfg.feature_dim
        self.ksize = cfg.cov_large
        dev, f32 = self.device, torch.float32

        with torch.no_grad():
            E = branch.embedding.weight.double()                                          # [K, m]
            gy = E @ branch.W_y.weight.double().T + branch.W_y.bias.double()              # [K, 3n]
            oy = (E @ branch.W_oy.weight.double().T + branch.W_oy.bias.double()
                  + branch.W_oc.bias.double() + branch.W_oh.bias.double())                # [K, m]
            att = copy.deepcopy(branch.attention).double()
            cov_w, cov_b = att.folded_coverage()                                          # [d, 1, k, k], [d]
            self.gy_table = gy.to(dev, f32).contiguous()
            self.oy_table = oy.to(dev, f32).contiguous()
            self.cov_w = cov_w.reshape(self.d, -1).to(dev, self.feat_torch_dtype).contiguous()
            self.cov_b = cov_b.to(dev, f32).contiguous()
            self.v = branch.attention.v.weight.detach()[0].to(dev, f32).contiguous()
            U_a = branch.attention.U_a
            self.U_a_weight = U_a.weight.detach().reshape(self.d, self.D).to(dev, f32).contiguous()
            self.U_a_bias = U_a.bias.detach().to(dev, f32).contiguous()
            wd = weight_dtype
            self.linears = {
                "U_h": pack_linear(branch.U_h.weight, None, wd, dev),
                "W_a": pack_linear(branch.attention.W_a.weight, None, wd, dev),
                "W_c": pack_linear(branch.W_c.weight, None, wd, dev),
                "U_h2": pack_linear(branch.U_h2.weight, branch.U_h2.bias, wd, dev),
                "W_oc": pack_linear(branch.W_oc.weight, None, wd, dev),     # bias folded into oy_table
                "W_oh": pack_linear(branch.W_oh.weight, None, wd, dev),     # bias folded into oy_table
                "W_o": pack_linear(branch.W_o.weight, branch.W_o.bias, wd, dev),
            }
        self.branch = branch

        w = _C.DecoderWeights()
        w.K, w.m, w.n, w.d, w.D, w.ksize = self.K, self.m, self.n, self.d, self.D, self.ksize
        w.gy_table, w.oy_table = self.gy_table.data_ptr(), self.oy_table.data_ptr()
        for name, packed in self.linears.items():
            setattr(w, name, packed.lin)
        w.cov_w, w.cov_b, w.v = self.cov_w.data_ptr(), self.cov_b.data_ptr(), self.v.data_ptr()
        w.feat_type = _C.DType.F16 if feat_dtype == "fp16" else _C.DType.F32
        self.weights = w   # holds pointers into the tensors above, which live as long as self

    # ---- per batch -------------------------------------------------------------------------------
    def prepare(self, features: torch.Tensor, mask: torch.Tensor | None = None, *,
                hv: torch.Tensor | None = None, wv: torch.Tensor | None = None) -> NativeFeatures:
        """Per-batch tensors for ``step``.

        Args:
            features: encoder output [B, D, H, W] (padded cells may hold anything finite).
            mask: valid cells [B, H, W]; each image's valid cells must be a top-left rectangle.
            hv, wv: instead of ``mask``, each image's valid rows / columns [B].
        Returns:
            NativeFeatures with F [B, L, D] and U_a F + b_a [B, L, d] (feature dtype) and the extents.
        """
        if features.dim() != 4 or features.shape[1] != self.D:
            raise ValueError(f"features must be [B, {self.D}, H, W], got {tuple(features.shape)}")
        B, _, H, W = features.shape
        if (mask is None) == (hv is None or wv is None):
            raise ValueError("pass either mask or both hv and wv")
        if mask is not None:
            if tuple(mask.shape) != (B, H, W):
                raise ValueError(f"mask must be [{B}, {H}, {W}], got {tuple(mask.shape)}")
            mask = mask.to(self.device).bool()
            hv, wv = mask.any(2).sum(1), mask.any(1).sum(1)
            rect = ((torch.arange(H, device=self.device)[None, :, None] < hv[:, None, None])
                    & (torch.arange(W, device=self.device)[None, None, :] < wv[:, None, None]))
            if not torch.equal(rect, mask):
                raise ValueError("mask: each image's valid cells must be a top-left rectangle (padded batches)")
        hv = torch.as_tensor(hv).to(self.device, torch.int32).contiguous()
        wv = torch.as_tensor(wv).to(self.device, torch.int32).contiguous()
        if hv.shape != (B,) or wv.shape != (B,):
            raise ValueError(f"hv and wv must be [{B}], got {tuple(hv.shape)} and {tuple(wv.shape)}")
        if bool(((hv < 1) | (hv > H) | (wv < 1) | (wv > W)).any()):
            raise ValueError(f"valid extents must be within [1, H={H}] x [1, W={W}], got hv={hv.tolist()} wv={wv.tolist()}")
        with torch.no_grad():
            F = features.detach().to(self.device, torch.float32).flatten(2).transpose(1, 2).contiguous()  # [B, L, D]
            uaf = torch.addmm(self.U_a_bias, F.view(-1, self.D), self.U_a_weight.T).view(B, H * W, self.d)
        return NativeFeatures(F.to(self.feat_torch_dtype).contiguous(), uaf.to(self.feat_torch_dtype).contiguous(),
                              hv, wv, H, W)

    def initial_state(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h_0 [B, n] from the PyTorch branch (spec 3.2; once per image, not a per-step cost)."""
        # The PyTorch branch may live on another device than this decoder (a CPU model driving the
        # CUDA kernels): run it where its weights are, hand the result to this decoder's device.
        where = next(self.branch.parameters()).device
        with torch.no_grad():
            return self.branch.initial_state(features.to(where), mask.to(where)).float().to(self.device)

    # ---- per step --------------------------------------------------------------------------------
    def _empty(self, *shape: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=torch.float32, device=self.device)
        return t.fill_(float("nan")) if self.poison else t

    def _rows(self, x: torch.Tensor, name: str, N: int) -> torch.Tensor:
        if x.shape != (N,):
            raise ValueError(f"{name} must be [{N}], got {tuple(x.shape)}")
        return x.to(self.device, torch.int32).contiguous()

    def _state(self, x: torch.Tensor, name: str, shape: tuple) -> torch.Tensor:
        if x.numel() != _prod(shape) or x.shape[0] != shape[0]:
            raise ValueError(f"{name} must be {list(shape)}, got {tuple(x.shape)}")
        return x.detach().to(self.device, torch.float32).reshape(shape).contiguous()

    def _tensors(self, feats: NativeFeatures, N: int, row_image: torch.Tensor, coverage: torch.Tensor):
        """StepTensors with the per-batch and attention fields set, and the tensors they point to."""
        if not isinstance(feats, NativeFeatures):
            raise TypeError("feats must come from NativeDecoder.prepare")
        L = feats.H * feats.W
        row_image = self._rows(row_image, "row_image", N)
        coverage = self._state(coverage, "coverage", (N, L))
        if row_image.device.type == "cpu" and bool(((row_image < 0) | (row_image >= feats.B)).any()):
            raise ValueError(f"row_image values must be in [0, {feats.B})")
        t = self._C.StepTensors()
        t.N, t.B, t.H, t.W = N, feats.B, feats.H, feats.W
        # CUDA: the energy scratch holds this many [N, L] channel slices (``split_energy``); the CPU ignores it
        t.energy_splits = self._C.energy_splits(N, L, self.d) if self.device.type == "cuda" else 1
        t.row_image, t.hv, t.wv = row_image.data_ptr(), feats.hv.data_ptr(), feats.wv.data_ptr()
        t.feats, t.uaf, t.coverage = feats.feats.data_ptr(), feats.uaf.data_ptr(), coverage.data_ptr()
        return t, [row_image, coverage]

    def _call(self, fn, *args) -> None:
        dev = self.device.type
        if dev == "cuda":
            with torch.cuda.device(self.device):
                fn(*args, dev, torch.cuda.current_stream(self.device).cuda_stream)
        else:
            fn(*args, dev)

    # ---- beam bookkeeping (used by native_search) ----------------------------------------------------
    def beam_state(self):
        """A fresh ``_C.BeamState`` for ``beam_select``."""
        return self._C.BeamState()

    def beam_select(self, state) -> None:
        """One beam-search bookkeeping step on this decoder's device (see csrc/decode/beam_select.h)."""
        self._call(self._C.beam_select, state)

    def gather_rows(self, src: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Row r of the result is ``src[rows[r]]`` (float32 rows; rows: int32 on this device).

        Args:
            out: where to write (same shape and dtype as ``src``, contiguous, not overlapping ``src``),
                e.g. a static buffer of a CUDA graph; None allocates a new tensor.
        Returns:
            ``out``, or the new tensor.
        """
        if out is None:
            out = torch.empty_like(src)
        elif out.shape != src.shape or out.dtype != src.dtype or out.device != src.device or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {src.dtype} tensor of shape {tuple(src.shape)} on "
                             f"{src.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
        elif _overlap(out, src):
            raise ValueError("gather_rows: out must not alias src (rows are read while others are written)")
        self._call(self._C.gather_rows, src.data_ptr(), rows.data_ptr(), out.data_ptr(), rows.numel(),
                   src[0].numel())
        return out

    def step(self, feats: NativeFeatures, prev_token: torch.Tensor, hidden: torch.Tensor, coverage: torch.Tensor,
             row_image: torch.Tensor) -> NativeStepOutput:
        """One decode step for N rows.

        Args:
            feats: from ``prepare`` (B images).
            prev_token: [N] previous tokens.
            hidden: h_{t-1} [N, n].
            coverage: beta_t [N, H, W] (or [N, L]); zero outside each row's valid extent.
            row_image: [N] image of each row (beams of one image share its features).
        Returns:
            NativeStepOutput (log_probs, hidden, alpha, coverage, context), new FP32 tensors on the device.
        """
        N = prev_token.shape[0] if prev_token.dim() == 1 else -1
        if N <= 0:
            raise ValueError(f"prev_token must be [N] with N > 0, got {tuple(prev_token.shape)}")
        t, keep = self._tensors(feats, N, row_image, coverage)
        prev = self._rows(prev_token, "prev_token", N)
        hidden = self._state(hidden, "hidden", (N, self.n))
        if prev.device.type == "cpu" and bool(((prev < 0) | (prev >= self.K)).any()):
            raise ValueError(f"prev_token values must be in [0, {self.K})")
        t.prev_token, t.hidden = prev.data_ptr(), hidden.data_ptr()
        n, d, m, L = self.n, self.d, self.m, feats.H * feats.W
        sizes = {"gates": 3 * n, "h_hat": n, "wa": d, "energy": t.energy_splits * L, "gates2": 3 * n, "gates2u": 3 * n,
                 "out_pre": m}
        scratch = self._empty(N * sum(sizes.values()))
        offset = 0
        for name, size in sizes.items():
            setattr(t, name, scratch.data_ptr() + 4 * offset)   # float32: 4 bytes
            offset += N * size
        out = NativeStepOutput(self._empty(N, self.K), self._empty(N, n), self._empty(N, feats.H, feats.W),
                               self._empty(N, feats.H, feats.W), self._empty(N, self.D))
        t.log_probs, t.hidden_out = out.log_probs.data_ptr(), out.hidden.data_ptr()
        t.alpha, t.coverage_out, t.context = out.alpha.data_ptr(), out.coverage.data_ptr(), out.context.data_ptr()
        self._call(self._C.decode_step, self.weights, t)
        del keep, prev, hidden, scratch   # stream-ordered frees: safe after an async CUDA launch
        return out

    def attend(self, feats: NativeFeatures, wa: torch.Tensor, coverage: torch.Tensor, row_image: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Coverage attention alone (``_C.coverage_attention``), for tests and profiling.

        Args:
            wa: W_a h_hat [N, d].
            coverage, row_image: as in ``step``.
        Returns:
            (alpha [N, H, W], context [N, D], coverage_out [N, H, W]).
        """
        N = wa.shape[0]
        t, keep = self._tensors(feats, N, row_image, coverage)
        wa = self._state(wa, "wa", (N, self.d))
        t.wa = wa.data_ptr()
        energy = self._empty(t.energy_splits, N, feats.H * feats.W)
        alpha, cov_out = self._empty(N, feats.H, feats.W), self._empty(N, feats.H, feats.W)
        context = self._empty(N, self.D)
        t.energy, t.alpha, t.coverage_out, t.context = (energy.data_ptr(), alpha.data_ptr(), cov_out.data_ptr(),
                                                        context.data_ptr())
        self._call(self._C.coverage_attention, self.weights, t)
        del keep, wa, energy
        return alpha, context, cov_out


def _prod(shape) -> int:
    p = 1
    for s in shape:
        p *= s
    return p


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of two tensors overlap (contiguous tensors: exact)."""
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()
