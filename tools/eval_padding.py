"""How batching and padding change the ExpRate of one engine on a labelled folder (e.g. CROHME 2014).

The paper's test decodes one image at a time, unpadded; the recognizer batches images of similar size and
rounds each batch's canvas up to a multiple of 16 pixels. Padding is not neutral for this model: the CNN
(BatchNorm, convolutions, ceil-mode pooling) sees the padded zeros, only the attention is masked. This tool
decodes the same images under several (batch size, pad multiple or the trainer's canvas grid) settings and reports each one's scores and
how many predictions differ from the first setting:

    python3 tools/eval_padding.py /path/to/crohme/2014 --settings 1x1,1x16,32x16 --device cuda --out pad.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

from abm_rt import Recognizer
from abm_rt.data.crohme import find_caption_file, read_captions
from abm_rt.metrics import score_predictions
from abm_rt.version import source_commit


def parse_settings(text: str) -> list[tuple[int, int | str]]:
    """``"1x1,32x16,16xgrid"`` -> [(1, 1), (32, 16), (16, "grid")]: batch size x canvas rounding, where
    ``grid`` is the trainer's canvas grid (``Recognizer(canvas_grid=True)``)."""
    out: list[tuple[int, int | str]] = []
    for item in text.split(","):
        b, m = item.lower().split("x")
        if int(b) < 1 or (m != "grid" and int(m) < 1):
            raise ValueError(f"batch size and pad multiple must be >= 1 (or the multiple 'grid'), got {item!r}")
        out.append((int(b), m if m == "grid" else int(m)))
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="a folder with caption.txt (or labels.txt) and NAME.png images")
    p.add_argument("--settings", default="1x1,1x16,32x16",
                   help="comma separated BATCHxMULTIPLE: images per batch x canvas rounding in pixels, or xgrid for "
                        "the trainer's canvas grid (default 1x1,1x16,32x16)")
    p.add_argument("--engine", default=None, help="engine directory (default: the bundled model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--decoder", default="auto", choices=["auto", "native", "pytorch"])
    p.add_argument("--beam", type=int, default=10)
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--out", default=None, help="write the report here (JSON)")
    args = p.parse_args(argv)
    folder = Path(args.dataset)
    captions = read_captions(find_caption_file(folder))[: args.limit]
    paths = [str(folder / f"{n}.png") for n, _ in captions]
    refs = [toks for _, toks in captions]
    rows, first = [], None
    for batch, multiple in parse_settings(args.settings):
        rec = Recognizer(args.engine, device=args.device, decoder=args.decoder, beam_size=args.beam,
                         max_batch_size=batch, max_len=256, pad_multiple=16 if multiple == "grid" else multiple,
                         canvas_grid=multiple == "grid")
        t0 = time.perf_counter()
        results = rec.predict(paths)
        seconds = time.perf_counter() - t0
        preds = [r.tokens if r.ok and not r.truncated else None for r in results]
        first = first or preds
        scores = score_predictions(preds, refs)
        row = {"batch_size": batch, "pad_multiple": multiple, **scores.to_dict(), "seconds": round(seconds, 2),
               "predictions_differing_from_first_setting": sum(a != b for a, b in zip(preds, first))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "command": "python3 tools/eval_padding.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": source_commit(),
            "dataset": str(folder),
            "recognizer": rec.info(), "settings": rows}, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
