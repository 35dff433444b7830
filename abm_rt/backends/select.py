"""Which encoder backend a Recognizer runs, and why.

Order, by what is installed, the device and the engine's files:
- CUDA device: TensorRT (the ``tensorrt`` package is installed and the engine holds a plan for this
  GPU, from ``abm-rt build-engine``) > PyTorch CUDA (``TorchEncoder``: BN folded, channels_last, CUDA
  graphs per size bucket, FP16 for engines whose precision is fp16, else FP32).
- CPU: ONNX Runtime (installed, and the engine has ``encoder.onnx`` from ``abm-rt convert``) > PyTorch.
  Measured by benchmarks/bench_cpu_encoders.py (benchmarks/results/cpu_encoders_*.json): ONNX Runtime
  FP32 is faster than PyTorch on the 2-core CPU, and its INT8 (Q/DQ) encoder is no faster than its FP32,
  so INT8 runs only for engines converted as int8.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import EncoderBackend, module_available

PREFERENCES = {"auto": "auto", "tensorrt": "tensorrt", "trt": "tensorrt", "pytorch": "pytorch",
               "torch": "pytorch", "onnxruntime": "onnxruntime", "ort": "onnxruntime"}
PLAN_PRECISIONS = ("fp16", "fp32", "int8")
CPU_MEASUREMENT = ("ONNX Runtime's encoder measured faster than PyTorch's on a 2-core CPU "
                   "(benchmarks/bench_cpu_encoders.py, results in benchmarks/results/cpu_encoders_*.json)")


def _tensorrt_plan(engine: Any, device: torch.device) -> tuple[Any | None, str, str]:
    """(plan path or None, precision, why) for this engine on ``device``."""
    if not module_available("tensorrt"):
        return None, "", "TensorRT is not installed (no `tensorrt` Python package)"
    from .tensorrt import plan_dir, plan_name
    import tensorrt

    gpu = torch.cuda.get_device_name(device)
    directory = plan_dir(engine.path, gpu, tensorrt.__version__)
    wanted = engine.config.get("precision") or "fp16"
    order = [wanted] + [p for p in PLAN_PRECISIONS if p != wanted]
    for precision in order:
        plan = directory / plan_name(precision)
        if plan.is_file():
            return plan, precision, f"TensorRT {tensorrt.__version__} plan {plan.name} for {gpu}"
    return None, "", (f"TensorRT is installed but the engine has no plan for {gpu} under {directory} "
                      f"(build one with `abm-rt build-engine {engine.path}`)")


def choose_encoder_backend(engine: Any, device: str | torch.device, preference: str = "auto"
                           ) -> tuple[EncoderBackend, str]:
    """Pick and construct the encoder backend for ``engine`` on ``device``.

    Args:
        engine: a loaded ``Engine`` (its model, config and directory).
        device: the decoder's device; the features are returned there.
        preference: "auto", or a backend by name: "tensorrt", "pytorch" ("torch"), "onnxruntime" ("ort").
            A named backend that cannot run here is a ValueError saying why.
    Returns:
        (backend, reason): the reason says what was chosen and why the others were not.
    """
    if preference not in PREFERENCES:
        raise ValueError(f"encoder backend preference must be one of {sorted(PREFERENCES)}, got {preference!r}")
    pref = PREFERENCES[preference]
    dev = torch.device(device)
    notes: list[str] = []

    if pref in ("auto", "tensorrt"):
        if dev.type != "cuda":
            why = f"TensorRT needs a CUDA device (device is {dev})"
            if not module_available("tensorrt"):
                why += " and is not installed (no `tensorrt` Python package)"
        else:
            plan, precision, why = _tensorrt_plan(engine, dev)
            if plan is not None:
                try:
                    from .tensorrt import TensorRTEncoder

                    return TensorRTEncoder(engine.path, precision, dev), f"{why}: the fastest available backend"
                except Exception as e:  # noqa: BLE001 - a stale plan must not stop the recognizer
                    if pref == "tensorrt":
                        raise ValueError(f"TensorRT backend could not load {plan}: {e}") from e
                    why = f"TensorRT plan {plan} could not be loaded ({type(e).__name__}: {e})"
        if pref == "tensorrt":
            raise ValueError(f"encoder backend 'tensorrt' is not usable: {why}")
        notes.append(why)

    if pref in ("auto", "onnxruntime") and (pref == "onnxruntime" or dev.type == "cpu"):
        from .onnxruntime_backend import INSTALL_HINT, OnnxRuntimeEncoder, engine_onnx_path, onnxruntime_available

        precision = "int8" if engine.config.get("precision") == "int8" else "fp32"
        path = engine_onnx_path(engine, precision)
        why = None
        if not onnxruntime_available():
            why = INSTALL_HINT
        elif not path.is_file():
            flag = " --precision int8" if precision == "int8" else ""
            why = (f"the engine has no {path.name} for ONNX Runtime (write it with "
                   f"`abm-rt convert {engine.path} --out DIR{flag}`)")
        if why is None:
            backend = OnnxRuntimeEncoder.from_engine(engine, dev, precision)
            because = "asked for by name" if pref == "onnxruntime" else CPU_MEASUREMENT
            return backend, (f"ONNX Runtime ({', '.join(backend.session.get_providers())}) running {path.name} "
                             f"on {dev}: {because}; " + "; ".join(notes)).rstrip("; ")
        if pref == "onnxruntime":
            raise ValueError(f"encoder backend 'onnxruntime' is not usable: {why}")
        notes.append(why)

    from .torch_backend import TorchEncoder

    if dev.type == "cuda":
        # An fp16 engine runs the PyTorch encoder in FP16 on CUDA (int8 and fp32 engines in FP32).
        precision = "fp16" if engine.config.get("precision") == "fp16" else "fp32"
        # No CUDA graphs by default yet: exact-shape graphs are captured once per new shape (~0.2 s each),
        # and bucket padding changes valid features of the trained model (by 0.4-0.7 of max|F| near the
        # canvas edge, measured on an H100). Enable them where shapes repeat: TorchEncoder(cuda_graphs=True).
        backend = TorchEncoder(engine.model, dev, precision=precision, cuda_graphs=False, bucket_pad=False)
        what = f"PyTorch on {dev} (CUDA, {precision}, BN folded, channels_last)"
    else:
        backend = TorchEncoder(engine.model, dev)
        what = f"PyTorch on {dev} (CPU, fp32, BN folded)"
    if pref == "pytorch":
        return backend, f"{what}: asked for by name"
    return backend, f"{what}: " + "; ".join(notes)
