"""training.soup: the weighted average of engine directories (tiny models, CPU)."""
from __future__ import annotations

import pytest
import torch

from abm_rt.data.vocab import Vocab
from abm_rt.engine_dir import load_engine, save_engine
from abm_rt.model import ABM, ModelConfig, initialize
from training.soup import average_engines, main

TINY = {"growth": 8, "block_depth": 2, "hidden": 32, "embed": 32, "attn": 32}


def _engine(path, seed: int, with_r2l: bool = False, **dims):
    torch.manual_seed(seed)
    model = ABM(ModelConfig(**{**TINY, **dims}), bidirectional=with_r2l)
    initialize(model)
    with torch.no_grad():   # BN statistics that differ between the engines, so their average is checked too
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
    return save_engine(path, model, Vocab.default(), provenance={"seed": seed}, with_r2l=with_r2l)


def test_r2l_branch_is_averaged_when_every_engine_has_it(tmp_path):
    """Engines with R2L give a soup with the averaged R2L; one engine without it gives a soup without."""
    a, b = _engine(tmp_path / "a", 1, with_r2l=True), _engine(tmp_path / "b", 2, with_r2l=True)
    soup = load_engine(average_engines([a, b], tmp_path / "soup"))
    assert soup.has_r2l
    wa, wb = load_engine(a).model.r2l.W_o.weight, load_engine(b).model.r2l.W_o.weight
    torch.testing.assert_close(soup.model.r2l.W_o.weight, 0.5 * (wa + wb))
    c = _engine(tmp_path / "c", 3)
    mixed = load_engine(average_engines([a, c], tmp_path / "mixed"))
    assert not mixed.has_r2l
    torch.testing.assert_close(mixed.model.l2r.W_o.weight,
                               0.5 * (load_engine(a).model.l2r.W_o.weight + load_engine(c).model.l2r.W_o.weight))


def test_weighted_average_of_every_floating_tensor(tmp_path):
    a, b = _engine(tmp_path / "a", 1), _engine(tmp_path / "b", 2)
    out = average_engines([a, b], tmp_path / "soup", weights=[3, 1], names=["run a", "run b"],
                          run_name="ab")
    sa, sb = load_engine(a).model.state_dict(), load_engine(b).model.state_dict()
    soup = load_engine(out)
    got = soup.model.state_dict()
    assert set(got) == set(sa)
    for k, v in got.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.75 * sa[k] + 0.25 * sb[k], rtol=1e-6, atol=1e-7, msg=k)
        else:
            assert torch.equal(v, sa[k]), k
    prov = soup.config["provenance"]
    assert prov["weights"] == [0.75, 0.25] and prov["run"] == "ab"
    assert [s["provenance"] for s in prov["sources"]] == [{"seed": 1}, {"seed": 2}]
    assert [s["name"] for s in prov["sources"]] == ["run a", "run b"]


def test_cli_equal_weights_and_bad_inputs(tmp_path, capsys):
    a, b = _engine(tmp_path / "a", 1), _engine(tmp_path / "b", 2)
    main([str(a), str(b), "--out", str(tmp_path / "soup")])
    assert str(tmp_path / "soup") in capsys.readouterr().out
    w = load_engine(tmp_path / "soup").model.l2r.W_o.weight
    torch.testing.assert_close(w, 0.5 * (load_engine(a).model.l2r.W_o.weight + load_engine(b).model.l2r.W_o.weight))
    with pytest.raises(ValueError, match="at least two"):
        average_engines([a], tmp_path / "x")
    with pytest.raises(ValueError, match="weights for"):
        average_engines([a, b], tmp_path / "x", weights=[1.0])
    with pytest.raises(ValueError, match="non-negative"):
        average_engines([a, b], tmp_path / "x", weights=[1.0, -1.0])
    c = _engine(tmp_path / "c", 3, hidden=48)
    with pytest.raises(ValueError, match="model dimensions"):
        average_engines([a, c], tmp_path / "x")
    # Another dropout rate is a training setting: that soup is made, with the first engine's config.
    d = _engine(tmp_path / "d", 4, dropout=0.3)
    soup = load_engine(average_engines([a, d], tmp_path / "mixed_dropout"))
    assert soup.model.cfg == load_engine(a).model.cfg
    torch.testing.assert_close(soup.model.l2r.W_o.weight,
                               0.5 * (load_engine(a).model.l2r.W_o.weight + load_engine(d).model.l2r.W_o.weight))
