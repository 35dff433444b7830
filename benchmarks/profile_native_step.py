"""Where one native decode step's time goes, kernel by kernel (torch.profiler; CUPTI on CUDA).

For each (rows N = images x beams, feature grid H' x W', weight precision) it runs the bundled model's
L2R branch through ``NativeDecoder.step`` + ``beam_select`` + the two row gathers (one search step) on
random features, then profiles ``--steps`` such steps and records every CUDA kernel's total time per
step (on CPU only the wall time per step). Writes
benchmarks/results/profile_native_step_<device>_<date>.json, so that the next optimisation starts from a
measured breakdown, not a guess.

    python3 benchmarks/profile_native_step.py --device cuda
    python3 benchmarks/profile_native_step.py --device cpu --shapes 160x6x24 --precisions fp32
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from abm_rt.data.vocab import EOS_ID, SOS_ID  # noqa: E402
from abm_rt.decode.native import NativeDecoder, tiled_kernels  # noqa: E402
from abm_rt.decode.native_search import _search_step, _SearchState  # noqa: E402
from abm_rt.engine_dir import default_engine_path, load_engine  # noqa: E402
from benchmarks.result_file import write_result  # noqa: E402


def profile_shape(model, device: str, N: int, H: int, W: int, precision: str, steps: int, beam: int) -> dict:
    """Per-kernel time of one search step at N rows on an H x W grid (images of N / beam rows each)."""
    B = N // beam
    dec = NativeDecoder(model.l2r, device, weight_dtype=precision, feat_dtype="fp32" if precision == "fp32" else "fp16")
    g = torch.Generator().manual_seed(0)
    feats_t = torch.rand(B, model.cfg.feature_dim, H, W, generator=g).to(device)
    mask = torch.ones(B, H, W, dtype=torch.bool, device=device)
    feats = dec.prepare(feats_t, mask)
    row_image = torch.arange(B, dtype=torch.int32, device=device).repeat_interleave(beam)
    h0 = dec.initial_state(feats_t, mask).index_select(0, row_image.long()).contiguous()
    s = _SearchState.allocate(h0, SOS_ID, B, beam, H * W, steps + 5)
    st = s.beam_state(dec, EOS_ID)
    cuda = device.startswith("cuda")

    def one(t: int) -> None:
        s.point_at(st, t)
        _search_step(dec, feats, row_image, s, st)
        s.done.zero_()                      # keep every row busy: we time the step, not the search

    for t in range(5):                      # warm-up (kernels loaded, allocator and thread pool primed)
        one(t)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for t in range(5, 5 + steps):
            one(t)
        if cuda:
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    row = {"N": N, "H": H, "W": W, "precision": precision, "steps": steps,
           "wall_ms_per_step (profiler on)": round(1000 * wall, 3)}
    if cuda:   # CUPTI sees every kernel, ours included; on CPU the _C calls are not profiler events
        kernels = {e.key: round(e.device_time_total / steps, 2) for e in prof.key_averages() if e.device_time_total > 0}
        row["us_per_step_by_kernel"] = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:25])
    return row


def main() -> int:
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="10x6x24,2560x6x24,2560x10x50",
                    help="comma separated NxHxW (rows x feature grid); rows are images x beam")
    ap.add_argument("--precisions", default="fp32,fp16,int8")
    ap.add_argument("--beam", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tiled-kernels", action="store_true",
                    help="turn the CUDA small-batch kernels off (native.tiled_kernels): by default linears of <= 32 "
                         "rows run one warp per output and the energy may be split into channel slices")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    model = load_engine(default_engine_path()).model.eval()
    with profile(activities=[ProfilerActivity.CPU]):   # the profiler's own start-up (~0.4 s) stays out of row 1
        pass
    rows = []
    with tiled_kernels() if args.tiled_kernels else contextlib.nullcontext():    # process-wide switches
        for shape in args.shapes.split(","):
            N, H, W = (int(v) for v in shape.split("x"))
            for precision in args.precisions.split(","):
                rows.append(profile_shape(model, args.device, N, H, W, precision, args.steps, args.beam))
                print(json.dumps(rows[-1]), flush=True)
    headline = {f"{r['precision']} N{r['N']} {r['H']}x{r['W']} ms/step": r["wall_ms_per_step (profiler on)"]
                for r in rows}
    out = write_result("profile_native_step", args.device, {"rows": rows, "headline": headline,
                                                          "small_batch_kernels": not args.tiled_kernels}, args.out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
