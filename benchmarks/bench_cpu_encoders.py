"""CPU encoder backends side by side: PyTorch (BN folded) vs ONNX Runtime FP32 vs ONNX Runtime INT8 (Q/DQ),
on the bundled engine converted with `abm-rt convert` (fp32 and int8), batch 8 of 94x256 images.
Writes benchmarks/results/cpu_encoders_<date>.json. This is the measurement behind the CPU default
in abm_rt/backends/select.py.

    python3 benchmarks/bench_cpu_encoders.py --fp32 ENGINE_FP32 --int8 ENGINE_INT8 [--threads 2]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from abm_rt.backends import choose_encoder_backend  # noqa: E402
from abm_rt.engine_dir import load_engine  # noqa: E402
from abm_rt.version import source_commit  # noqa: E402


def time_backend(backend, x, mask, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` encode calls after two warm-ups."""
    for _ in range(2):
        backend.encode(x, mask)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        backend.encode(x, mask)
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", required=True, help="engine converted with --precision fp32 (has encoder.onnx)")
    ap.add_argument("--int8", required=True, help="engine converted with --precision int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(args.batch, 1, 94, 256, generator=g) > 0.92).float()     # binary strokes-like input
    mask = torch.ones(args.batch, 94, 256, dtype=torch.bool)
    dev = torch.device("cpu")
    e32, e8 = load_engine(args.fp32), load_engine(args.int8)
    runs = {"pytorch_fp32": choose_encoder_backend(e32, dev, "pytorch")[0],
            "onnxruntime_fp32": choose_encoder_backend(e32, dev, "onnxruntime")[0],
            "onnxruntime_int8": choose_encoder_backend(e8, dev, "onnxruntime")[0]}
    figures = {}
    for name, backend in runs.items():
        secs = time_backend(backend, x, mask, args.repeats)
        figures[name] = {"median_s": round(statistics.median(secs), 4), "min_s": round(min(secs), 4),
                         "images_per_s_median": round(args.batch / statistics.median(secs), 2), "runs_s": secs}
        print(name, figures[name]["median_s"], flush=True)
    now = dt.datetime.now(dt.timezone.utc)
    commit = source_commit()
    doc = {"benchmark": "cpu_encoders", "date": now.isoformat(timespec="seconds"),
           "device": f"cpu {os.cpu_count()} cores ({platform.processor() or platform.machine()}), load "
                     f"{os.getloadavg()[0]:.2f}", "commit": commit, "command": " ".join(["python3", *sys.argv]),
           "setup": {"batch": args.batch, "size": [94, 256], "threads": args.threads, "repeats": args.repeats},
           "figures": figures,
           "headline": {f"{k} ms (median, batch {args.batch})": round(1000 * v["median_s"], 1) for k, v in figures.items()}}
    out = REPO / "benchmarks" / "results" / f"cpu_encoders_{now.date()}.json"
    out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
