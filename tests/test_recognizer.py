"""Recognizer API: mixed input types, per-item errors that never take down a batch, options, threads."""
from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from abm_rt import Recognizer, Result
from abm_rt.data.vocab import Vocab
from abm_rt.engine_dir import EngineError, contains_engine, default_engine_path, save_engine
from abm_rt.model import ModelConfig, scaled_random_model

SMALL = ModelConfig(growth=8, block_depth=2, hidden=32, embed=32, attn=32)


def _strokes(h: int = 94, w: int = 240, seed: int = 0) -> np.ndarray:
    """A white-on-black uint8 picture with a few thick random strokes (our own fixture)."""
    rng = np.random.default_rng(seed)
    im = Image.new("L", (w, h), 0)
    from PIL import ImageDraw
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x0, x1 = sorted(rng.integers(5, w - 5, 2))
        y0, y1 = rng.integers(10, h - 10, 2)
        d.line([(int(x0), int(y0)), (int(x1), int(y1))], fill=255, width=3)
    return np.asarray(im)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("engine")
    save_engine(path, scaled_random_model(SMALL, seed=3, eos_bias=4.0), Vocab.default())
    return path


@pytest.fixture(scope="module")
def rec(engine_dir) -> Recognizer:
    return Recognizer(engine_dir, device="cpu", beam_size=3, max_len=12)


def test_mixed_input_types_agree(rec, tmp_path):
    """The same picture given as path, bytes, PIL, numpy (uint8, float, HxWx3) and torch gives one answer."""
    a = _strokes()
    path = tmp_path / "a.png"
    Image.fromarray(a).save(path)
    items = [str(path), path, path.read_bytes(), Image.fromarray(a), a, a.astype(np.float32) / 255,
             np.stack([a] * 3, -1), torch.from_numpy(a.copy()), torch.from_numpy(a.copy())[None]]
    results = rec.predict(items)
    assert len(results) == len(items)
    assert all(isinstance(r, Result) and r.ok for r in results), [r.error for r in results]
    assert len({r.latex for r in results}) == 1
    assert len({round(r.score, 5) for r in results}) == 1
    assert all(r.score <= 0 for r in results)
    assert [r.index for r in results] == list(range(len(items)))


def test_bad_items_do_not_take_down_the_batch(rec, tmp_path):
    """Each bad item gets an error; the good items get exactly what they get without the bad ones."""
    good = [_strokes(seed=1), _strokes(94, 300, seed=2)]
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    bad = [str(tmp_path / "missing.png"), str(empty), b"not an image", np.zeros((1, 1), np.uint8),
           np.zeros((94, 200), np.uint8), np.full((20, 20), np.nan, np.float32), np.zeros((2, 3, 4, 5)),
           "x" * 10, None, {"a": 1}, np.array(["a", "b"])]
    mixed = [bad[0], good[0]] + bad[1:6] + [good[1]] + bad[6:]
    results = rec.predict(mixed)
    alone = rec.predict(good)
    got_good = [results[1], results[7]]
    for r, ref in zip(got_good, alone):
        assert r.ok and r.latex == ref.latex and r.score == pytest.approx(ref.score, abs=1e-6)
    errors = [r for i, r in enumerate(results) if i not in (1, 7)]
    assert len(errors) == len(bad)
    for r in errors:
        assert r.error and not r.ok and r.latex == "" and r.tokens == []


def test_single_item_and_empty_list(rec):
    """One item (not in a list) gives a list of one result; an empty list gives an empty list."""
    out = rec.predict(_strokes())
    assert len(out) == 1 and out[0].ok
    assert rec.predict([]) == []


def test_attention_on_request(rec):
    """return_attention gives one map per emitted token over the image's feature grid, rows summing to 1."""
    r = rec.predict([_strokes(94, 240)], return_attention=True)[0]
    assert rec.predict([_strokes(94, 240)])[0].attention is None
    assert r.attention.shape == (len(r.tokens), 6, 15)
    np.testing.assert_allclose(r.attention.reshape(len(r.tokens), -1).sum(1), 1.0, atol=1e-5)


def test_attention_rows_follow_the_tokens_a_control_token_leaves(rec, monkeypatch):
    """A search that emits a control token mid-sequence (an untrained model can emit sos) returns a map per
    emitted id; the result drops the control token and its map, so each kept token keeps its own map."""
    from abm_rt.data.vocab import SOS_ID
    from abm_rt.decode.types import DecodedSequence

    vocab = Vocab.default()
    a, b = vocab.encode(["x", "y"])
    ids = [a, SOS_ID, b]
    maps = np.stack([np.full((6, 15), float(k), np.float32) for k in range(len(ids))])
    monkeypatch.setattr(rec, "_decode", lambda pixels, want: [
        DecodedSequence(list(ids), 3.0, 0.75, False, maps if want else None) for _ in pixels])
    r = rec.predict([_strokes()], return_attention=True)[0]
    assert r.tokens == ["x", "y"] and r.latex == "x y"
    assert [float(m[0, 0]) for m in r.attention] == [0.0, 2.0]
    assert vocab.kept_positions([a, SOS_ID, b, 1, a]) == [0, 2]
    assert vocab.decode([a, SOS_ID, b, 1, a]) == ["x", "y"]


def test_truncated_when_no_hypothesis_ends(tmp_path):
    """A model that never emits eos returns its best partial hypothesis, marked truncated."""
    save_engine(tmp_path, scaled_random_model(SMALL, seed=4, eos_bias=-100.0), Vocab.default())
    r = Recognizer(tmp_path, device="cpu", beam_size=2, max_len=5).predict([_strokes()])[0]
    assert r.ok and r.truncated
    assert 0 < len(r.tokens) <= 5


def test_huge_image_is_downscaled_with_a_note(rec):
    """An image over the pixel cap is recognized after downscaling, and the result says so."""
    big = np.kron(_strokes(94, 240), np.ones((12, 12), np.uint8))     # 1128 x 2880 = 3.2 MP
    r = rec.predict([big])[0]
    assert r.ok
    assert any("downscaled" in n for n in r.notes)


def test_threads_share_one_recognizer(rec):
    """Eight threads calling predict on one Recognizer get the answers of a single-threaded call."""
    items = [_strokes(seed=s) for s in range(3)]
    expected = [r.latex for r in rec.predict(items)]
    got, errors = [], []

    def work():
        try:
            got.append([r.latex for r in rec.predict(items)])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == [expected] * 8


def test_default_engine_or_clear_error():
    """Recognizer() loads the bundled engine when one is bundled, else says plainly that none is."""
    if contains_engine(default_engine_path()):
        assert Recognizer(device="cpu").info()["engine"] == str(default_engine_path())
    else:
        with pytest.raises(EngineError, match="no trained model is bundled"):
            Recognizer(device="cpu")


def test_bad_arguments(engine_dir):
    """Misuse is an exception naming the argument."""
    with pytest.raises(ValueError, match="beam_size"):
        Recognizer(engine_dir, beam_size=0)
    with pytest.raises(ValueError, match="device"):
        Recognizer(engine_dir, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            Recognizer(engine_dir, device="cuda")
    with pytest.raises(EngineError):
        Recognizer(Path("/nonexistent/engine"))


def test_info(rec, engine_dir):
    """info() names the engine, device and backends."""
    info = rec.info()
    assert info["engine"] == str(engine_dir) and info["device"] == "cpu"
    assert info["encoder_backend"] and info["decoder"] and info["why"]


def test_native_and_pytorch_decoders_agree(engine_dir):
    """The native (C++) beam search and the PyTorch one give the same results through the Recognizer."""
    from abm_rt.decode import native
    if not native.is_available("cpu"):
        pytest.skip("abm_rt._C is not built")
    items = [_strokes(seed=s) for s in range(4)] + [_strokes(94, 300, seed=9)]
    a = Recognizer(engine_dir, device="cpu", beam_size=3, max_len=12, decoder="native")
    b = Recognizer(engine_dir, device="cpu", beam_size=3, max_len=12, decoder="pytorch")
    assert a.info()["decoder"].startswith("native") and b.info()["decoder"].startswith("pytorch")
    for x, y in zip(a.predict(items), b.predict(items)):
        assert x.tokens == y.tokens and x.truncated == y.truncated
        assert x.score == pytest.approx(y.score, abs=1e-5)


def test_compaction_switch_keeps_results(engine_dir):
    """compact=False (finished images stay in the working batch) gives the same results as the default,
    info() says which ran, and decoder_graphs is off on a CPU device (CUDA graphs need CUDA)."""
    from abm_rt.decode import native
    if not native.is_available("cpu"):
        pytest.skip("abm_rt._C is not built")
    items = [_strokes(seed=s) for s in range(5)] + [_strokes(60, 120, seed=7), _strokes(94, 300, seed=9)]
    # compact is left at its default (on)
    on = Recognizer(engine_dir, device="cpu", beam_size=3, max_len=12, max_batch_size=8, decoder_graphs=True)
    off = Recognizer(engine_dir, device="cpu", beam_size=3, max_len=12, max_batch_size=8, compact=False)
    assert on.info()["compact"] is True and off.info()["compact"] is False
    assert on.info()["decoder_graphs"] is False
    for x, y in zip(on.predict(items), off.predict(items)):
        assert x.tokens == y.tokens and x.truncated == y.truncated
        assert x.score == pytest.approx(y.score, abs=1e-6)


def test_pad_multiple_sets_the_canvas(engine_dir):
    """The batch canvas is the largest image rounded up to ``pad_multiple`` (1: not rounded), or the smallest
    canvas of the trainer's grid that holds it (heights 64, 96, ..; widths 128, 192, ..); 0 is refused."""
    with pytest.raises(ValueError, match="pad_multiple"):
        Recognizer(engine_dir, device="cpu", pad_multiple=0)
    items = [_strokes(50, 101, seed=1), _strokes(61, 90, seed=2)]
    for multiple, grid, canvas in ((1, False, (61, 101)), (16, False, (64, 112)), (16, True, (64, 128))):
        r = Recognizer(engine_dir, device="cpu", beam_size=2, max_len=6, pad_multiple=multiple, canvas_grid=grid)
        seen = []
        encode = r.encoder.encode
        r.encoder.encode = lambda x, m: (seen.append(tuple(x.shape[-2:])), encode(x, m))[1]
        assert all(res.ok for res in r.predict(items))
        assert seen == [canvas]
