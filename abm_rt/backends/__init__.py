"""Encoder backends: one interface (``EncoderBackend``), several runners, and the choice between them.

- ``torch_backend.TorchEncoder``: the PyTorch model itself (CPU or CUDA); always available.
- ``onnxruntime_backend.OnnxRuntimeEncoder``: ``encoder.onnx`` (or ``encoder.int8.onnx``) on ONNX Runtime.
- ``tensorrt.TensorRTEncoder``: TensorRT plans built by ``abm-rt build-engine``.

Optional dependencies (onnxruntime, tensorrt) are imported only inside their backend files, on first use.
"""
from .base import EncoderBackend
from .select import choose_encoder_backend

__all__ = ["EncoderBackend", "choose_encoder_backend"]
