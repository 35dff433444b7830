"""``abm-rt eval``: ExpRate, <=1, <=2 and WER on a labelled folder (CROHME layout)."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

from ..data.crohme import find_caption_file, read_captions
from ..metrics import edit_distance, score_predictions
from ..version import source_commit
from .common import add_model_options, make_recognizer


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("eval", help="score the model on a labelled folder (ExpRate, <=1, <=2, WER)",
                       description="Recognize every image of DATASET_DIR (caption.txt or labels.txt with "
                                   "'NAME<TAB>space separated tokens' lines, and NAME.png images) and score it. "
                                   "Every item counts: an image that fails or is truncated is an error, never "
                                   "dropped (the paper's script divides by the predictions it made).")
    p.add_argument("dataset", metavar="DATASET_DIR")
    p.add_argument("--json", metavar="REPORT", help="write the summary and per-item results to this JSON file")
    p.add_argument("--limit", type=int, default=None, help="only the first N items (quick checks)")
    p.add_argument("--omit-references", action="store_true",
                   help="leave the reference captions out of the JSON report (for reports on data that may not be "
                        "redistributed, such as CROHME)")
    add_model_options(p)


def _image_path(folder: Path, name: str) -> Path:
    p = folder / f"{name}.png"
    if p.exists():
        return p
    others = sorted(folder.glob(f"{name}.*"))
    return others[0] if others else p


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit status."""
    folder = Path(args.dataset)
    try:
        captions = read_captions(find_caption_file(folder))
    except (OSError, ValueError) as e:
        print(f"abm-rt eval: {e}", file=sys.stderr)
        return 2
    if args.limit is not None:
        captions = captions[:args.limit]
    rec = make_recognizer(args)
    t0 = time.perf_counter()
    results = rec.predict([str(_image_path(folder, n)) for n, _ in captions], progress=True)
    seconds = time.perf_counter() - t0
    # A truncated decode is an error for the metric: it never produced an end token.
    preds = [r.tokens if r.ok and not r.truncated else None for r in results]
    refs = [toks for _, toks in captions]
    scores = score_predictions(preds, refs)
    summary = {**scores.to_dict(), "seconds": round(seconds, 2),
               "images_per_second": round(len(captions) / seconds, 3) if seconds > 0 else None}
    print(f"{folder}: {scores.total} items  ExpRate {scores.exprate:.2f}  <=1 {scores.le1:.2f}  "
          f"<=2 {scores.le2:.2f}  WER {scores.wer:.2f}  (failed {scores.failed}; {seconds:.1f} s)")
    if args.json:
        items = [{"name": n, **({} if args.omit_references else {"reference": " ".join(ref)}), "prediction": r.latex, "score": r.to_dict()["score"],
                  "distance": edit_distance(r.tokens, ref) if r.ok else None, "truncated": r.truncated,
                  "error": r.error} for (n, ref), r in zip(captions, results)]
        report = {"command": "abm-rt " + " ".join(sys.argv[1:]), "date": dt.datetime.now(dt.timezone.utc).isoformat(
            timespec="seconds"), "dataset": str(folder), "device": _device_name(rec.device),
            "host": platform.node(), "recognizer": rec.info(), "commit": source_commit(), "summary": summary,
            "items": items}
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


def _device_name(device) -> str:
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"
