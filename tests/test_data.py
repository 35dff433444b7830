"""Data layer: the vocabulary (spec 4.1), batch formation (spec 1.5 and our size buckets), padding with
masks (spec 1.3) and the CROHME folder reader."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from abm_rt.data.buckets import pad_batch, paper_batches, size_batches
from abm_rt.data.crohme import find_caption_file, read_captions, read_split
from abm_rt.data.vocab import EOS_ID, SOS_ID, Vocab

REPO = Path(__file__).resolve().parents[1]
CROHME = REPO.parent / "shared" / "data" / "crohme"


# ---- vocabulary ------------------------------------------------------------------------------------

def test_default_vocab_layout():
    """Vocab.default() has 113 tokens, sos = 0, eos = 1, <eol> = 112, and a few spec 4.1 entries."""
    v = Vocab.default()
    assert len(v) == 113
    assert SOS_ID == 0 and EOS_ID == 1
    assert v.tokens[0] == "sos" and v.tokens[1] == "eos" and v.tokens[112] == "<eol>"
    assert v.index["sos"] == 0 and v.index["eos"] == 1 and v.index["<eol>"] == 112
    for i, tok in {2: r"\geq", 3: r"\sqrt", 58: "{", 84: r"\frac", 94: "=", 111: "}"}.items():
        assert v.tokens[i] == tok


def test_default_vocab_matches_crohme_dictionary():
    """Vocab.default() equals ../shared/data/crohme/dictionary.txt (TOKEN<TAB>ID) token for token."""
    path = CROHME / "dictionary.txt"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    assert Vocab.load(path) == Vocab.default()
    assert Vocab.load(path).sha256() == Vocab.default().sha256()


def test_vocab_round_trips():
    """encode/decode and to_latex/from_latex are inverse on symbol sequences; decode stops at eos and
    drops sos/<eol>; vocab.txt text reloads to the same vocabulary."""
    v = Vocab.default()
    toks = [r"\frac", "{", "x", "^", "{", "2", "}", "}", "{", r"\sqrt", "{", "y", "}", "}", "=", r"\alpha"]
    ids = v.encode(toks)
    assert all(isinstance(i, int) for i in ids)
    assert v.decode(ids) == toks
    latex = v.to_latex(ids)
    assert latex == " ".join(toks)
    assert v.from_latex(latex) == ids
    assert v.from_latex("  x   +  1 ") == v.encode(["x", "+", "1"])
    assert v.decode([SOS_ID] + ids + [EOS_ID] + v.encode(["x"])) == toks
    assert v.decode(v.encode(["x", "<eol>", "y"])) == ["x", "y"]
    for sym in range(2, 112):
        assert v.decode(v.encode(v.decode([sym]))) == [v.tokens[sym]]


def test_vocab_text_reload(tmp_path):
    """to_text() written to a file loads back (one token per line) to an equal vocabulary."""
    v = Vocab.default()
    p = tmp_path / "vocab.txt"
    p.write_text(v.to_text(), encoding="utf-8")
    assert Vocab.load(p) == v


def test_unknown_token_raises_keyerror_naming_it():
    """encode/from_latex raise KeyError whose message names the unknown token."""
    v = Vocab.default()
    with pytest.raises(KeyError, match="notatoken"):
        v.encode(["x", "notatoken", "y"])
    with pytest.raises(KeyError, match=r"\\foo"):
        v.from_latex(r"x + \foo")


def test_vocab_rejects_bad_lists():
    """A vocabulary must start with sos, eos and have no duplicates."""
    with pytest.raises(ValueError):
        Vocab(["eos", "sos", "x"])
    with pytest.raises(ValueError):
        Vocab(["sos", "eos", "x", "x"])


# ---- spec 1.5: the paper's batches -----------------------------------------------------------------

def test_paper_batches_hand_made():
    """Stable area sort, closing rule `area * (count + 1) > batch_pixels or count == batch_size`, and
    dropping above max_image_pixels, on a hand-made list worked out by hand (spec 1.5)."""
    sizes = [(10, 10), (5, 20), (20, 20), (1, 50), (30, 30), (10, 30), (40, 40), (4, 25)]
    # areas:   100       100       400       50        900       300       1600      100
    # sorted (stable): 3(50) 0(100) 1(100) 7(100) 5(300) 2(400) 4(900) 6(1600)
    # 3 -> [3]; 0: 100*2 <= 700 -> [3,0]; 1: 300 -> [3,0,1]; 7: count == 3 -> close, [7];
    # 5: 300*2 = 600 -> [7,5]; 2: 400*3 = 1200 > 700 -> close, [2]; 4: 900*2 > 700 -> close, [4]
    # (900 alone is above batch_pixels but kept: only max_image_pixels drops); 6: 1600 > 1000 -> dropped.
    batches, dropped = paper_batches(sizes, batch_size=3, batch_pixels=700, max_image_pixels=1000)
    assert batches == [[3, 0, 1], [7, 5], [2], [4]]
    assert dropped == [6]
    batches, dropped = paper_batches(sizes, batch_size=3, batch_pixels=700)
    assert batches == [[3, 0, 1], [7, 5], [2], [4], [6]] and dropped == []


def _data_iterator_literal(sizes, batch_size, batch_imagesize, max_imagesize):
    """The paper's dataIterator loop transcribed (labels never too long here)."""
    areas = [(i, h * w) for i, (h, w) in enumerate(sizes)]
    areas = sorted(areas, key=lambda d: d[1])
    batches, dropped, cur = [], [], []
    biggest, i = 0, 0
    for uid, size in areas:
        if size > biggest:
            biggest = size
        batch_image_size = biggest * (i + 1)
        if size > max_imagesize:
            dropped.append(uid)
        else:
            if batch_image_size > batch_imagesize or i == batch_size:
                batches.append(cur)
                i, biggest, cur = 0, size, [uid]
                i += 1
            else:
                cur.append(uid)
                i += 1
    batches.append(cur)
    return [b for b in batches if b], dropped


def test_paper_batches_equals_literal_loop():
    """paper_batches equals a literal transcription of dataIterator on random size lists with many area
    ties, for the training (16, 320k, 320k) and test (8, 500k, 500k) settings of spec 1.5."""
    rng = random.Random(0)
    for trial in range(30):
        sizes = [(rng.choice([40, 60, 94, 120, 200, 300]), rng.choice([100, 256, 400, 800, 1200, 2000]))
                 for _ in range(rng.randint(1, 200))]
        for bs, bp in ((16, 320_000), (8, 500_000)):
            assert paper_batches(sizes, bs, bp, bp) == _data_iterator_literal(sizes, bs, bp, bp), trial


def _check_size_batches(sizes, batches, max_bs, max_px):
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(sizes))), "every index exactly once, none dropped"
    for b in batches:
        assert 1 <= len(b) <= max_bs
        hmax = max(sizes[i][0] for i in b)
        wmax = max(sizes[i][1] for i in b)
        if len(b) > 1:
            assert hmax * wmax * len(b) <= max_px, (b, hmax, wmax)


def test_size_batches_properties():
    """size_batches never drops, keeps max_batch_size, and keeps the padded pixels (max H x max W x count)
    within budget except for a singleton larger than the budget; every index appears exactly once."""
    rng = random.Random(1)
    for trial in range(40):
        n = rng.randint(1, 150)
        sizes = [(rng.randint(8, 400), rng.randint(8, 2500)) for _ in range(n)]
        max_bs, max_px = rng.choice([1, 4, 16, 64]), rng.choice([50_000, 320_000, 1_000_000])
        batches = size_batches(sizes, max_bs, max_px)
        _check_size_batches(sizes, batches, max_bs, max_px)
    # Oversize images: alone, but never dropped.
    sizes = [(100, 100), (1000, 1000), (50, 50), (2000, 10), (100, 120)]
    batches = size_batches(sizes, 8, 100_000)
    _check_size_batches(sizes, batches, 8, 100_000)
    assert [1] in batches


def test_pad_batch_top_left_and_mask():
    """pad_batch places each image at the top-left of a zero canvas, with a pixel mask true exactly on
    its pixels; `multiple` rounds the canvas up."""
    rng = np.random.default_rng(0)
    ims = [rng.random((5, 9)).astype(np.float32), rng.random((12, 3)).astype(np.float32),
           np.ones((1, 1), np.float32)]
    x, m = pad_batch(ims)
    assert x.shape == (3, 1, 12, 9) and m.shape == (3, 12, 9)
    assert x.dtype.is_floating_point and m.dtype == __import__("torch").bool
    for i, im in enumerate(ims):
        h, w = im.shape
        assert np.array_equal(x[i, 0, :h, :w].numpy(), im)
        assert float(x[i, 0].sum()) == pytest.approx(float(im.sum()), rel=1e-6)   # zeros elsewhere
        assert bool(m[i, :h, :w].all()) and int(m[i].sum()) == h * w
    x16, m16 = pad_batch(ims, multiple=16)
    assert x16.shape == (3, 1, 16, 16) and m16.shape == (3, 16, 16)
    assert np.array_equal(x16[:, :, :12, :9].numpy(), x.numpy())
    assert int(m16.sum()) == int(m.sum())


# ---- CROHME reader ---------------------------------------------------------------------------------

def _write_png(path: Path, arr: np.ndarray, mode: str = "L"):
    im = Image.fromarray(arr)
    if mode != "L":
        im = im.convert(mode)
    im.save(path)


def test_read_split_tmp_folder(tmp_path):
    """read_split reads caption.txt (tab form and space form, blank lines skipped) in file order and the
    PNGs as uint8 grayscale [H, W]; RGB PNGs are converted; limit and load_images work."""
    rng = np.random.default_rng(0)
    arrays = {"a_1": (rng.random((20, 30)) > 0.8).astype(np.uint8) * 255,
              "b_2": (rng.random((7, 11)) > 0.5).astype(np.uint8) * 255,
              "c_3": (rng.random((9, 4)) > 0.5).astype(np.uint8) * 255}
    _write_png(tmp_path / "a_1.png", arrays["a_1"])
    _write_png(tmp_path / "b_2.png", arrays["b_2"])
    _write_png(tmp_path / "c_3.png", arrays["c_3"], mode="RGB")
    (tmp_path / "caption.txt").write_text(
        "a_1\tx ^ { 2 } + 1\n\nb_2 \\frac { a } { b }\nc_3\t\\sqrt { y }\n", encoding="utf-8")
    samples = read_split(tmp_path)
    assert [s.name for s in samples] == ["a_1", "b_2", "c_3"]
    assert samples[0].tokens == ["x", "^", "{", "2", "}", "+", "1"]
    assert samples[1].tokens == [r"\frac", "{", "a", "}", "{", "b", "}"]
    assert samples[2].tokens == [r"\sqrt", "{", "y", "}"]
    for s in samples:
        assert s.image.dtype == np.uint8 and s.image.ndim == 2
        assert np.array_equal(s.image, arrays[s.name])
    assert [s.name for s in read_split(tmp_path, limit=2)] == ["a_1", "b_2"]
    lazy = read_split(tmp_path, load_images=False)
    assert [s.tokens for s in lazy] == [s.tokens for s in samples] and lazy[0].image.size == 0


def test_read_split_labels_txt_and_missing(tmp_path):
    """labels.txt is accepted when caption.txt is absent; a folder with neither is a FileNotFoundError."""
    with pytest.raises(FileNotFoundError, match="caption.txt"):
        find_caption_file(tmp_path)
    (tmp_path / "labels.txt").write_text("n\tx\n", encoding="utf-8")
    assert find_caption_file(tmp_path).name == "labels.txt"
    assert read_captions(tmp_path / "labels.txt") == [("n", ["x"])]


def test_crohme_2014_split():
    """The staged CROHME 2014 test split has 986 items, every PNG exists, every token is in the vocabulary,
    and a sample of images are binary uint8 white-on-black."""
    split = CROHME / "2014"
    if not (split / "caption.txt").is_file():
        pytest.skip(f"{split} not present")
    samples = read_split(split, load_images=False)
    assert len(samples) == 986
    assert len({s.name for s in samples}) == 986
    v = Vocab.default()
    unknown = {t for s in samples for t in s.tokens if t not in v.index or t in Vocab.CONTROL}
    assert not unknown, sorted(unknown)
    assert all((split / f"{s.name}.png").is_file() for s in samples)
    assert max(len(s.tokens) for s in samples) == 204          # 505_em_51 (spec 7.6)
    for s in read_split(split, limit=10):
        assert s.image.dtype == np.uint8 and set(np.unique(s.image).tolist()) <= {0, 255}
        assert s.image.mean() < 128


def test_canvas_grid_is_the_trainers_and_pads_to_it():
    """CanvasGrid holds the trainer's canvases (ShapeGrid's heights and widths), picks the smallest that holds an
    image, rounds past its end to 16 / 32, and pad_batch pads a batch to it."""
    from abm_rt.data.buckets import CanvasGrid
    from training.packed import ShapeGrid
    g = CanvasGrid()
    assert g.heights == ShapeGrid().heights and g.widths == ShapeGrid().widths
    assert g.canvas(64, 128) == (64, 128) and g.canvas(65, 129) == (96, 192)
    assert g.canvas(600, 3000) == (608, 3008)
    x, m = pad_batch([np.ones((70, 100), np.float32), np.ones((50, 200), np.float32)], grid=g)
    assert x.shape == (2, 1, 96, 288) and int(m[0].sum()) == 7000 and int(m[1].sum()) == 10000
