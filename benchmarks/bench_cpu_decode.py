"""CPU throughput of ABM decoding: the reference one-image beam search (spec 5.1, literal step) against
the batched beam search at batch 1 and batch 16, plus the encoder alone, on the full-size model.

The model has random weights (``scaled_random_model``) with an eos logit bias chosen so that decoded
sequences end after a realistic number of tokens; the output states the bias, the mean decoded
length and the number of decoder steps. Throughput is set by the steps, not by the winner's length:
the beam runs until all k hypotheses finish (spec 5.1), and some hypotheses of a random model never
emit eos, so the default ``--max-len`` is 48 (not the runtime's 256) to stand in for a trained model,
whose beams finish a few steps after the winner. With the defaults (model seed 11, eos bias 2.0) the
winners have 7-18 tokens and about half the images finish all beams at length + 1.
Images are random binary strokes (white on black) at a median CROHME size, 94 x 256 pixels, which
the encoder maps to a 6 x 16 feature grid. The timed phases run round-robin
``--repeats`` times; each phase's figures come from its fastest run (median and every run recorded).

Writes ``benchmarks/results/cpu_decode_<date>.json`` (``--out`` to override). Example:

    python3 benchmarks/bench_cpu_decode.py            # 16 images, about 1-3 minutes on 2 cores
    python3 benchmarks/bench_cpu_decode.py --quick    # 4 images, a smoke run
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from abm_rt.decode import beam_search, reference_beam_search  # noqa: E402
from abm_rt.model import ModelConfig, count_parameters, feature_size, scaled_random_model  # noqa: E402
from abm_rt.version import source_commit  # noqa: E402

DEFAULT_SEED = 11        # a random model whose beams often all finish, as a trained model's do
DEFAULT_EOS_BIAS = 2.0   # with seed 11 and these images: winners of 7-18 tokens, mean about 14
DEFAULT_MAX_LEN = 48


def random_ink_images(n: int, height: int, width: int, seed: int, strokes: int = 12) -> torch.Tensor:
    """[n, 1, H, W] binary images in {0, 1}: white horizontal/vertical strokes on black."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, height, width)
    for i in range(n):
        for _ in range(strokes):
            r = int(torch.randint(0, height, (1,), generator=g))
            c = int(torch.randint(0, width, (1,), generator=g))
            x[i, 0, r:r + 3, c:c + int(torch.randint(5, 40, (1,), generator=g))] = 1.0
            x[i, 0, r:r + int(torch.randint(5, 30, (1,), generator=g)), c:c + 3] = 1.0
    return x


class StepCounter:
    """Counts calls of a branch's step / step_plain by shadowing them on the instance."""

    def __init__(self, branch):
        self.branch, self.calls = branch, 0
        for name in ("step", "step_plain"):
            orig = getattr(branch, name)

            def wrapped(*a, _orig=orig, **kw):
                self.calls += 1
                return _orig(*a, **kw)
            setattr(branch, name, wrapped)

    def take(self) -> int:
        n, self.calls = self.calls, 0
        return n


def git_info() -> dict:
    """Commit of the working tree (read-only git calls) and whether it has local changes."""
    def run(*cmd):
        try:
            return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": source_commit(),
            "dirty": bool(run("git", "status", "--porcelain", "--untracked-files=no"))}


def per_image(seconds: float, images: int) -> dict:
    return {"seconds": round(seconds, 4), "images": images, "images_per_s": round(images / seconds, 3),
            "seconds_per_image": round(seconds / images, 4)}


def headline(figures: dict, beam: int) -> dict:
    """The key figures for the README table."""
    return {"beam": beam,
            "reference decoder img/s": figures["reference"]["images_per_s"],
            "batched decoder img/s (batch 1)": figures["batched_batch1"]["images_per_s"],
            "batched decoder img/s (batch 16)": figures["batched_batch16"]["images_per_s"],
            "encoder img/s (batch 16)": figures["encoder_batch16"]["images_per_s"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16, help="number of images (default 16)")
    ap.add_argument("--batch", type=int, default=16, help="batch size of the batched run (default 16)")
    ap.add_argument("--beam", type=int, default=10, help="beam size k (default 10, as the paper)")
    ap.add_argument("--eos-bias", type=float, default=DEFAULT_EOS_BIAS,
                    help=f"added to the eos logit bias of the random model (default {DEFAULT_EOS_BIAS})")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"model seed (default {DEFAULT_SEED})")
    ap.add_argument("--image-seed", type=int, default=0, help="image seed (default 0)")
    ap.add_argument("--height", type=int, default=94)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN,
                    help=f"maximum decode steps (default {DEFAULT_MAX_LEN}; see above)")
    ap.add_argument("--repeats", type=int, default=5,
                    help="rounds over all phases; each phase's fastest run is reported (default 5)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--skip-reference", action="store_true", help="do not time the reference decoder")
    ap.add_argument("--quick", action="store_true", help="4 images, batch 4, 2 rounds: a smoke run")
    ap.add_argument("--out", type=Path, default=None,
                    help="output JSON (default benchmarks/results/cpu_decode_<date>[_quick].json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.batch, args.repeats = min(args.images, 4), min(args.batch, 4), 2

    load_start = [round(x, 2) for x in os.getloadavg()]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig()
    model = scaled_random_model(cfg, seed=args.seed, eos_bias=args.eos_bias)
    branch = model.l2r
    counter = StepCounter(branch)
    images = random_ink_images(args.images, args.height, args.width, args.image_seed)
    hw = feature_size(args.height, args.width)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    log(f"full ABM ({count_parameters(model):,} params), {args.images} images {args.height}x{args.width} "
        f"-> features {hw}, beam {args.beam}, eos_bias {args.eos_bias}, threads {torch.get_num_threads()}")

    figures: dict = {}
    with torch.no_grad():
        # Warm-up (allocator, kernels), not timed.
        f0, m0 = model.encode(images[:1])
        beam_search(branch, f0, m0, args.beam, max_len=3)
        reference_beam_search(branch, f0, args.beam, max_len=2)
        counter.take()

        feats = [model.encode(images[i:i + 1])[0] for i in range(args.images)]
        ones = torch.ones(1, *hw, dtype=torch.bool)
        batches = {bs: [torch.cat(feats[s:s + bs]) for s in range(0, args.images, bs)] for bs in {1, args.batch}}

        def run_batched(bs: int) -> list:
            out = []
            for f in batches[bs]:
                out += beam_search(branch, f, ones.expand(f.shape[0], -1, -1), args.beam, max_len=args.max_len)
            return out

        phases = {
            "encoder_batch1": lambda: [model.encode(images[i:i + 1])[0] for i in range(args.images)],
            f"encoder_batch{args.batch}": lambda: [model.encode(images[s:s + args.batch])
                                                  for s in range(0, args.images, args.batch)],
            "batched_batch1": lambda: run_batched(1),
            f"batched_batch{args.batch}": lambda: run_batched(args.batch),
        }
        if not args.skip_reference:
            phases["reference"] = lambda: [reference_beam_search(branch, f, args.beam, max_len=args.max_len)
                                           for f in feats]
        # Round-robin over the phases, so that each phase sees the same share of a shared machine's load;
        # each phase's figures come from its fastest run (the least disturbed).
        times: dict[str, list[float]] = {name: [] for name in phases}
        outputs, steps = {}, {}
        for r in range(args.repeats):
            for name, fn in phases.items():
                counter.take()
                t0 = time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - t0)
                steps[name] = counter.take()
                outputs.setdefault(name, out)
            log(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in phases))
        for name in phases:
            ts = times[name]
            fig = per_image(min(ts), args.images)
            fig["median_seconds"] = round(statistics.median(ts), 4)
            fig["median_images_per_s"] = round(args.images / statistics.median(ts), 3)
            fig["runs_seconds"] = [round(t, 4) for t in ts]
            if steps[name]:
                fig["decoder_steps"] = steps[name]
                fig["decoder_steps_per_s"] = round(steps[name] / fig["seconds"], 2)
            figures[name] = fig
        for name in ("batched_batch1", "reference"):
            if name in figures:
                figures[name]["mean_steps_per_image"] = round(figures[name]["decoder_steps"] / args.images, 2)
        figures[f"batched_batch{args.batch}"]["steps_per_batch"] = round(
            figures[f"batched_batch{args.batch}"]["decoder_steps"] / len(batches[args.batch]), 2)
        res_b1, res_bn, res_ref = (outputs["batched_batch1"], outputs[f"batched_batch{args.batch}"],
                                   outputs.get("reference"))

    lengths = [len(r.tokens) for r in res_b1]
    agree = {f"batch{args.batch}_vs_batch1": sum(a.tokens == b.tokens for a, b in zip(res_bn, res_b1))}
    if res_ref is not None:
        agree["batch1_vs_reference"] = sum(a.tokens == b.tokens for a, b in zip(res_b1, res_ref))
        figures["speedup_batched_b1_vs_reference"] = round(
            figures["reference"]["seconds"] / figures["batched_batch1"]["seconds"], 2)
        figures[f"speedup_batched_b{args.batch}_vs_reference"] = round(
            figures["reference"]["seconds"] / figures[f"batched_batch{args.batch}"]["seconds"], 2)
    enc1 = figures["encoder_batch1"]["seconds_per_image"]
    figures["end_to_end_batch1_images_per_s"] = round(
        1 / (enc1 + figures["batched_batch1"]["seconds_per_image"]), 3)
    encn = figures[f"encoder_batch{args.batch}"]["seconds_per_image"]
    figures[f"end_to_end_batch{args.batch}_images_per_s"] = round(
        1 / (encn + figures[f"batched_batch{args.batch}"]["seconds_per_image"]), 3)

    now = dt.datetime.now(dt.timezone.utc)
    result = {
        "benchmark": "cpu_decode",
        "date": now.isoformat(timespec="seconds"),
        "device": {"kind": "cpu", "processor": platform.processor() or platform.machine(),
                   "machine": platform.machine(), "cpu_count": os.cpu_count(),
                   "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                   "load_average_1_5_15min": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
                   "note": "shared machine: other processes may run at the same time; see load averages"},
        "git": git_info(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "setup": {"model": "full ABM (ModelConfig() defaults), random weights, L2R branch",
                  "parameters": count_parameters(model), "model_seed": args.seed, "eos_bias": args.eos_bias,
                  "images": args.images, "image_size": [args.height, args.width], "feature_grid": list(hw),
                  "image_kind": "random binary strokes, white on black", "beam": args.beam,
                  "max_len": args.max_len, "batch": args.batch, "repeats": args.repeats, "quick": args.quick,
                  "reference_step": "step_plain (literal spec 3.3)", "batched_step": "step (folded, spec 3.6)"},
        "decoded": {"mean_tokens": round(statistics.mean(lengths), 2), "min_tokens": min(lengths),
                    "mean_decoder_steps_per_image": figures["batched_batch1"]["mean_steps_per_image"],
                    "max_tokens": max(lengths), "tokens_per_image": lengths,
                    "truncated": sum(r.truncated for r in res_b1),
                    "same_tokens": agree},
        "figures": figures,
        "headline": headline(figures, args.beam),
    }
    out = args.out or REPO / "benchmarks" / "results" / \
        f"cpu_decode_{now.date().isoformat()}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    log(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
