"""The Recognizer: images in, LaTeX out. It orchestrates only; each step lives in its own module:
image decoding (data/images), size bucketing and padding (data/buckets), encoding (model), beam
search (decode), ids -> LaTeX (data/vocab)."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .data.buckets import CanvasGrid, pad_batch, size_batches
from .data.images import ImageError, ImageOptions, LoadedImage, load_image
from .data.vocab import EOS_ID, SOS_ID
from .backends import choose_encoder_backend
from .decode import beam_search
from .decode.rescore import rescore_with_r2l
from .engine_dir import Engine, EngineError, contains_engine, default_engine_path, load_engine
from .result import Result

# Items that predict() treats as one image rather than as a batch of images.
_SINGLE = (str, Path, bytes, bytearray, memoryview, np.ndarray, torch.Tensor)


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> CUDA when available, else CPU; an explicit CUDA device must exist."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {str(device)!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but this PyTorch sees no CUDA GPU: use device='cpu' or 'auto'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {str(device)!r}")
    return dev


def choose_decoder(preference: str, device: torch.device) -> tuple[str, str]:
    """("native" or "pytorch", why). The native search (abm_rt._C) is tested against the PyTorch one in CI
    on the CPU and, on an H100, on CROHME 2014: 99.9 % of images give the same tokens in FP32 and the
    ExpRate is equal in FP16 (benchmarks/results/decoders_H100_*.json), 2-5x faster."""
    from .decode import native

    if preference not in ("auto", "native", "pytorch"):
        raise ValueError(f"decoder must be 'auto', 'native' or 'pytorch', got {preference!r}")
    if preference == "pytorch":
        return "pytorch", "asked for"
    available = native.is_available(device)
    if preference == "native":
        if not available:
            raise ValueError(f"decoder='native' needs abm_rt._C built{' with CUDA' if device.type == 'cuda' else ''} "
                             f"(pip install . with nvcc on PATH for CUDA)")
        return "native", "asked for"
    if device.type == "cpu" and available:
        return "native", "abm_rt._C is built: the C++ decode step and beam search (same results as PyTorch's)"
    if device.type == "cuda" and available:
        return "native", "abm_rt._C is built with CUDA: the fused CUDA decode step and device beam search"
    return "pytorch", f"abm_rt._C is not built{' with CUDA' if device.type == 'cuda' else ''}"


def load_default_engine() -> Engine:
    """The engine bundled inside the package, or a clear error when this build bundles none."""
    path = default_engine_path()
    if not contains_engine(path):
        raise EngineError("no trained model is bundled with this abm_rt yet: pass Recognizer(engine=PATH) with an "
                          "engine directory (written by the trainer, `python -m training`)")
    return load_engine(path)


class Recognizer:
    """Recognizes handwritten math in images and returns LaTeX.

    Args:
        engine: an engine directory (path), a loaded ``Engine``, or None for the bundled default.
        device: "auto" (CUDA when available), "cpu" or "cuda[:N]".
        beam_size: beam width k (the paper uses 10).
        max_batch_size: images encoded and decoded together (similar sizes are grouped).
        max_batch_pixels: padded pixels per batch (bounds memory).
        max_len: decode steps before an unfinished hypothesis is returned with ``truncated=True``.
        image_options: how inputs are normalized (inversion, binarization, rescaling, pixel cap).
        encoder_backend: "auto" (see ``abm_rt.backends.select``), "pytorch", "onnxruntime" or "tensorrt".
        decoder: "auto", "native" (abm_rt._C: C++ or CUDA kernels) or "pytorch" (see ``choose_decoder``).
        decoder_precision: the native decoder's weights: "fp32", "fp16" (FP16 weights and features) or
            "int8" (INT8 weights with per-channel scales, FP16 features); accumulation is always FP32.
        compact: native search: finished images leave the working batch (same results, less work when a
            batch's expressions differ in length; see ``native_search._eager_search``). On by default: on an
            H200 it gave the same tokens and 3.3x the images/s at batch 256
            (``benchmarks/results/decoders_H200_2026-12-02.json``).
        decoder_graphs: native search on CUDA: replay the decode steps from CUDA graphs
            (``native_beam_search(cuda_graph=True)``). Off by default: on an H200 it gave the same tokens as
            the eager search but was slower (29.8 vs 21.2 ms per image at batch 1; at batch 256 it cannot
            compact). That figure captured a graph per call; the captured searches are now kept per batch
            shape (``native_search.SearchGraphs``, ``graph_capacity`` of them) and replayed with new inputs,
            which has not been timed on a GPU yet. Attention maps are then computed by the eager loop.
        pad_multiple: a batch's canvas is rounded up to a multiple of this many pixels (default 16, the
            encoder's stride). Padding is not neutral for this CNN (tools/eval_padding.py measures it).
        canvas_grid: pad each batch instead to the smallest canvas of the trainer's grid that holds it
            (``data.buckets.CanvasGrid``: sizes x1.5 apart), the canvases the model was trained on.
        graph_capacity: how many captured searches ``decoder_graphs`` keeps (least recently used out; also
            bounded by 2 GiB of their tensors).
        rescore: "auto" (default: "both" when the engine carries the R2L branch, else "none"), "both", "r2l"
            or "none". With "r2l" the R2L branch re-scores every hypothesis the L2R beam finished and each image
            keeps the best by ``(L2R + rescore_weight * R2L) / (n + 1)`` (``decode.rescore``); it costs one
            teacher-forced R2L pass over the finished hypotheses. "both" also runs an R2L beam search and
            chooses among both beams' finished hypotheses, each scored by both branches (a bidirectional
            search). On CROHME 2014 with abm-paper-soup3 (bundled since 2026-12-06), at batch 32 on the CPU:
            "both" 57.81 / 74.34 / 81.34 (ExpRate / <=1 / <=2; all three at or above the paper's), "r2l"
            57.81 / 74.04 / 80.53, "none" 55.88 % at batch 16. Cost on an H100 at batch 32 (encoder included):
            5.6 ms per image with "both", 3.4 with "r2l", 2.1 with "none" (README.md, "Bidirectional rescoring").
        rescore_weight: the R2L score's weight (1.0: both branches count alike).

    A Recognizer may be shared between threads: ``predict`` calls run one at a time.
    """

    def __init__(self, engine: str | Path | Engine | None = None, device: str = "auto", beam_size: int = 10,
                 max_batch_size: int = 32, max_batch_pixels: int = 4_000_000, max_len: int | None = None,
                 image_options: ImageOptions | None = None, encoder_backend: str = "auto", decoder: str = "auto",
                 decoder_precision: str = "fp32", compact: bool = True,
                 decoder_graphs: bool = False, graph_capacity: int = 64, pad_multiple: int = 16,
                 canvas_grid: bool = False, rescore: str = "auto", rescore_weight: float = 1.0):
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        if max_batch_size < 1 or max_batch_pixels < 1:
            raise ValueError("max_batch_size and max_batch_pixels must be positive")
        if pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
        if rescore not in ("auto", "r2l", "both", "none"):
            raise ValueError(f"rescore must be 'auto', 'r2l', 'both' or 'none', got {rescore!r}")
        if not rescore_weight >= 0:
            raise ValueError(f"rescore_weight must be >= 0, got {rescore_weight}")
        if engine is None:
            self.engine = load_default_engine()
        elif isinstance(engine, Engine):
            self.engine = engine
        else:
            self.engine = load_engine(engine)
        self.device = resolve_device(device)
        self.model = self.engine.model.to(self.device).eval()
        self.encoder, self.encoder_reason = choose_encoder_backend(self.engine, self.device, encoder_backend)
        self.decoder_name, self.decoder_reason = choose_decoder(decoder, self.device)
        self._native = None
        if self.decoder_name == "native":
            from .decode.native import NativeDecoder
            weights = {"fp32": "fp32", "fp16": "fp16", "int8": "int8"}.get(decoder_precision)
            if weights is None:
                raise ValueError(f"decoder_precision must be fp32, fp16 or int8, got {decoder_precision!r}")
            self._native = NativeDecoder(self.model.l2r, self.device, weight_dtype=weights,
                                         feat_dtype="fp32" if decoder_precision == "fp32" else "fp16")
        self.decoder_precision = decoder_precision if self._native is not None else "fp32"
        if rescore in ("r2l", "both") and not self.engine.has_r2l:
            raise ValueError(f"rescore={rescore!r} needs an engine with the R2L branch ({self.engine.path} has no "
                             f"r2l.safetensors; `abm-rt convert` of a trainer state keeps it)")
        if rescore == "auto":
            # "both": the decoding that meets the paper's three figures with the bundled engine (README.md)
            rescore = "both" if self.engine.has_r2l else "none"
        self.rescore = rescore
        self.rescore_weight = float(rescore_weight)
        self._native_r2l = None
        if self.rescore != "none" and self._native is not None:
            from .decode.native import NativeDecoder
            self._native_r2l = NativeDecoder(self.model.r2l, self.device, weight_dtype=self._native.weight_dtype,
                                             feat_dtype=self._native.feat_dtype)
        self.vocab = self.engine.vocab
        self.beam_size = beam_size
        self.max_batch_size = max_batch_size
        self.max_batch_pixels = max_batch_pixels
        self.max_len = max_len
        self.compact = bool(compact)
        self.decoder_graphs = decoder_graphs and self._native is not None and self.device.type == "cuda"
        self._graphs = None
        if self.decoder_graphs:
            from .decode.native_search import SearchGraphs
            self._graphs = SearchGraphs(graph_capacity)
        self.image_options = image_options or ImageOptions()
        # 16, the encoder's stride, keeps the canvas shapes (TensorRT profiles, CUDA graphs) few
        self.pad_multiple = pad_multiple
        self.canvas_grid = CanvasGrid() if canvas_grid else None
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        """What this Recognizer runs: engine, device, backends and why they were chosen."""
        cfg = self.engine.config
        return {
            "engine": str(self.engine.path),
            "format_version": cfg.get("format_version"),
            "precision": cfg.get("precision"),
            "provenance": cfg.get("provenance", {}),
            "device": str(self.device),
            "encoder_backend": self.encoder.name,
            "encoder": self.encoder.describe(),
            "decoder": "native (abm_rt._C)" if self._native else "pytorch batched beam search",
            "why": self.encoder_reason,
            "decoder_why": self.decoder_reason,
            "decoder_precision": self.decoder_precision,
            "beam_size": self.beam_size,
            "max_len": self.max_len,
            "canvas": "trainer grid" if self.canvas_grid else f"multiple of {self.pad_multiple}",
            "rescore": (f"{self.rescore} (weight {self.rescore_weight:g})" if self.rescore != "none" else
                        "none" + ("" if self.engine.has_r2l else ": the engine has no R2L branch")),
            "compact": self.compact if self._native is not None else None,
            "decoder_graphs": self._graphs.info() if self._graphs is not None else False,
        }

    def predict(self, images: Any, return_attention: bool = False, progress: bool = False) -> list[Result]:
        """Recognize ``images``: a list (or tuple) of items, or one item.

        An item is a file path, encoded file bytes, a ``PIL.Image``, a numpy array or a torch tensor.
        Returns one ``Result`` per item, in input order. A bad item gets ``Result.error`` and never
        stops the others.
        """
        items = [images] if isinstance(images, _SINGLE) or not isinstance(images, Sequence) else list(images)
        results = [Result(index=i) for i in range(len(items))]
        loaded: dict[int, LoadedImage] = {}
        for i, item in enumerate(items):
            try:
                loaded[i] = load_image(item, self.image_options)
                results[i].notes = list(loaded[i].notes)
            except ImageError as e:
                results[i].error = str(e)
            except Exception as e:  # noqa: BLE001 - one item's surprise must not take down the batch
                results[i].error = f"could not read item {i}: {type(e).__name__}: {e}"
        good = sorted(loaded)
        groups = size_batches([loaded[i].pixels.shape for i in good], self.max_batch_size, self.max_batch_pixels)
        bar = _progress_bar(len(items), progress)
        bar.update(len(items) - len(good))
        with self._lock:
            for group in groups:
                idx = [good[j] for j in group]
                self._run_batch(idx, loaded, results, return_attention)
                bar.update(len(idx))
        bar.close()
        return results

    def _run_batch(self, idx: list[int], loaded: dict[int, LoadedImage], results: list[Result],
                   return_attention: bool) -> None:
        """Encode and decode one size bucket; if the batch fails as a whole, retry its items one by one."""
        try:
            seqs = self._decode([loaded[i].pixels for i in idx], return_attention)
        except Exception as e:  # noqa: BLE001
            if len(idx) == 1:
                results[idx[0]].error = f"recognition failed: {type(e).__name__}: {e}"
                return
            for i in idx:
                self._run_batch([i], loaded, results, return_attention)
            return
        for i, seq in zip(idx, seqs):
            r = results[i]
            r.tokens = self.vocab.decode(seq.tokens)
            r.latex = " ".join(r.tokens)
            r.score = -seq.normalized_score
            r.truncated = seq.truncated
            r.attention = None
            if return_attention and seq.attention is not None:
                # one map per returned token: a control token emitted mid-sequence leaves with its map
                r.attention = seq.attention[self.vocab.kept_positions(seq.tokens)]

    @torch.inference_mode()
    def _decode(self, pixels: list[np.ndarray], return_attention: bool):
        x, pixel_mask = pad_batch(pixels, multiple=self.pad_multiple, grid=self.canvas_grid)
        features, mask = self.encoder.encode(x, pixel_mask)
        keep = self.rescore != "none"
        seqs = self._search(self.model.l2r, self._native, features, mask, return_attention, keep, SOS_ID, EOS_ID)
        if keep:
            # "both": the R2L branch searches too, from eos to sos (spec 4.2), and its hypotheses join the L2R's
            r2l_seqs = (self._search(self.model.r2l, self._native_r2l, features, mask, return_attention, True,
                                     EOS_ID, SOS_ID) if self.rescore == "both" else None)
            seqs = rescore_with_r2l(seqs, self.model.r2l, features, mask, self.rescore_weight, self._native_r2l,
                                    r2l_seqs=r2l_seqs, l2r=self.model.l2r, native_l2r=self._native)
        return seqs

    def _search(self, branch, native, features: torch.Tensor, mask: torch.Tensor, return_attention: bool,
                keep: bool, sos: int, eos: int):
        """One beam search of ``branch`` over the encoded batch: native when built, else PyTorch."""
        check_every = 4 if self.device.type == "cuda" else 1
        if native is not None:
            from .decode.native_search import native_beam_search
            return native_beam_search(native, features, mask, self.beam_size, max_len=self.max_len,
                                      return_attention=return_attention, check_every=check_every,
                                      compact=self.compact, sos=sos, eos=eos,
                                      cuda_graph=self.decoder_graphs and not return_attention,
                                      graphs=self._graphs, keep_candidates=keep)
        return beam_search(branch, features, mask, self.beam_size, max_len=self.max_len, sos=sos, eos=eos,
                           return_attention=return_attention, check_every=check_every, keep_candidates=keep)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    """A tqdm bar on stderr when asked for (and tqdm is installed), else a no-op."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="img", dynamic_ncols=True, leave=False, disable=None)  # None: off unless a TTY
