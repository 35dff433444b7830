"""``abm-rt recognize``: files, folders and globs -> LaTeX (text or JSON)."""
from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

from .common import add_model_options, make_recognizer

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".pbm"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("recognize", help="recognize images and print their LaTeX",
                       description="Recognize handwritten math in image files. Folders are searched for "
                                   f"images ({', '.join(sorted(IMAGE_SUFFIXES))}); glob patterns are expanded. "
                                   "Prints 'FILE<TAB>LATEX' lines, or a JSON array with --json. A file that "
                                   "cannot be recognized gets an error entry and the others still run; the "
                                   "exit status is 1 when any file failed.")
    p.add_argument("inputs", nargs="+", metavar="PATH", help="image files, folders or glob patterns")
    p.add_argument("--json", action="store_true", help="print a JSON array: file, latex, tokens, score, truncated, "
                                                       "error, notes")
    p.add_argument("--attention", metavar="DIR", help="also write one PNG of attention maps per image to DIR")
    add_model_options(p)


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files as given; folders -> their images (sorted); globs -> their matches (sorted)."""
    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(str(f) for f in sorted(p.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists() or not glob.has_magic(item):
            out.append(item)               # a missing file is reported per item, not here
        else:
            out.extend(sorted(glob.glob(item)))
    return out


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit status."""
    files = expand_inputs(args.inputs)
    if not files:
        print("abm-rt recognize: no images found in " + " ".join(args.inputs), file=sys.stderr)
        return 2
    rec = make_recognizer(args)
    results = rec.predict(files, return_attention=bool(args.attention), progress=len(files) > 8)
    if args.attention:
        from ..viz import save_attention_png
        Path(args.attention).mkdir(parents=True, exist_ok=True)
        for f, r in zip(files, results):
            if r.ok and r.attention is not None:
                save_attention_png(Path(args.attention) / f"{Path(f).stem}.attention.png", f, r, rec.image_options)
    if args.json:
        print(json.dumps([{"file": f, **r.to_dict()} for f, r in zip(files, results)], indent=1))
    else:
        for f, r in zip(files, results):
            line = r.latex + ("    [truncated]" if r.truncated else "") if r.ok else f"ERROR: {r.error}"
            print(f"{f}\t{line}")
    return 0 if all(r.ok for r in results) else 1
