"""ONNX Runtime encoder: an engine directory's ``encoder.onnx`` (or INT8 ``encoder.int8.onnx``).

``onnxruntime`` is imported only when a backend is made. The input and the output go through an
IOBinding over numpy buffers: the output is written straight into an array we allocate from the
known output shape, so no copy is made on CPU.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model import ModelConfig
from ..model.config import feature_size
from ..model.encoder import feature_mask
from .base import EncoderBackend, module_available, require_module

INSTALL_HINT = "ONNX Runtime is not installed: `pip install onnxruntime` (or onnxruntime-gpu for CUDA)"
INPUT_NAME = "images"
OUTPUT_NAME = "features"
FILES = {"fp32": ("encoder_onnx", "encoder.onnx"), "int8": ("encoder_int8_onnx", "encoder.int8.onnx")}


def onnxruntime_available() -> bool:
    """True when the ``onnxruntime`` package can be imported."""
    return module_available("onnxruntime")


def require_onnxruntime():
    """Import ``onnxruntime`` or raise ImportError saying what to install."""
    return require_module("onnxruntime", INSTALL_HINT)


def engine_onnx_path(engine: Any, precision: str = "fp32") -> Path:
    """Where an engine directory keeps its encoder graph for ``precision`` ("fp32" or "int8");
    the path may not exist. fp16 engines keep an FP32 graph (GPU backends choose FP16 when they build)."""
    key, default = FILES["int8" if precision == "int8" else "fp32"]
    files = (getattr(engine, "config", None) or {}).get("files") or {}
    return Path(engine.path) / files.get(key, default)


class OnnxRuntimeEncoder(EncoderBackend):
    """Runs an exported encoder with ONNX Runtime.

    Args:
        onnx_path: ``encoder.onnx`` or ``encoder.int8.onnx``.
        cfg: the model dimensions (feature channels, stride) for the output buffer and the mask.
        device: where the features are returned; on CUDA, ONNX Runtime's CUDA provider is used when
            this onnxruntime has it (else the CPU provider runs and the features are copied over).
        threads: intra-op threads (None: ONNX Runtime's default, one per physical core).
        precision: a label for ``describe()``.
    """

    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, cfg: ModelConfig, device: str | torch.device = "cpu",
                 threads: int | None = None, precision: str = "fp32"):
        ort = require_onnxruntime()
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist: write it with `abm-rt convert`")
        self.cfg, self.device, self.precision = cfg, torch.device(device), precision
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
        # Idle intra-op threads must not spin after a run: the PyTorch decoder runs next on the same cores
        # (spinning also measured slower on a loaded 2-core CPU: 0.26 s vs 0.34 s for 8 x 94x256).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list[Any] = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        self.threads = threads
        self.ort_version = ort.__version__
        names_in = [i.name for i in self.session.get_inputs()]
        names_out = [o.name for o in self.session.get_outputs()]
        if names_in != [INPUT_NAME] or names_out != [OUTPUT_NAME]:
            raise ValueError(f"{self.path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, "
                             f"got {names_in} -> {names_out}")
        channels = self.session.get_outputs()[0].shape[1]
        if isinstance(channels, int) and channels != cfg.feature_dim:
            raise ValueError(f"{self.path} outputs {channels} channels but the model config says {cfg.feature_dim}")

    @classmethod
    def from_engine(cls, engine: Any, device: str | torch.device = "cpu", precision: str | None = None,
                    threads: int | None = None) -> "OnnxRuntimeEncoder":
        """The backend for an engine directory: its INT8 graph for int8 engines, else the FP32 graph."""
        if precision is None:
            precision = "int8" if engine.config.get("precision") == "int8" else "fp32"
        return cls(engine_onnx_path(engine, precision), engine.model_config, device, threads,
                   "int8" if precision == "int8" else "fp32")

    def encode(self, images: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"images must be [B, 1, H, W], got {tuple(images.shape)}")
        x = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())   # [B, 1, H, W]
        b, _, h, w = x.shape
        hf, wf = feature_size(h, w, self.cfg)
        out = np.empty((b, self.cfg.feature_dim, hf, wf), np.float32)                # [B, D, H', W']
        binding = self.session.io_binding()        # one per call: bindings are not shared between threads
        binding.bind_cpu_input(INPUT_NAME, x)
        binding.bind_output(OUTPUT_NAME, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        self.session.run_with_iobinding(binding)
        features = torch.from_numpy(out).to(self.device)
        mask = feature_mask(pixel_mask.bool(), self.cfg).to(self.device)
        return features, mask

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "file": str(self.path), "precision": self.precision,
                "providers": self.session.get_providers(), "device": str(self.device),
                "onnxruntime": self.ort_version, "threads": self.threads or "default"}
