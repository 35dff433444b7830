"""``abm-rt convert``: a trained model -> an engine directory with its ONNX graphs.

Sources:
- an engine directory (``abm_rt.engine_dir``): re-exported as is;
- a trainer state directory (``training/checkpoint.py``'s ``save_state``: ``state.json`` and
  ``state-*.safetensors`` holding ``model.<key>`` tensors of the bidirectional training model). The
  dimensions come from the run's config in ``state.json``.
Either way the R2L branch, when the source has it, is kept as ``r2l.safetensors`` (bidirectional
rescoring, ``abm_rt.decode.rescore``); the exported graphs are of the L2R branch.

The engine directory gets ``config.json``, ``vocab.txt`` and ``model.safetensors`` from
``save_engine``, then ``encoder.onnx``, ``decoder_prepare.onnx``, ``decoder_step.onnx`` (and
``encoder.int8.onnx`` for ``--precision int8``). ``config.json`` lists every file under "files" and
records how they were made under "export".
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from abm_rt.data.vocab import Vocab
from abm_rt.engine_dir import (CONFIG_FILE, WEIGHTS_FILE, EngineError, contains_engine, load_checked, load_engine,
                               read_config, save_engine, update_config)
from abm_rt.model import ABM, ModelConfig

from .onnx_export import DEFAULT_OPSET, export_decoder_prepare, export_decoder_step, export_encoder

PRECISIONS = ("fp32", "fp16", "int8")
ENCODER_ONNX = "encoder.onnx"
ENCODER_INT8_ONNX = "encoder.int8.onnx"
DECODER_PREPARE_ONNX = "decoder_prepare.onnx"
DECODER_STEP_ONNX = "decoder_step.onnx"
STATE_META = "state.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# Input sizes the exported graphs are meant for (CROHME statistics: 94 px median height, long tails).
# TensorRT optimization profiles are built from this; [height, width] in pixels.
SHAPE_RANGE = {"min": {"height": 16, "width": 16}, "opt": {"height": 96, "width": 320},
               "max": {"height": 512, "width": 2048}}
BATCH_RANGE = {"min": 1, "opt": 8, "max": 32}


def is_trainer_state(path: str | Path) -> bool:
    """True when ``path`` is a trainer state directory (``state.json`` + safetensors shards)."""
    return (Path(path) / STATE_META).is_file()


def load_trainer_state(path: str | Path, bidirectional: bool | None = False) -> tuple[ABM, dict[str, Any]]:
    """The model of a trainer state directory and the state's ``meta``: the inference model (encoder +
    L2R) by default, both branches with ``bidirectional`` (a warm start that keeps R2L), and with None
    both when the state has an R2L branch (a run trained with ``--bidirectional false`` has none)."""
    from training.checkpoint import load_model_weights

    path = Path(path)
    try:
        weights, meta = load_model_weights(path)
    except (OSError, ValueError, KeyError) as e:
        raise EngineError(f"{path}: not a readable trainer state ({type(e).__name__}: {e})") from e
    overrides = (meta.get("config") or {}).get("model") or {}
    try:
        cfg = ModelConfig(**overrides)
    except (TypeError, ValueError) as e:
        raise EngineError(f"{path / STATE_META}: bad model config {overrides} ({e})") from e
    if bidirectional is None:
        bidirectional = any(k.startswith("r2l.") for k in weights)
    model = ABM(cfg, bidirectional=bidirectional)
    if not bidirectional:
        weights = {k: v for k, v in weights.items() if not k.startswith("r2l.")}
    load_checked(model, weights, f"trainer state {path}")
    return model.eval(), meta


def load_source(path: str | Path) -> tuple[ABM, Vocab, dict[str, Any]]:
    """(model, vocabulary, provenance) of an engine directory or a trainer state directory; the model
    has its R2L branch when the source does."""
    path = Path(path)
    if not path.exists():
        raise EngineError(f"{path} does not exist")
    if contains_engine(path):
        engine = load_engine(path)
        prov = dict(engine.config.get("provenance") or {})
        prov.setdefault("converted_from", str(path))
        return engine.model, engine.vocab, prov
    if is_trainer_state(path):
        model, meta = load_trainer_state(path, bidirectional=None)
        prov = {"converted_from": str(path), "source": "trainer state",
                **{k: meta[k] for k in ("epoch", "step", "best_exprate", "best_epoch") if k in meta}}
        return model, Vocab.default(), prov
    raise EngineError(f"{path} is neither an engine directory ({CONFIG_FILE} + {WEIGHTS_FILE}) nor a trainer "
                      f"state directory ({STATE_META} + state-*.safetensors)")


def find_calibration_images(directory: str | Path, count: int) -> list[Path]:
    """Up to ``count`` image files under ``directory`` (recursive), spread evenly over the sorted list."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"--calibration {directory}: not a directory")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"--calibration {directory}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    if count <= 0:
        raise ValueError(f"--calibration-count must be positive, got {count}")
    if len(files) > count:
        idx = np.linspace(0, len(files) - 1, count).round().astype(int)
        files = [files[i] for i in sorted(set(idx.tolist()))]
    return files


def load_calibration_images(directory: str | Path, count: int) -> list[np.ndarray]:
    """Calibration images as the runtime sees them: float [H, W] in [0, 1], white ink on black."""
    from abm_rt.data.images import ImageError, ImageOptions, load_image

    images = []
    for f in find_calibration_images(directory, count):
        try:
            images.append(load_image(f, ImageOptions()).pixels)
        except ImageError:
            continue    # an unreadable file is skipped, not fatal for calibration
    if not images:
        raise ValueError(f"--calibration {directory}: none of the images could be read")
    return images


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max|b| (b is the reference)."""
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))


def stroke_image(height: int = 96, width: int = 320, seed: int = 0) -> np.ndarray:
    """A synthetic ink-like image (white strokes on black), float [H, W]: an input for export checks."""
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width), np.float32)
    for _ in range(12):
        r, c = int(rng.integers(0, height)), int(rng.integers(0, width))
        img[r:r + 3, c:c + int(rng.integers(5, 40))] = 1.0
        img[r:r + int(rng.integers(5, 30)), c:c + 3] = 1.0
    return img


def check_encoder(model: ABM, onnx_path: str | Path, image: np.ndarray | None = None) -> float:
    """Relative error of an exported encoder against the PyTorch model on one image (float [H, W];
    default: a synthetic 96x320 stroke image)."""
    import onnxruntime as ort

    img = stroke_image() if image is None else np.asarray(image, np.float32)
    x = torch.from_numpy(np.ascontiguousarray(img))[None, None]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        ref = model.encoder(x).numpy()
    return relative_error(got, ref)


def convert(model_path: str | Path, out: str | Path, precision: str = "fp32", calibration: str | Path | None = None,
            calibration_count: int = 64, opset: int = DEFAULT_OPSET,
            calibration_images: Sequence[np.ndarray] | None = None, verify: bool = True) -> Path:
    """Convert ``model_path`` (engine or trainer state directory) into the engine directory ``out``.

    Args:
        precision: "fp32", "fp16" (graphs stay FP32; TensorRT/PyTorch pick FP16 when they build) or
            "int8" (adds ``encoder.int8.onnx``, Q/DQ, calibrated on ``calibration``).
        calibration: directory of images for int8 calibration (searched recursively).
        calibration_count: how many of its images to use.
        calibration_images: float [H, W] images, instead of ``calibration`` (library use, tests).
        verify: run each exported encoder once on ONNX Runtime and record its error against PyTorch.
    Returns:
        the engine directory.
    """
    import onnx

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "int8" and calibration is None and calibration_images is None:
        raise ValueError("--precision int8 needs --calibration DIR: a directory of typical input images "
                         "(e.g. a CROHME training split) to measure activation ranges on")
    model, vocab, provenance = load_source(model_path)
    calib = None
    if precision == "int8":
        calib = list(calibration_images) if calibration_images is not None else \
            load_calibration_images(calibration, calibration_count)

    out = Path(out)
    save_engine(out, model, vocab, precision=precision, provenance=provenance, with_r2l=model.r2l is not None)
    files = dict(read_config(out).get("files") or {})
    export_encoder(model, out / ENCODER_ONNX, opset)
    export_decoder_prepare(model.l2r, out / DECODER_PREPARE_ONNX, opset)
    export_decoder_step(model.l2r, out / DECODER_STEP_ONNX, opset)
    files.update({"encoder_onnx": ENCODER_ONNX, "decoder_prepare_onnx": DECODER_PREPARE_ONNX,
                  "decoder_step_onnx": DECODER_STEP_ONNX})
    stale = out / ENCODER_INT8_ONNX
    if stale.exists() and precision != "int8":
        stale.unlink()           # a previous int8 conversion into the same directory
    info: dict[str, Any] = {"opset": opset, "onnx_version": onnx.__version__,
                            "torch_version": torch.__version__.split("+")[0], "precision": precision,
                            "shape_range": SHAPE_RANGE, "batch_range": BATCH_RANGE,
                            "batchnorm_folded": True}
    if precision == "int8":
        from .quantize import quantize_encoder_int8

        quantize_encoder_int8(out / ENCODER_ONNX, out / ENCODER_INT8_ONNX, calib)
        files["encoder_int8_onnx"] = ENCODER_INT8_ONNX
        info["int8"] = {"format": "QDQ", "per_channel": True, "symmetric": True, "calibration_method": "minmax",
                        "calibration_images": len(calib),
                        "calibration_source": str(calibration) if calibration is not None else "in memory"}
    try:
        import onnxruntime
        info["onnxruntime_version"] = onnxruntime.__version__
    except ImportError:
        verify = False
    if verify:
        # On a calibration image when there are some (the INT8 ranges were measured on such images).
        image = calib[0] if calib else stroke_image()
        check = {"input": [1, 1, *image.shape], "input_source": "calibration image" if calib else "synthetic strokes",
                 "encoder_max_rel_error": check_encoder(model, out / ENCODER_ONNX, image)}
        if precision == "int8":
            check["encoder_int8_max_rel_error"] = check_encoder(model, out / ENCODER_INT8_ONNX, image)
        info["check"] = check
    update_config(out, files=files, export=info)
    return out
