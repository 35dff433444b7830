"""``abm-rt train``: the trainer (``python -m training``), when the source tree's training package is present."""
from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand (its options belong to the trainer: `abm-rt train --help`)."""
    sub.add_parser("train", help="train ABM on CROHME (see `abm-rt train --help`)", add_help=False)


def run(argv) -> int:
    """Hand the arguments to the trainer."""
    try:
        from training.__main__ import main
    except ImportError:
        print("abm-rt train: the trainer is not installed; run it from a source checkout of abm_rt "
              "(`pip install .` there) or as `python -m training`", file=sys.stderr)
        return 2
    return main(list(argv) if not isinstance(argv, argparse.Namespace) else [])
