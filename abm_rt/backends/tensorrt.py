"""TensorRT encoder backend: runs serialized plans built by ``abm-rt build-engine`` (export/tensorrt_build.py).

TensorRT is optional and imported only here, lazily. Everything that does not need TensorRT itself
(profile planning and choice, plan locations, output shapes) is plain Python and unit-tested on any
machine. Device buffers are torch CUDA tensors, so the features stay on the GPU for the decoder; the
plan runs with ``execute_async_v3`` on the current torch CUDA stream.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .base import module_available, require_module

INSTALL_HINT = ("TensorRT is not installed: `pip install tensorrt` (TensorRT 10 or newer, from NVIDIA's package "
                "index) on a machine with an NVIDIA GPU and driver")
INPUT_NAME = "images"
OUTPUT_NAME = "features"
STRIDE = 16


def tensorrt_available() -> bool:
    """True when the ``tensorrt`` Python package can be imported."""
    return module_available("tensorrt")


def require_tensorrt():
    """Import ``tensorrt`` or raise ImportError saying what to install."""
    return require_module("tensorrt", INSTALL_HINT)


@dataclass(frozen=True)
class Profile:
    """One optimization profile: min / opt / max of (batch, height, width) for the input ``images``."""

    min: tuple[int, int, int]
    opt: tuple[int, int, int]
    max: tuple[int, int, int]

    def contains(self, batch: int, height: int, width: int) -> bool:
        """True when an input of this shape may run under the profile."""
        return all(lo <= v <= hi for lo, v, hi in zip(self.min, (batch, height, width), self.max))

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """The NCHW min / opt / max shapes TensorRT's ``set_shape`` takes."""
        return tuple((b, 1, h, w) for b, h, w in (self.min, self.opt, self.max))  # type: ignore[return-value]


def plan_profiles(max_batch: int = 32, opt_batch: int = 16, min_hw: tuple[int, int] = (16, 16),
                  opt_hw: tuple[int, int] = (96, 320), max_hw: tuple[int, int] = (512, 2048),
                  split_width: int = 768) -> list[Profile]:
    """Profiles covering CROHME-like inputs (heights 54-481, widths 26-2116 in the data).

    One range from 16 px to 2048 px wide would make TensorRT tune its kernels for the rare wide
    images too; two profiles split at ``split_width`` keep the common short lines on kernels chosen
    for them. Wide images run at a smaller batch (they are bucketed under a pixel budget anyway).
    """
    if not (1 <= opt_batch <= max_batch):
        raise ValueError(f"need 1 <= opt_batch <= max_batch, got {opt_batch}, {max_batch}")
    r16 = lambda v: -(-v // STRIDE) * STRIDE    # noqa: E731 - inputs are padded to multiples of 16
    (h0, w0), (ho, wo), (h1, w1) = min_hw, opt_hw, max_hw
    if w1 <= split_width:
        return [Profile((1, h0, w0), (opt_batch, r16(ho), r16(wo)), (max_batch, r16(h1), r16(w1)))]
    narrow = Profile((1, h0, w0), (opt_batch, r16(ho), r16(min(wo, split_width))),
                     (max_batch, r16(h1), r16(split_width)))
    wide_batch = max(1, max_batch // 4)
    wide = Profile((1, h0, r16(split_width) + 1), (max(1, min(opt_batch, wide_batch) // 2), r16(ho * 3 // 2),
                   r16((split_width + w1) // 2)), (wide_batch, r16(h1), r16(w1)))
    return [narrow, wide]


def pick_profile(profiles: list[Profile], batch: int, height: int, width: int) -> int:
    """Index of the tightest profile (smallest max volume) that admits the shape; ValueError if none."""
    fits = [i for i, p in enumerate(profiles) if p.contains(batch, height, width)]
    if not fits:
        ranges = "; ".join(f"{p.min}..{p.max}" for p in profiles)
        raise ValueError(f"input batch {batch} x {height} x {width} is outside every optimization profile "
                         f"(batch, height, width: {ranges}); rebuild with `abm-rt build-engine` and wider ranges")
    return min(fits, key=lambda i: profiles[i].max[0] * profiles[i].max[1] * profiles[i].max[2])


def feature_shape(batch: int, height: int, width: int, channels: int) -> tuple[int, int, int, int]:
    """The encoder's output shape: ceil-halving four times (spec 2.3)."""
    return batch, channels, -(-height // STRIDE), -(-width // STRIDE)


def plan_dir(engine_dir: str | Path, gpu_name: str, trt_version: str) -> Path:
    """Where plans for one GPU model and TensorRT version live: plans are device caches, the ONNX is the truth."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    return Path(engine_dir) / "trt" / f"{slug}-trt{trt_version}"


def plan_name(precision: str) -> str:
    """File name of the encoder plan for a precision."""
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    return f"encoder.{precision}.plan"


def manifest_name(precision: str) -> str:
    """File name of the JSON that describes a plan (its profiles, in build order, and versions)."""
    return plan_name(precision).replace(".plan", ".json")


def write_manifest(directory: Path, profiles: list[Profile], precision: str, extra: dict[str, Any]) -> Path:
    """Record what a plan holds: its profiles in build order (profile i is context i), precision, versions."""
    path = directory / manifest_name(precision)
    doc = {"precision": precision, "profiles": [asdict(p) for p in profiles], **extra}
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return path


def read_profiles(directory: Path, precision: str) -> list[Profile]:
    """The profiles a plan was built with, from its manifest."""
    doc = json.loads((directory / manifest_name(precision)).read_text(encoding="utf-8"))
    return [Profile(tuple(p["min"]), tuple(p["opt"]), tuple(p["max"])) for p in doc["profiles"]]


class TensorRTEncoder:
    """Runs an encoder plan. One execution context per optimization profile; not for concurrent use
    from several threads (the Recognizer serializes predict calls)."""

    name = "tensorrt"

    def __init__(self, engine_dir: str | Path, precision: str = "fp16", device: Any = "cuda"):
        trt = require_tensorrt()
        import torch

        self.torch = torch
        self.device = torch.device(device)
        directory = plan_dir(engine_dir, torch.cuda.get_device_name(self.device), trt.__version__)
        plan = directory / plan_name(precision)
        if not plan.is_file():
            raise FileNotFoundError(f"no TensorRT plan {plan}: build it with `abm-rt build-engine {engine_dir} "
                                    f"--precision {precision}` on this machine")
        self.profiles, self.precision = read_profiles(directory, precision), precision
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {plan} (built by another TensorRT version or GPU?)")
        self.contexts = []
        for i in range(len(self.profiles)):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(i, torch.cuda.current_stream(self.device).cuda_stream)
            self.contexts.append(ctx)
        self.channels = self.engine.get_tensor_shape(OUTPUT_NAME)[1]
        self.plan_path = plan

    def encode(self, images, pixel_mask):
        """images [B, 1, H, W] float32 (any device) -> (features [B, D, H', W'] float32 on the GPU, mask)."""
        from ..model.encoder import feature_mask

        torch = self.torch
        x = images.to(self.device, torch.float32).contiguous()
        b, _, h, w = x.shape
        i = pick_profile(self.profiles, b, h, w)
        ctx = self.contexts[i]
        ctx.set_input_shape(INPUT_NAME, tuple(x.shape))
        out = torch.empty(feature_shape(b, h, w, self.channels), dtype=torch.float32, device=self.device)
        ctx.set_tensor_address(INPUT_NAME, x.data_ptr())
        ctx.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        mask = feature_mask(pixel_mask.to(self.device).bool())
        return out, mask

    def describe(self) -> dict[str, Any]:
        """What this backend runs."""
        return {"backend": self.name, "plan": str(self.plan_path), "precision": self.precision,
                "profiles": [asdict(p) for p in self.profiles]}
