"""ONNX export (export/): encoder, decoder preparation and step vs the PyTorch oracle; INT8 Q/DQ;
``abm-rt convert`` end to end."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the export tests need the onnx package")
ort = pytest.importorskip("onnxruntime", reason="the export tests need onnxruntime")

from abm_rt.data.vocab import Vocab  # noqa: E402
from abm_rt.engine_dir import load_engine, read_config, save_engine  # noqa: E402
from abm_rt.model import ModelConfig, feature_size, scaled_random_model  # noqa: E402
from export import export_decoder_prepare, export_decoder_step, export_encoder  # noqa: E402
from export.quantize import quantize_encoder_int8  # noqa: E402

from conftest import SMALL_CFG, random_ink_image  # noqa: E402

FP32_TOL = 1e-4
ODD_H = (33, 47, 94, 97, 161)       # ceil(H/4) or ceil(H/8) odd: partial ceil-mode pool windows
ODD_W = (17, 129, 251, 333)


def rel_err(a, b) -> float:
    """max|a - b| / max|b|, b the PyTorch reference."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small random model with its three graphs exported once for the module."""
    d = tmp_path_factory.mktemp("onnx_small")
    model = scaled_random_model(SMALL_CFG, seed=3)
    paths = {"encoder": export_encoder(model, d / "encoder.onnx"),
             "prepare": export_decoder_prepare(model.l2r, d / "decoder_prepare.onnx"),
             "step": export_decoder_step(model.l2r, d / "decoder_step.onnx")}
    return model, paths, d


def test_encoder_graph_is_folded_and_pools_exact(small):
    """No BatchNormalization or Dropout left; every AveragePool is ceil mode, unpadded, and divides partial
    windows by the cells inside (count_include_pad=0, spec 2.2); the axes are dynamic."""
    _, paths, _ = small
    m = onnx.load(str(paths["encoder"]))
    ops = {n.op_type for n in m.graph.node}
    assert "BatchNormalization" not in ops and "Dropout" not in ops, ops
    pools = [n for n in m.graph.node if n.op_type == "AveragePool"]
    assert len(pools) == SMALL_CFG.num_blocks - 1
    for n in pools:
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        assert a["ceil_mode"] == 1 and a.get("count_include_pad", 0) == 0 and not any(a.get("pads", [0]))
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"] and dims[1].dim_value == 1


def test_encoder_matches_pytorch_on_odd_and_random_sizes(small):
    """FP32 ONNX encoder == PyTorch (max rel err <= 1e-4, no NaN) on every odd size of spec 2.2 and on
    fresh random sizes, with random images and the exact ceil(H/16) x ceil(W/16) grid."""
    model, paths, _ = small
    sess = session(paths["encoder"])
    seed = random.randrange(1 << 30)
    rng = np.random.default_rng(seed)
    sizes = [(h, w) for h in ODD_H for w in ODD_W]
    sizes += [(int(rng.integers(16, 200)), int(rng.integers(16, 400))) for _ in range(4)]
    worst = 0.0
    for i, (h, w) in enumerate(sizes):
        x = torch.from_numpy(rng.random((2 if i % 3 == 0 else 1, 1, h, w), dtype=np.float32))
        got = sess.run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            ref = model.encoder(x).numpy()
        assert got.shape == ref.shape == (x.shape[0], SMALL_CFG.feature_dim, *feature_size(h, w, SMALL_CFG))
        assert np.isfinite(got).all()
        worst = max(worst, rel_err(got, ref))
        assert worst <= FP32_TOL, (h, w, worst, f"seed {seed}")
    print(f"small encoder FP32 max rel err {worst:.2e} over {len(sizes)} sizes (seed {seed})")


def test_full_size_encoder_matches_pytorch(tmp_path):
    """The full ABM encoder (D = 684, 3 x 16 bottlenecks) exports and matches at one small odd size."""
    model = scaled_random_model(ModelConfig(), seed=1)
    path = export_encoder(model, tmp_path / "encoder.onnx")
    x = random_ink_image(47, 97, torch.Generator().manual_seed(2))
    got = session(path).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        ref = model.encoder(x).numpy()
    assert got.shape == ref.shape == (1, 684, 3, 7)
    err = rel_err(got, ref)
    print(f"full-size encoder FP32 max rel err {err:.2e}")
    assert np.isfinite(got).all() and err <= FP32_TOL


def random_decoder_inputs(cfg: ModelConfig, n: int, h: int, w: int, gen: torch.Generator):
    """Features >= 0 (as the encoder's), masks with padded rows/columns and random holes (never empty),
    coverage >= 0, hidden in (-1, 1), random previous tokens."""
    features = torch.rand(n, cfg.feature_dim, h, w, generator=gen) * 2
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        vh = int(torch.randint(1, h + 1, (1,), generator=gen))
        vw = int(torch.randint(1, w + 1, (1,), generator=gen))
        mask[i, :vh, :vw] = True                                    # top-left image, padding after
    if n > 1:
        holes = torch.rand(h, w, generator=gen) < 0.3
        mask[-1] = ~holes
        mask[-1, 0, 0] = True                                       # an arbitrary mask, never empty
    hidden = torch.rand(n, cfg.hidden, generator=gen) * 2 - 1
    coverage = torch.rand(n, h, w, generator=gen) * mask
    prev = torch.randint(0, cfg.vocab_size, (n,), generator=gen)
    return features, mask, hidden, coverage, prev


@pytest.mark.parametrize("n,h,w", [(1, 1, 1), (3, 3, 17), (4, 7, 5), (2, 6, 16)])
def test_decoder_prepare_and_step_match_pytorch(small, n, h, w):
    """decoder_prepare (h0, U_a F + b_a) and decoder_step (log_probs, h_t, alpha, coverage) on ONNX Runtime
    equal DecoderBranch.initial_state / prepare / step + log_softmax (max rel err <= 1e-4) with random masks;
    two chained steps, so the step's outputs are valid inputs of the next."""
    model, paths, _ = small
    branch = model.l2r
    gen = torch.Generator().manual_seed(100 * n + 10 * h + w)
    features, mask, hidden, coverage, prev = random_decoder_inputs(SMALL_CFG, n, h, w, gen)
    prep, step = session(paths["prepare"]), session(paths["step"])
    h0, ua_f = prep.run(None, {"features": features.numpy(), "mask": mask.numpy()})
    with torch.no_grad():
        cache = branch.prepare(features, mask)
        ref_h0 = branch.initial_state(features, mask)
    assert rel_err(h0, ref_h0) <= FP32_TOL and rel_err(ua_f, cache.ua_f) <= FP32_TOL
    worst = 0.0
    for _ in range(2):
        feeds = {"prev_token": prev.numpy(), "hidden": hidden.numpy(), "coverage": coverage.numpy(),
                 "features": features.numpy(), "ua_f": ua_f, "mask": mask.numpy()}
        log_probs, h_out, alpha, cov_out = step.run(None, feeds)
        with torch.no_grad():
            ref = branch.step(cache, prev, hidden, coverage)
            ref_lp = torch.log_softmax(ref.logits, -1)
        for got, want in ((log_probs, ref_lp), (h_out, ref.hidden), (alpha, ref.alpha), (cov_out, ref.coverage)):
            assert got.shape == tuple(want.shape) and np.isfinite(got).all()
            worst = max(worst, rel_err(got, want))
        assert worst <= FP32_TOL, worst
        assert np.all(alpha[~mask.numpy()] == 0)
        prev = ref_lp.argmax(-1)
        hidden, coverage = ref.hidden, ref.coverage
    print(f"decoder step ({n}x{h}x{w}) FP32 max rel err {worst:.2e}")


def test_int8_qdq_encoder(small, tmp_path):
    """The INT8 encoder is Q/DQ (QuantizeLinear/DequantizeLinear, int8, symmetric), runs on ONNX Runtime with
    finite output, and stays loosely close to FP32 (its error is printed)."""
    model, paths, _ = small
    gen = torch.Generator().manual_seed(7)
    calib = [random_ink_image(h, w, gen)[0, 0].numpy() for h, w in ((40, 100), (94, 256), (60, 180), (33, 70))]
    out = quantize_encoder_int8(paths["encoder"], tmp_path / "encoder.int8.onnx", calib)
    m = onnx.load(str(out))
    ops = [n.op_type for n in m.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    zero_points = [i for i in m.graph.initializer if i.name.endswith("_zero_point")]
    assert zero_points and all(z.data_type == onnx.TensorProto.INT8 for z in zero_points
                               if "bias" not in z.name)                    # biases are int32
    assert all(not np.any(onnx.numpy_helper.to_array(z)) for z in zero_points)     # symmetric
    x = random_ink_image(94, 256, torch.Generator().manual_seed(8))
    got = session(out).run(None, {"images": x.numpy()})[0]
    fp32 = session(paths["encoder"]).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        ref = model.encoder(x).numpy()
    err = rel_err(got, ref)
    print(f"INT8 Q/DQ encoder rel err vs PyTorch {err:.3f} (FP32 ONNX: {rel_err(fp32, ref):.1e})")
    assert got.shape == ref.shape and np.isfinite(got).all() and err < 0.2


def write_calibration_dir(path, count: int = 5):
    from PIL import Image

    path.mkdir()
    gen = torch.Generator().manual_seed(11)
    for i in range(count):
        img = random_ink_image(40 + 13 * i, 90 + 31 * i, gen)[0, 0].numpy()
        Image.fromarray(((1 - img) * 255).astype(np.uint8)).save(path / f"c{i}.png")   # dark ink on paper
    return path


@pytest.fixture(scope="module")
def source_engine(tmp_path_factory):
    model = scaled_random_model(SMALL_CFG, seed=5, bidirectional=True)
    return save_engine(tmp_path_factory.mktemp("src") / "eng", model, Vocab.default()), model


def check_converted(out, precision, model, with_r2l=False):
    config = read_config(out)
    assert config["precision"] == precision
    files = config["files"]
    for key in ("weights", "vocab", "encoder_onnx", "decoder_prepare_onnx", "decoder_step_onnx"):
        assert (out / files[key]).is_file(), key
    assert ("encoder_int8_onnx" in files) == (precision == "int8")
    exp = config["export"]
    assert exp["opset"] == 17 and exp["precision"] == precision and exp["onnx_version"] == onnx.__version__
    assert exp["torch_version"] and exp["shape_range"]["opt"] == {"height": 96, "width": 320}
    assert exp["shape_range"]["min"] == {"height": 16, "width": 16}
    assert exp["shape_range"]["max"] == {"height": 512, "width": 2048}
    assert exp["check"]["encoder_max_rel_error"] <= FP32_TOL
    eng = load_engine(out)
    assert eng.has_r2l == with_r2l == ("r2l" in files) and eng.model_config == SMALL_CFG
    expected = model.state_dict() if with_r2l else model.inference_state_dict()   # R2L when the source has it
    assert set(eng.model.state_dict()) == set(expected)
    for k, v in expected.items():
        assert torch.equal(eng.model.state_dict()[k], v), k
    return config


def test_convert_cli_fp32_and_int8(source_engine, tmp_path, capsys):
    """`abm-rt convert` writes a loadable engine directory whose config lists every file (fp32), and adds a
    calibrated encoder.int8.onnx for int8; converting again without int8 removes the stale INT8 graph."""
    from abm_rt.cli import main

    src, model = source_engine
    out = tmp_path / "fp32"
    assert main(["convert", str(src), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["files"]["encoder_onnx"] == "encoder.onnx"
    check_converted(out, "fp32", model)

    calib = write_calibration_dir(tmp_path / "calib")
    out8 = tmp_path / "int8"
    assert main(["convert", str(src), "--out", str(out8), "--precision", "int8", "--calibration", str(calib),
                 "--calibration-count", "4"]) == 0
    config = check_converted(out8, "int8", model)
    assert config["export"]["int8"]["calibration_images"] == 4
    print(f"convert int8 check: {config['export']['check']}")
    assert main(["convert", str(out8), "--out", str(out8), "--precision", "fp16"]) == 0
    check_converted(out8, "fp16", model)
    assert not (out8 / "encoder.int8.onnx").exists()


def test_convert_from_trainer_state(tmp_path):
    """A trainer state directory (state.json + shards of the bidirectional model) converts: the R2L branch is
    kept (r2l.safetensors, for rescoring) and the dimensions come from the run's config."""
    from abm_rt.cli import main
    from training.checkpoint import save_state

    model = scaled_random_model(SMALL_CFG, seed=6, bidirectional=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meta = {"epoch": 3, "step": 30, "config": {"model": {k: v for k, v in SMALL_CFG.to_dict().items()
                                                          if v != getattr(ModelConfig(), k)}}}
    state = save_state(tmp_path / "state", model, opt, meta)
    out = tmp_path / "eng"
    assert main(["convert", str(state), "--out", str(out)]) == 0
    config = check_converted(out, "fp32", model, with_r2l=True)
    assert config["provenance"]["epoch"] == 3


def test_convert_errors(source_engine, tmp_path, capsys):
    """Bad sources and int8 without calibration images are one clear line and exit status 2."""
    from abm_rt.cli import main

    src, _ = source_engine
    assert main(["convert", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "neither an engine directory" in capsys.readouterr().err
    assert main(["convert", str(src), "--out", str(tmp_path / "o"), "--precision", "int8"]) == 2
    assert "--calibration" in capsys.readouterr().err
