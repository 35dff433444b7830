"""``abm-rt convert``: a trained model -> an engine directory with ONNX graphs (and INT8 Q/DQ)."""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser(
        "convert", help="export a model to an engine directory with ONNX graphs",
        description="Convert MODEL (an engine directory, or a trainer state directory holding state.json and "
                    "state-*.safetensors) into the engine directory ENGINE_DIR: config.json, vocab.txt, "
                    "model.safetensors, encoder.onnx, decoder_prepare.onnx, decoder_step.onnx, and "
                    "encoder.int8.onnx for --precision int8. Needs the onnx and onnxruntime packages.")
    p.add_argument("model", metavar="MODEL", help="engine directory or trainer state directory")
    p.add_argument("--out", required=True, metavar="ENGINE_DIR", help="engine directory to write")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="fp32 (default); fp16: the graphs stay FP32 and GPU backends build FP16; "
                        "int8: also write an INT8 Q/DQ encoder calibrated on --calibration")
    p.add_argument("--calibration", metavar="DIR",
                   help="directory of typical input images for int8 calibration (searched recursively)")
    p.add_argument("--calibration-count", type=int, default=64, metavar="N",
                   help="calibration images to use, spread over DIR (default 64)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit status."""
    missing = [name for name in ("onnx", "onnxruntime") if not _importable(name)]
    if missing:
        print(f"abm-rt convert: needs the Python package(s) {', '.join(missing)}: "
              f"pip install {' '.join(missing)}", file=sys.stderr)
        return 2
    try:
        from export.convert import convert
    except ImportError as e:
        print(f"abm-rt convert: the export tools are not installed with this abm_rt ({e})", file=sys.stderr)
        return 2
    out = convert(args.model, args.out, precision=args.precision, calibration=args.calibration,
                  calibration_count=args.calibration_count, opset=args.opset)
    from ..engine_dir import read_config

    config = read_config(out)
    print(json.dumps({"engine": str(out), "precision": config.get("precision"), "files": config.get("files"),
                      "check": config.get("export", {}).get("check")}, indent=1))
    return 0


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
