"""Training-step time of the three ways to run the two decoder branches: ``separate`` (one after the
other, the default), ``paired`` (--paired-branches: one stacked pass, training/paired.py) and ``streams``
(--branch-streams: R2L on a second CUDA stream; CUDA only).

For each mode, a fresh full-size bidirectional model (same seed) trains on real CROHME batches packed as the
trainer packs them (``--max-batch`` / ``--batch-pixels``; the defaults are abm-paper's 16 / 480 k): the
``--shapes`` most frequent batch shapes, one batch each. On a GPU each shape's step is captured in a CUDA
graph (the trainer's fast path) and replayed ``--reps`` times; on a CPU it runs eagerly. The figures:
milliseconds per step for each shape, their mean weighted by how many batches of the epoch have that shape,
that mean times the epoch's batch count (the epoch estimate, capture excluded), and, from one profiled eager
step of the most frequent shape, the number of kernels (CUDA) or operators (CPU) and their summed time.
Writes benchmarks/results/train_branch_modes_<device>_<date>.json.

    python3 benchmarks/bench_branch_modes.py --data /tmp/data/crohme
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from abm_rt.data.crohme import read_split  # noqa: E402
from abm_rt.data.vocab import Vocab  # noqa: E402
from abm_rt.model import ABM, initialize  # noqa: E402
from benchmarks.result_file import write_result  # noqa: E402
from training.graphed import GraphedTrainStep, optimizer_step, shape_key  # noqa: E402
from training.packed import pack_fixed_shapes  # noqa: E402
from training.trainer import TrainConfig, batch_loss  # noqa: E402

# Operators that only make views or allocate: no kernel on a GPU.
METADATA_OPS = {f"aten::{n}" for n in (
    "as_strided", "as_strided_", "view", "_unsafe_view", "reshape", "resolve_conj", "resolve_neg", "empty",
    "empty_strided", "empty_like", "resize_", "detach", "alias", "t", "transpose", "permute", "expand",
    "unsqueeze", "squeeze", "slice", "select", "unbind", "split", "chunk", "narrow", "unflatten", "flatten",
    "set_", "lift_fresh", "_reshape_alias", "contiguous")}

MODES = {"separate": {}, "paired": {"paired_branches": True}, "streams": {"branch_streams": True}}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def profile_one_step(step, dev: torch.device) -> dict:
    """Kernels (CUDA) or operators (CPU) of one eager step, and their summed self time in ms."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        _sync(dev)
    events = prof.events()
    if dev.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        us = sum(getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0) for e in kernels)
        return {"kernels": len(kernels), "kernel_ms": round(us / 1000, 2)}
    # CPU: the leaf operators (no aten:: operator below them) that compute, i.e. what a GPU would run as
    # kernels; views, allocations and other metadata-only operators are left out
    leaves = [e for e in events if e.name.startswith("aten::") and e.name not in METADATA_OPS
              and not any(c.name.startswith("aten::") for c in e.cpu_children)]
    return {"operators": len(leaves), "operator_ms": round(sum(e.self_cpu_time_total for e in leaves) / 1000, 2)}


def run_mode(name: str, batches_by_shape: dict, counts: dict, total: int, dev: torch.device, reps: int,
             seed: int) -> dict:
    """Times one mode on one batch of each chosen shape; see the module docstring."""
    cfg = TrainConfig(precision="bf16", attention_fp32=True, **MODES[name])
    torch.manual_seed(seed)
    model = ABM(bidirectional=True)
    initialize(model)
    model.to(dev).train()
    graphs = dev.type == "cuda"
    lr = torch.tensor(1.0, device=dev) if graphs else 1.0
    opt = torch.optim.Adadelta(model.parameters(), lr=lr, rho=0.9, eps=1e-6, weight_decay=1e-4,
                               foreach=True if graphs else None, capturable=graphs)
    side = torch.cuda.Stream(dev) if cfg.branch_streams else None
    loss_fn = lambda b, cache=True: batch_loss(model, b, cfg, dev.type, cache, side_stream=side)  # noqa: E731
    params = list(model.parameters())
    sums = torch.zeros(4, device=dev)
    graphed = GraphedTrainStep(model, opt, loss_fn, 100.0) if graphs else None
    rows = []
    for key, b in batches_by_shape.items():
        t0 = time.time()
        if graphed is not None:
            graphed.step(b)                                  # eager warm-up step and capture
            run = lambda: graphed.step(b)                    # noqa: E731
        else:
            optimizer_step(params, opt, loss_fn, b, 100.0, sums)
            run = lambda: optimizer_step(params, opt, loss_fn, b, 100.0, sums)  # noqa: E731
        _sync(dev)
        first_s = time.time() - t0
        t0 = time.perf_counter()
        for _ in range(reps):
            run()
        _sync(dev)
        ms = 1000 * (time.perf_counter() - t0) / reps
        rows.append({"shape_BHWT": list(key), "batches": counts[key], "ms_per_step": round(ms, 2),
                     "first_s": round(first_s, 2)})
        print(json.dumps({"mode": name, **rows[-1]}), flush=True)
    n = sum(r["batches"] for r in rows)
    mean_ms = sum(r["ms_per_step"] * r["batches"] for r in rows) / n
    top = max(batches_by_shape, key=lambda k: counts[k])
    profiled = profile_one_step(lambda: optimizer_step(params, opt, loss_fn, batches_by_shape[top], 100.0, sums), dev)
    finite = bool(torch.isfinite(sums).all())
    return {"mode": name, "weighted_ms_per_step": round(mean_ms, 2),
            "epoch_estimate_s": round(mean_ms * total / 1000, 1), "loss_sums_finite": finite,
            "profiled_shape_BHWT": list(top), **profiled, "shapes": rows}


def main() -> int:
    """Pack the batches, run each mode, write the result file."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="CROHME directory (its train/ is packed)")
    ap.add_argument("--max-batch", type=int, default=16, help="images per batch at most (default 16)")
    ap.add_argument("--batch-pixels", type=int, default=480_000, help="padded pixels per batch (default 480000)")
    ap.add_argument("--shapes", type=int, default=12, help="the most frequent batch shapes to time (default 12)")
    ap.add_argument("--reps", type=int, default=10, help="timed steps per shape (default 10)")
    ap.add_argument("--modes", default="separate,paired,streams",
                    help="comma-separated, of separate, paired, streams (streams needs CUDA)")
    ap.add_argument("--train-limit", type=int, default=None, help="pack only the first N training images")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    ap.add_argument("--out", type=Path, help="result file (default benchmarks/results/...)")
    args = ap.parse_args()
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                       else ("cpu" if args.device == "auto" else args.device))
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    if "streams" in modes and dev.type != "cuda":
        modes.remove("streams")
        print("streams skipped: it needs a CUDA device", file=sys.stderr)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = False          # as the trainer runs
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    batches = pack_fixed_shapes(read_split(Path(args.data) / "train", limit=args.train_limit), Vocab.default(),
                                dev, args.max_batch, args.batch_pixels)
    counts = collections.Counter(shape_key(b) for b in batches)
    chosen = [k for k, _ in counts.most_common(args.shapes)]
    by_shape = {k: next(b for b in batches if shape_key(b) == k) for k in chosen}
    coverage = sum(counts[k] for k in chosen) / len(batches)
    results = [run_mode(m, by_shape, counts, len(batches), dev, args.reps, seed=1) for m in modes]
    base = results[0]
    headline = {f"{r['mode']} ms/step": r["weighted_ms_per_step"] for r in results}
    headline.update({f"{r['mode']} speed-up vs {base['mode']}":
                     round(base["weighted_ms_per_step"] / r["weighted_ms_per_step"], 3) for r in results[1:]})
    out = write_result("train_branch_modes", str(dev), {
        "headline": headline, "batches_per_epoch": len(batches), "distinct_shapes": len(counts),
        "timed_shapes": len(chosen), "timed_batch_fraction": round(coverage, 3),
        "setup": {"max_batch": args.max_batch, "batch_pixels": args.batch_pixels, "reps": args.reps,
                  "precision": "bf16 autocast, fp32 attention", "optimizer": "adadelta (capturable on CUDA)",
                  "cuda_graphs": dev.type == "cuda", "train_limit": args.train_limit},
        "modes": results}, args.out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
