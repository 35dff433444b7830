"""Seconds per training epoch of the real trainer, for several option sets, each in a fresh process.

Each configuration runs ``python -m training`` for ``--epochs`` epochs on CROHME (a fresh model, the trainer's
recipe, CUDA graphs, no validation decode) and is read back from its log.jsonl: the first epoch carries the
graph capture, the later ones are the steady state. One process per configuration, so none inherits another's
graphs, cuDNN plans or memory. Writes benchmarks/results/train_epoch_<GPU>_<date>.json.

    python3 benchmarks/bench_train_epoch.py --data /tmp/data/crohme \\
        --config base= --config streams=--branch-streams=true --epochs 3

A configuration is NAME=FLAGS: FLAGS are extra trainer options, separated by spaces, e.g.
``b192=--max-batch=192 --batch-pixels=3000000``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402

BASE = ["--cuda-graphs", "true", "--attention-fp32", "true", "--val-every", "100000", "--val-from", "100000",
        "--save-every", "100000"]


def parse_config(text: str) -> tuple[str, list[str]]:
    """``NAME=FLAGS`` -> (NAME, the flags as arguments; ``--a=b`` stays one argument, as argparse reads it)."""
    name, sep, flags = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"a configuration is NAME=FLAGS, got {text!r}")
    return name, flags.split()


def epoch_figures(log: Path) -> dict:
    """The per-epoch seconds of a trainer log: first (with capture), steady mean and the steps per epoch."""
    rows = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    start = next(r for r in rows if r.get("event") == "start")
    epochs = [r for r in rows if "epoch_seconds" in r]
    if len(epochs) < 2:
        raise RuntimeError(f"{log}: {len(epochs)} epoch(s) logged; the steady state needs at least 2")
    steady = [r["epoch_seconds"] for r in epochs[1:]]
    mean = sum(steady) / len(steady)
    batches = start["train_batches"]
    return {"device": start.get("device", "?"), "train_images": start["train_images"], "batches_per_epoch": batches,
            "epochs": len(epochs),
            "first_epoch_s": round(epochs[0]["epoch_seconds"], 2),
            "capture_s": round(sum(r.get("capture_seconds", 0.0) for r in epochs), 2),
            "steady_epoch_s": round(mean, 3), "steady_epoch_s_each": [round(s, 3) for s in steady],
            "ms_per_step": round(1000 * mean / batches, 2),
            "images_per_s": round(start["train_images"] / mean, 1),
            "ce_l2r_last": round(epochs[-1]["ce_l2r"], 4)}


def main() -> int:
    """Run each configuration and write the result file."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="CROHME directory (train/ and 2014/)")
    ap.add_argument("--config", action="append", type=parse_config, required=True,
                    help="NAME=FLAGS, repeatable: extra trainer options of one configuration")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per configuration (>= 2; default 3)")
    ap.add_argument("--out", type=Path, help="result file (default benchmarks/results/train_epoch_<GPU>_<date>.json)")
    args = ap.parse_args()
    if args.epochs < 2:
        ap.error("--epochs must be at least 2: the first epoch carries the graph capture")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in args.config:
            run = Path(tmp) / name
            cmd = [sys.executable, "-m", "training", "--data", args.data, "--out", str(run),
                   "--epochs", str(args.epochs), *BASE, *flags]
            t0 = time.time()
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"configuration {name} failed (exit {done.returncode})")
            row = {"name": name, "flags": flags, "wall_s": round(time.time() - t0, 1),
                   **epoch_figures(run / "log.jsonl")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = rows[0]
    headline = {f"{r['name']} s/epoch": r["steady_epoch_s"] for r in rows}
    headline.update({f"{r['name']} vs {base['name']}": round(base["steady_epoch_s"] / r["steady_epoch_s"], 3)
                     for r in rows[1:]})
    where = "cpu" if all(r["device"] == "cpu" for r in rows) else "cuda"     # where the trainers ran
    out = write_result("train_epoch", where, {"headline": headline, "rows": rows,
                                               "note": "one fresh trainer process per configuration; a fresh "
                                                       "model; steady = epochs after the first"}, args.out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
