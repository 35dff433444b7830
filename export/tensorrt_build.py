"""Build TensorRT plans of the encoder from an engine directory's ONNX (``abm-rt build-engine``).

TensorRT 10+ API: ONNX parser -> network; builder config with FP16, or INT8 through the explicitly
quantized (Q/DQ) ONNX (``encoder.int8.onnx``, made by ``abm-rt convert --precision int8``; implicit
calibrators are deprecated); one optimization profile per size range; a timing cache kept beside the
plans so rebuilds reuse measured tactics.
"""
from __future__ import annotations

from pathlib import Path

from abm_rt.backends.tensorrt import (INPUT_NAME, Profile, plan_dir, plan_name, plan_profiles, require_tensorrt,
                                      write_manifest)


def onnx_for(engine_dir: Path, precision: str) -> Path:
    """The ONNX a precision is built from: the Q/DQ encoder for INT8, the FP32 one otherwise."""
    name = "encoder.int8.onnx" if precision == "int8" else "encoder.onnx"
    path = Path(engine_dir) / name
    if not path.is_file():
        hint = " --precision int8" if precision == "int8" else ""
        raise FileNotFoundError(f"{path} is missing: run `abm-rt convert MODEL --out {engine_dir}{hint}` first")
    return path


def build_encoder_plan(engine_dir: str | Path, precision: str = "fp16", profiles: list[Profile] | None = None,
                       workspace_gib: float = 4.0) -> Path:
    """Build and save the encoder plan for this GPU; returns its path."""
    trt = require_tensorrt()
    import torch

    engine_dir = Path(engine_dir)
    profiles = profiles or plan_profiles()
    onnx_path = onnx_for(engine_dir, precision)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)              # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)         # layers outside Q/DQ pairs run in FP16
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)         # honour the Q/DQ nodes (explicit quantization)
    for p in profiles:
        prof = builder.create_optimization_profile()
        prof.set_shape(INPUT_NAME, *p.shapes())
        config.add_optimization_profile(prof)
    out_dir = plan_dir(engine_dir, torch.cuda.get_device_name(), trt.__version__)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_path = out_dir / "timing.cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build {precision} plan from {onnx_path} (see the log above)")
    path = out_dir / plan_name(precision)
    path.write_bytes(bytes(plan))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    write_manifest(out_dir, profiles, precision, {"tensorrt": trt.__version__, "onnx": onnx_path.name,
                                                  "gpu": torch.cuda.get_device_name()})
    return path
