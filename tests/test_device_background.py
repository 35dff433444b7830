"""training/device_background.sh returns at most the 64 MiB a device call brings back.

Session 5 of abm-paper lost the tail of its tar (the rest of tail_engine and all of weights_fp16) when
train.out, best_engine, tail_engine and weights_fp16 together came to 83 MB. The script now returns the parts
in order of need while they fit and names the rest, which ``ONLY=... WAIT=0 ... wait`` fetches later.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "training" / "device_background.sh"
MIB = 1024 * 1024
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None,
                                reason="needs bash and tar")


def _engine(path: Path, mib: int) -> None:
    """An engine-sized folder: one sparse file of ``mib`` MiB, so the test costs no disk."""
    path.mkdir(parents=True)
    with open(path / "model.safetensors", "wb") as f:
        f.truncate(mib * MIB)


def _finished_run(tmp_path: Path) -> Path:
    """A run folder as a trainer leaves it after it stopped: output, two 33 MiB engines, a dead pid."""
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "train.out").write_text("epoch 80\n")
    (run / "log.jsonl").write_text('{"epoch": 80}\n')
    _engine(run / "tail_engine", 33)
    _engine(run / "best_engine", 33)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run / "pid").write_text(f"{dead.pid}\n")
    return run


def _call(tmp_path: Path, **env: str) -> tuple[str, list[str]]:
    """Run ``wait`` as a device call would, in ``tmp_path``; the names in the returned tar."""
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    done = subprocess.run(["bash", str(SCRIPT), "wait"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "RUN": "r", "WAIT": "0", "OUT": str(out), **env}, check=True)
    total = sum(p.stat().st_size for p in out.iterdir())
    assert total <= 64 * MIB
    parts = sorted(out.glob("r.tar.part-*"))
    if not parts:
        return done.stdout, []
    listing = subprocess.run(f"cat {' '.join(map(str, parts))} | tar -t", shell=True, capture_output=True,
                             text=True, check=True).stdout.split()
    return done.stdout, sorted({name.split("/")[0] for name in listing})


def test_returns_what_fits_and_names_the_rest(tmp_path: Path) -> None:
    _finished_run(tmp_path)
    stdout, names = _call(tmp_path)
    assert names == ["tail_engine", "train.out"]
    assert 'not returned (over the 64 MiB a call returns): best_engine; fetch it with ONLY="best_engine"' in stdout
    assert (tmp_path / "out" / "r.log.jsonl").read_text() == '{"epoch": 80}\n'


def test_only_fetches_the_named_part(tmp_path: Path) -> None:
    _finished_run(tmp_path)
    stdout, names = _call(tmp_path, ONLY="best_engine")
    assert names == ["best_engine"]
    assert "not returned" not in stdout
