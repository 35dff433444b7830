"""training.bn_recalibrate: BatchNorm statistics recomputed for the current weights, dropout off (tiny model, CPU)."""
from __future__ import annotations

import json

import pytest
import torch

from abm_rt.data.crohme import read_split
from abm_rt.data.vocab import Vocab
from abm_rt.engine_dir import load_engine, save_engine
from abm_rt.model import ABM, ModelConfig, initialize
from test_trainer import TINY, _samples, _write_split
from training.bn_recalibrate import batchnorm_buffers, main, recalibrate_batchnorm
from training.packed import pack_split


def _model(seed: int = 0, dropout: float = 0.5) -> ABM:
    torch.manual_seed(seed)
    model = ABM(ModelConfig(**{**TINY, "dropout": dropout}), bidirectional=True)
    initialize(model)
    return model


def _batches(n: int = 10, seed: int = 3):
    return pack_split(_samples(n, seed=seed, max_h=90, max_w=200), Vocab.default(), torch.device("cpu"), 4, 60_000)


def test_statistics_are_the_average_of_the_batches_statistics_with_dropout_off():
    """The first BN (after the stem conv only, so its inputs do not depend on any BN statistics) ends with
    the plain mean over batches of its batch mean and unbiased variance, measured in a separate eval pass;
    mode, momenta and buffer storage are kept; a second pass gives the same statistics (no dropout noise)."""
    model = _model()
    model.train()
    batches = _batches()
    first_bn = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    hook = first_bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().clone()))
    model.eval()
    with torch.no_grad():
        for b in batches:
            model.encode(*b.inputs())
    hook.remove()
    model.train()
    expected_mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen]).mean(0)
    expected_var = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in seen]).mean(0)
    momenta = [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    pointers = [t.data_ptr() for t in batchnorm_buffers(model)]

    images = recalibrate_batchnorm(model, batches)

    assert images == sum(int(b.images.shape[0]) for b in batches)
    torch.testing.assert_close(first_bn.running_mean, expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first_bn.running_var, expected_var, rtol=1e-5, atol=1e-6)
    assert int(first_bn.num_batches_tracked) == len(batches)
    assert model.training and all(m.training for m in model.modules())
    assert [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)] == momenta
    assert [t.data_ptr() for t in batchnorm_buffers(model)] == pointers      # in place: CUDA graphs stay valid
    once = [t.clone() for t in batchnorm_buffers(model)]
    recalibrate_batchnorm(model, batches)
    for a, b in zip(once, batchnorm_buffers(model)):
        assert torch.equal(a, b)


def test_deeper_statistics_change_and_weights_do_not():
    """Every BN's statistics move off their initial values; no parameter changes."""
    model = _model()
    before = {k: v.clone() for k, v in model.named_parameters()}
    initial = [t.clone() for t in batchnorm_buffers(model)]
    recalibrate_batchnorm(model, _batches())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    moved = [not torch.equal(a, b) for a, b in zip(initial[0::3], batchnorm_buffers(model)[0::3])]
    assert all(moved) and len(moved) >= 4


def test_dropout_on_reaches_the_statistics_after_the_first_dropout_only():
    """With dropout=True (as in training) the first BN, which no dropout precedes, gets the same statistics as
    with dropout off; BNs after a dropout get other ones, which differ from one dropout seed to another."""
    batches = _batches()
    off, on_a, on_b = _model(), _model(), _model()
    recalibrate_batchnorm(off, batches)
    torch.manual_seed(1)
    recalibrate_batchnorm(on_a, batches, dropout=True)
    torch.manual_seed(2)
    recalibrate_batchnorm(on_b, batches, dropout=True)
    first_off, first_on = batchnorm_buffers(off)[0], batchnorm_buffers(on_a)[0]
    torch.testing.assert_close(first_on, first_off)
    later = [i for i in range(3, len(batchnorm_buffers(off)), 3)]
    assert any(not torch.allclose(batchnorm_buffers(on_a)[i], batchnorm_buffers(off)[i]) for i in later)
    assert any(not torch.equal(batchnorm_buffers(on_a)[i], batchnorm_buffers(on_b)[i]) for i in later)
    assert on_a.training and off.training          # each was in training mode before, and is again


def test_no_batches_is_an_error():
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batchnorm(_model(), [])


def test_command_writes_a_recalibrated_engine(tmp_path, capsys):
    """`python -m training.bn_recalibrate ENGINE --out DIR` on a self-made CROHME folder: same weights and R2L,
    new BN statistics (those of the in-memory recalibration on the same images), provenance recorded."""
    data = tmp_path / "crohme"
    samples = _samples(9, seed=5, max_h=90, max_w=200)
    _write_split(data / "train", samples)
    src = save_engine(tmp_path / "src", _model(seed=2), Vocab.default(), provenance={"run": "tiny"}, with_r2l=True)

    main([str(src), "--out", str(tmp_path / "bn"), "--data", str(data), "--images", "8", "--max-batch", "4",
          "--batch-pixels", "60000"])

    assert capsys.readouterr().out.strip() == str(tmp_path / "bn")
    old, new = load_engine(src), load_engine(tmp_path / "bn")
    assert new.has_r2l
    reference = load_engine(src).model
    recalibrate_batchnorm(reference, pack_split(read_split(data / "train", limit=8), Vocab.default(),
                                                torch.device("cpu"), 4, 60_000))
    for name, value in new.model.state_dict().items():
        if "running_" in name or "num_batches" in name:
            torch.testing.assert_close(value, reference.state_dict()[name])
        else:
            assert torch.equal(value, old.model.state_dict()[name]), name
    assert not torch.equal(batchnorm_buffers(new.model)[0], batchnorm_buffers(old.model)[0])
    prov = json.loads((tmp_path / "bn" / "config.json").read_text())["provenance"]
    assert prov["run"] == "tiny" and prov["bn_recalibrated"]["images"] == 8
    assert prov["bn_recalibrated"]["source"] == str(src)
