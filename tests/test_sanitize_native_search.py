"""tools/sanitize_native_search.py (the racecheck split of real images into an encoder process and a search
process): on CPU, the saved reference tokens are reproduced, and a difference is reported with exit code 1; the
R2L branch's search is the PyTorch R2L beam search's."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from abm_rt.data.vocab import EOS_ID, SOS_ID
from abm_rt.decode import native
from abm_rt.decode.batched import beam_search
from abm_rt.recognizer import load_default_engine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import sanitize_native_search as tool  # noqa: E402

pytestmark = pytest.mark.skipif(not native.is_available("cpu"), reason="abm_rt._C is not built")


@pytest.mark.parametrize("branch", ["l2r", "r2l"])
def test_search_reproduces_the_saved_tokens_and_flags_a_difference(tmp_path, capsys, branch):
    out = tmp_path / "feats.pt"
    assert tool.main(["features", str(ROOT / "examples"), "--limit", "2", "--beam", "2", "--device", "cpu",
                      "--branch", branch, "--out", str(out)]) == 0
    saved = torch.load(out, weights_only=True)
    assert saved["branch"] == branch
    if branch == "r2l":         # the R2L search, from eos to sos, of the PyTorch reference on the same features
        r2l = load_default_engine().model.r2l
        for b in saved["batches"]:
            ref = beam_search(r2l, b["features"], b["mask"], 2, max_len=saved["max_len"], sos=EOS_ID, eos=SOS_ID)
            assert [list(s.tokens) for s in ref] == b["tokens"]
    assert sum(len(b["names"]) for b in saved["batches"]) == 2
    assert all(len(t) > 0 for b in saved["batches"] for t in b["tokens"])
    assert tool.main(["search", str(out), "--device", "cpu"]) == 0
    assert "same tokens for 2 of 2 images" in capsys.readouterr().out

    saved["batches"][0]["tokens"][0] = saved["batches"][0]["tokens"][0][:-1]   # as if the search had changed
    torch.save(saved, out)
    assert tool.main(["search", str(out), "--device", "cpu"]) == 1
    assert "tokens differ" in capsys.readouterr().out
