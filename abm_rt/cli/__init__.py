"""The ``abm-rt`` command line: each subcommand parses its arguments and calls the library."""
from __future__ import annotations

import argparse
import sys

from . import build_engine, convert, evaluate, info, recognize, train

COMMANDS = {"recognize": recognize, "eval": evaluate, "info": info, "train": train,
            "build-engine": build_engine, "convert": convert}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command."""
    p = argparse.ArgumentParser(
        prog="abm-rt",
        description="abm_rt: recognize handwritten mathematical expressions (images -> LaTeX) with ABM "
                    "(AAAI 2022). Run `abm-rt COMMAND --help` for a command's options.")
    from ..version import __version__
    p.add_argument("--version", action="version", version=f"abm_rt {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``abm-rt`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:          # the trainer owns its options
        return train.run(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from ..engine_dir import EngineError
    try:
        return COMMANDS[args.command].run(args)
    except (EngineError, ValueError) as e:     # a bad engine or option: one clear line, no traceback
        print(f"abm-rt {args.command}: {e}", file=sys.stderr)
        return 2
