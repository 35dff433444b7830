"""Build-time tools: PyTorch ABM -> ONNX graphs, INT8 Q/DQ quantization, engine-directory conversion.

Nothing here runs inside ``Recognizer.predict``: backends only load what these functions wrote
(architecture.md, convention 7). Requires ``onnx`` (and ``onnxruntime`` for quantization and checks).
"""
from .onnx_export import (DEFAULT_OPSET, export_decoder_prepare, export_decoder_step, export_encoder,
                          fold_batchnorm)

__all__ = ["DEFAULT_OPSET", "export_encoder", "export_decoder_prepare", "export_decoder_step",
           "fold_batchnorm", "quantize_encoder_int8", "convert"]


def __getattr__(name: str):
    # quantize and convert pull in onnxruntime; load them on first use.
    if name == "quantize_encoder_int8":
        from .quantize import quantize_encoder_int8
        return quantize_encoder_int8
    if name == "convert":
        from .convert import convert
        return convert
    raise AttributeError(f"module 'export' has no attribute {name!r}")
