"""How much bidirectional rescoring can give on a labelled set, and how it depends on the R2L weight.

One L2R beam search per batch (the Recognizer's encoder, batching and decoder), every finished hypothesis
kept and scored once by the R2L branch (``decode.rescore``). From those scores, for each weight w in
``--weights``: the ExpRate when each image keeps the lowest ``(L2R + w * R2L) / (n + 1)`` (w = 0 is the
L2R search's own choice), plus the oracle: the share of images whose reference is among the finished
hypotheses at all (no weight can do better). ``--r2l-beam`` adds the hypotheses of an R2L beam search to
the candidates (a bidirectional search, as BTTR's), to see what that would add. Writes a JSON under
benchmarks/results/.

    python3 tools/eval_rescore_weights.py ../shared/data/crohme/2014 --device cpu --batch-size 16
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from abm_rt import Recognizer  # noqa: E402
from abm_rt.data.buckets import pad_batch, size_batches  # noqa: E402
from abm_rt.data.crohme import find_caption_file, read_captions  # noqa: E402
from abm_rt.data.images import ImageOptions, load_image  # noqa: E402
from abm_rt.data.vocab import EOS_ID, SOS_ID  # noqa: E402
from abm_rt.decode.rescore import candidate_r2l_scores, combined_score, r2l_search_candidates  # noqa: E402
from abm_rt.decode.types import Candidate  # noqa: E402
from abm_rt.version import source_commit  # noqa: E402


def candidate_scores(rec: Recognizer, images: list, batch_size: int, r2l_beam: bool = False
                     ) -> list[list[tuple[list[str], Candidate, float]]]:
    """Per image: (tokens, candidate with its L2R raw score, R2L raw score) of every finished hypothesis of its
    L2R beam, and with ``r2l_beam`` also of an R2L beam search (its hypotheses reversed into reading order
    and scored by L2R teacher forcing), each distinct token sequence once."""
    def search(branch, native, sos, eos, f, m):     # the Recognizer's own search, candidates kept
        return rec._search(branch, native, f, m, False, True, sos, eos)

    out: list = [[] for _ in images]
    for g in size_batches([im.shape for im in images], batch_size, rec.max_batch_pixels):
        with torch.inference_mode():
            x, pm = pad_batch([images[i] for i in g], multiple=rec.pad_multiple, grid=rec.canvas_grid)
            f, m = rec.encoder.encode(x, pm)
            seqs = search(rec.model.l2r, rec._native, SOS_ID, EOS_ID, f, m)
            seen = [set() for _ in g]
            for j, c, r2l in candidate_r2l_scores(seqs, rec.model.r2l, f, m, rec._native_r2l):
                out[g[j]].append((rec.vocab.decode(c.tokens), c, r2l))
                seen[j].add(tuple(c.tokens))
            if r2l_beam:
                # The R2L search starts from eos and ends on sos (spec 4.2); its hypotheses come back in reading order.
                r2l_seqs = search(rec.model.r2l, rec._native_r2l, EOS_ID, SOS_ID, f, m)
                for j, c, r2l in r2l_search_candidates(r2l_seqs, rec.model.l2r, f, m, rec._native, seen):
                    out[g[j]].append((rec.vocab.decode(c.tokens), c, r2l))
    return out


def main() -> int:
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", metavar="DATASET_DIR")
    ap.add_argument("--engine", default=None, help="engine directory with r2l.safetensors (default: the bundled one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--beam", type=int, default=10)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--weights", default="0,0.3,0.5,0.7,1,1.5,2", help="comma separated R2L weights")
    ap.add_argument("--r2l-beam", action="store_true",
                    help="also run an R2L beam search and add its hypotheses to each image's candidates")
    ap.add_argument("--out", type=Path, default=None, help="JSON to write (default: benchmarks/results/...)")
    args = ap.parse_args()
    folder = Path(args.dataset)
    captions = read_captions(find_caption_file(folder))[: args.limit]
    rec = Recognizer(args.engine, device=args.device, beam_size=args.beam, rescore="r2l")
    images = [load_image(str(folder / f"{n}.png"), ImageOptions()).pixels for n, _ in captions]
    t0 = time.perf_counter()
    cands = candidate_scores(rec, images, args.batch_size, args.r2l_beam)
    seconds = time.perf_counter() - t0
    refs = [t for _, t in captions]
    n = len(refs)
    rows = []
    for w in [float(x) for x in args.weights.split(",")]:
        right = 0
        for ref, cs in zip(refs, cands):
            if cs:
                best = min(cs, key=lambda c: combined_score(c[1], c[2], w))
                right += best[0] == ref
        rows.append({"weight": w, "exprate": round(100 * right / n, 2)})
        print(json.dumps(rows[-1]), flush=True)
    oracle = round(100 * sum(any(c[0] == ref for c in cs) for ref, cs in zip(refs, cands)) / n, 2)
    unfinished = sum(not cs for cs in cands)
    print(f"oracle (reference among the finished hypotheses): {oracle} %; images with none finished: {unfinished}")
    date = dt.date.today().isoformat()
    out = args.out or REPO / "benchmarks" / "results" / f"rescore_weights_{folder.name}{'_r2l-beam' if args.r2l_beam else ''}_{args.device.split(':')[0]}_{date}.json"
    doc = {"benchmark": "rescore_weights", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "device": args.device, "commit": source_commit(), "command": "python3 tools/eval_rescore_weights.py " +
           " ".join(sys.argv[1:]), "dataset": folder.name, "items": n, "beam": args.beam, "batch_size": args.batch_size, "r2l_beam": args.r2l_beam,
           "engine": rec.info()["engine"], "provenance_run": rec.info()["provenance"].get("run"),
           "seconds": round(seconds, 1), "oracle_exprate": oracle, "images_without_finished_hypothesis": unfinished,
           "rows": rows, "headline": {"oracle ExpRate": oracle, **{f"w={r['weight']:g} ExpRate": r["exprate"] for r in rows}}}
    out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
