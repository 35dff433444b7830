"""Make an engine directory (weights only: config.json, vocab.txt, model.safetensors) from a trainer state.

    python -m training.bundle RUN_DIR/state OUT_ENGINE_DIR [--log RUN_DIR/log.jsonl]

This is how the package's default engine (abm_rt/assets/default) is made from a training run; the
engine keeps the encoder and the L2R branch (the inference model), the R2L branch when the run trained
one (for bidirectional rescoring), and records where it came from.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from abm_rt.data.vocab import Vocab
from abm_rt.engine_dir import save_engine


def bundle(state_dir: str | Path, out: str | Path, log: str | Path | None = None, run_name: str | None = None) -> Path:
    """Write the inference engine of the trainer state at ``state_dir`` to ``out``."""
    from export.convert import load_trainer_state

    model, meta = load_trainer_state(state_dir, bidirectional=None)
    provenance = {"trained_by": "abm_rt training", "run": run_name, "epoch": meta.get("epoch"),
                  "train_seconds": round(meta.get("train_seconds", 0.0), 1), "train_config": meta.get("config")}
    if log and Path(log).is_file():
        records = [json.loads(ln) for ln in Path(log).read_text().splitlines() if ln.strip()]
        last_val = [r for r in records if "val_exprate" in r]
        if last_val:
            provenance["val_2014_last"] = {k[4:]: last_val[-1][k] for k in last_val[-1] if k.startswith("val_")}
            provenance["val_2014_last"]["epoch"] = last_val[-1]["epoch"]
    return save_engine(out, model, Vocab.default(), provenance=provenance, with_r2l=model.r2l is not None)


def main() -> None:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("state", help="a trainer state directory (state.json + state-*.safetensors)")
    p.add_argument("out", help="the engine directory to write")
    p.add_argument("--log", help="the run's log.jsonl, to record its last validation scores")
    p.add_argument("--run-name", help="name of the run, recorded in the engine's provenance")
    a = p.parse_args()
    print(bundle(a.state, a.out, a.log, a.run_name))


if __name__ == "__main__":
    main()
