"""TensorRT backend: the parts that need no TensorRT run everywhere; the rest skip with the reason."""
from __future__ import annotations

import pytest

from abm_rt.backends.tensorrt import (INSTALL_HINT, Profile, feature_shape, pick_profile, plan_dir, plan_name,
                                      plan_profiles, read_profiles, tensorrt_available, write_manifest)

needs_trt = pytest.mark.skipif(not tensorrt_available(), reason="TensorRT is not installed here (" + INSTALL_HINT + ")")


def test_profiles_cover_the_data_range():
    """Every CROHME-like size (heights 54-481, widths 26-2116, padded to 16) fits exactly one chosen profile."""
    profiles = plan_profiles(max_batch=32)
    assert len(profiles) == 2
    for h in (16, 54, 94, 161, 481, 512):
        for w in (16, 26, 268, 767, 768, 769, 1500, 2048):
            b = 1
            i = pick_profile(profiles, b, -(-h // 16) * 16, -(-w // 16) * 16)
            assert profiles[i].contains(b, -(-h // 16) * 16, -(-w // 16) * 16)
    assert pick_profile(profiles, 32, 96, 320) == 0          # the common case runs on the narrow profile
    for p in profiles:
        assert all(lo <= o <= hi for lo, o, hi in zip(p.min, p.opt, p.max)), p


def test_single_profile_when_narrow_and_errors():
    """A narrow range needs one profile; shapes outside every profile are a clear error."""
    (p,) = plan_profiles(max_batch=8, opt_batch=4, max_hw=(256, 512))
    assert p.max == (8, 256, 512) and p.shapes()[2] == (8, 1, 256, 512)
    with pytest.raises(ValueError, match="outside every optimization profile"):
        pick_profile([p], 9, 96, 96)
    with pytest.raises(ValueError):
        plan_profiles(max_batch=4, opt_batch=8)


def test_buffer_planning_and_locations(tmp_path):
    """Output shapes follow the encoder's ceil-halving; plans live per GPU model and TensorRT version."""
    assert feature_shape(3, 94, 256, 684) == (3, 684, 6, 16)
    assert feature_shape(1, 97, 251, 684) == (1, 684, 7, 16)
    d = plan_dir(tmp_path, "NVIDIA H100 80GB HBM3", "10.13.0")
    assert d == tmp_path / "trt" / "nvidia-h100-80gb-hbm3-trt10.13.0"
    assert plan_name("int8") == "encoder.int8.plan"
    with pytest.raises(ValueError):
        plan_name("int4")
    profiles = plan_profiles()
    d.mkdir(parents=True)
    write_manifest(d, profiles, "fp16", {"tensorrt": "10.13.0"})
    assert read_profiles(d, "fp16") == profiles


def test_build_engine_without_tensorrt_says_what_to_install(tmp_path, capsys):
    """`abm-rt build-engine` without TensorRT exits non-zero with the install hint."""
    if tensorrt_available():
        pytest.skip("TensorRT is installed here")
    from abm_rt.cli import main
    assert main(["build-engine", str(tmp_path)]) == 2
    assert "pip install tensorrt" in capsys.readouterr().err


@needs_trt
def test_tensorrt_plan_matches_pytorch(tmp_path):  # pragma: no cover - needs TensorRT and a GPU
    """A built FP32 plan reproduces the PyTorch encoder (max relative error <= 1e-3 with TF32)."""
    import torch
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from abm_rt.backends.tensorrt import TensorRTEncoder
    from abm_rt.data.vocab import Vocab
    from abm_rt.engine_dir import save_engine
    from abm_rt.model import ModelConfig, scaled_random_model
    from export.onnx_export import export_encoder
    from export.tensorrt_build import build_encoder_plan

    model = scaled_random_model(ModelConfig(growth=8, block_depth=2, hidden=32, embed=32, attn=32), seed=1)
    save_engine(tmp_path, model, Vocab.default())
    export_encoder(model, tmp_path / "encoder.onnx")
    build_encoder_plan(tmp_path, "fp32", plan_profiles(max_batch=4, opt_batch=2, max_hw=(256, 512)))
    enc = TensorRTEncoder(tmp_path, "fp32")
    x = torch.rand(2, 1, 96, 320, device="cuda")
    mask = torch.ones(2, 96, 320, dtype=torch.bool)
    got, _ = enc.encode(x, mask)
    ref = model.cuda().encoder(x)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-3
