"""What an ensemble of ABM models (or of input scales of one model) would give, measured on a labelled set.

Each member is an engine directory with its R2L branch, optionally at an input scale (``ENGINE@0.8``: the
images resized by 0.8 before that member sees them; test-time augmentation when the engine repeats). For
every batch:

1. every member runs its own L2R beam search (the Recognizer's encoder, batching and decoder) and keeps
   every finished hypothesis;
2. the hypotheses of all members are pooled, each distinct token sequence once;
3. every member scores every pooled hypothesis by teacher forcing, with its L2R and its R2L branch
   (``decode.rescore.teacher_forced_scores``): raw sums of -log p over the n + 1 predicted tokens.

Each image then keeps the pooled hypothesis with the lowest ``sum over the chosen scores / (n + 1)``. The
JSON reports, per combination: every member alone (its own beam, L2R alone and rescored with its R2L, as
``abm-rt eval`` does), each member's own beam under all members' scores (one search, several rescoring
passes), and the pool under the L2R scores of all members and under all their scores. Plus
the oracle (the reference among the pooled hypotheses). Nothing here is tuned: every score counts alike.

    python3 tools/eval_ensemble.py ../shared/data/crohme/2014 abm_rt/assets/default /tmp/eng_s3b --device cpu
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from abm_rt import Recognizer  # noqa: E402
from abm_rt.data.buckets import pad_batch, size_batches  # noqa: E402
from abm_rt.data.crohme import find_caption_file, read_captions  # noqa: E402
from abm_rt.data.images import ImageOptions, load_image  # noqa: E402
from abm_rt.decode import beam_search  # noqa: E402
from abm_rt.decode.native_search import native_beam_search  # noqa: E402
from abm_rt.decode.rescore import teacher_forced_scores  # noqa: E402
from abm_rt.model.teacher import teacher_tensors  # noqa: E402
from abm_rt.version import source_commit  # noqa: E402


def parse_member(spec: str) -> tuple[str, float]:
    """``ENGINE`` or ``ENGINE@SCALE`` -> (engine path, scale)."""
    path, _, scale = spec.partition("@")
    return path, float(scale) if scale else 1.0


def rescaled(pixels: np.ndarray, scale: float) -> np.ndarray:
    """``pixels`` [H, W] float resized by ``scale`` (bilinear, antialiased when shrinking)."""
    if scale == 1.0:
        return pixels
    H, W = pixels.shape
    size = (max(1, round(H * scale)), max(1, round(W * scale)))
    t = torch.from_numpy(pixels)[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)[0, 0].numpy()


def member_search(rec: Recognizer, images: list[np.ndarray]) -> tuple[list[list[tuple[int, ...]]], list, list]:
    """One member's L2R beam on a batch: (finished hypotheses per image, its features, mask)."""
    x, pm = pad_batch(images, multiple=rec.pad_multiple, grid=rec.canvas_grid)
    f, m = rec.encoder.encode(x, pm)
    if rec._native is not None:
        seqs = native_beam_search(rec._native, f, m, rec.beam_size, max_len=rec.max_len, keep_candidates=True)
    else:
        seqs = beam_search(rec.model.l2r, f, m, rec.beam_size, max_len=rec.max_len, keep_candidates=True)
    return [[tuple(c.tokens) for c in s.candidates] for s in seqs], f, m


def member_scores(rec: Recognizer, f: torch.Tensor, m: torch.Tensor, rows: list[tuple[int, tuple[int, ...]]]
                  ) -> tuple[list[float], list[float]]:
    """(L2R raw scores, R2L raw scores) of (image, tokens) ``rows`` under one member, teacher-forced."""
    image = torch.tensor([j for j, _ in rows], dtype=torch.long)
    out = []
    for branch, native, reverse in ((rec.model.l2r, rec._native, False), (rec.model.r2l, rec._native_r2l, True)):
        inputs, targets, steps = teacher_tensors([list(t) for _, t in rows], reverse=reverse)
        out.append(teacher_forced_scores(branch, f, m, image, inputs, targets, steps, native).tolist())
    return out[0], out[1]


def pooled_scores(members: list[tuple[Recognizer, float]], images: list[np.ndarray], batch_size: int,
                  max_pixels: int) -> list[dict]:
    """Per image: its pooled hypotheses, which member's beam found each, and every member's two scores."""
    out: list[dict] = [{} for _ in images]
    for g in size_batches([im.shape for im in images], batch_size, max_pixels):
        found, encoded = [], []
        with torch.inference_mode():
            for rec, scale in members:
                hyps, f, m = member_search(rec, [rescaled(images[i], scale) for i in g])
                found.append(hyps)
                encoded.append((f, m))
            pools = [sorted({t for hyps in found for t in hyps[j]}) for j in range(len(g))]
            rows = [(j, t) for j, pool in enumerate(pools) for t in pool]
            if not rows:
                continue
            scores = [member_scores(rec, f, m, rows) for (rec, _), (f, m) in zip(members, encoded)]
        for r, (j, t) in enumerate(rows):
            entry = out[g[j]].setdefault("hyps", [])
            entry.append({"tokens": t, "found_by": [k for k, hyps in enumerate(found) if t in hyps[j]],
                          "l2r": [s[0][r] for s in scores], "r2l": [s[1][r] for s in scores]})
    return out


def choose(hyps: list[dict], members: list[int], use_r2l: bool, own_beam: int | None = None) -> tuple[int, ...] | None:
    """The hypothesis with the lowest summed score / (n + 1) over ``members`` (their L2R, and R2L when
    ``use_r2l``); with ``own_beam`` only the hypotheses that member's beam found (the single-model case)."""
    pool = [h for h in hyps if own_beam is None or own_beam in h["found_by"]]
    if not pool:
        return None

    def value(h: dict) -> float:
        total = sum(h["l2r"][k] + (h["r2l"][k] if use_r2l else 0.0) for k in members)
        return total / (len(h["tokens"]) + 1)

    return min(pool, key=value)["tokens"]


def main() -> int:
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", metavar="DATASET_DIR")
    ap.add_argument("members", nargs="+", metavar="ENGINE[@SCALE]", help="engine directories with their R2L branch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--beam", type=int, default=10)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--name", default="ensemble", help="name in the output file")
    ap.add_argument("--out", type=Path, default=None, help="JSON to write (default: benchmarks/results/...)")
    args = ap.parse_args()
    folder = Path(args.dataset)
    captions = read_captions(find_caption_file(folder))[: args.limit]
    specs = [parse_member(s) for s in args.members]
    members = [(Recognizer(path, device=args.device, beam_size=args.beam, rescore="r2l"), scale) for path, scale in specs]
    images = [load_image(str(folder / f"{n}.png"), ImageOptions()).pixels for n, _ in captions]
    t0 = time.perf_counter()
    per_image = pooled_scores(members, images, args.batch_size, members[0][0].max_batch_pixels)
    seconds = time.perf_counter() - t0
    vocab = members[0][0].vocab
    refs = [list(t) for _, t in captions]

    def right_answer(tokens, ref) -> bool:
        # as abm-rt eval compares: the LaTeX tokens the Recognizer would return
        return tokens is not None and vocab.decode(list(tokens)) == ref

    n = len(refs)
    everyone = list(range(len(members)))
    combos = {}
    for k in everyone:
        combos[f"member {k} alone, L2R"] = dict(members=[k], use_r2l=False, own_beam=k)
        combos[f"member {k} alone, rescored"] = dict(members=[k], use_r2l=True, own_beam=k)
        combos[f"pool, member {k}'s L2R + R2L"] = dict(members=[k], use_r2l=True)
        # one beam search, every member rescoring: the cheap form (one search, several teacher-forced passes)
        combos[f"member {k}'s beam, every L2R + R2L"] = dict(members=everyone, use_r2l=True, own_beam=k)
    combos["pool, every L2R"] = dict(members=everyone, use_r2l=False)
    combos["pool, every L2R + R2L"] = dict(members=everyone, use_r2l=True)
    rows = []
    for label, how in combos.items():
        right = sum(right_answer(choose(img.get("hyps", []), **how), ref) for img, ref in zip(per_image, refs))
        rows.append({"combination": label, "exprate": round(100 * right / n, 2), "correct": right})
        print(json.dumps(rows[-1]), flush=True)
    oracle = round(100 * sum(any(right_answer(h["tokens"], ref) for h in img.get("hyps", []))
                             for img, ref in zip(per_image, refs)) / n, 2)
    print(f"oracle (reference among the pooled hypotheses): {oracle} %; {seconds:.0f} s")
    date = dt.date.today().isoformat()
    out = args.out or REPO / "benchmarks" / "results" / f"ensemble_{folder.name}_{args.name}_{args.device.split(':')[0]}_{date}.json"
    doc = {"benchmark": "ensemble", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "device": args.device, "commit": source_commit(),
           "command": "python3 tools/eval_ensemble.py " + " ".join(sys.argv[1:]), "dataset": folder.name, "items": n,
           "beam": args.beam, "batch_size": args.batch_size,
           "members": [{"engine": str(rec.engine.path), "scale": scale, "run": rec.info()["provenance"].get("run")}
                       for rec, scale in members],
           "seconds": round(seconds, 1), "oracle_exprate": oracle, "rows": rows,
           "headline": {r["combination"]: r["exprate"] for r in rows}}
    out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
