"""benchmarks/bench_train_epoch.py end to end on a CPU: real trainer processes on a tiny fixture, read back."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_train_epoch import epoch_figures, parse_config
from test_trainer import TINY, _samples, _write_split

REPO = Path(__file__).resolve().parents[1]


def test_parse_config_keeps_flags_whole():
    assert parse_config("base=") == ("base", [])
    assert parse_config("b=--max-batch=4 --seed=2") == ("b", ["--max-batch=4", "--seed=2"])
    with pytest.raises(Exception, match="NAME=FLAGS"):
        parse_config("no-equals")


def test_two_configurations_run_and_are_read_back(tmp_path):
    """Two trainer processes (a tiny model on a tiny CROHME-format fixture) give one row each, whose figures
    are those of their own log: steady = the mean of the epochs after the first."""
    data = tmp_path / "crohme"
    _write_split(data / "train", _samples(8, seed=1, max_h=90, max_w=180))
    _write_split(data / "2014", _samples(2, seed=2, max_h=90, max_w=180))
    common = f"--device=cpu --precision=fp32 --model={json.dumps(TINY, separators=(',', ':'))}"
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, "benchmarks/bench_train_epoch.py", "--data", str(data), "--epochs", "2",
                    "--config", f"a={common} --max-batch=4", "--config", f"b={common} --max-batch=2",
                    "--out", str(out)], cwd=REPO, check=True, capture_output=True, text=True)
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "train_epoch" and "commit" in doc and "command" in doc
    a, b = doc["rows"]
    assert (a["name"], b["name"]) == ("a", "b")
    assert a["train_images"] == b["train_images"] == 8 and a["epochs"] == b["epochs"] == 2
    assert a["batches_per_epoch"] < b["batches_per_epoch"]          # batches of <= 4 vs <= 2 images
    for r in (a, b):
        assert r["steady_epoch_s"] == pytest.approx(r["steady_epoch_s_each"][0], abs=1e-3) and r["steady_epoch_s"] > 0
        assert r["ms_per_step"] == pytest.approx(1000 * r["steady_epoch_s"] / r["batches_per_epoch"], rel=1e-2)
    assert doc["headline"]["b vs a"] == pytest.approx(a["steady_epoch_s"] / b["steady_epoch_s"], rel=1e-2)


def test_epoch_figures_need_a_steady_epoch(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"event": "start", "train_images": 4, "train_batches": 2}) + "\n"
                   + json.dumps({"epoch": 1, "epoch_seconds": 3.0, "ce_l2r": 1.0}) + "\n")
    with pytest.raises(RuntimeError, match="at least 2"):
        epoch_figures(log)
