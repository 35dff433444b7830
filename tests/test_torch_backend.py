"""TorchEncoder: the folded inference encoder (CPU checks) and its CUDA paths (FP16, CUDA graphs per bucket).

The CUDA tests skip on machines without a CUDA GPU; they run in the GPU session.
"""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from abm_rt.backends import choose_encoder_backend
from abm_rt.backends.torch_backend import TorchEncoder
from abm_rt.data.buckets import pad_batch
from abm_rt.data.vocab import Vocab
from abm_rt.engine_dir import load_engine, save_engine
from abm_rt.model import scaled_random_model
from abm_rt.model.fold import fold_batchnorm, has_batchnorm_or_dropout

from conftest import SMALL_CFG, random_ink_image

HAVE_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU (CUDA graphs, FP16): runs in the GPU session")
SIZES = [(47, 129), (33, 251), (94, 97), (20, 333)]     # odd sizes; the last one is the widest


@pytest.fixture(scope="module")
def model():
    """Small random model with random BN statistics (scaled_random_model sets them), eval mode, on CPU."""
    return scaled_random_model(SMALL_CFG, seed=4)


def padded_batch(sizes=SIZES, seed: int = 0, multiple: int = 16):
    gen = torch.Generator().manual_seed(seed)
    return pad_batch([random_ink_image(h, w, gen)[0, 0].numpy() for h, w in sizes], multiple=multiple)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float().cpu() - ref.float().cpu()).abs().max() / ref.abs().max())


def valid_rel_err(a: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    """Max |a - ref| over valid feature cells, relative to max |ref| there."""
    a, ref, mask = a.float().cpu(), ref.float().cpu(), mask.cpu()
    valid = mask[:, None].expand_as(ref)
    return float((a - ref).abs()[valid].max() / ref.abs()[valid].max())


# ---- CPU ----------------------------------------------------------------------------------------------
def test_fold_removes_batchnorm_and_dropout_and_leaves_the_model_alone(model):
    """The folded copy has no BatchNorm/Dropout, every former conv+BN conv has a bias, the model keeps its BNs;
    export/onnx_export.py uses this same function."""
    from export import fold_batchnorm as exported_fold

    assert exported_fold is fold_batchnorm
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.encoder.modules())
    folded = fold_batchnorm(model.encoder)
    assert has_batchnorm_or_dropout(folded) == [] and not folded.training
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.encoder.modules()) == n_bn > 0
    biased = [m for m in folded.modules() if isinstance(m, nn.Conv2d) and m.bias is not None]
    assert len(biased) == n_bn                      # the stem has no BN and keeps no bias
    assert all(getattr(m, "dropout", 0.0) == 0.0 for m in folded.modules())
    enc = TorchEncoder(model, "cpu")
    assert has_batchnorm_or_dropout(enc.encoder) == []
    assert all(not p.requires_grad for p in enc.encoder.parameters())


@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_encoder_equals_the_original(model, channels_last):
    """FP32 folded encoder == the reference encoder (eval) within 1e-5 max rel err at odd sizes, NCHW or NHWC;
    the features come back NCHW-contiguous float32 and the mask equals ABM.encode's."""
    enc = TorchEncoder(model, "cpu", channels_last=channels_last)
    assert enc.bucket_pad is False and enc.cuda_graphs is False      # CPU defaults: exact, no graphs
    for sizes in ([(47, 97)], [(33, 251), (21, 75)], SIZES):
        x, pm = padded_batch(sizes, multiple=1)                      # odd canvases: partial pool windows
        with torch.no_grad():
            ref, ref_mask = model.encode(x, pm)
        f, m = enc.encode(x, pm)
        err = rel_err(f, ref)
        print(f"folded (channels_last={channels_last}) vs reference {tuple(x.shape)}: max rel err {err:.2e}")
        assert f.shape == ref.shape and f.dtype == torch.float32 and f.is_contiguous()
        assert torch.equal(m, ref_mask) and m.dtype == torch.bool
        assert err <= 1e-5


def test_channels_last_gives_the_same_features(model):
    x, pm = padded_batch()
    a, _ = TorchEncoder(model, "cpu", channels_last=False).encode(x, pm)
    b, _ = TorchEncoder(model, "cpu", channels_last=True).encode(x, pm)
    assert rel_err(b, a) <= 1e-5


def test_bucket_padding_changes_valid_cells_only_near_the_canvas_edge(model):
    """Measured: padding the Recognizer's canvas further (to a bucket) changes valid features of the images that
    reach the canvas' right/bottom edge (receptive field; spec 5.2), and only those. bucket_pad=False is exact."""
    x, pm = padded_batch()                                           # the Recognizer's canvas: 4 x 96 x 336
    exact = TorchEncoder(model, "cpu", bucket_pad=False)
    bucketed = TorchEncoder(model, "cpu", bucket_pad=True)
    assert bucketed.bucket_shape(4, 96, 336) == (4, 96, 384)
    f0, m0 = exact.encode(x, pm)
    f1, m1 = bucketed.encode(x, pm)
    with torch.no_grad():
        ref, _ = model.encode(x, pm)
    assert f1.shape == f0.shape == ref.shape and torch.equal(m0, m1)
    assert rel_err(f0, ref) <= 1e-5
    total = valid_rel_err(f1, f0, m0)
    per_image = [valid_rel_err(f1[i:i + 1], f0[i:i + 1], m0[i:i + 1]) for i in range(len(SIZES))]
    print(f"bucket padding 4x96x336 -> 4x96x384 (small model, random weights): max |diff| on valid cells / "
          f"max |f| = {total:.2e}; per image {[f'{e:.1e}' for e in per_image]} for sizes {SIZES}")
    assert torch.isfinite(f1).all()
    # Images whose valid region ends far from the canvas' right edge are untouched; the widest one is not.
    assert max(per_image[:3]) <= 1e-5 and per_image[3] > 0
    d = describe_ok(bucketed)
    assert d["bucket_pad"] is True and "spec 5.2" in d["bucketing"]


def test_bucket_shapes(model):
    enc = TorchEncoder(model, "cpu", bucket_pad=True, max_batch=32)
    assert enc.bucket_shape(1, 16, 16) == (1, 32, 64)
    assert enc.bucket_shape(3, 50, 100) == (4, 64, 128)
    assert enc.bucket_shape(5, 64, 128) == (8, 64, 128)
    assert enc.bucket_shape(32, 96, 336) == (32, 96, 384)
    assert enc.bucket_shape(33, 96, 336) == (33, 96, 336)           # over max_batch: not bucketed
    assert TorchEncoder(model, "cpu", bucket_pad=True, max_batch=24).bucket_shape(20, 32, 64) == (24, 32, 64)
    assert TorchEncoder(model, "cpu").bucket_shape(3, 50, 100) == (3, 50, 100)


def describe_ok(enc: TorchEncoder) -> dict:
    d = enc.describe()
    for key in ("backend", "device", "precision", "channels_last", "graphs", "bn_folded", "bucket_pad"):
        assert key in d, key
    assert d["backend"] == "pytorch" and d["bn_folded"] is True
    assert {"count", "buckets", "enabled"} <= set(d["graphs"])
    return d


def test_describe_and_errors_on_cpu(model):
    d = describe_ok(TorchEncoder(model, "cpu"))
    assert d["precision"] == "fp32" and d["channels_last"] is True and d["cudnn_tf32"] is None
    assert d["graphs"]["enabled"] is False and d["graphs"]["count"] == 0 and d["graphs"]["buckets"] == []
    assert "CUDA device" in d["graphs"]["why_not"]
    with pytest.raises(ValueError, match=r"fp16.*needs a CUDA device.*precision='fp32'"):
        TorchEncoder(model, "cpu", precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        TorchEncoder(model, "cpu", precision="bf16")
    enc = TorchEncoder(model, "cpu")
    x, pm = padded_batch()
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        enc.encode(x[:, 0], pm)
    with pytest.raises(ValueError, match="pixel_mask"):
        enc.encode(x, pm[:, :-1])


def test_threads_share_one_encoder_on_cpu(model):
    """8 threads encoding at once through one TorchEncoder get what a single call gets."""
    enc = TorchEncoder(model, "cpu")
    batches = [padded_batch([(20 + 3 * i, 40 + 5 * i)], seed=i) for i in range(8)]
    expected = [enc.encode(x, pm)[0] for x, pm in batches]
    got: list = [None] * 8

    def work(i):
        got[i] = enc.encode(*batches[i])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_choose_pytorch_on_cpu_folds(model, tmp_path):
    backend, reason = choose_encoder_backend(load_engine(save_engine(tmp_path / "e", model, Vocab.default())),
                                             "cpu", "pytorch")
    assert isinstance(backend, TorchEncoder) and backend.describe()["bn_folded"] is True
    assert reason.startswith("PyTorch on cpu (CPU, fp32, BN folded)") and "asked for by name" in reason


# ---- CUDA (skipped without a GPU) -----------------------------------------------------------------------
@pytest.fixture
def fp32_exact():
    """cuDNN without TF32 for the FP32 comparisons (restored afterwards)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@needs_cuda
def test_cuda_graph_capture_and_replay_equal_eager(model, fp32_exact):
    """First call of a bucket captures, later calls replay; replays equal the eager encoder on the same
    (bucket-padded) canvas, and the CPU reference encoding of that canvas within 1e-5."""
    enc = TorchEncoder(model, "cuda", cuda_graphs=True)
    eager = TorchEncoder(model, "cuda", cuda_graphs=False, bucket_pad=True)
    cpu_bucketed = TorchEncoder(model, "cpu", bucket_pad=True)
    assert enc.cuda_graphs and enc.bucket_pad
    x, pm = padded_batch()
    f, m = enc.encode(x, pm)
    assert enc.captures == 1 and enc.replays == 1
    f2, _ = enc.encode(x, pm)
    assert enc.captures == 1 and enc.replays == 2 and torch.equal(f, f2)
    ref, _ = eager.encode(x, pm)
    cpu_ref, cpu_mask = cpu_bucketed.encode(x, pm)
    assert f.device.type == "cuda" and f.dtype == torch.float32 and f.is_contiguous() and f.shape == cpu_ref.shape
    assert torch.equal(m.cpu(), cpu_mask)
    print(f"graph vs eager rel err {rel_err(f, ref):.2e}, vs CPU {rel_err(f, cpu_ref):.2e}")
    assert rel_err(f, ref) <= 1e-6 and rel_err(f, cpu_ref) <= 1e-5
    # A smaller batch in the same bucket (3 images -> 4, 96x336 -> 96x384) replays the same graph.
    f3, _ = enc.encode(x[:3], pm[:3])
    assert enc.captures == 1 and enc.replays == 3 and rel_err(f3, eager.encode(x[:3], pm[:3])[0]) <= 1e-6
    d = describe_ok(enc)
    assert d["graphs"]["count"] == 1 and d["graphs"]["buckets"] == ["4x96x384"]


@needs_cuda
def test_cuda_graph_without_bucket_padding_is_exact(model, fp32_exact):
    """bucket_pad=False: one graph per exact shape, features equal the reference model's (CPU) within 1e-5."""
    enc = TorchEncoder(model, "cuda", bucket_pad=False)
    x, pm = padded_batch()
    f, m = enc.encode(x, pm)
    with torch.no_grad():
        ref, ref_mask = model.encode(x, pm)
    assert enc.describe()["graphs"]["buckets"] == ["4x96x336"]
    assert torch.equal(m.cpu(), ref_mask) and rel_err(f, ref) <= 1e-5


@needs_cuda
def test_cuda_graph_replay_overwrites_poisoned_static_buffers(model):
    """NaN-poisoned static input and output before replay: the result is finite and unchanged (the padding
    of a smaller input is zeroed, a full-bucket input overwrites everything)."""
    enc = TorchEncoder(model, "cuda")
    x, pm = padded_batch()
    full_x = torch.nn.functional.pad(x, (0, 48))                     # exactly the bucket 4x96x384
    full_pm = torch.nn.functional.pad(pm, (0, 48))
    want_small, _ = enc.encode(x, pm)
    want_full, _ = enc.encode(full_x, full_pm)
    assert enc.captures == 1
    for inp, mask, want in ((x, pm, want_small), (full_x, full_pm, want_full)):
        entry = enc._graphs[(4, 96, 384)]
        with torch.inference_mode():                                 # the static buffers are inference tensors
            entry.static_in.fill_(float("nan"))
            entry.static_out.fill_(float("nan"))
        got, _ = enc.encode(inp, mask)
        assert torch.isfinite(got).all() and torch.equal(got, want)


@needs_cuda
def test_cuda_fp16_close_to_fp32(model, fp32_exact):
    """FP16 (graphs, bucket padding) vs the FP32 CPU reference on the same bucket canvas: max rel err <= 2e-3;
    also without bucket padding vs the plain reference model."""
    x, pm = padded_batch()
    enc = TorchEncoder(model, "cuda", precision="fp16")
    assert enc.encoder.stem.weight.dtype == torch.float16
    f, _ = enc.encode(x, pm)
    ref, _ = TorchEncoder(model, "cpu", bucket_pad=True).encode(x, pm)
    err = rel_err(f, ref)
    f_exact, _ = TorchEncoder(model, "cuda", precision="fp16", bucket_pad=False).encode(x, pm)
    with torch.no_grad():
        err_exact = rel_err(f_exact, model.encode(x, pm)[0])
    print(f"fp16 vs fp32: max rel err {err:.2e} (bucketed), {err_exact:.2e} (exact shape)")
    assert f.dtype == torch.float32 and torch.isfinite(f).all()
    assert err <= 2e-3 and err_exact <= 2e-3
    assert enc.describe()["precision"] == "fp16"


@needs_cuda
def test_cuda_graph_lru_and_large_batches(model, fp32_exact):
    """At most max_graphs graphs are kept (least recently used evicted, recaptured on return); batches over
    max_batch run without a graph."""
    enc = TorchEncoder(model, "cuda", max_graphs=2, max_batch=4)
    eager = TorchEncoder(model, "cuda", cuda_graphs=False, bucket_pad=True, max_batch=4)   # the same canvases
    shapes = [[(30, 60)], [(30, 200)], [(100, 60)]]
    for sizes in shapes + shapes[:1]:
        x, pm = padded_batch(sizes)
        assert rel_err(enc.encode(x, pm)[0], eager.encode(x, pm)[0]) <= 1e-6
    d = enc.describe()["graphs"]
    assert d["count"] == 2 and d["captures"] == 4 and d["evictions"] == 2
    assert d["buckets"] == ["1x128x64", "1x32x64"]
    x, pm = padded_batch(SIZES + SIZES[:1])                              # 5 images > max_batch 4
    f, _ = enc.encode(x, pm)
    assert enc.describe()["graphs"]["captures"] == 4 and rel_err(f, eager.encode(x, pm)[0]) <= 1e-6


@needs_cuda
def test_cuda_graphs_from_many_threads(model, fp32_exact):
    """Two graph encoders used by 8 threads at once (captures racing replays): every result equals eager."""
    encs = [TorchEncoder(model, "cuda"), TorchEncoder(model, "cuda", bucket_pad=False)]
    eager = [TorchEncoder(model, "cuda", cuda_graphs=False, bucket_pad=True),
             TorchEncoder(model, "cuda", cuda_graphs=False)]
    batches = [padded_batch([(20 + 9 * i, 40 + 17 * i)] * (1 + i % 3), seed=i) for i in range(8)]
    errors: list = []

    def work(i):
        try:
            for k in range(3):
                j = (i + k) % 2
                x, pm = batches[(i + k) % 8]
                got, _ = encs[j].encode(x, pm)
                want, _ = eager[j].encode(x, pm)
                assert rel_err(got, want) <= 1e-6, (i, k)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@needs_cuda
def test_choose_pytorch_on_cuda_uses_engine_precision(model, tmp_path):
    for precision in ("fp32", "fp16"):
        engine = load_engine(save_engine(tmp_path / precision, model, Vocab.default(), precision=precision))
        backend, reason = choose_encoder_backend(engine, "cuda", "pytorch")
        assert isinstance(backend, TorchEncoder) and backend.precision == precision
        assert f"CUDA, {precision}" in reason and not backend.cuda_graphs   # graphs are opt-in (bucket padding)
