"""Reader for the CROHME offline layout: ``SPLIT/caption.txt`` ("NAME<TAB>tokens") + ``SPLIT/NAME.png``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Sample:
    """One labelled expression: its name, its uint8 image [H, W] (white ink on black) and tokens."""

    name: str
    image: np.ndarray
    tokens: list[str]


def read_captions(path: str | Path) -> list[tuple[str, list[str]]]:
    """Parse a caption file: one ``NAME<TAB>space separated tokens`` per line, in file order."""
    out = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        name, sep, rest = line.partition("\t")
        if not sep:  # tolerate "NAME tok tok" (space separated, as the paper's caption files)
            name, _, rest = line.partition(" ")
        if not name:
            raise ValueError(f"{path}:{lineno}: no name")
        out.append((name, rest.split()))
    return out


def find_caption_file(split_dir: str | Path) -> Path:
    """The caption file of a split folder: ``caption.txt`` or ``labels.txt``."""
    split_dir = Path(split_dir)
    for name in ("caption.txt", "labels.txt"):
        if (split_dir / name).is_file():
            return split_dir / name
    raise FileNotFoundError(f"{split_dir}: no caption.txt or labels.txt (expected 'NAME<TAB>tokens' lines)")


def read_split(split_dir: str | Path, limit: int | None = None, load_images: bool = True) -> list[Sample]:
    """Read a split folder (``train/``, ``2014/`` or ``examples/``). Images are read as uint8 grayscale.

    ``limit`` keeps the first N captions (in file order) for quick runs.
    """
    split_dir = Path(split_dir)
    caps = read_captions(find_caption_file(split_dir))
    if limit is not None:
        caps = caps[:limit]
    samples = []
    for name, tokens in caps:
        image = np.zeros((0, 0), np.uint8)
        if load_images:
            with Image.open(split_dir / f"{name}.png") as im:
                image = np.asarray(im.convert("L"), dtype=np.uint8)
        samples.append(Sample(name, image, tokens))
    return samples
