"""Training-step time of the three ways to run the two decoder branches: ``separate`` (one after the
other, the default), ``paired`` (--paired-branches: one stacked pass, training/paired.py) and ``streams``
(--branch-streams: R2L on a second CUDA stream; CUDA only).

For each mode, a fresh ``Trainer`` (the full model at the trainer's seed, its optimizer, its packed CROHME
batches and its step paths; ``--max-batch`` / ``--batch-pixels`` default to abm-paper's 16 / 480 k) trains one
batch of each of the ``--shapes`` most frequent batch shapes. On a GPU each shape's step is captured in a CUDA
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
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402
from training.graphed import LOSS_PARTS, shape_key  # noqa: E402
from training.trainer import TrainConfig, Trainer  # noqa: E402

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


def _top(names_ms: list[tuple[str, float]], n: int = 8) -> list[dict]:
    """The ``n`` names with the most summed time: where a mode's time goes. (On an H100 the paired mode's kernels
    were a third fewer than the separate mode's but took 4.3x their time: train_branch_modes_h100_2026-12-06.json.)"""
    total: dict[str, list[float]] = {}
    for name, ms in names_ms:
        t = total.setdefault(name[:100], [0.0, 0])
        t[0] += ms
        t[1] += 1
    ranked = sorted(total.items(), key=lambda kv: -kv[1][0])[:n]
    return [{"name": k, "ms": round(v[0], 3), "count": v[1]} for k, v in ranked]


def profile_one_step(step, dev: torch.device) -> dict:
    """Kernels (CUDA) or operators (CPU) of one eager step, their summed self time in ms, and the names that
    take the most of it."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        _sync(dev)
    events = prof.events()
    if dev.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        times = [(e.name, (getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0)) / 1000) for e in kernels]
        return {"kernels": len(kernels), "kernel_ms": round(sum(ms for _, ms in times), 2), "top_kernels": _top(times)}
    # CPU: the leaf operators (no aten:: operator below them) that compute, i.e. what a GPU would run as
    # kernels; views, allocations and other metadata-only operators are left out
    leaves = [e for e in events if e.name.startswith("aten::") and e.name not in METADATA_OPS
              and not any(c.name.startswith("aten::") for c in e.cpu_children)]
    times = [(e.name, e.self_cpu_time_total / 1000) for e in leaves]
    return {"operators": len(leaves), "operator_ms": round(sum(ms for _, ms in times), 2), "top_operators": _top(times)}


def run_mode(name: str, args: argparse.Namespace, out_dir: Path) -> dict:
    """Times one mode with a fresh Trainer (its model, optimizer, packed batches and step paths) on one batch
    of each of the ``--shapes`` most frequent shapes; see the module docstring."""
    cfg = TrainConfig(data=args.data, out=str(out_dir / name), max_batch=args.max_batch,
                      batch_pixels=args.batch_pixels, cuda_graphs=True, attention_fp32=True,
                      train_limit=args.train_limit, val_limit=1, device=args.device, **MODES[name])
    trainer = Trainer(cfg)             # seeded by cfg.seed: every mode starts from the same weights
    dev = trainer.device
    counts = collections.Counter(shape_key(b) for b in trainer.train_batches)
    by_shape = {}
    for b in trainer.train_batches:
        by_shape.setdefault(shape_key(b), b)
    chosen = [k for k, _ in counts.most_common(args.shapes)]
    step = trainer._graphed_step if trainer.graphed is not None else trainer._eager_step
    sums = torch.zeros(LOSS_PARTS, device=dev)
    rows = []
    for key in chosen:
        b = by_shape[key]
        t0 = time.time()
        step(b, sums)                  # on a GPU: the eager warm-up step and the capture
        _sync(dev)
        first_s = time.time() - t0
        t0 = time.perf_counter()
        for _ in range(args.reps):
            step(b, sums)
        _sync(dev)
        ms = 1000 * (time.perf_counter() - t0) / args.reps
        rows.append({"shape_BHWT": list(key), "batches": counts[key], "ms_per_step": round(ms, 2),
                     "first_s": round(first_s, 2)})
        print(json.dumps({"mode": name, **rows[-1]}), flush=True)
    n = sum(r["batches"] for r in rows)
    mean_ms = sum(r["ms_per_step"] * r["batches"] for r in rows) / n
    profiled = profile_one_step(lambda: trainer._eager_step(by_shape[chosen[0]], sums), dev)
    if trainer.graphed is not None:
        sums += trainer.graphed.sums
    total = len(trainer.train_batches)
    return {"mode": name, "weighted_ms_per_step": round(mean_ms, 2),
            "epoch_estimate_s": round(mean_ms * total / 1000, 1), "loss_sums_finite": bool(torch.isfinite(sums).all()),
            "profiled_shape_BHWT": list(chosen[0]), **profiled, "shapes": rows,
            "batches_per_epoch": total, "distinct_shapes": len(counts),
            "timed_batch_fraction": round(n / total, 3), "cuda_graphs": trainer.graphed is not None}


def main() -> int:
    """Run each mode, write the result file."""
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
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if "streams" in modes and not cuda:
        modes.remove("streams")
        print("streams skipped: it needs a CUDA device", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_mode(m, args, Path(tmp)) for m in modes]
    base = results[0]
    headline = {f"{r['mode']} ms/step": r["weighted_ms_per_step"] for r in results}
    headline.update({f"{r['mode']} speed-up vs {base['mode']}":
                     round(base["weighted_ms_per_step"] / r["weighted_ms_per_step"], 3) for r in results[1:]})
    shared = ("batches_per_epoch", "distinct_shapes", "timed_batch_fraction", "cuda_graphs")
    out = write_result("train_branch_modes", "cuda" if cuda else "cpu", {
        "headline": headline, **{k: base[k] for k in shared},
        "setup": {"max_batch": args.max_batch, "batch_pixels": args.batch_pixels, "reps": args.reps,
                  "precision": "bf16 autocast, fp32 attention", "optimizer": "the trainer's (adadelta)",
                  "train_limit": args.train_limit},
        "modes": [{k: v for k, v in r.items() if k not in shared} for r in results]}, args.out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
