#!/usr/bin/env python3
"""Generate ``examples/``: 12 synthetic, handwriting-like math images with LaTeX labels.

The images are ours: each one is drawn from the Hershey stroke fonts (public domain vector
glyphs) plus a few hand-coded strokes (fraction bar, radical sign, theta) and laid out by the
tiny LaTeX layout engine below. Nothing is taken from any data set.

"Handwriting-like" means every glyph gets its own random jitter in position (+-1.5 px),
slant (a few degrees of shear), scale (+-8 %) and stroke width (2-4 px). The random
generator is seeded, so the same ``--seed`` always gives pixel-identical images.

Output matches ABM's training bitmaps: 8-bit grayscale PNG (mode ``L``), white ink (255)
on black (0), binary values only, about 94 px high for a plain one-line expression, a few
pixels of margin around the ink. ``labels.txt`` has one ``<name>\\t<tokens>`` line per
image, tokens separated by single spaces as in the CROHME captions.

Supported LaTeX subset: sequences of symbols, ``^ { .. }``, ``_ { .. }``,
``\\frac { .. } { .. }``, ``\\sqrt { .. }``; ``\\sum`` and ``\\lim`` take their limits
above/below, ``\\int`` to the right.

Requires ``pip install Hershey-Fonts`` (import name ``HersheyFonts``) and Pillow.

Usage: python tools/make_examples.py [--out examples/] [--seed 20240]
"""
from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

try:
    from HersheyFonts import HersheyFonts
except ImportError as exc:  # pragma: no cover - only hit without the dev dependency
    raise SystemExit("tools/make_examples.py needs the Hershey fonts: pip install Hershey-Fonts") from exc

REPO = Path(__file__).resolve().parents[1]

# (name, label) - every token must be in abm_rt/data/vocab.txt.
EXAMPLES = [
    ("ex01_pythagoras", r"x ^ { 2 } + y ^ { 2 } = r ^ { 2 }"),
    ("ex02_am_gm", r"\frac { a + b } { 2 } \geq \sqrt { a b }"),
    ("ex03_sqrt_bound", r"| x | \leq \sqrt { x ^ { 2 } + 1 }"),
    ("ex04_series", r"\sum _ { k = 0 } ^ { \infty } x ^ { k }"),
    ("ex05_integral", r"\int _ { 0 } ^ { 1 } f ( x ) d x"),
    ("ex06_angles", r"\alpha + \beta + \gamma = \pi"),
    ("ex07_trig", r"\sin ^ { 2 } \theta + \cos ^ { 2 } \theta = 1"),
    ("ex08_decay", r"f ( t ) = e ^ { - \lambda t }"),
    ("ex09_recurrence", r"a _ { n + 1 } = 2 a _ { n }"),
    ("ex10_limit", r"\lim _ { x \rightarrow 0 } \frac { \sin x } { x } = 1"),
    ("ex11_quadratic", r"x = \frac { - b \pm \sqrt { \Delta } } { 2 a }"),
    ("ex12_log", r"\log ( x y ) = \log x + \log y"),
]

CAP = 21.0  # Hershey units from cap line (-12) to base line (9)
BASE_Y = 9.0  # Hershey base line
SIZE = 64.0  # cap height in px of a main-line glyph
SCRIPT = 0.6  # size factor of super/subscripts and limits
MARGIN = 5  # px of black around the ink
SS = 4  # supersampling factor for drawing before binarizing

# token -> (Hershey face, character). Single characters not listed come from "scripts";
# \theta, \sum, \int, \ldots, \cdots, fraction bars and radicals are drawn by hand below.
GLYPHS = {
    r"\alpha": ("greeks", "a"), r"\beta": ("greeks", "b"), r"\gamma": ("greeks", "c"),
    r"\lambda": ("greeks", "k"), r"\mu": ("greeks", "l"), r"\pi": ("greeks", "p"),
    r"\sigma": ("greeks", "r"), r"\phi": ("greeks", "u"), r"\Delta": ("greeks", "D"),
    r"\pm": ("mathlow", "!"), r"\times": ("mathlow", "#"), r"\cdot": ("mathlow", "$"),
    r"\leq": ("mathlow", "&"), r"\geq": ("mathlow", "'"), r"\neq": ("mathlow", "?"),
    r"\in": ("mathlow", "h"), r"\rightarrow": ("mathlow", "i"), r"\exists": ("mathlow", "v"),
    r"\div": ("mathlow", "x"), r"\infty": ("mathlow", "_"),
    r"\{": ("scripts", "{"), r"\}": ("scripts", "}"), r"\prime": ("scripts", "'"),
}
FUNCTIONS = {r"\sin": "sin", r"\cos": "cos", r"\tan": "tan", r"\log": "log", r"\lim": "lim"}
LIMITS_BELOW = {r"\sum", r"\lim"}  # display-style limits, as people write them
RELATIONS = {"=", "<", ">", r"\leq", r"\geq", r"\neq", r"\rightarrow", r"\in"}
BINARY = {"+", "-", r"\pm", r"\times", r"\div", r"\cdot"}

_FONTS: dict[str, dict] = {}


def font(face: str) -> dict:
    """All glyphs of a built-in Hershey face, keyed by character (cached)."""
    if face not in _FONTS:
        f = HersheyFonts()
        f.load_default_font(face)
        _FONTS[face] = f.all_glyphs
    return _FONTS[face]


# ----------------------------------------------------------------------------- boxes

Stroke = tuple[float, list[tuple[float, float]]]  # (line width px, polyline); y down, baseline 0


@dataclass
class Box:
    """A laid-out piece: advance width, extent above/below the baseline, its strokes."""

    w: float
    asc: float
    desc: float
    strokes: list[Stroke] = field(default_factory=list)

    def place(self, dx: float, dy: float) -> list[Stroke]:
        return [(lw, [(x + dx, y + dy) for x, y in pts]) for lw, pts in self.strokes]


def ink_box(strokes: list[Stroke], w: float) -> Box:
    ys = [y for _, pts in strokes for _, y in pts]
    return Box(w, max(0.0, -min(ys)), max(0.0, max(ys)), strokes)


class Pen:
    """Per-glyph handwriting jitter drawn from one seeded RNG."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.slant = rng.uniform(-2.0, 6.0)  # the writer's slant, degrees
        self.width = rng.uniform(2.3, 3.7)  # the writer's pen width, px

    def u(self, a: float, b: float) -> float:
        return self.rng.uniform(a, b)

    def lw(self) -> float:
        return min(4.0, max(2.0, self.width + self.u(-0.4, 0.4)))

    def glyph(self, polylines: list[list[tuple[float, float]]], adv: float) -> Box:
        """Jitter glyph-local polylines (px, baseline at y=0, origin at the left edge)."""
        s = 1.0 + self.u(-0.08, 0.08)
        shear = math.tan(math.radians(self.slant + self.u(-3.0, 3.0)))
        dx, dy = self.u(-1.5, 1.5), self.u(-1.5, 1.5)
        lw = self.lw()
        out = [(lw, [(x * s - shear * y * s + dx, y * s + dy) for x, y in pts]) for pts in polylines]
        return ink_box(out, adv * s)

    def line(self, x0: float, y0: float, x1: float, y1: float, n: int = 6) -> Stroke:
        """A slightly wobbly hand-drawn straight line."""
        wob = self.u(-1.0, 1.0)
        pts = []
        for i in range(n + 1):
            t = i / n
            pts.append((x0 + (x1 - x0) * t, y0 + (y1 - y0) * t + wob * math.sin(math.pi * t)))
        return (self.lw(), pts)


# ----------------------------------------------------------------------------- glyphs


def hershey(face: str, ch: str, size: float, pen: Pen) -> Box:
    """A Hershey glyph at cap height ``size``; spacing is by ink, not the font's wide advance."""
    g = font(face)[ch]
    k = size / CAP
    (x0, _), (x1, _) = g.draw_box
    lines = [[((x - x0) * k, (y - BASE_Y) * k) for x, y in st] for st in g.strokes]
    return pen.glyph(lines, (x1 - x0) * k)


def theta(size: float, pen: Pen) -> Box:
    """Lower-case theta (not in the Hershey greek faces): a tall oval with a bar."""
    rx, ry, cx, cy = 0.26 * size, 0.5 * size, 0.38 * size, -0.5 * size
    oval = [(cx + rx * math.sin(2 * math.pi * i / 36), cy - ry * math.cos(2 * math.pi * i / 36))
            for i in range(37)]
    bar = [(cx - rx, cy), (cx + rx, cy)]
    return pen.glyph([oval, bar], 0.8 * size)


def big_op(tok: str, size: float, pen: Pen) -> Box:
    """Single-stroke sigma and integral sign, centred on the math axis like written ones."""
    if tok == r"\sum":
        h, w = 1.5 * size, 1.0 * size
        pts = [(0.95, 0.14), (0.9, 0.0), (0.0, 0.0), (0.55, 0.5), (0.0, 1.0), (0.92, 1.0), (1.0, 0.85)]
        line = [(x * w, y * h) for x, y in pts]
    else:  # \int: a cubic Bezier S with hooks at both ends
        h, w = 1.7 * size, 0.55 * size
        p = [(1.0, 0.08), (0.6, -0.2), (0.4, 1.2), (0.0, 0.92)]
        line = []
        for i in range(33):
            t = i / 32
            c = [(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t * t * (1 - t), t ** 3]
            line.append((sum(ci * q[0] for ci, q in zip(c, p)) * w, sum(ci * q[1] for ci, q in zip(c, p)) * h))
    top = -0.43 * size - h / 2
    return pen.glyph([[(x, y + top) for x, y in line]], w + 0.1 * size)


def dots(size: float, pen: Pen, centred: bool) -> Box:
    y = -0.43 * size if centred else -0.02 * size
    r = 0.03 * size
    lines = [[(x - r, y), (x + r, y)] for x in (0.15 * size, 0.45 * size, 0.75 * size)]
    return pen.glyph(lines, 0.9 * size)


def symbol(tok: str, size: float, pen: Pen) -> Box:
    if tok in FUNCTIONS:  # \sin, \log, ... written as a word of close-set letters
        boxes = [hershey("scripts", c, size, pen) for c in FUNCTIONS[tok]]
        return hbox(boxes, [0.01 * size] * (len(boxes) - 1))
    if tok in (r"\sum", r"\int"):
        return big_op(tok, size, pen)
    if tok == r"\theta":
        return theta(size, pen)
    if tok in (r"\ldots", r"\cdots"):
        return dots(size, pen, tok == r"\cdots")
    if tok in GLYPHS:
        return hershey(*GLYPHS[tok], size, pen)
    if len(tok) == 1 and tok in font("scripts"):
        return hershey("scripts", tok, size, pen)
    raise KeyError(f"no glyph for token {tok!r}")


# ----------------------------------------------------------------------------- layout


def hbox(boxes: list[Box], gaps: list[float]) -> Box:
    x, strokes = 0.0, []
    for i, b in enumerate(boxes):
        strokes += b.place(x, 0)
        x += b.w + (gaps[i] if i < len(gaps) else 0.0)
    if not boxes:
        return Box(0, 0, 0, [])
    return Box(x, max(b.asc for b in boxes), max(b.desc for b in boxes), strokes)


def parse(tokens: list[str], i: int = 0, close: bool = False) -> tuple[list, int]:
    """Token list -> list of nodes; a node is ("sym", tok), ("frac", a, b), ("sqrt", a),
    ("group", seq) or ("script", base, sup, sub)."""
    seq: list = []
    while i < len(tokens):
        t = tokens[i]
        if t == "}":
            if not close:
                raise ValueError("unbalanced '}'")
            return seq, i + 1
        if t in ("^", "_"):
            if not seq:
                raise ValueError(f"'{t}' without a base")
            base = seq.pop()
            if base[0] != "script":
                base = ("script", base, None, None)
            arg, i = group(tokens, i + 1)
            base = (base[0], base[1], arg if t == "^" else base[2], arg if t == "_" else base[3])
            seq.append(base)
            continue
        if t == r"\frac":
            a, i = group(tokens, i + 1)
            b, i = group(tokens, i)
            seq.append(("frac", a, b))
        elif t == r"\sqrt":
            a, i = group(tokens, i + 1)
            seq.append(("sqrt", a))
        elif t == "{":
            a, i = parse(tokens, i + 1, close=True)
            seq.append(("group", a))
        else:
            seq.append(("sym", t))
            i += 1
    if close:
        raise ValueError("missing '}'")
    return seq, i


def group(tokens: list[str], i: int) -> tuple[list, int]:
    if i >= len(tokens) or tokens[i] != "{":
        raise ValueError(f"expected '{{' at token {i}")
    return parse(tokens, i + 1, close=True)


def lay_seq(seq: list, size: float, pen: Pen) -> Box:
    boxes, gaps = [], []
    for n, node in enumerate(seq):
        tok = node[1] if node[0] == "sym" else None
        rel, binop = tok in RELATIONS, tok in BINARY and n > 0  # a leading '-' is unary
        pad = (0.35 if rel else 0.28 if binop else 0.0) * size
        if boxes and pad:
            gaps[-1] += pad
        boxes.append(lay(node, size, pen))
        head = node[1][1] if node[0] == "script" and node[1][0] == "sym" else tok
        op = head in FUNCTIONS or head in (r"\sum", r"\int")  # \sin x, \sum x ^ { k }
        gaps.append(pad + (0.15 if op else 0.0) * size + pen.u(0.08, 0.16) * size)
    return hbox(boxes, gaps[:-1])


def lay(node: tuple, size: float, pen: Pen) -> Box:
    kind = node[0]
    if kind == "sym":
        return symbol(node[1], size, pen)
    if kind == "group":
        return lay_seq(node[1], size, pen)
    if kind == "frac":
        return lay_frac(node, size, pen)
    if kind == "sqrt":
        return lay_sqrt(node, size, pen)
    return lay_script(node, size, pen)


def lay_frac(node: tuple, size: float, pen: Pen) -> Box:
    num, den = lay_seq(node[1], 0.9 * size, pen), lay_seq(node[2], 0.9 * size, pen)
    pad, gap, axis = 0.15 * size, 0.2 * size, -0.43 * size
    w = max(num.w, den.w) + 2 * pad
    strokes = num.place((w - num.w) / 2, axis - gap - num.desc)
    strokes += den.place((w - den.w) / 2, axis + gap + den.asc)
    strokes.append(pen.line(pen.u(0, 0.05) * size, axis, w - pen.u(0, 0.05) * size, axis + pen.u(-1.5, 1.5)))
    return Box(w, -axis + gap + num.desc + num.asc, axis + gap + den.asc + den.desc, strokes)


def lay_sqrt(node: tuple, size: float, pen: Pen) -> Box:
    body = lay_seq(node[1], size, pen)
    asc, desc = max(body.asc, 0.75 * size), max(body.desc, 0.05 * size)
    top, bot, rw = -asc - 0.18 * size, desc + 0.05 * size, 0.45 * size
    mid = bot - 0.45 * (bot - top)
    x_end = rw + 0.12 * size + body.w + 0.1 * size
    lw = pen.lw()
    radical = [(0.0, mid + 0.08 * size), (0.12 * rw, mid), (0.45 * rw, bot), (rw, top),
               (x_end, top + pen.u(-1.5, 1.5))]
    strokes = [(lw, [(x + pen.u(-0.8, 0.8), y + pen.u(-0.8, 0.8)) for x, y in radical])]
    strokes += body.place(rw + 0.12 * size, 0)
    return Box(x_end, -top, bot, strokes)


def lay_script(node: tuple, size: float, pen: Pen) -> Box:
    _, base_node, sup_node, sub_node = node
    base = lay(base_node, size, pen)
    small = max(SCRIPT * size, 0.3 * SIZE)
    sup = lay_seq(sup_node, small, pen) if sup_node is not None else None
    sub = lay_seq(sub_node, small, pen) if sub_node is not None else None
    strokes, asc, desc = list(base.strokes), base.asc, base.desc
    if base_node[0] == "sym" and base_node[1] in LIMITS_BELOW:
        w = max(base.w, sup.w if sup else 0, sub.w if sub else 0)
        strokes = base.place((w - base.w) / 2, 0)
        gap = 0.15 * size
        if sup:
            y = -base.asc - gap - sup.desc
            strokes += sup.place((w - sup.w) / 2, y)
            asc = -y + sup.asc
        if sub:
            y = base.desc + gap + sub.asc
            strokes += sub.place((w - sub.w) / 2, y)
            desc = y + sub.desc
        return Box(w, asc, desc, strokes)
    is_int = base_node == ("sym", r"\int")
    x = base.w + 0.03 * size
    w = x
    if sup:
        y = -base.asc + 0.6 * sup.asc if is_int else -max(0.45 * size, base.asc - 0.4 * sup.asc)
        dx = 0.15 * size if is_int else 0.0  # follow the integral's slant
        strokes += sup.place(x + dx, y)
        asc, w = max(asc, -y + sup.asc), max(w, x + dx + sup.w)
    if sub:
        y = base.desc - 0.1 * sub.asc if is_int else max(0.25 * size, base.desc - 0.3 * sub.asc)
        dx = -0.15 * size if is_int else 0.0
        strokes += sub.place(x + dx, y)
        desc, w = max(desc, y + sub.desc), max(w, x + dx + sub.w)
    if is_int:
        w += 0.2 * size  # the integrand's descenders hang left; keep them off the limits
    return Box(w, asc, desc, strokes)


# ----------------------------------------------------------------------------- render


def render(label: str, rng: random.Random) -> Image.Image:
    """Lay out a space-separated LaTeX token string and draw it as a binary L-mode image."""
    pen = Pen(rng)
    seq, _ = parse(label.split())
    box = lay_seq(seq, SIZE * rng.uniform(0.96, 1.04), pen)
    xs = [x for _, pts in box.strokes for x, _ in pts]
    ys = [y for _, pts in box.strokes for _, y in pts]
    pad = 4 + MARGIN
    x0, y0 = min(xs) - pad, min(ys) - pad
    w, h = math.ceil(max(xs) - x0 + pad), math.ceil(max(ys) - y0 + pad)
    im = Image.new("L", (w * SS, h * SS), 0)
    draw = ImageDraw.Draw(im)
    for lw, pts in box.strokes:
        p = [((x - x0) * SS, (y - y0) * SS) for x, y in pts]
        r = lw * SS / 2
        if len(p) > 1:
            draw.line(p, fill=255, width=max(1, round(lw * SS)), joint="curve")
        for cx, cy in (p[0], p[-1]):  # round pen caps
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    im = im.resize((w, h), Image.Resampling.BOX).point(lambda v: 255 if v >= 128 else 0)
    l, t, r, b = im.getbbox()
    return im.crop((l - MARGIN, t - MARGIN, r + MARGIN, b + MARGIN))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Needs: pip install Hershey-Fonts")
    ap.add_argument("--out", type=Path, default=REPO / "examples",
                    help="output directory (default: examples/ at the repository root)")
    ap.add_argument("--seed", type=int, default=20240, help="RNG seed (default: 20240)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (name, label) in enumerate(EXAMPLES):
        im = render(label, random.Random(args.seed * 1000 + i))
        im.save(args.out / f"{name}.png", optimize=False)
        lines.append(f"{name}\t{label}\n")
        print(f"{name}.png {im.width}x{im.height}  {label}")
    (args.out / "labels.txt").write_text("".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
