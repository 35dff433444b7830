"""The PyTorch encoder: an inference copy of the reference encoder (BN folded, dropout gone), on CPU or CUDA.

On CUDA it can run in FP16 and replay CUDA graphs captured per input-size bucket (see ``TorchEncoder``).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..model import ABM
from ..model.config import feature_size
from ..model.encoder import feature_mask
from ..model.fold import fold_batchnorm, has_batchnorm_or_dropout
from .base import EncoderBackend

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
PADDING_NOTE = ("bucket padding (zeros, bottom/right) is not exact: after the folded BN the padding is non-zero and "
                "reaches valid cells within the receptive field of the canvas edge through the 3x3 convs and "
                "pools (spec 5.2); measured on the bundled trained engine, the valid cells next to the canvas "
                "edge change by up to 0.4-0.7 of max|F| (H100, FP32); pass bucket_pad=False for features equal "
                "to encoding the Recognizer's canvas as it is")


_CAPTURE_LOCK = threading.Lock()   # process-wide: CUDA graph captures never overlap


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@dataclass
class _Graph:
    """One captured bucket: replaying ``graph`` reads ``static_in`` and writes ``static_out``."""

    graph: Any                      # torch.cuda.CUDAGraph
    static_in: torch.Tensor         # [B, 1, H, W] in the encoder's dtype / memory format
    static_out: torch.Tensor        # [B, D, H', W'] in the encoder's dtype, lives in the graphs' memory pool


class TorchEncoder(EncoderBackend):
    """The encoder in PyTorch, prepared for inference.

    At construction an inference copy of ``model.encoder`` is made on ``device``: every BatchNorm is folded
    into the conv before it (exact in eval mode; the conv gets a bias), dropout is removed, the weights are
    optionally cast to FP16 and put in channels_last memory format. ``model`` itself is not changed.

    Args:
        model: the ABM model (its ``encoder`` and ``cfg`` are used).
        device: "cpu" or "cuda[:N]"; the features are returned there.
        precision: "fp32", or "fp16" (CUDA only): the input is cast to half and the features back to
            float32 (the decoder runs in FP32).
        channels_last: run the convolutions in NHWC memory format (the features are returned NCHW).
        cuda_graphs: on CUDA, capture one ``torch.cuda.CUDAGraph`` per input shape (per bucket when
            ``bucket_pad``) and replay it; ignored on CPU.
        max_graphs: at most this many graphs are kept (least recently used goes first).
        bucket_pad: pad each batch further, with zeros at the bottom/right, to a bucket shape: B up to a
            power of two (batches over ``max_batch`` are not bucketed, and run without a graph), H up to a
            multiple of ``height_step``, W of ``width_step``, so few shapes reach the graphs. The features
            are cut back to ceil(H/16) x ceil(W/16) of the input and the mask comes from the input's pixel
            mask. Not exact (spec 5.2): valid cells near the input canvas' bottom/right edge change, those of
            images that reach that edge. Measured: up to 4.5e-2 of max|F| on the small random test model
            (tests/test_torch_backend.py), up to 0.4-0.7 of max|F| on the bundled trained engine (H100, FP32,
            random ink images); whether recognition changes is for an accuracy evaluation to say. None
            (default): on when CUDA graphs run, off otherwise; False with graphs: one graph per exact shape
            (exact features, more captures: a capture costs about 0.1-0.25 s, a replay 1-5 ms on an H100).
        max_batch, height_step, width_step: the buckets (see ``bucket_pad``).
        warmup: eager runs on a side stream before a capture (cuDNN and allocator warm-up).

    Graphs share one memory pool: they only ever run one at a time, under a lock, each call's stream
    waiting for the previous call's copy-out (an event), and the features are copied out of the static
    output before ``encode`` returns, so a later replay never overwrites what a caller holds. FP32 on
    CUDA follows PyTorch's TF32 setting for cuDNN (``torch.backends.cudnn.allow_tf32``, on by default),
    which ``describe()`` reports; this backend does not change it.
    """

    name = "pytorch"

    def __init__(self, model: ABM, device: str | torch.device = "cpu", precision: str = "fp32",
                 channels_last: bool = True, cuda_graphs: bool = True, max_graphs: int = 32,
                 bucket_pad: bool | None = None, max_batch: int = 32, height_step: int = 32,
                 width_step: int = 64, warmup: int = 2):
        self.device = torch.device(device)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError(f"precision='fp16' needs a CUDA device (device is {self.device}): PyTorch's CPU "
                             f"convolutions are not run in half precision here; use precision='fp32' on CPU")
        if max_graphs < 0 or max_batch < 1 or height_step < 1 or width_step < 1 or warmup < 0:
            raise ValueError("max_graphs and warmup must be >= 0, max_batch, height_step and width_step >= 1")
        self.cfg = model.cfg
        self.precision, self.dtype = precision, PRECISIONS[precision]
        self.channels_last = bool(channels_last)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format

        encoder = fold_batchnorm(model.encoder)
        encoder.requires_grad_(False)
        encoder = encoder.to(self.device, self.dtype)
        if self.channels_last:
            encoder = encoder.to(memory_format=torch.channels_last)
        self.encoder = encoder.eval()
        left = has_batchnorm_or_dropout(self.encoder)
        assert not left, left

        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda" and max_graphs > 0
        self.bucket_pad = self.cuda_graphs if bucket_pad is None else bool(bucket_pad)
        self.max_graphs, self.max_batch, self.warmup = max_graphs, max_batch, warmup
        self.height_step, self.width_step = height_step, width_step
        self._graphs: OrderedDict[tuple[int, int, int], _Graph] = OrderedDict()
        self._pool = None                 # one CUDA graph memory pool for every capture, made on first use
        self._lock = threading.Lock()     # captures, replays and the static buffers are one at a time
        self._done: Any = None            # CUDA event: the last replay's copy-out, on its caller's stream
        self.captures = self.replays = self.evictions = 0

    # ---- shapes ------------------------------------------------------------------------------------
    def bucket_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int]:
        """(B, H, W) of the canvas an input of this shape is padded to (itself when not bucketing)."""
        if not self.bucket_pad or batch > self.max_batch:
            return batch, height, width
        return (min(_next_pow2(batch), self.max_batch), -(-height // self.height_step) * self.height_step,
                -(-width // self.width_step) * self.width_step)

    # ---- encode ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, images: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"images must be [B, 1, H, W], got {tuple(images.shape)}")
        b, _, h, w = images.shape
        if tuple(pixel_mask.shape) != (b, h, w):
            raise ValueError(f"pixel_mask must be [B, H, W] = {(b, h, w)}, got {tuple(pixel_mask.shape)}")
        hf, wf = feature_size(h, w, self.cfg)
        mask = feature_mask(pixel_mask.bool(), self.cfg).to(self.device)
        shape = self.bucket_shape(b, h, w)
        x = images.to(self.device, self.dtype)
        if self.cuda_graphs and b <= self.max_batch:
            with self._lock, torch.cuda.device(self.device):
                stream = torch.cuda.current_stream(self.device)
                if self._done is not None:          # the last caller's stream may differ from ours
                    stream.wait_event(self._done)
                out = self._run_graph(shape, x)
                # A copy: the static output is overwritten by the next replay (of any graph: shared pool).
                features = out[:b, :, :hf, :wf].to(torch.float32, memory_format=torch.contiguous_format,
                                                   copy=True)
                if self._done is None:
                    self._done = torch.cuda.Event()
                self._done.record(stream)
            return features, mask
        if shape != (b, h, w):
            x = F.pad(x, (0, shape[2] - w, 0, shape[1] - h, 0, 0, 0, shape[0] - b))
        out = self.encoder(x.contiguous(memory_format=self.memory_format))
        features = out[:b, :, :hf, :wf].to(torch.float32).contiguous()
        return features, mask

    def _run_graph(self, shape: tuple[int, int, int], x: torch.Tensor) -> torch.Tensor:
        """Copy ``x`` into the bucket's static input (zeros around it), replay, return the static output."""
        entry = self._graphs.get(shape)
        if entry is None:
            entry = self._capture(shape)
            self._graphs[shape] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
                self.evictions += 1
        else:
            self._graphs.move_to_end(shape)
        b, _, h, w = x.shape
        if (b, h, w) != shape:
            entry.static_in.zero_()
        entry.static_in[:b, :, :h, :w].copy_(x)
        entry.graph.replay()
        self.replays += 1
        return entry.static_out

    def _capture(self, shape: tuple[int, int, int]) -> _Graph:
        """Warm up on a side stream, then capture the encoder on a zero static input of ``shape``."""
        b, h, w = shape
        static_in = torch.zeros(b, 1, h, w, device=self.device, dtype=self.dtype
                                ).contiguous(memory_format=self.memory_format)
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.encoder(static_in)
        current.wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (another Recognizer, this one's callers copying their next batch
        # to the GPU) may keep using CUDA while this thread captures on its own side stream. One capture
        # at a time in the process: two encoders capturing at once made the caching allocator fail
        # ("beginAllocateToPool: already recording to mempool") in the 8-thread test on an H100.
        with _CAPTURE_LOCK, torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            static_out = self.encoder(static_in)
        self.captures += 1
        return _Graph(graph, static_in, static_out)

    def clear_graphs(self) -> None:
        """Drop every captured graph (their memory returns to the pool / allocator)."""
        with self._lock:
            self._graphs.clear()

    # ---- describe ----------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        if self.cuda_graphs:
            why = None
        elif self.device.type != "cuda":
            why = f"CUDA graphs need a CUDA device (device is {self.device})"
        else:
            why = "turned off (cuda_graphs=False or max_graphs=0)"
        buckets = "B: powers of two up to {0}, H: multiples of {1}, W: multiples of {2}".format(
            self.max_batch, self.height_step, self.width_step)
        return {
            "backend": self.name, "device": str(self.device), "torch": torch.__version__,
            "threads": torch.get_num_threads() if self.device.type == "cpu" else None,
            "precision": self.precision, "channels_last": self.channels_last,
            "bn_folded": True, "dropout_removed": True,
            "cudnn_tf32": (torch.backends.cudnn.allow_tf32 if self.device.type == "cuda" and self.precision == "fp32"
                           else None),
            "graphs": {"enabled": self.cuda_graphs, "why_not": why, "count": len(self._graphs),
                       "buckets": [f"{b}x{h}x{w}" for b, h, w in self._graphs], "max_graphs": self.max_graphs,
                       "captures": self.captures, "replays": self.replays, "evictions": self.evictions},
            "bucket_pad": self.bucket_pad,
            "bucketing": (buckets + "; " + PADDING_NOTE) if self.bucket_pad else
                         "off: each batch runs at the Recognizer's padded shape (exact)",
        }
