"""INT8 Q/DQ quantization of the encoder with ONNX Runtime's static quantizer.

The output keeps the float graph and brackets each quantized tensor with QuantizeLinear /
DequantizeLinear pairs (QDQ). Weights are per output channel, weights and activations symmetric
int8: the form TensorRT builds INT8 engines from, and one ONNX Runtime runs on CPU.

Weights use the reduced 7-bit range (``reduce_range``) by default. ONNX Runtime's x86 int8 convolution
on CPUs without VNNI (AVX2 only) multiplies u8 x s8 pairs with VPMADDUBSW, which saturates the int16 sum
of two full-range products; on such a CPU the full-range graph of a small random model was 0.46 off
(relative to max |F|) against 0.05 with 7-bit weights, while on an AVX512-VNNI CPU both are fine
(0.038 / 0.049): ``tests/logs/2026-12-02_int8_avx2/``. A file that is right only on some CPUs is no
engine to ship, so the portable form is the default.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

STRIDE = 16   # the encoder's total stride: calibration canvases are padded to a multiple of it


def calibration_batches(images: Sequence[np.ndarray], max_batch: int = 4, max_batch_pixels: int = 1_000_000
                        ) -> list[np.ndarray]:
    """Group calibration images by size and pad each group as the runtime does (top-left, zeros,
    canvas a multiple of 16). Returns float32 batches [b, 1, H, W]: a few distinct sizes, so the
    ranges are observed at the sizes inference sees."""
    from abm_rt.data.buckets import pad_batch, size_batches

    images = [np.asarray(im, np.float32) for im in images]
    for i, im in enumerate(images):
        if im.ndim != 2:
            raise ValueError(f"calibration image {i} must be a float [H, W] array, got shape {im.shape}")
    groups = size_batches([im.shape for im in images], max_batch, max_batch_pixels)
    return [pad_batch([images[j] for j in g], multiple=STRIDE)[0].numpy() for g in groups]


class ImageCalibrationReader:
    """ONNX Runtime ``CalibrationDataReader`` over padded calibration batches (input name ``images``)."""

    def __init__(self, batches: Sequence[np.ndarray], input_name: str = "images"):
        self.batches = list(batches)
        self.input_name = input_name
        self._it: Iterator[np.ndarray] = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {self.input_name: x}

    def rewind(self) -> None:
        self._it = iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def quantize_encoder_int8(fp32_onnx: str | Path, out_path: str | Path, calibration_images: Sequence[np.ndarray],
                          max_batch: int = 4, preprocess: bool = True, calibrate_method: str = "minmax",
                          reduce_range: bool = True) -> Path:
    """Write an INT8 Q/DQ copy of the FP32 encoder ``fp32_onnx`` to ``out_path``.

    Args:
        fp32_onnx: the encoder written by ``export_encoder``.
        out_path: where to write the quantized model.
        calibration_images: float [H, W] images in [0, 1], white ink on black (as the runtime feeds them).
        max_batch: calibration images run together (grouped by size, padded to a multiple of 16).
        preprocess: run ONNX Runtime's ``quant_pre_process`` (shape inference + graph optimization) first.
        calibrate_method: "minmax", "entropy" or "percentile".
        reduce_range: 7-bit weights (see the module docstring: full 8-bit weights saturate in ONNX Runtime's
            AVX2 kernels); False gives full-range weights for runtimes that never saturate (TensorRT, VNNI CPUs).
    Returns:
        ``out_path``.
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration_images:
        raise ValueError("quantize_encoder_int8 needs at least one calibration image")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if calibrate_method not in methods:
        raise ValueError(f"calibrate_method must be one of {sorted(methods)}, got {calibrate_method!r}")

    class _Reader(ImageCalibrationReader, CalibrationDataReader):
        pass

    reader = _Reader(calibration_batches(calibration_images, max_batch))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="abm_rt_quant_") as tmp:
        src = Path(fp32_onnx)
        if preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre = Path(tmp) / "encoder.pre.onnx"
            try:
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
                src = pre
            except Exception:  # noqa: BLE001 - pre-processing is an optimization; quantize the raw graph
                src = Path(fp32_onnx)
        quantize_static(str(src), str(out_path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=methods[calibrate_method],
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "CalibTensorRangeSymmetric": True})
    return out_path
