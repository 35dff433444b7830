"""``abm-rt build-engine``: compile an engine directory's encoder ONNX into TensorRT plans for this GPU."""
from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("build-engine", help="build TensorRT plans of the encoder (needs TensorRT and a GPU)",
                       description="Build TensorRT plans (FP32, FP16, or INT8 from the Q/DQ ONNX that `abm-rt "
                                   "convert --precision int8` writes) for this GPU into ENGINE_DIR/trt/<gpu>-<trt>/, "
                                   "with optimization profiles over batch, height and width and a timing cache "
                                   "kept beside the plans. Needs the `tensorrt` package and an NVIDIA GPU.")
    p.add_argument("engine", metavar="ENGINE_DIR")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp16")
    p.add_argument("--max-batch", type=int, default=32, help="largest batch the plan accepts (default 32)")
    p.add_argument("--max-height", type=int, default=512)
    p.add_argument("--max-width", type=int, default=2048)
    p.add_argument("--workspace-gib", type=float, default=4.0)


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit status."""
    from ..backends.tensorrt import INSTALL_HINT, plan_profiles, tensorrt_available
    if not tensorrt_available():
        print(f"abm-rt build-engine: {INSTALL_HINT}. Without it abm_rt runs the encoder with PyTorch "
              "(CUDA or CPU) or ONNX Runtime.", file=sys.stderr)
        return 2
    from export.tensorrt_build import build_encoder_plan
    profiles = plan_profiles(max_batch=args.max_batch, opt_batch=min(16, args.max_batch),
                             max_hw=(args.max_height, args.max_width))
    path = build_encoder_plan(args.engine, args.precision, profiles, args.workspace_gib)
    print(path)
    return 0
