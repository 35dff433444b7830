"""tools/eval_padding.py: settings parse, each setting is scored on the same items, and the report is JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from abm_rt.data.vocab import Vocab
from abm_rt.engine_dir import save_engine
from abm_rt.model import ModelConfig, scaled_random_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import eval_padding as tool  # noqa: E402


def test_parse_settings():
    assert tool.parse_settings("1x1,32X16,4xgrid") == [(1, 1), (32, 16), (4, "grid")]
    with pytest.raises(ValueError):
        tool.parse_settings("0x16")


def test_report_scores_every_setting(tmp_path, capsys):
    engine = tmp_path / "engine"
    save_engine(engine, scaled_random_model(ModelConfig(growth=8, block_depth=2, hidden=32, embed=32, attn=32),
                                            seed=3, eos_bias=4.0), Vocab.default())
    out = tmp_path / "pad.json"
    assert tool.main([str(ROOT / "examples"), "--settings", "1x1,4x16,2xgrid", "--engine", str(engine), "--device", "cpu",
                      "--beam", "2", "--limit", "3", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert [(r["batch_size"], r["pad_multiple"]) for r in rep["settings"]] == [(1, 1), (4, 16), (2, "grid")]
    assert all(r["total"] == 3 for r in rep["settings"])
    assert rep["settings"][0]["predictions_differing_from_first_setting"] == 0
    for key in ("command", "date", "commit", "dataset", "recognizer"):
        assert key in rep
