"""Any input item -> a float32 [H, W] image in [0, 1], white ink on black (the model's input).

Accepted items: file paths, encoded image bytes, PIL images, numpy arrays and torch tensors. Every bad
item raises :class:`ImageError` (a ``ValueError``) whose message names the item and the problem.
"""
from __future__ import annotations

import io
import os
import stat
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_INVERT = ("auto", "always", "never")
_LUMA = (np.float32(0.299), np.float32(0.587), np.float32(0.114))
_FLOAT_SLOP = 1e-3     # float inputs may overshoot [0, 1] a little (e.g. after bicubic resizing elsewhere)


class ImageError(ValueError):
    """A bad input item; its message says what is wrong, naming the item kind (e.g. "file 'x.png': not
    an image (cannot identify image file)")."""


@dataclass(frozen=True)
class ImageOptions:
    """How items are normalized.

    invert: "auto" inverts when the border is bright (dark ink on paper), "always", or "never".
    binarize: Otsu threshold to {0, 1} (for scans and photos; the training images are binary).
    target_height: rescale so the whole image is this tall (e.g. 94, the training median); None keeps it.
    max_pixels: larger images are downscaled (aspect kept) to fit, not rejected.
    min_side: images with a smaller height or width are rejected ("too small").
    max_file_pixels: limit on the size an encoded file's header declares, checked before decoding.
    """

    invert: str = "auto"
    binarize: bool = False
    target_height: int | None = None
    max_pixels: int = 1_000_000
    min_side: int = 8
    max_file_pixels: int = 200_000_000

    def __post_init__(self) -> None:
        if self.invert not in _INVERT:
            raise ValueError(f"ImageOptions.invert must be one of {_INVERT}, got {self.invert!r}")
        if not isinstance(self.binarize, bool):
            raise ValueError(f"ImageOptions.binarize must be a bool, got {self.binarize!r}")
        for name in ("target_height", "max_pixels", "min_side", "max_file_pixels"):
            v = getattr(self, name)
            if v is None and name == "target_height":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"ImageOptions.{name} must be a positive int, got {v!r}")


@dataclass
class LoadedImage:
    """A normalized image and what was done to it.

    pixels: float32 [H, W] in [0, 1], white ink on black, C-contiguous, never sharing the input's memory.
    source_size: (H, W) of the item as given (for files: after applying the EXIF orientation).
    inverted: whether the pixels were inverted. scale: output height / source height (1.0 untouched).
    notes: human-readable notes; sizes are written HxW.
    """

    pixels: np.ndarray
    source_size: tuple[int, int]
    inverted: bool
    scale: float
    notes: list[str] = field(default_factory=list)


def load_image(item: object, options: ImageOptions = ImageOptions()) -> LoadedImage:
    """Decode and normalize one item (see the module docstring); raises ImageError for bad items."""
    arr, label, notes = _to_array(item, options)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise ImageError(f"{label}: expected [H, W] or [H, W, C] with C in 1, 3, 4 (numpy is channels "
                         f"last); got shape {arr.shape}")
    h, w = int(arr.shape[0]), int(arr.shape[1])
    if min(h, w) < options.min_side:    # checked before any reduction: empty arrays have no max()
        raise ImageError(f"{label}: too small: {h}x{w} (HxW), min_side is {options.min_side}")
    x = _to_gray(arr, label)
    lo, hi = float(x.min()), float(x.max())
    if hi - lo < 1e-3:
        raise ImageError(f"{label}: blank image: no ink (every pixel is {lo:.3g})")

    inverted = options.invert == "always"
    if options.invert == "auto":
        # The border is mostly background; CROHME-style images (black, ~7% ink) have a dark border.
        border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
        if float(np.median(border)) > 0.5:
            inverted = True
            notes.append("inverted (bright background)")
    elif inverted:
        notes.append("inverted (invert='always')")
    if inverted:
        x = 1.0 - x

    # Work out the final size first and resample once: two resamplings would blur thin strokes twice.
    oh, ow = h, w
    if options.target_height is not None and options.target_height != h:
        oh, ow = options.target_height, max(1, round(w * options.target_height / h))
        notes.append(f"rescaled from {h}x{w} to {oh}x{ow} (target_height {options.target_height})")
    if oh * ow > options.max_pixels:
        s = (options.max_pixels / (oh * ow)) ** 0.5
        nh = max(1, int(oh * s + 1e-9))
        nw = max(1, round(nh * ow / oh))      # from the rounded height: aspect kept within 1 px
        if nh * nw > options.max_pixels:      # the width was rounded up
            nw = max(1, nw - 1)
        if nh * nw > options.max_pixels:      # a 1-px clamp on an extremely thin image
            nh = max(1, options.max_pixels // nw)
            nw = min(nw, options.max_pixels // nh)
        notes.append(f"downscaled from {oh}x{ow} to {nh}x{nw} (max_pixels {options.max_pixels})")
        oh, ow = nh, nw
    if (oh, ow) != (h, w):
        # BOX averages the covered area when shrinking, so 1-px strokes fade instead of vanishing.
        resample = Image.Resampling.BOX if oh * ow < h * w else Image.Resampling.BILINEAR
        x = np.array(Image.fromarray(np.ascontiguousarray(x, dtype=np.float32)).resize((ow, oh), resample),
                     dtype=np.float32)

    if options.binarize:
        x, t = _otsu(x)
        notes.append(f"binarized (Otsu threshold {t:.3f})")
    x = np.ascontiguousarray(np.clip(x, 0.0, 1.0, out=x), dtype=np.float32)
    return LoadedImage(pixels=x, source_size=(h, w), inverted=inverted, scale=oh / h, notes=notes)


def _to_array(item: object, options: ImageOptions) -> tuple[np.ndarray, str, list[str]]:
    """Item -> (raw numpy array [H, W] or [H, W, C], label for messages, notes)."""
    if isinstance(item, (str, os.PathLike)):
        return _from_file(item, options)
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
        label = f"bytes ({len(data)} bytes)"
        if not data:
            raise ImageError(f"{label}: empty (no image data)")
        return _decode(io.BytesIO(data), label, options)
    if isinstance(item, Image.Image):
        label = f"PIL image (mode {item.mode}, {item.height}x{item.width})"
        _check_header(item, label, options)   # the caller may hand us a lazily opened file
        try:
            return _pil_array(item), label, []
        except ImageError:
            raise
        except Exception as e:       # a lazily opened PIL image decodes here: bad data of any kind
            raise ImageError(f"{label}: cannot decode ({type(e).__name__}: {e})") from e
    if isinstance(item, np.ndarray):
        return item, f"numpy array (shape {item.shape}, dtype {item.dtype})", []
    # Only a caller that imported torch can hold a tensor: looking in sys.modules avoids importing
    # torch (slow) for every other item.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(item, torch.Tensor):
        return _from_tensor(item, torch), f"torch tensor (shape {tuple(item.shape)}, dtype {item.dtype})", []
    raise ImageError(f"unsupported input type {type(item).__name__}: expected a file path, encoded image "
                     "bytes, a PIL image, a numpy array or a torch tensor")


def _from_file(item: Any, options: ImageOptions) -> tuple[np.ndarray, str, list[str]]:
    path = os.fspath(item)
    label = f"file {str(path)!r}"
    if not path:
        raise ImageError(f"{label}: empty path")
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise ImageError(f"{label}: not found") from None
    except (OSError, ValueError) as e:       # name too long, embedded NUL, permission on a parent, ...
        raise ImageError(f"{label}: cannot access ({e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{label}: is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):         # a FIFO or device could block or never end
        raise ImageError(f"{label}: not a regular file")
    if st.st_size == 0:
        raise ImageError(f"{label}: empty file (0 bytes)")
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise ImageError(f"{label}: cannot read ({e.strerror or e})") from None
    with fh:
        return _decode(fh, label, options)


def _check_header(img: Image.Image, label: str, options: ImageOptions) -> None:
    # img.size comes from the header; nothing is decompressed until load(), so a bomb costs nothing.
    w, h = img.size
    if w * h > options.max_file_pixels:
        raise ImageError(f"{label}: declares {h}x{w} = {w * h} pixels, above max_file_pixels "
                         f"{options.max_file_pixels} (refusing to decode: possible decompression bomb)")


def _decode(src: Any, label: str, options: ImageOptions) -> tuple[np.ndarray, str, list[str]]:
    notes: list[str] = []
    try:
        with Image.open(src) as img:
            _check_header(img, label, options)
            img.load()
            try:         # phone photos are stored sideways with an EXIF rotation; a bad EXIF is no reason to fail
                orientation = int(img.getexif().get(0x0112, 1))
            except Exception:
                orientation = 1
            if orientation in range(2, 9):
                img = ImageOps.exif_transpose(img)
                notes.append(f"applied EXIF orientation {orientation}")
            return _pil_array(img), label, notes
    except ImageError:
        raise
    except Image.DecompressionBombError as e:   # Pillow's own limit (about 179M pixels) comes first
        raise ImageError(f"{label}: declared size too large, refusing to decode ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image (cannot identify image file)") from None
    except Exception as e:    # Pillow raises OSError, SyntaxError, EOFError, zlib.error, ... on bad data
        raise ImageError(f"{label}: truncated or corrupt image data ({type(e).__name__}: {e})") from None


def _pil_array(img: Image.Image) -> np.ndarray:
    """PIL image -> numpy array that _to_gray understands (alpha and palettes become RGBA)."""
    mode = img.mode
    if mode in ("1", "L", "I", "F", "RGB", "RGBA") or mode.startswith("I;16"):
        return np.asarray(img)
    if mode == "P" or "A" in mode or "a" in mode:      # LA, La, PA, RGBa, palette (may carry transparency)
        return np.asarray(img.convert("RGBA"))
    return np.asarray(img.convert("RGB"))               # CMYK, YCbCr, LAB, HSV, RGBX, ...


def _from_tensor(t: Any, torch: Any) -> np.ndarray:
    """Torch tensor (channels first) -> numpy array (channels last)."""
    if t.is_complex():
        raise ImageError(f"torch tensor (dtype {t.dtype}): unsupported dtype (complex)")
    shape = tuple(t.shape)
    if len(shape) == 4 and shape[0] == 1:
        t, shape = t[0], shape[1:]
    if len(shape) == 3 and shape[0] in (1, 3, 4):
        t = t.permute(1, 2, 0)
    elif len(shape) != 2:
        raise ImageError(f"torch tensor (shape {shape}): expected [H, W], [C, H, W] or [1, C, H, W] "
                         "with C in 1, 3, 4 (channels first)")
    try:
        t = t.detach()
        t = t.to_dense() if t.layout != torch.strided else t
        t = t.cpu()
        if t.dtype == torch.bool or t.dtype == torch.uint8:
            return t.numpy()
        # numpy has no bfloat16 / float8; floats go through float32 (exact for those).
        return t.float().numpy() if t.is_floating_point() and t.dtype != torch.float64 else t.numpy()
    except Exception as e:
        raise ImageError(f"torch tensor (shape {shape}, dtype {t.dtype}): cannot convert ({e})") from None


def _to_gray(arr: np.ndarray, label: str) -> np.ndarray:
    """[H, W] or [H, W, C] of any supported dtype -> float32 [H, W] in [0, 1] (a new array)."""
    kind = arr.dtype.kind
    if kind == "b":
        x = arr.astype(np.float32)
    elif kind in "ui":
        if kind == "i" and int(arr.min()) < 0:
            raise ImageError(f"{label}: negative values (min {int(arr.min())})")
        if arr.dtype.itemsize == 1 and kind == "u":
            scale = 255.0
        elif arr.dtype.itemsize == 2 and kind == "u":
            scale = 65535.0
        else:                        # other integer types: judged by range, as 8-bit or 16-bit data
            top = int(arr.max())
            if top > 65535:
                raise ImageError(f"{label}: values up to {top}, expected at most 65535")
            scale = 255.0 if top <= 255 else 65535.0
        x = arr.astype(np.float32) / np.float32(scale)
    elif kind == "f":
        if not np.isfinite(arr).all():     # checked in the original dtype: float64 -> float32 may overflow
            raise ImageError(f"{label}: contains NaN or infinite values")
        x = arr.astype(np.float32)
        lo, hi = float(x.min()), float(x.max())
        if lo < -_FLOAT_SLOP:
            raise ImageError(f"{label}: negative values (min {lo:.4g})")
        if hi > 255.0 + _FLOAT_SLOP:
            raise ImageError(f"{label}: values up to {hi:.4g}, expected [0, 1] or [0, 255]")
        if hi > 1.0 + _FLOAT_SLOP:
            x /= np.float32(255.0)
        np.clip(x, 0.0, 1.0, out=x)
    else:
        raise ImageError(f"{label}: unsupported dtype {arr.dtype} (expected bool, integer or float)")
    if x.ndim == 3:
        c = x.shape[2]
        if c == 1:
            x = x[..., 0]
        else:
            gray = x[..., 0] * _LUMA[0] + x[..., 1] * _LUMA[1] + x[..., 2] * _LUMA[2]
            if c == 4:               # transparent PNGs are dark ink on nothing: composite onto white
                a = x[..., 3]
                gray = gray * a + (np.float32(1.0) - a)
            x = gray
    return np.ascontiguousarray(x, dtype=np.float32)


def _otsu(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Otsu's threshold -> ({0, 1} image, threshold). The histogram spans [min, max] (Otsu is invariant
    to that stretch), so low-contrast images still get 256 usable bins."""
    lo, hi = float(x.min()), float(x.max())
    if hi - lo < 1e-6:
        return (x > 0.5).astype(np.float32), 0.5
    idx = np.minimum(((x - lo) * np.float32(256.0 / (hi - lo))).astype(np.int32), 255)
    hist = np.bincount(idx.ravel(), minlength=256).astype(np.float64)
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m = np.cumsum(hist * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (m / w0 - (m[-1] - m) / w1) ** 2
    t = int(np.argmax(np.nan_to_num(between, nan=-1.0)))
    return (idx > t).astype(np.float32), lo + (t + 1) / 256.0 * (hi - lo)
