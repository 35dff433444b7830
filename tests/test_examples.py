"""Checks on the committed ``examples/`` (made by ``tools/make_examples.py``)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SCRIPT = REPO / "tools" / "make_examples.py"
CONTROL = {"sos", "eos", "<eol>"}


def read_labels(path: Path) -> dict[str, list[str]]:
    labels = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        name, sep, caption = line.partition("\t")
        assert sep and name and caption, f"{path}:{n}: expected '<name>\\t<tokens>', got {line!r}"
        assert caption == " ".join(caption.split()), f"{path}:{n}: tokens must be single-space separated"
        assert name not in labels, f"{path}:{n}: duplicate name {name}"
        labels[name] = caption.split(" ")
    return labels


@pytest.fixture(scope="module")
def labels() -> dict[str, list[str]]:
    return read_labels(EXAMPLES / "labels.txt")


def test_labels_parse(labels):
    assert len(labels) == 12
    for name, tokens in labels.items():
        assert (EXAMPLES / f"{name}.png").is_file(), f"{name}.png is missing"
        assert 3 <= len(tokens) <= 20, f"{name}: {len(tokens)} tokens"
        assert tokens.count("{") == tokens.count("}"), f"{name}: unbalanced braces"
    assert sorted(p.stem for p in EXAMPLES.glob("*.png")) == sorted(labels), "stray or unlabeled images"


def test_tokens_in_vocab(labels):
    vocab_lines = (REPO / "abm_rt" / "data" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    vocab = {t for t in vocab_lines if t.strip()} - CONTROL
    for name, tokens in labels.items():
        unknown = sorted(set(tokens) - vocab)
        assert not unknown, f"{name}: tokens not in vocab.txt: {unknown}"


def test_images_match_training_format(labels):
    for name in labels:
        with Image.open(EXAMPLES / f"{name}.png") as im:
            assert im.format == "PNG"
            assert im.mode == "L", f"{name}: mode {im.mode}"
            a = np.asarray(im)
        assert set(np.unique(a).tolist()) <= {0, 255}, f"{name}: not binary"
        assert a.mean() < 80, f"{name}: should be white ink on black (mean {a.mean():.1f})"
        assert (a == 255).sum() > 100, f"{name}: no ink"
        assert 40 <= a.shape[0] <= 400, f"{name}: height {a.shape[0]}"
        assert 46 <= a.shape[1] <= 1700, f"{name}: width {a.shape[1]}"
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
        assert not border.any(), f"{name}: ink touches the border (no margin)"


@pytest.mark.skipif(importlib.util.find_spec("HersheyFonts") is None,
                    reason="regeneration needs the Hershey fonts: pip install Hershey-Fonts")
def test_regenerates_identically(tmp_path, labels):
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True,
                   capture_output=True, text=True)
    assert read_labels(tmp_path / "labels.txt") == labels
    for name in labels:
        with Image.open(EXAMPLES / f"{name}.png") as old, Image.open(tmp_path / f"{name}.png") as new:
            assert old.size == new.size, f"{name}: size {old.size} != {new.size}"
            assert np.array_equal(np.asarray(old), np.asarray(new)), f"{name}: pixels differ"
