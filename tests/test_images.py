"""Tests for ``abm_rt.data.images``: every accepted input kind, normalization, and every bad input."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from abm_rt.data.images import ImageError, ImageOptions, LoadedImage, load_image

H, W = 94, 300


def make_picture() -> np.ndarray:
    """94x300 uint8: white strokes (with grey anti-aliased edges) on black, ~7% ink like CROHME."""
    a = np.zeros((H, W), np.uint8)
    a[40:44, 20:120] = 255          # a minus sign
    a[39, 20:120] = a[44, 20:120] = 128
    a[20:75, 150:154] = 255         # a 1
    for i in range(50):             # a slash
        a[20 + i, 200 + i // 2:203 + i // 2] = 255
    a[60:64, 240:290] = 200
    return a


PIC = make_picture()
REF = PIC.astype(np.float32) / 255.0


def png_bytes(arr: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", **save)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height but whose data is a few bytes (a decompression bomb
    as far as the header is concerned)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """The picture saved in several formats."""
    out = {}
    def save(name: str, arr: np.ndarray, fmt: str = "PNG", **kw) -> None:
        out[name] = tmp_path / f"{name}.{fmt.lower()}"
        Image.fromarray(arr).save(out[name], fmt, **kw)
    save("gray", PIC)
    save("inverse", 255 - PIC)
    save("rgb", np.repeat(PIC[..., None], 3, axis=2))
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 3] = PIC                 # black ink on transparency, the usual "transparent PNG"
    save("rgba", rgba)
    save("gray16", PIC.astype(np.uint16) * 257)
    save("jpeg", PIC, "JPEG", quality=95)
    return out


def check_contract(r: LoadedImage) -> None:
    assert isinstance(r, LoadedImage)
    assert r.pixels.dtype == np.float32 and r.pixels.ndim == 2 and r.pixels.flags["C_CONTIGUOUS"]
    assert r.pixels.min() >= 0.0 and r.pixels.max() <= 1.0


# ---------------------------------------------------------------- every input kind, same pixels
SAME = {
    "path": lambda f: f["gray"],
    "str path": lambda f: str(f["gray"]),
    "bytes": lambda f: f["gray"].read_bytes(),
    "bytearray": lambda f: bytearray(f["gray"].read_bytes()),
    "memoryview": lambda f: memoryview(f["gray"].read_bytes()),
    "PIL L": lambda f: Image.fromarray(PIC),
    "PIL lazy file": lambda f: Image.open(f["gray"]),
    "PIL RGB": lambda f: Image.fromarray(PIC).convert("RGB"),
    "PIL P": lambda f: Image.fromarray(PIC).convert("P"),
    "PIL LA": lambda f: Image.fromarray(PIC).convert("LA"),
    "PIL F": lambda f: Image.fromarray(REF),
    "rgb png": lambda f: f["rgb"],
    "rgba png (black ink on transparency)": lambda f: f["rgba"],
    "16-bit png": lambda f: f["gray16"],
    "numpy uint8 HxW": lambda f: PIC,
    "numpy HxWx1": lambda f: PIC[..., None],
    "numpy HxWx3": lambda f: np.repeat(PIC[..., None], 3, axis=2),
    "numpy HxWx4 opaque": lambda f: np.dstack([PIC, PIC, PIC, np.full_like(PIC, 255)]),
    "numpy uint16": lambda f: PIC.astype(np.uint16) * 257,
    "numpy int64 (range 0..255)": lambda f: PIC.astype(np.int64),
    "numpy float32 [0,1]": lambda f: REF,
    "numpy float64 [0,255]": lambda f: PIC.astype(np.float64),
    "numpy float16": lambda f: REF.astype(np.float16),
    "numpy non-contiguous": lambda f: np.asfortranarray(PIC),
    "torch [H,W]": lambda f: torch.from_numpy(REF.copy()),
    "torch [1,H,W]": lambda f: torch.from_numpy(REF.copy())[None],
    "torch [3,H,W]": lambda f: torch.from_numpy(REF.copy())[None].expand(3, H, W),
    "torch [1,1,H,W] uint8": lambda f: torch.from_numpy(PIC.copy())[None, None],
    "torch bfloat16 (0..255)": lambda f: torch.from_numpy(PIC.astype(np.float32)).to(torch.bfloat16),
    "torch requires_grad": lambda f: torch.from_numpy(REF.copy()).requires_grad_(),
}


@pytest.mark.parametrize("kind", list(SAME))
def test_every_kind_gives_the_same_pixels(files, kind):
    item = SAME[kind](files)
    r = load_image(item)
    check_contract(r)
    assert r.source_size == (H, W) and r.scale == 1.0
    np.testing.assert_allclose(r.pixels, REF, atol=2e-3 if "float16" in kind or "LA" in kind else 1e-6)
    # "rgba" composites onto white (dark ink on white) and is then inverted back; all others are not
    assert r.inverted == ("rgba" in kind)


def test_jpeg_loads_close_to_the_picture(files):
    r = load_image(files["jpeg"])
    check_contract(r)
    assert not r.inverted and r.pixels.shape == (H, W)
    assert np.abs(r.pixels - REF).mean() < 0.02


def test_output_never_shares_the_input_memory():
    src = REF.copy()
    r = load_image(src)
    r.pixels[:] = 0.5
    np.testing.assert_array_equal(src, REF)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6                 # "rotate 90 CW to display": stored sideways by a phone
    buf = io.BytesIO()
    Image.fromarray(PIC).save(buf, "JPEG", exif=exif, quality=95)
    r = load_image(buf.getvalue())
    assert r.pixels.shape == (W, H) and r.source_size == (W, H)
    assert any("EXIF" in n for n in r.notes)


# ---------------------------------------------------------------- inversion
def test_auto_inverts_black_on_white(files):
    r = load_image(files["inverse"])
    assert r.inverted and any("inverted" in n for n in r.notes)
    np.testing.assert_allclose(r.pixels, REF, atol=1e-6)


def test_auto_keeps_white_on_black():
    r = load_image(PIC)
    assert not r.inverted and r.notes == []


def test_auto_keeps_an_image_with_ink_touching_the_border():
    a = PIC.copy()
    a[:, :60] = 255                  # a big stroke along part of the border: the median still says black
    assert not load_image(a).inverted


def test_invert_never_and_always():
    r = load_image(255 - PIC, ImageOptions(invert="never"))
    assert not r.inverted
    np.testing.assert_allclose(r.pixels, 1.0 - REF, atol=1e-6)
    r = load_image(PIC, ImageOptions(invert="always"))
    assert r.inverted and any("always" in n for n in r.notes)
    np.testing.assert_allclose(r.pixels, 1.0 - REF, atol=1e-6)


# ---------------------------------------------------------------- binarize, resize
def test_binarize_gives_only_zero_and_one():
    noisy = np.clip(REF * 0.6 + 0.2 + np.random.default_rng(0).normal(0, 0.05, REF.shape), 0, 1)
    r = load_image(noisy.astype(np.float32), ImageOptions(binarize=True))
    assert set(np.unique(r.pixels)) == {0.0, 1.0}
    assert (r.pixels == (REF >= 0.5)).mean() > 0.99
    assert any("Otsu" in n for n in r.notes)


def test_binarize_after_inversion_and_resize():
    r = load_image(255 - PIC, ImageOptions(binarize=True, target_height=47))
    assert r.inverted and r.pixels.shape == (47, 150)
    assert set(np.unique(r.pixels)) == {0.0, 1.0}
    assert r.pixels.mean() < 0.2         # ink stays the minority: binarized after the inversion


@pytest.mark.parametrize("height,width", [(47, 150), (188, 600), (94, 300)])
def test_target_height(height, width):
    r = load_image(PIC, ImageOptions(target_height=height))
    assert r.pixels.shape == (height, width)
    assert r.scale == pytest.approx(height / H) and r.source_size == (H, W)
    assert bool(r.notes) == (height != H)
    assert r.pixels.max() > 0.9          # strokes survive downscaling (area averaging)


def test_huge_image_is_downscaled_to_max_pixels():
    a = np.zeros((3000, 4500), np.uint8)
    a[1000:1010, 500:4000] = 255
    r = load_image(a)
    h, w = r.pixels.shape
    assert h * w <= 1_000_000 and h * w > 990_000
    assert abs(w - h * 4500 / 3000) <= 1
    assert any("downscaled" in n and "max_pixels" in n for n in r.notes)
    assert r.scale == pytest.approx(h / 3000)
    assert r.pixels.max() > 0.5          # a 10-px stroke shrunk ~3.7x is still bright


def test_target_height_then_max_pixels():
    r = load_image(PIC, ImageOptions(target_height=188, max_pixels=10_000))
    h, w = r.pixels.shape
    assert h * w <= 10_000 and abs(w - h * W / H) <= 1
    assert len(r.notes) == 2


# ---------------------------------------------------------------- options validation
@pytest.mark.parametrize("kwargs,field", [
    ({"invert": "yes"}, "invert"), ({"binarize": 1}, "binarize"), ({"target_height": 0}, "target_height"),
    ({"target_height": 9.5}, "target_height"), ({"max_pixels": -1}, "max_pixels"),
    ({"min_side": 0}, "min_side"), ({"max_file_pixels": True}, "max_file_pixels"),
])
def test_bad_options(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ImageOptions(**kwargs)


# ---------------------------------------------------------------- bad inputs
def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def good_png() -> bytes:
    noise = np.random.default_rng(1).integers(0, 256, (H, W), dtype=np.uint8)  # incompressible: long IDAT
    return png_bytes(noise)


BAD = {
    "missing file": (lambda p: p / "nope.png", "not found"),
    "string that is no path": (lambda p: "x + y = 2", "not found"),
    "directory": (lambda p: p, "directory"),
    "0-byte file": (lambda p: write(p / "empty.png", b""), "empty file"),
    "empty bytes": (lambda p: b"", "empty"),
    "non-image bytes": (lambda p: b"hello", "not an image"),
    "non-image file": (lambda p: write(p / "a.png", b"hello"), "not an image"),
    "truncated png bytes": (lambda p: good_png()[:len(good_png()) // 2], "truncated"),
    "truncated png file": (lambda p: write(p / "t.png", good_png()[:3000]), "truncated"),
    "bomb header (Pillow's limit)": (lambda p: png_header_only(100_000, 100_000), "too large"),
    "header only, data missing": (lambda p: png_header_only(3000, 3000), "truncated"),
    "1x1 png": (lambda p: png_bytes(np.full((1, 1), 255, np.uint8)), "too small"),
    "1x1 array": (lambda p: np.ones((1, 1), np.float32), "too small"),
    "thin array": (lambda p: np.ones((5, 300), np.uint8), "too small"),
    "0x0 array": (lambda p: np.zeros((0, 0), np.float32), "too small"),
    "blank zeros": (lambda p: np.zeros((H, W), np.uint8), "blank image: no ink"),
    "blank 255": (lambda p: np.full((H, W), 255, np.uint8), "blank image: no ink"),
    "blank png": (lambda p: png_bytes(np.full((H, W), 255, np.uint8)), "blank image: no ink"),
    "NaN": (lambda p: np.where(PIC > 0, np.nan, 0.0), "NaN"),
    "inf": (lambda p: np.where(PIC > 0, np.inf, 0.0), "infinite"),
    "complex": (lambda p: REF.astype(np.complex64), "unsupported dtype"),
    "object": (lambda p: np.empty((H, W), dtype=object), "unsupported dtype"),
    "string array": (lambda p: np.full((H, W), "a"), "unsupported dtype"),
    "None": (lambda p: None, "unsupported input type NoneType"),
    "dict": (lambda p: {"image": PIC}, "unsupported input type dict"),
    "int": (lambda p: 3, "unsupported input type int"),
    "list": (lambda p: PIC.tolist(), "unsupported input type list"),
    "0-D array": (lambda p: np.array(1.0), "shape ()"),
    "1-D array": (lambda p: REF[0], "shape (300,)"),
    "4-D numpy": (lambda p: REF[None, None], "shape (1, 1, 94, 300)"),
    "5 channels": (lambda p: np.zeros((H, W, 5), np.uint8), "C in 1, 3, 4"),
    "2 channels": (lambda p: np.zeros((H, W, 2), np.uint8), "C in 1, 3, 4"),
    "negative int": (lambda p: PIC.astype(np.int16) - 5, "negative"),
    "negative float": (lambda p: REF - 0.5, "negative"),
    "float above 255": (lambda p: REF * 1000, "expected [0, 1] or [0, 255]"),
    "int above 65535": (lambda p: PIC.astype(np.int64) * 1000, "65535"),
    "torch complex": (lambda p: torch.zeros(H, W, dtype=torch.complex64), "complex"),
    "torch 5-D": (lambda p: torch.zeros(1, 1, 1, H, W), "channels first"),
    "torch channels last": (lambda p: torch.zeros(H, W, 3), "channels first"),
    "torch batch of 2": (lambda p: torch.zeros(2, 1, H, W), "channels first"),
    "torch NaN": (lambda p: torch.full((H, W), float("nan")), "NaN"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_image_error(tmp_path, case):
    make, expected = BAD[case]
    item = make(tmp_path)
    with pytest.raises(ImageError) as info:
        load_image(item)
    assert expected in str(info.value)


def test_messages_name_the_item(tmp_path):
    with pytest.raises(ImageError, match=r"^file '.*x\.png': not an image \(cannot identify image file\)$"):
        (tmp_path / "x.png").write_bytes(b"hello")
        load_image(tmp_path / "x.png")
    with pytest.raises(ImageError, match=r"^bytes \(5 bytes\): not an image"):
        load_image(b"hello")
    with pytest.raises(ImageError, match=r"^numpy array \(shape \(94, 300\), dtype float64\): contains NaN"):
        load_image(np.full((H, W), np.nan))


def test_max_file_pixels_is_checked_from_the_header(tmp_path):
    # 9000x9000 declared (below Pillow's own limits): our check must refuse before decoding anything
    with pytest.raises(ImageError, match="max_file_pixels"):
        load_image(png_header_only(9000, 9000), ImageOptions(max_file_pixels=50_000_000))
    # a real, valid image above a low limit, as bytes, as a file and as a lazily opened PIL image
    (tmp_path / "ok.png").write_bytes(png_bytes(PIC))
    opts = ImageOptions(max_file_pixels=10_000)
    with Image.open(tmp_path / "ok.png") as lazy:
        for item in (png_bytes(PIC), tmp_path / "ok.png", lazy):
            with pytest.raises(ImageError, match="max_file_pixels"):
                load_image(item, opts)
    assert load_image(tmp_path / "ok.png", ImageOptions(max_file_pixels=H * W)).pixels.shape == (H, W)


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)
