"""One way to write a benchmark result: benchmarks/results/<name>_<device tag>_<date>.json with the
provenance every result file carries (benchmark, date, device, commit, command) and its own figures."""
from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from abm_rt.version import source_commit

REPO = Path(__file__).resolve().parents[1]


def write_result(benchmark: str, device: str, fields: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``fields`` (rows, headline, ...) with the provenance header; returns the path written.

    Args:
        benchmark: the result's name (also the file name's prefix).
        device: "cpu" or a torch CUDA device string; the GPU's name is recorded for CUDA.
        fields: the benchmark's own keys, added after the header.
        out: the file to write (default benchmarks/results/<benchmark>_<tag>_<date>.json).
    """
    import torch

    now = dt.datetime.now(dt.timezone.utc)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    doc = {"benchmark": benchmark, "date": now.isoformat(timespec="seconds"), "device": name, "commit": source_commit(),
           "command": " ".join(["python3", *sys.argv]), **fields}
    tag = name.split()[1] if " " in name else name          # "NVIDIA H100 80GB HBM3" -> "H100"
    out = out or REPO / "benchmarks" / "results" / f"{benchmark}_{tag}_{now.date()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return out
