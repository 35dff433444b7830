"""Encoder backends: ONNX Runtime vs PyTorch on a padded batch, and choose_encoder_backend's choices and reasons."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from abm_rt.backends import EncoderBackend, choose_encoder_backend
from abm_rt.backends.torch_backend import TorchEncoder
from abm_rt.data.buckets import pad_batch
from abm_rt.data.vocab import Vocab
from abm_rt.engine_dir import load_engine, save_engine
from abm_rt.model import scaled_random_model

from conftest import SMALL_CFG, random_ink_image

HAVE_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
needs_ort = pytest.mark.skipif(not HAVE_ORT, reason="needs onnx and onnxruntime")
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """The same small random model as a plain engine (no ONNX) and as a converted one (encoder.onnx...)."""
    d = tmp_path_factory.mktemp("backends")
    model = scaled_random_model(SMALL_CFG, seed=4)
    plain = save_engine(d / "plain", model, Vocab.default())
    converted = None
    if HAVE_ORT:
        from export.convert import convert
        converted = convert(plain, d / "onnx", verify=False)
    return model, plain, converted


def padded_batch(seed: int = 0):
    """Images of different (odd) sizes padded together to a multiple of 16, as the Recognizer does."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [(47, 129), (33, 251), (94, 97), (20, 333)]
    return pad_batch([random_ink_image(h, w, gen)[0, 0].numpy() for h, w in sizes], multiple=16)


@needs_ort
def test_onnxruntime_backend_matches_torch(engines):
    """ONNX Runtime's features equal PyTorch's (max rel err <= 1e-4) on a padded batch; the masks are identical."""
    from abm_rt.backends.onnxruntime_backend import OnnxRuntimeEncoder

    _, _, converted = engines
    eng = load_engine(converted)
    ref_backend = TorchEncoder(eng.model, "cpu")
    ort_backend = OnnxRuntimeEncoder.from_engine(eng, "cpu")
    assert isinstance(ort_backend, EncoderBackend) and ort_backend.name == "onnxruntime"
    x, pm = padded_batch()
    f_ref, m_ref = ref_backend.encode(x, pm)
    f, m = ort_backend.encode(x, pm)
    assert f.shape == f_ref.shape == (4, SMALL_CFG.feature_dim, 6, 21) and f.dtype == torch.float32
    assert torch.equal(m, m_ref) and m.dtype == torch.bool
    err = float((f - f_ref).abs().max() / f_ref.abs().max())
    print(f"ONNX Runtime vs PyTorch encoder on a padded batch: max rel err {err:.2e}")
    assert torch.isfinite(f).all() and err <= 1e-4
    d = ort_backend.describe()
    assert d["backend"] == "onnxruntime" and d["precision"] == "fp32" and "CPUExecutionProvider" in d["providers"]
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        ort_backend.encode(x[:, 0], pm)


@needs_ort
def test_cpu_auto_chooses_onnxruntime_when_the_engine_has_onnx(engines):
    """On CPU, auto picks ONNX Runtime for a converted engine (measured faster there) and says why, including
    why TensorRT was not used."""
    _, _, converted = engines
    backend, reason = choose_encoder_backend(load_engine(converted), "cpu")
    assert backend.name == "onnxruntime" and "faster" in reason
    assert "TensorRT needs a CUDA device" in reason
    if not HAVE_TRT:
        assert "not installed" in reason


def test_cpu_auto_without_onnx_files_falls_back_to_torch(engines):
    """An engine without encoder.onnx runs on PyTorch; the reason names the missing file (or package) and
    the command that writes it."""
    _, plain, _ = engines
    backend, reason = choose_encoder_backend(load_engine(plain), torch.device("cpu"))
    assert backend.name == "pytorch" and reason.startswith("PyTorch on cpu")
    assert ("encoder.onnx" in reason and "abm-rt convert" in reason) or "pip install onnxruntime" in reason
    assert "TensorRT" in reason
    assert backend.describe()["backend"] == "pytorch"


@needs_ort
def test_named_preferences(engines):
    """A backend asked for by name is used, or refused with a ValueError that says why."""
    _, plain, converted = engines
    conv, plain_eng = load_engine(converted), load_engine(plain)
    backend, reason = choose_encoder_backend(conv, "cpu", "pytorch")
    assert backend.name == "pytorch" and "asked for by name" in reason
    backend, reason = choose_encoder_backend(conv, "cpu", "onnxruntime")
    assert backend.name == "onnxruntime" and "asked for by name" in reason
    with pytest.raises(ValueError, match="encoder.onnx"):
        choose_encoder_backend(plain_eng, "cpu", "onnxruntime")
    with pytest.raises(ValueError, match="TensorRT needs a CUDA device"):
        choose_encoder_backend(conv, "cpu", "tensorrt")
    with pytest.raises(ValueError, match="preference must be one of"):
        choose_encoder_backend(conv, "cpu", "tpu")


@needs_ort
def test_int8_engine_runs_its_int8_graph(engines, tmp_path):
    """An int8 engine's ONNX Runtime backend loads encoder.int8.onnx and stays loosely close to FP32."""
    from export.convert import convert

    model, plain, _ = engines
    gen = torch.Generator().manual_seed(3)
    calib = [random_ink_image(h, w, gen)[0, 0].numpy() for h, w in ((40, 120), (94, 256), (33, 200))]
    out = convert(plain, tmp_path / "int8", precision="int8", calibration_images=calib, verify=False)
    backend, reason = choose_encoder_backend(load_engine(out), "cpu")
    assert backend.name == "onnxruntime" and "encoder.int8.onnx" in reason
    assert backend.describe()["precision"] == "int8"
    x, pm = padded_batch(1)
    f, _ = backend.encode(x, pm)
    with torch.no_grad():
        ref, _ = model.encode(x, pm)
    err = float((f - ref).abs().max() / ref.abs().max())
    print(f"INT8 backend rel err {err:.3f}")
    assert np.isfinite(f.numpy()).all() and err < 0.3


def test_convert_cli_without_onnx_says_what_to_install(monkeypatch, tmp_path, capsys):
    """`abm-rt convert` without onnx/onnxruntime exits 2 with the pip command, before importing export/."""
    from abm_rt.cli import convert as convert_cli
    from abm_rt.cli import main

    monkeypatch.setattr(convert_cli, "_importable", lambda name: name != "onnxruntime")
    assert main(["convert", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "pip install onnxruntime" in capsys.readouterr().err
