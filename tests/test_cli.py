"""The abm-rt command line on the committed examples and a small random-weight engine."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from abm_rt.cli import main
from abm_rt.data.vocab import Vocab
from abm_rt.engine_dir import save_engine
from abm_rt.model import ModelConfig, scaled_random_model

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
FAST = ["--device", "cpu", "--beam", "2", "--max-len", "8"]


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("engine")
    cfg = ModelConfig(growth=8, block_depth=2, hidden=32, embed=32, attn=32)
    save_engine(path, scaled_random_model(cfg, seed=5, eos_bias=3.0), Vocab.default())
    return path


def test_recognize_folder_json(engine_dir, capsys):
    """`recognize examples/ --json` gives one JSON entry per image, each with LaTeX and no error."""
    assert main(["recognize", str(EXAMPLES), "--json", "--engine", str(engine_dir), *FAST]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 12
    assert all(e["error"] is None and isinstance(e["latex"], str) and e["file"].endswith(".png") for e in out)


def test_recognize_text_glob_and_missing(engine_dir, capsys, tmp_path):
    """Glob patterns expand; a missing file is an error line and exit status 1, the rest still printed."""
    code = main(["recognize", str(EXAMPLES / "ex0[12]*.png"), str(tmp_path / "nope.png"),
                 "--engine", str(engine_dir), *FAST])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 1 and len(lines) == 3
    assert lines[-1].startswith(str(tmp_path / "nope.png")) and "ERROR" in lines[-1]


def test_recognize_attention_pngs(engine_dir, tmp_path, capsys):
    """--attention writes one PNG per recognized image."""
    main(["recognize", str(EXAMPLES / "ex01_pythagoras.png"), "--attention", str(tmp_path), "--engine",
          str(engine_dir), *FAST])
    assert (tmp_path / "ex01_pythagoras.attention.png").stat().st_size > 0


def test_eval_report(engine_dir, tmp_path, capsys):
    """`eval` scores every item (a missing image counts as a failure) and writes a JSON report."""
    data = tmp_path / "set"
    data.mkdir()
    lines = (EXAMPLES / "labels.txt").read_text().splitlines()[:3]
    for ln in lines:
        name = ln.split("\t")[0]
        (data / f"{name}.png").write_bytes((EXAMPLES / f"{name}.png").read_bytes())
    (data / "caption.txt").write_text("\n".join(lines + ["ghost\tx + 1"]) + "\n")
    report = tmp_path / "r.json"
    assert main(["eval", str(data), "--json", str(report), "--engine", str(engine_dir), *FAST]) == 0
    rep = json.loads(report.read_text())
    assert rep["summary"]["total"] == 4 and rep["summary"]["failed"] >= 1
    assert len(rep["items"]) == 4 and rep["items"][-1]["error"]
    for key in ("device", "date", "command", "commit"):
        assert key in rep
    assert "ExpRate" in capsys.readouterr().out


def test_canvas_options_reach_the_recognizer(engine_dir, tmp_path):
    """--pad-multiple and --canvas-grid set the Recognizer's canvas, and the eval report says which."""
    data = tmp_path / "set"
    data.mkdir()
    line = (EXAMPLES / "labels.txt").read_text().splitlines()[0]
    (data / f"{line.split(chr(9))[0]}.png").write_bytes((EXAMPLES / f"{line.split(chr(9))[0]}.png").read_bytes())
    (data / "caption.txt").write_text(line + "\n")
    for extra, canvas in ((["--pad-multiple", "1"], "multiple of 1"), (["--canvas-grid"], "trainer grid")):
        report = tmp_path / "r.json"
        assert main(["eval", str(data), "--json", str(report), "--engine", str(engine_dir), *FAST, *extra]) == 0
        assert json.loads(report.read_text())["recognizer"]["canvas"] == canvas


def test_info(engine_dir, capsys):
    """`info ENGINE` prints the engine's config as JSON."""
    assert main(["info", str(engine_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format_version"] == 1 and info["vocab_size"] == 113 and "model.safetensors" in info["file_sizes"]
    assert main(["info", str(engine_dir / "nope")]) == 1


@pytest.mark.parametrize("cmd", [[], ["recognize"], ["eval"], ["info"]])
def test_help(cmd):
    """Every command has a --help that explains it."""
    out = subprocess.run([sys.executable, "-m", "abm_rt", *cmd, "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0 and "usage: abm-rt" in out.stdout and len(out.stdout) > 200


def test_encoder_backend_option(engine_dir, tmp_path, capsys):
    """--encoder-backend picks the backend by name (recorded in the report); onnxruntime on an engine without
    encoder.onnx is a clear error naming `abm-rt convert`, not a traceback."""
    report = tmp_path / "r.json"
    data = tmp_path / "set"
    data.mkdir()
    line = (EXAMPLES / "labels.txt").read_text().splitlines()[0]
    (data / f"{line.split(chr(9))[0]}.png").write_bytes((EXAMPLES / f"{line.split(chr(9))[0]}.png").read_bytes())
    (data / "caption.txt").write_text(line + "\n")
    assert main(["eval", str(data), "--json", str(report), "--engine", str(engine_dir), "--encoder-backend",
                 "pytorch", *FAST]) == 0
    assert json.loads(report.read_text())["recognizer"]["encoder_backend"] == "pytorch"
    code = main(["recognize", str(data), "--engine", str(engine_dir), "--encoder-backend", "onnxruntime", *FAST])
    assert code != 0 and "convert" in capsys.readouterr().err


def test_rescore_option(engine_dir, tmp_path, capsys):
    """--rescore r2l on an engine without the R2L branch is one clear error line (exit 2); --rescore none
    works there; an engine that carries R2L decodes with the bidirectional search by default (its eval
    report's recognizer info says so)."""
    args = ["recognize", str(EXAMPLES / "ex01_pythagoras.png"), "--engine", str(engine_dir), *FAST]
    assert main(args + ["--rescore", "r2l"]) == 2
    assert "R2L branch" in capsys.readouterr().err
    assert main(args + ["--rescore", "none"]) == 0
    capsys.readouterr()
    cfg = ModelConfig(growth=8, block_depth=2, hidden=32, embed=32, attn=32)
    bi = save_engine(tmp_path / "bi", scaled_random_model(cfg, seed=5, eos_bias=3.0, bidirectional=True),
                     Vocab.default(), with_r2l=True)
    data = tmp_path / "set"
    data.mkdir()
    line = (EXAMPLES / "labels.txt").read_text().splitlines()[0]
    (data / "labels.txt").write_text(line + "\n")
    name = line.split("\t")[0]
    (data / f"{name}.png").write_bytes((EXAMPLES / f"{name}.png").read_bytes())
    report = tmp_path / "r.json"
    assert main(["eval", str(data), "--engine", str(bi), "--json", str(report), *FAST]) == 0
    assert json.loads(report.read_text())["recognizer"]["rescore"] == "both (weight 1)"
