"""A PNG of a run's curves (training losses and 2014 validation ExpRate per epoch) from its log.jsonl.

Drawn with Pillow alone so the trainer needs no plotting library: ``python -m training.plot RUN_DIR``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

SERIES = [("ce_l2r", (31, 119, 180)), ("ce_r2l", (255, 127, 14)), ("kl", (44, 160, 44)),
          ("val_ce", (148, 103, 189))]


def read_log(path: str | Path) -> list[dict]:
    """The per-epoch records of a log.jsonl (start/pause events left out)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "epoch" in rec and "event" not in rec:
            out.append(rec)
    return out


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], records: list[dict],
           series: list[tuple[str, tuple[int, int, int]]], title: str) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((x0 + 4, y0 - 14), title, fill=(0, 0, 0))
    pts = {k: [(r["epoch"], r[k]) for r in records if r.get(k) is not None] for k, _ in series}
    vals = [v for p in pts.values() for _, v in p]
    if not vals:
        return
    lo, hi = min(vals), max(vals)
    hi = hi if hi > lo else lo + 1
    emax = max(r["epoch"] for r in records)
    for i, frac in enumerate((0, 0.5, 1)):
        v = lo + (hi - lo) * frac
        y = y1 - (y1 - y0) * frac
        draw.text((x0 - 46, y - 6), f"{v:.3g}", fill=(0, 0, 0))
    draw.text((x1 - 60, y1 + 4), f"epoch {emax}", fill=(0, 0, 0))
    for j, (k, color) in enumerate(s for s in series if pts[s[0]]):      # runs without EMA: no ema_ label
        p = [(x0 + (x1 - x0) * e / max(1, emax), y1 - (y1 - y0) * (v - lo) / (hi - lo)) for e, v in pts[k]]
        if len(p) > 1:
            draw.line(p, fill=color, width=2)
        for x, y in p[-1:]:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
        draw.text((x0 + 8 + 90 * j, y0 + 4), k, fill=color)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``curves.png`` for ``run_dir/log.jsonl``: losses; validation ExpRate, <=1, <=2, and the EMA
    weights' ExpRate in runs that validate an EMA, and the epoch mean's in runs with --average-from."""
    run_dir = Path(run_dir)
    records = read_log(run_dir / "log.jsonl")
    img = Image.new("RGB", (900, 560), (255, 255, 255))
    d = ImageDraw.Draw(img)
    _panel(d, (60, 30, 880, 260), records, SERIES, "losses")
    _panel(d, (60, 310, 880, 530), records, [("val_exprate", (214, 39, 40)), ("val_le1", (140, 86, 75)),
                                             ("val_le2", (127, 127, 127)), ("ema_val_exprate", (23, 190, 207)),
                                             ("tail_val_exprate", (148, 103, 189))],
           "CROHME 2014 (validation), %")
    out = Path(out) if out else run_dir / "curves.png"
    img.save(out)
    return out


if __name__ == "__main__":
    print(plot_run(sys.argv[1]))
