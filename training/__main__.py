"""Command line of the trainer: ``python -m training --data DIR --out RUN_DIR [options]``."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from .checkpoint import save_state
from .trainer import TrainConfig, Trainer


def build_parser() -> argparse.ArgumentParser:
    """Every TrainConfig field as an option, with its help text and default."""
    p = argparse.ArgumentParser(
        prog="python -m training",
        description="Train ABM (L2R + R2L mutual learning, spec 4) on CROHME. Resumes from OUT/state "
                    "when present; writes OUT/log.jsonl (one JSON line per epoch), OUT/state (resumable "
                    "shards of <= 16 MiB) and OUT/best_engine (best 2014 ExpRate, an engine directory). "
                    "On a GPU add --cuda-graphs true --attention-fp32 true (the fast path). The commands "
                    "of every run so far are in training/runs/*/README.md.")
    for f in fields(TrainConfig):
        flag, text = f"--{f.name.replace('_', '-')}", f.metadata.get("help", "")
        if f.name == "model":
            p.add_argument(flag, type=json.loads, default={}, help=text)
            continue
        default = f.default
        if isinstance(default, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), metavar="true|false",
                           default=default, help=f"{text} (default {str(default).lower()})")
        elif isinstance(default, tuple):
            p.add_argument(flag, type=lambda s: tuple(int(x) for x in s.split(",")), metavar="H,W",
                           default=default, help=f"{text} (default {','.join(map(str, default))})")
        elif default is None:
            kind = float if "float" in str(f.type) else (str if "str" in str(f.type) else int)
            p.add_argument(flag, type=kind, default=None, help=f"{text} (default: none)")
        else:
            p.add_argument(flag, type=type(default), default=default, help=f"{text} (default {default})")
    p.add_argument("--export-compact", metavar="DIR", help="after training, also write the compact "
                   "(bf16 moments, no first moment) state to DIR, for carrying to another machine")
    p.add_argument("--export-weights", metavar="DIR", help="after training, also write the weights alone "
                   "(fp32, shards of <= 16 MiB, no optimizer moments) to DIR: enough for training.bundle")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    trainer = Trainer(TrainConfig(**values))
    meta = trainer.run()
    if args.export_compact:
        save_state(args.export_compact, trainer.model, trainer.opt, trainer.meta, compact=True,
                   keep_first_moment=False)
    if args.export_weights:
        save_state(args.export_weights, trainer.model, trainer.opt, trainer.meta, keep_moments=False)
    print(json.dumps({"done": True, "epoch": meta["epoch"], "best_exprate": meta["best_exprate"],
                      "best_epoch": meta["best_epoch"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
